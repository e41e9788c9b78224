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
//! the response body writes to ([`StreamProgress`]), how long the body has
//! waited for hyper to take its next frame. Past the limit the watch drops
//! the stream's future, and h2 resets a stream whose last handle is dropped
//! (RST_STREAM with CANCEL). The action's result is recorded all the same:
//! the idempotency layer's body is dropped, the disconnect case.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

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
        *crate::lock(&self.waiting_since) = waiting_since;
    }

    fn waiting_since(&self) -> Option<Instant> {
        *crate::lock(&self.waiting_since)
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
        if this.timer.deadline() != deadline {
            this.timer.as_mut().reset(deadline);
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

/// The HTTP/2 stream a response body is sent on, as the body sees it: the
/// response body ([`crate::connection::Guarded`]) reports when it hands
/// hyper a frame and when hyper is back for the next.
pub(crate) struct StreamProgress(Arc<Progress>);

impl StreamProgress {
    /// The stream being polled, if this runs in one (an HTTP/2 stream's
    /// task, under [`StreamExecutor`]); `None` on HTTP/1.
    pub(crate) fn current() -> Option<Self> {
        STREAM.try_with(|progress| Self(Arc::clone(progress))).ok()
    }

    /// hyper is back for a frame: whatever it waited for has come.
    pub(crate) fn asked(&self) {
        self.0.set(None);
    }

    /// A frame was handed to hyper: the wait for the client starts.
    pub(crate) fn handed(&self) {
        self.0.set(Some(Instant::now()));
    }
}
