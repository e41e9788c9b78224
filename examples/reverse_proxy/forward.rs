//! The innermost service: forwards a request to the upstream and streams the
//! answer back.
//!
//! Once the request may have reached the upstream, the forwarder never
//! answers as if nothing ran: a failure other than a connect error, or the
//! exchange outliving `--upstream-abandon`, is a 502/504 carrying
//! [`OutcomeUnknown`], so the idempotency layer leaves the key to its
//! marker instead of releasing it; a body cut off after its head ends with
//! an error, which the layer treats the same way. A connect error (nothing
//! was sent) is a plain 502, and the key is released. A gRPC call gets
//! these answers as gRPC statuses (`UNAVAILABLE`, `DEADLINE_EXCEEDED`).
//!
//! With `--upstream-http2` the upstream is spoken to in HTTP/2 with prior
//! knowledge (h2c), as a gRPC server expects. Either way `TE: trailers` is
//! passed on, and trailers flow both ways: the bodies are handed over frame
//! by frame, trailer frames included.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
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
use tower::{BoxError, Service};
use tower_idempotency::OutcomeUnknown;

use crate::deadline::UpstreamClock;
use crate::exchange::{Exchanges, UpstreamBody};
use crate::problem::{self, is_grpc};
use crate::upstream_link::{Dialer, LinkError, UpstreamLink};

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Headers that describe one connection, not the message (RFC 9110 7.6.1):
/// a proxy must not pass them on. `TE: trailers` is passed on all the same
/// (see [`accepts_trailers`]): gRPC needs it.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Sends each request to the upstream, on its client connection's own
/// upstream connection (`upstream_link.rs`) or a pooled client. Never fails: an
/// unreachable upstream is a 502; one that fails after the request was sent
/// a 502, and one that outlives `abandon` a 504, both [`OutcomeUnknown`].
/// The client-facing timeout is [`UpstreamDeadline`](crate::deadline), above
/// the idempotency layer.
#[derive(Clone)]
pub(crate) struct Forwarder {
    // One reference count per request instead of the client's several.
    shared: Arc<Shared>,
}

struct Shared {
    client: Client<HttpConnector, Body>,
    // How a client connection's own upstream connection is opened (HTTP/1
    // upstreams; `upstream_link.rs`).
    dialer: Option<Dialer>,
    upstream: Uri,
    // HTTP/2 with prior knowledge (`--upstream-http2`).
    http2: bool,
    // The upstream's path prefix without its trailing `/` ("" for none: the
    // request's path and query then go as they are, not re-parsed).
    prefix: String,
    // The longest an exchange (head and, for a keyed request, body) is kept.
    abandon: Duration,
    exchanges: Exchanges,
}

