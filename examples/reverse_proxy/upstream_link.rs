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
//!
//! The connection runs in no task of its own: whoever waits on it drives
//! it, the request's future until the response head, then the response
//! body until its end, when the connection goes back to the link. A request
//! thus crosses no channel to another task and back (hyper's dispatch
//! channel and oneshot are still used, but polled in the same task), and
//! the connection never waits on a task that is not its client's.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::uri::{PathAndQuery, Uri};
use http::{Request, Response};
use http_body::{Body as _, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::{Connection, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tower::BoxError;

/// One client connection's upstream connection, shared by its requests (a
/// request extension); empty until the first request opens it.
#[derive(Clone, Default)]
pub(crate) struct UpstreamLink {
    held: Arc<Mutex<Option<Held>>>,
}

/// hyper's HTTP/1 client connection over a TCP stream: the future that
/// does the connection's reading and writing.
type UpstreamConnection = Pin<Box<Connection<TokioIo<TcpStream>, Body>>>;

/// An upstream connection and the handle that sends on it.
struct Held {
    sender: SendRequest<Body>,
    /// `None` once it has ended.
    connection: Option<UpstreamConnection>,
}

impl Held {
    /// Drives the connection; `true` once it has ended (closed or failed).
    /// An ended connection is dropped at once: a request queued on it and
    /// never written is then handed back (hyper answers it `canceled`, with
    /// the request), instead of waiting for a connection nobody polls.
    fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(connection) = &mut self.connection else {
            return true;
        };
        match connection.as_mut().poll(cx) {
            Poll::Ready(ended) => {
                if let Err(error) = ended {
                    tracing::debug!(%error, "upstream connection ended with an error");
                }
                self.connection = None;
                true
            }
            Poll::Pending => false,
        }
    }

    /// Whether the connection can take a request now: it has not ended
    /// while idle (the upstream closing it shows as soon as it is polled:
    /// nothing polls an idle link), and no exchange is left on it.
    fn usable(&mut self) -> bool {
        !self.drive(&mut Context::from_waker(Waker::noop())) && self.sender.is_ready()
    }
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

    async fn open(&self) -> Result<Held, BoxError> {
        let connect = TcpStream::connect((self.host.as_str(), self.port));
        let stream = tokio::time::timeout(self.connect_timeout, connect)
            .await
            .map_err(|_| "connect timed out")??;
        // As the pooled client's connector: no Nagle delay on a request's
        // last write.
        stream.set_nodelay(true)?;
        let (sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        Ok(Held {
            sender,
            connection: Some(Box::pin(connection)),
        })
    }
}

impl UpstreamLink {
    fn slot(&self) -> MutexGuard<'_, Option<Held>> {
        crate::lock(&self.held)
    }

    /// Gives a connection back to the link (unless another took its place).
    fn put_back(&self, held: Held) {
        let mut slot = self.slot();
        if slot.is_none() {
            *slot = Some(held);
        }
    }

    /// Sends `request` (its URI absolute, as the pool takes it) on this
    /// link's connection, opening one when the link has none usable.
    pub(crate) async fn send(
        &self,
        dialer: &Dialer,
        request: Request<Body>,
    ) -> Result<Response<Body>, LinkError> {
        // Taken out while in use: a request arriving meanwhile finds the
        // slot empty and goes to the pool. A connection that ended or is
        // still busy is dropped here.
        let taken = self.slot().take();
        let usable = taken.and_then(|mut held| held.usable().then_some(held));
        let mut held = match usable {
            Some(held) => held,
            None => dialer.open().await.map_err(LinkError::Connect)?,
        };
        let absolute = request.uri().clone();
        let (mut parts, body) = request.into_parts();
        parts.uri = origin_form(&absolute);
        parts
            .headers
            .insert(header::HOST, dialer.host_header.clone());
        let mut answer = std::pin::pin!(held
            .sender
            .try_send_request(Request::from_parts(parts, body)));
        let answer = std::future::poll_fn(|cx| {
            // The connection writes the request and reads the head.
            held.drive(cx);
            answer.as_mut().poll(cx)
        })
        .await;
        match answer {
            Ok(response) => {
                let (parts, body) = response.into_parts();
                let held = held.connection.is_some().then_some(held);
                if body.is_end_stream() {
                    // Nothing to read: the connection is free at once.
                    if let Some(held) = held {
                        self.put_back(held);
                    }
                    return Ok(Response::from_parts(parts, Body::new(body)));
                }
                let body = LinkBody {
                    body,
                    held,
                    link: self.clone(),
                };
                Ok(Response::from_parts(parts, Body::new(body)))
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

/// An upstream response body that drives its connection while it is read
/// and gives the connection back to the link at its end. Dropped before its
/// end, it closes the connection (the rest of the answer is still on it).
struct LinkBody {
    body: Incoming,
    /// `None` once the connection ended or went back to the link.
    held: Option<Held>,
    link: UpstreamLink,
}

impl http_body::Body for LinkBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        if let Some(held) = &mut this.held {
            if held.drive(cx) {
                this.held = None;
            }
        }
        let frame = Pin::new(&mut this.body).poll_frame(cx);
        let done = match &frame {
            Poll::Ready(None) => true,
            Poll::Ready(Some(Ok(_))) => this.body.is_end_stream(),
            // A failed body leaves the connection in no state to reuse.
            Poll::Ready(Some(Err(_))) => {
                this.held = None;
                false
            }
            Poll::Pending => false,
        };
        if done {
            if let Some(held) = this.held.take() {
                this.link.put_back(held);
            }
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
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
