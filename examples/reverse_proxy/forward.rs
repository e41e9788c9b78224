//! The innermost service: forwards a request to the upstream and streams the
//! answer back.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{PathAndQuery, Uri};
use http::{Request, Response, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::timeout::{error::Elapsed, Timeout};
use tower::{BoxError, Service, ServiceExt};

use crate::problem::problem;

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Headers that describe one connection, not the message (RFC 9110 7.6.1):
/// a proxy must not pass them on.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Sends each request to the upstream on a pooled client. Never fails: an
/// unreachable upstream is a 502, one that does not answer in time a 504.
#[derive(Clone)]
pub(crate) struct Forwarder {
    // tower's ready timeout around the client bounds the wait for response
    // headers; the body then streams for as long as the upstream sends it.
    client: Timeout<Client<HttpConnector, Body>>,
    upstream: Uri,
}

impl Forwarder {
    pub(crate) fn new(upstream: Uri, timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(timeout));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector);
        Self {
            client: Timeout::new(client, timeout),
            upstream,
        }
    }

    async fn forward<B>(self, request: Request<B>) -> Response<Body>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let (mut parts, body) = request.into_parts();
        let uri = match self.upstream_uri(&parts.uri) {
            Ok(uri) => uri,
            Err(e) => {
                return problem(
                    StatusCode::BAD_REQUEST,
                    "Bad request target",
                    &e.to_string(),
                )
            }
        };
        let host = parts.headers.get(header::HOST).cloned().or_else(|| {
            let authority = parts.uri.authority()?;
            HeaderValue::from_str(authority.as_str()).ok()
        });
        let client = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(addr)| addr.ip());

        strip_hop_by_hop(&mut parts.headers);
        // The client's Host names the proxy; the upstream gets its own (the
        // client sets it from the URI) and the original in x-forwarded-host.
        parts.headers.remove(header::HOST);
        if let Some(ip) = client {
            append_forwarded_for(&mut parts.headers, &ip.to_string());
        }
        parts
            .headers
            .insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
        if let Some(host) = host {
            parts.headers.insert(X_FORWARDED_HOST, host);
        }
        parts.uri = uri;
        parts.version = http::Version::HTTP_11;

        let request = Request::from_parts(parts, Body::new(body));
        match self.client.oneshot(request).await {
            Ok(response) => {
                let (mut parts, body) = response.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                Response::from_parts(parts, Body::new(body))
            }
            Err(e) if e.is::<Elapsed>() => {
                tracing::warn!(upstream = %self.upstream, "upstream timed out");
                problem(
                    StatusCode::GATEWAY_TIMEOUT,
                    "Upstream timeout",
                    "The upstream did not answer in time.",
                )
            }
            Err(e) => {
                tracing::warn!(upstream = %self.upstream, error = %error_chain(&*e), "upstream failed");
                problem(
                    StatusCode::BAD_GATEWAY,
                    "Upstream unreachable",
                    "The upstream could not be reached or broke the connection.",
                )
            }
        }
    }

    /// The upstream base joined with the request's path and query.
    fn upstream_uri(&self, request: &Uri) -> Result<Uri, http::Error> {
        let prefix = self.upstream.path().trim_end_matches('/');
        let path_and_query = request.path_and_query().map_or("/", PathAndQuery::as_str);
        let mut parts = self.upstream.clone().into_parts();
        parts.path_and_query = Some(format!("{prefix}{path_and_query}").parse()?);
        Ok(Uri::from_parts(parts)?)
    }
}

impl<B> Service<Request<B>> for Forwarder
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The pooled client is always ready; waiting happens per request.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { Ok(this.forward(request).await) })
    }
}

/// Removes the hop-by-hop headers and those the `Connection` header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
}

fn append_forwarded_for(headers: &mut HeaderMap, ip: &str) {
    let previous: Vec<&str> = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .collect();
    let value = if previous.is_empty() {
        ip.to_owned()
    } else {
        format!("{}, {ip}", previous.join(", "))
    };
    if let Ok(value) = HeaderValue::from_str(&value) {
        headers.insert(X_FORWARDED_FOR, value);
    }
}

fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
