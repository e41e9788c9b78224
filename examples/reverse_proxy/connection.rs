//! One client connection's clock: how long it may take to send a request
//! head, how long it may sit idle between requests, and how long it may
//! leave the proxy's response bytes untaken.
//!
//! The clock lives in the connection's socket ([`Watched`]), not in hyper:
//! hyper's own HTTP/1 header timeout closes without a word and also times
//! the wait between keep-alive requests, where this proxy wants a 408 for a
//! head that never completes and a separate, longer idle limit. The service
//! ([`Clock::request_started`]) tells the clock when a request is being
//! answered, so a slow upstream or a long download is never cut short.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::limits::{EdgeStats, Limits};
use crate::stream_stall::StreamProgress;

/// What an HTTP/1 client reads when its request head did not arrive in time.
const REQUEST_TIMEOUT: &[u8] = b"HTTP/1.1 408 Request Timeout\r\n\
connection: close\r\n\
content-type: text/plain\r\n\
content-length: 41\r\n\
\r\n\
The request head did not arrive in time.\n";

/// The first bytes of an HTTP/2 connection with prior knowledge.
const H2_PREFACE_START: &[u8] = b"PRI *";

/// Where a connection stands, and so which limit applies to it.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// A request head is awaited and has begun (or the connection is new):
    /// it must be complete by `deadline`.
    Head { deadline: Instant },
    /// At least one request is being answered: no connection limit applies
    /// (the body read timeout covers a slow request body).
    Busy { requests: usize },
    /// Every request is answered and nothing new has arrived: the
    /// connection is closed at `deadline`.
    Idle { deadline: Instant },
}

/// Which limit ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expired {
    Head,
    Idle,
}

/// What the connection has spoken so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    /// Too few bytes yet to tell.
    Unknown,
    Http1,
    Http2,
}

/// Shared by a connection's socket and the requests served on it.
pub(crate) struct Clock {
    phase: Mutex<Phase>,
    limits: Limits,
    /// The task reading the socket, woken when the deadline moves.
    reader: AtomicWaker,
}

impl Clock {
    pub(crate) fn new(limits: Limits) -> Arc<Self> {
        Arc::new(Self {
            phase: Mutex::new(Phase::Head {
                deadline: Instant::now() + limits.header_read_timeout,
            }),
            limits,
            reader: AtomicWaker::new(),
        })
    }

    fn phase(&self) -> MutexGuard<'_, Phase> {
        crate::lock(&self.phase)
    }

    /// A request head is complete and its answer begins; the connection's
    /// limits pause until the returned guard (kept with the response body)
    /// is dropped.
    pub(crate) fn request_started(self: &Arc<Self>) -> RequestGuard {
        let mut phase = self.phase();
        *phase = match *phase {
            Phase::Busy { requests } => Phase::Busy {
                requests: requests + 1,
            },
            Phase::Head { .. } | Phase::Idle { .. } => Phase::Busy { requests: 1 },
        };
        RequestGuard {
            clock: Arc::clone(self),
        }
    }

    fn request_finished(&self) {
        let mut phase = self.phase();
        if let Phase::Busy { requests } = *phase {
            *phase = if requests > 1 {
                Phase::Busy {
                    requests: requests - 1,
                }
            } else {
                Phase::Idle {
                    deadline: Instant::now() + self.limits.idle_timeout,
                }
            };
        }
        drop(phase);
        // The reader may be parked with no deadline armed: let it arm one.
        self.reader.wake();
    }

    /// Bytes arrived. On HTTP/1 they begin the next request head, which now
    /// has the header timeout to complete. HTTP/2 also carries frames that
    /// are no request (PING, WINDOW_UPDATE), so there the idle deadline stays.
    fn bytes_arrived(&self, protocol: Protocol) {
        let mut phase = self.phase();
        if let Phase::Idle { .. } = *phase {
            if protocol != Protocol::Http2 {
                *phase = Phase::Head {
                    deadline: Instant::now() + self.limits.header_read_timeout,
                };
            }
        }
    }

    fn deadline(&self) -> Option<(Instant, Expired)> {
        match *self.phase() {
            Phase::Head { deadline } => Some((deadline, Expired::Head)),
            Phase::Idle { deadline } => Some((deadline, Expired::Idle)),
            Phase::Busy { .. } => None,
        }
    }
}

/// Marks one request as being answered; dropping it (with the response
/// body, or the response future when the client leaves first) ends it.
pub(crate) struct RequestGuard {
    clock: Arc<Clock>,
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.clock.request_finished();
    }
}

/// The response body as the edge serves it: it ends its request when it is
/// dropped, and on HTTP/2 tells its stream's watch when it waits for hyper
/// to take a frame (`stream_stall.rs`: a client that takes none of it for
/// the write timeout has the stream reset).
pub(crate) struct Guarded<B> {
    body: B,
    _request: RequestGuard,
    /// Found on the first poll (the body is made outside the stream's task).
    stream: Option<StreamProgress>,
    looked: bool,
}

impl<B> Guarded<B> {
    pub(crate) fn new(body: B, request: RequestGuard) -> Self {
        Self {
            body,
            _request: request,
            stream: None,
            looked: false,
        }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Guarded<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        if !this.looked {
            this.looked = true;
            this.stream = StreamProgress::current();
        }
        let Some(stream) = &this.stream else {
            return Pin::new(&mut this.body).poll_frame(cx);
        };
        stream.asked();
        let frame = Pin::new(&mut this.body).poll_frame(cx);
        if let Poll::Ready(Some(Ok(_))) = &frame {
            stream.handed();
        }
        frame
    }

