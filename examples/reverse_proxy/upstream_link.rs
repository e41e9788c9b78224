//! A client connection's own upstream connection, for HTTP/1 clients of an
//! HTTP/1 upstream.
//!
//! An HTTP/1 client connection sends one request at a time, so it can keep
//! one upstream connection for itself, opened on its first request and
//! closed with it. That skips the shared pool's checkout (a lock, a lookup,
//! a connect-or-wait race) on every request: on one CPU, a bare hyper proxy
//! forwarded 31-33 k requests/s through hyper-util's pooled client and
//! 36.5 k with a connection per client connection (BENCHMARKS.md, "Reverse
//! proxy against nginx"). The pool stays for what a link cannot take: HTTP/2
//! (a client's streams run side by side, and `--upstream-http2`), and a
//! request arriving while the link's connection is still busy with an
//! earlier exchange (one handed off to the background after its client got
//! a 504). A request the link's connection could not send (the upstream
//! closed it while idle) goes to the pool too: nothing of it reached the
//! upstream.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::Body;
use http::header::{self, HeaderValue};
use http::uri::{PathAndQuery, Uri};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tower::BoxError;

/// One client connection's upstream connection, shared by its requests (a
/// request extension); empty until the first request opens it.
#[derive(Clone, Default)]
pub(crate) struct UpstreamLink {
    sender: Arc<Mutex<Option<SendRequest<Body>>>>,
}

/// How a link opens its connection: the upstream's address and the `Host`
/// its requests carry.
pub(crate) struct Dialer {
    host: String,
    port: u16,
    host_header: HeaderValue,
    connect_timeout: Duration,
}

/// Why a request did not get its answer over a link.
pub(crate) enum LinkError {
    /// Nothing was sent: the request, as it was given, for the pool (boxed:
    /// the rare case should not widen every answer).
    Unsent(Box<Request<Body>>),
    /// No connection could be opened; nothing was sent.
    Connect(BoxError),
    /// The connection failed after the request was (or may have been) sent.
    Sent(hyper::Error),
}

impl Dialer {
    /// `None` when `upstream` has no host.
    pub(crate) fn new(upstream: &Uri, connect_timeout: Duration) -> Option<Self> {
        let authority = upstream.authority()?;
        Some(Self {
            // An IPv6 literal without its brackets, as the resolver takes it.
            host: authority
                .host()
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            port: authority.port_u16().unwrap_or(80),
            host_header: HeaderValue::from_str(authority.as_str()).ok()?,
            connect_timeout,
        })
    }

    async fn open(&self) -> Result<SendRequest<Body>, BoxError> {
        let connect = TcpStream::connect((self.host.as_str(), self.port));
        let stream = tokio::time::timeout(self.connect_timeout, connect)
            .await
            .map_err(|_| "connect timed out")??;
        // As the pooled client's connector: no Nagle delay on a request's
        // last write.
        stream.set_nodelay(true)?;
        let (sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }
}

impl UpstreamLink {
    fn slot(&self) -> MutexGuard<'_, Option<SendRequest<Body>>> {
        // A panic while holding this lock leaves a plain value behind.
        self.sender
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Sends `request` (its URI absolute, as the pool takes it) on this
    /// link's connection, opening one when the link has none ready.
    pub(crate) async fn send(
        &self,
        dialer: &Dialer,
        request: Request<Body>,
    ) -> Result<Response<Incoming>, LinkError> {
        // Taken out while in use: a request arriving meanwhile finds the
        // slot empty and goes to the pool. A connection that is busy or
        // closed is dropped here.
        let ready = self.slot().take().filter(SendRequest::is_ready);
        let mut sender = match ready {
            Some(sender) => sender,
            None => dialer.open().await.map_err(LinkError::Connect)?,
        };
        let absolute = request.uri().clone();
        let (mut parts, body) = request.into_parts();
        parts.uri = origin_form(&absolute);
        parts
            .headers
            .insert(header::HOST, dialer.host_header.clone());
        match sender
            .try_send_request(Request::from_parts(parts, body))
            .await
        {
            Ok(response) => {
                let mut slot = self.slot();
                if slot.is_none() {
                    *slot = Some(sender);
                }
                Ok(response)
            }
            Err(mut failed) => match failed.take_message() {
                Some(request) => {
                    let (mut parts, body) = request.into_parts();
                    parts.uri = absolute;
                    parts.headers.remove(header::HOST);
                    Err(LinkError::Unsent(Box::new(Request::from_parts(
                        parts, body,
                    ))))
                }
                None => Err(LinkError::Sent(failed.into_error())),
            },
        }
    }
}

/// The path and query of `uri` alone, as an HTTP/1 request line carries it.
fn origin_form(uri: &Uri) -> Uri {
    let path_and_query = uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    Uri::from(path_and_query)
}
