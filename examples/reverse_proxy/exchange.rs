//! Upstream exchanges the proxy has started: how many are running (the
//! drain on shutdown waits for them, including those whose client got its
//! 504 and went), and the upstream's response body under the abandon bound.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep};

/// Counts the upstream exchanges running, from the request being sent to
/// the response body being dropped. An atomic count, and a wake-up only when
/// it reaches zero: a watch channel here cost a lock and a notify on every
/// request (perf, BENCHMARKS.md "Reverse proxy against nginx").
#[derive(Clone)]
pub(crate) struct Exchanges {
    shared: Arc<Count>,
}

struct Count {
    running: AtomicUsize,
    idle: Notify,
}

impl Exchanges {
    pub(crate) fn new() -> Self {
        Self {
            shared: Arc::new(Count {
                running: AtomicUsize::new(0),
                idle: Notify::new(),
            }),
        }
    }

    /// An exchange starts; it ends when the answer is dropped.
    pub(crate) fn start(&self) -> Running {
        self.shared.running.fetch_add(1, Ordering::SeqCst);
        Running {
            shared: Arc::clone(&self.shared),
        }
    }

    /// How many exchanges are running.
    pub(crate) fn running(&self) -> usize {
        self.shared.running.load(Ordering::SeqCst)
    }

    /// Resolves once no exchange is running.
    pub(crate) async fn idle(&self) {
        loop {
            // Registered before the count is read: a last exchange ending
            // in between still wakes this waiter.
            let notified = self.shared.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.running() == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// One running exchange; dropping it ends it.
pub(crate) struct Running {
    shared: Arc<Count>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.shared.running.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.shared.idle.notify_waiters();
        }
    }
}

/// The error of an upstream body still arriving when its exchange was
/// abandoned.
#[derive(Debug)]
pub(crate) struct Abandoned;

impl std::fmt::Display for Abandoned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the upstream body did not end within --upstream-abandon")
    }
}

impl std::error::Error for Abandoned {}

/// The upstream's response body: its frames and its errors as they come
/// (a body cut off after its head ends with an error, never cleanly), an
/// error once `deadline` passes, and the exchange counted until it is
/// dropped.
pub(crate) struct UpstreamBody {
    body: Body,
    deadline: Option<Pin<Box<Sleep>>>,
    _running: Running,
}

impl UpstreamBody {
    pub(crate) fn new(body: Body, deadline: Option<Instant>, running: Running) -> Self {
        Self {
            body,
            deadline: deadline.map(|at| Box::pin(tokio::time::sleep_until(at))),
            _running: running,
        }
    }
}

impl http_body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.body).poll_frame(cx) {
            if frame.is_none() {
                self.deadline = None;
            }
            return Poll::Ready(frame);
        }
        let Some(deadline) = self.deadline.as_mut() else {
            return Poll::Pending;
        };
        if deadline.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        tracing::warn!("upstream body abandoned: --upstream-abandon passed");
        self.deadline = None;
        Poll::Ready(Some(Err(axum::Error::new(Abandoned))))
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