    /// On HTTP/2 the end is told by a last, empty poll rather than ahead:
    /// told ahead, hyper sends a frame marked as the stream's end and stops
    /// watching the stream, while its bytes may still wait for the client's
    /// window. Asked for the end, hyper first waits for room for the last
    /// frame, and that wait is watched like the others.
    fn is_end_stream(&self) -> bool {
        self.stream.is_none() && self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A client socket that ends the connection when its clock runs out: a
/// request head not complete in time gets a 408 (on HTTP/1) and the
/// connection is closed; an idle connection reads as closed by the client.
pub(crate) struct Watched<IO> {
    io: IO,
    clock: Arc<Clock>,
    stats: Arc<EdgeStats>,
    timer: Pin<Box<Sleep>>,
    protocol: Protocol,
    first_bytes: Vec<u8>,
    expired: Option<Expired>,
    /// Runs while a write waits for the client to take bytes.
    write_timer: Pin<Box<Sleep>>,
    /// When the waiting write gives up; `None` while writes go through.
    write_deadline: Option<Instant>,
}

impl<IO> Watched<IO> {
    pub(crate) fn new(io: IO, clock: Arc<Clock>, stats: Arc<EdgeStats>) -> Self {
        Self {
            io,
            clock,
            stats,
            timer: Box::pin(tokio::time::sleep_until(Instant::now())),
            protocol: Protocol::Unknown,
            first_bytes: Vec::new(),
            expired: None,
            write_timer: Box::pin(tokio::time::sleep_until(Instant::now())),
            write_deadline: None,
        }
    }

    /// Passes a write's answer through; a write that has waited for the
    /// client longer than the response write timeout fails instead, and
    /// hyper closes the connection (every stream on HTTP/2).
    fn timed_write<T>(
        &mut self,
        cx: &mut Context<'_>,
        answer: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if answer.is_ready() {
            self.write_deadline = None;
            return answer;
        }
        let deadline = match self.write_deadline {
            Some(deadline) => deadline,
            None => {
                let deadline = Instant::now() + self.clock.limits.response_write_timeout;
                self.write_timer.as_mut().reset(deadline);
                self.write_deadline = Some(deadline);
                deadline
            }
        };
        match self.write_timer.as_mut().poll(cx) {
            Poll::Ready(()) => {
                EdgeStats::incr(&self.stats.write_timeouts);
                tracing::debug!(
                    waited = ?self.clock.limits.response_write_timeout,
                    ?deadline,
                    "the client took no response bytes in time; closing the connection"
                );
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the client took no response bytes in time",
                )))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    /// Tells HTTP/2 prior knowledge from HTTP/1 by the first bytes.
    fn learn_protocol(&mut self, read: &[u8]) {
        if self.protocol != Protocol::Unknown {
            return;
        }
        let wanted = H2_PREFACE_START.len() - self.first_bytes.len();
        self.first_bytes
            .extend_from_slice(&read[..read.len().min(wanted)]);
        if self.first_bytes.len() == H2_PREFACE_START.len() {
            self.protocol = if self.first_bytes == H2_PREFACE_START {
                Protocol::Http2
            } else {
                Protocol::Http1
            };
            self.first_bytes = Vec::new();
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> Watched<IO> {
    /// Ends the connection for `why`: answers what hyper reads from now on.
    fn expire(&mut self, why: Expired, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match why {
            Expired::Head => {
                EdgeStats::incr(&self.stats.header_timeouts);
                if self.protocol != Protocol::Http2 {
                    // Best effort: the client may not be reading either.
                    if let Poll::Ready(Ok(_)) =
                        Pin::new(&mut self.io).poll_write(cx, REQUEST_TIMEOUT)
                    {
                        let _ = Pin::new(&mut self.io).poll_flush(cx);
                    }
                }
                tracing::debug!("request head not received in time; closing the connection");
            }
            Expired::Idle => {
                EdgeStats::incr(&self.stats.idle_closed);
                tracing::debug!("connection idle too long; closing it");
            }
        }
        self.expired = Some(why);
        Self::answer_expired(why)
    }

    fn answer_expired(why: Expired) -> Poll<io::Result<()>> {
        match why {
            Expired::Head => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "request head not received in time",
            ))),
            // The end of the stream: hyper closes an idle connection quietly.
            Expired::Idle => Poll::Ready(Ok(())),
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for Watched<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some(why) = this.expired {
            return Self::answer_expired(why);
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let read = &buf.filled()[before..];
                if !read.is_empty() {
                    this.learn_protocol(read);
                    this.clock.bytes_arrived(this.protocol);
                }
                return Poll::Ready(Ok(()));
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => {}
        }
        // Nothing to read: register before looking at the deadline, so a
        // request ending in between still wakes this task.
        this.clock.reader.register(cx.waker());
        let Some((deadline, why)) = this.clock.deadline() else {
            return Poll::Pending;
        };
        if this.timer.deadline() != deadline {
            this.timer.as_mut().reset(deadline);
        }
        match this.timer.as_mut().poll(cx) {
            Poll::Ready(()) => this.expire(why, cx),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Watched<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let answer = Pin::new(&mut self.io).poll_write(cx, buf);
        self.timed_write(cx, answer)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let answer = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.timed_write(cx, answer)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let answer = Pin::new(&mut self.io).poll_flush(cx);
        self.timed_write(cx, answer)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
