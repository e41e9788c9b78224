//! HTTP/2: a stream whose client takes none of its response for
//! `--response-write-timeout` is reset, while the connection's other streams
//! go on.
//!
//! On HTTP/1 a client that stops reading fills the socket, and the socket's
//! clock ([`crate::connection::Watched`]) closes the connection. On HTTP/2
//! the socket keeps flowing: the client holds one stream by sending no
//! WINDOW_UPDATE for it, and hyper then waits for send capacity without
//! polling the response body again, so no timer in the body can fire. What
//! hyper does hand out is each stream's future, to the executor: this
//! executor runs every stream under a watch that sees, through a task-local
//! the response body writes to ([`StallWatched`]), how long the body has
//! waited for hyper to take its next frame. Past the limit the watch drops
//! the stream's future, and h2 resets a stream whose last handle is dropped
//! (RST_STREAM with CANCEL). The action's result is recorded all the same:
//! the idempotency layer's body is dropped, the disconnect case.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use crate::limits::EdgeStats;

tokio::task_local! {
    /// The progress of the HTTP/2 stream being polled, if any.
    static STREAM: Arc<Progress>;
}

/// When the stream's response body last handed hyper a frame that hyper has
/// not yet come back for.
#[derive(Debug, Default)]
struct Progress {
    waiting_since: Mutex<Option<Instant>>,
}

impl Progress {
    fn set(&self, waiting_since: Option<Instant>) {
        // A panic while holding this lock leaves a plain value behind.
        *self
            .waiting_since
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = waiting_since;
    }

    fn waiting_since(&self) -> Option<Instant> {
        *self
            .waiting_since
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// hyper's executor for the server's HTTP/2 streams: spawns each on tokio
/// under a [`Watch`].
#[derive(Debug, Clone)]
pub(crate) struct StreamExecutor {
    write_timeout: Duration,
    stats: Arc<EdgeStats>,
}

impl StreamExecutor {
    pub(crate) fn new(write_timeout: Duration, stats: Arc<EdgeStats>) -> Self {
        Self {
            write_timeout,
            stats,
        }
    }
}

impl<F> hyper::rt::Executor<F> for StreamExecutor
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, stream: F) {
        tokio::spawn(Watch {
            stream,
            progress: Arc::default(),
            timer: tokio::time::sleep_until(Instant::now()),
            armed_for: None,
            write_timeout: self.write_timeout,
            stats: Arc::clone(&self.stats),
        });
    }
}

pin_project! {
    /// One HTTP/2 stream's future, ended (and so reset) when its client has
    /// taken none of the response for the write timeout.
    struct Watch<F> {
        #[pin]
        stream: F,
        progress: Arc<Progress>,
        #[pin]
        timer: Sleep,
        armed_for: Option<Instant>,
        write_timeout: Duration,
        stats: Arc<EdgeStats>,
    }
}

impl<F: Future<Output = ()>> Future for Watch<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        let progress = Arc::clone(this.progress);
        if STREAM
            .sync_scope(progress, || this.stream.as_mut().poll(cx))
            .is_ready()
        {
            return Poll::Ready(());
        }
        let Some(since) = this.progress.waiting_since() else {
            return Poll::Pending;
        };
        let deadline = since + *this.write_timeout;
        if *this.armed_for != Some(deadline) {
            this.timer.as_mut().reset(deadline);
            *this.armed_for = Some(deadline);
        }
        match this.timer.poll(cx) {
            Poll::Ready(()) => {
                EdgeStats::incr(&this.stats.write_timeouts);
                tracing::debug!(
                    waited = ?this.write_timeout,
                    "the client took none of an HTTP/2 response in time; resetting the stream"
                );
                Poll::Ready(())
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// A response body that tells its HTTP/2 stream's [`Watch`] when it waits
/// for hyper to take a frame. Outside an HTTP/2 stream it passes through.
pub(crate) struct StallWatched<B> {
    body: B,
    /// Found on the first poll (the body is made outside the stream's task).
    progress: Option<Arc<Progress>>,
    looked: bool,
}

impl<B> StallWatched<B> {
    pub(crate) fn new(body: B) -> Self {
        Self {
            body,
            progress: None,
            looked: false,
        }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for StallWatched<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        if !this.looked {
            this.looked = true;
            this.progress = STREAM.try_with(Arc::clone).ok();
        }
        let Some(progress) = &this.progress else {
            return Pin::new(&mut this.body).poll_frame(cx);
        };
        // hyper is back for a frame: whatever it waited for has come.
        progress.set(None);
        let frame = Pin::new(&mut this.body).poll_frame(cx);
        if let Poll::Ready(Some(Ok(_))) = &frame {
            progress.set(Some(Instant::now()));
        }
        frame
    }

    /// On HTTP/2 the end is told by a last, empty poll rather than ahead:
    /// hyper sends a frame marked as the stream's end and stops watching
    /// the stream, while its bytes may still wait for the client's window.
    /// Asked for the end, hyper first waits for room for the last frame,
    /// and that wait is watched like the others.
    fn is_end_stream(&self) -> bool {
        self.progress.is_none() && self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