impl Forwarder {
    /// `connect_timeout` bounds opening a connection (nothing is sent before);
    /// `http2` speaks HTTP/2 with prior knowledge.
    pub(crate) fn new(
        upstream: Uri,
        http2: bool,
        connect_timeout: Duration,
        abandon: Duration,
        exchanges: Exchanges,
    ) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(connect_timeout));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .http2_only(http2)
            .build(connector);
        let prefix = upstream.path().trim_end_matches('/').to_owned();
        let dialer = if http2 {
            None
        } else {
            Dialer::new(&upstream, connect_timeout)
        };
        Self {
            shared: Arc::new(Shared {
                client,
                dialer,
                upstream,
                http2,
                prefix,
                abandon,
                exchanges,
            }),
        }
    }

    async fn forward<B>(&self, request: Request<B>) -> Response<Body>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let (mut parts, body) = request.into_parts();
        let grpc = is_grpc(&parts.headers);
        let this = &*self.shared;
        let uri = match this.upstream_uri(&parts.uri) {
            Ok(uri) => uri,
            Err(e) => {
                return problem::answer(
                    grpc,
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
        let clock = parts.extensions.remove::<UpstreamClock>();
        let link = parts.extensions.remove::<UpstreamLink>();

        let te_trailers = accepts_trailers(&parts.headers);
        strip_hop_by_hop(&mut parts.headers);
        if te_trailers {
            parts
                .headers
                .insert(header::TE, HeaderValue::from_static("trailers"));
        }
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
        parts.version = if this.http2 {
            http::Version::HTTP_2
        } else {
            http::Version::HTTP_11
        };

        let request = Request::from_parts(parts, Body::new(body));
        let running = this.exchanges.start();
        let abandon_at = tokio::time::Instant::now() + this.abandon;
        if let Some(clock) = &clock {
            clock.sent();
        }
        let keyed = clock.as_ref().is_none_or(UpstreamClock::keyed);
        let exchange = this.exchange(request, link);
        // The abandon bound is for exchanges that hold a key (and so may run
        // on after their client's 504); a request without one is bounded by
        // the upstream deadline above, which drops it, and one timer per
        // request is enough.
        let answer = if keyed {
            tokio::time::timeout_at(abandon_at, exchange).await
        } else {
            Ok(exchange.await)
        };
        if let Some(clock) = &clock {
            clock.answered();
        }
        match answer {
            Ok(Ok(response)) => {
                let (mut parts, body) = response.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                // A keyed exchange holds its key while its body streams: it
                // is bounded too. Other bodies stream as long as they last.
                let bound = keyed.then_some(abandon_at);
                let body = UpstreamBody::new(body, bound, running);
                Response::from_parts(parts, Body::new(body))
            }
            Ok(Err(Failure::Connect(e))) => {
                let error = error_chain(&*e);
                tracing::warn!(upstream = %this.upstream, error, "upstream unreachable");
                problem::answer(
                    grpc,
                    StatusCode::BAD_GATEWAY,
                    "Upstream unreachable",
                    "The upstream could not be reached; nothing was sent to it.",
                )
            }
            Ok(Err(Failure::Sent(e))) => {
                let error = error_chain(&*e);
                tracing::warn!(upstream = %this.upstream, error, "upstream failed, request sent");
                outcome_unknown(
                    StatusCode::BAD_GATEWAY,
                    "Upstream failed",
                    "The upstream broke the connection after the request was sent.",
                    keyed,
                    grpc,
                )
            }
            Err(_) => {
                let abandon = this.abandon;
                tracing::warn!(upstream = %this.upstream, ?abandon, "upstream exchange abandoned");
                outcome_unknown(
                    StatusCode::GATEWAY_TIMEOUT,
                    "Upstream timeout",
                    "The upstream did not answer within --upstream-abandon.",
                    keyed,
                    grpc,
                )
            }
        }
    }
}

/// Why an exchange got no answer from the upstream.
enum Failure {
    /// No connection could be opened: nothing was sent.
    Connect(BoxError),
    /// The request was (or may have been) sent.
    Sent(BoxError),
}

impl Shared {
    /// Sends `request` on the client connection's own upstream connection
    /// when it has a `link` (HTTP/1 both sides), else, or when the link's
    /// connection could not send it, on the pool.
    async fn exchange(
        &self,
        request: Request<Body>,
        link: Option<UpstreamLink>,
    ) -> Result<Response<Body>, Failure> {
        let request = match (link, &self.dialer) {
            (Some(link), Some(dialer)) => match link.send(dialer, request).await {
                Ok(response) => return Ok(response),
                Err(LinkError::Connect(e)) => return Err(Failure::Connect(e)),
                Err(LinkError::Sent(e)) => return Err(Failure::Sent(e.into())),
                Err(LinkError::Unsent(request)) => *request,
            },
            _ => request,
        };
        match self.client.request(request).await {
            Ok(response) => Ok(response.map(Body::new)),
            Err(e) if e.is_connect() => Err(Failure::Connect(e.into())),
            Err(e) => Err(Failure::Sent(e.into())),
        }
    }

    /// The upstream base joined with the request's path and query.
    fn upstream_uri(&self, request: &Uri) -> Result<Uri, http::Error> {
        let path_and_query = match (self.prefix.as_str(), request.path_and_query()) {
            // No prefix: the request's own path and query, shared, not parsed again.
            ("", Some(path_and_query)) => path_and_query.clone(),
            (prefix, path_and_query) => {
                let path_and_query = path_and_query.map_or("/", PathAndQuery::as_str);
                format!("{prefix}{path_and_query}").parse()?
            }
        };
        let mut parts = http::uri::Parts::default();
        parts.scheme = self.upstream.scheme().cloned();
        parts.authority = self.upstream.authority().cloned();
        parts.path_and_query = Some(path_and_query);
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
        // Both the link and the pooled client are always ready; waiting
        // happens per request.
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

/// Whether the client accepts trailers (`TE: trailers`, as a gRPC client
/// sends): the one `TE` value passed on.
fn accepts_trailers(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::TE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|coding| {
            let coding = coding.split(';').next().unwrap_or("").trim();
            coding.eq_ignore_ascii_case("trailers")
        })
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

/// The answer for an exchange that may have reached the upstream (a gRPC
/// status for a gRPC call, problem+json otherwise): it carries
/// [`OutcomeUnknown`], so the key is left to its marker.
fn outcome_unknown(
    status: StatusCode,
    title: &str,
    what: &str,
    keyed: bool,
    grpc: bool,
) -> Response<Body> {
    let conflict = if grpc { "ABORTED" } else { "409" };
    let detail = if keyed {
        format!(
            "{what} Whether it acted is not known: a retry with the same Idempotency-Key \
             gets {conflict} until the key's in-flight marker expires (--lease-ttl)."
        )
    } else {
        format!("{what} Whether it acted is not known.")
    };
    let mut response = problem::answer(grpc, status, title, &detail);
    response.extensions_mut().insert(OutcomeUnknown);
    response
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
