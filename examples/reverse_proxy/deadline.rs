//! The client-facing `--upstream-timeout`, above the idempotency layer.
//!
//! The clock starts when the forwarder sends the request upstream (not
//! while the layer reads the request body or a duplicate waits on the first
//! under `--concurrent wait`) and stops at the upstream's response head.
//! When it runs out, the client gets its 504 at once and the layer's
//! response future is dropped: under `Disconnect::Complete` the layer hands
//! what is left of the exchange to a task, which keeps the lease renewed,
//! awaits the upstream (up to `--upstream-abandon`, in the forwarder) and
//! records what arrives. A retry with the same key gets 409 while the
//! exchange goes on (or, under `--concurrent wait`, waits for it) and the
//! upstream's own answer after it: the upstream runs once. Once the upstream
//! request may have been sent, only a definite answer or the key's marker
//! running out frees the key. A gRPC call gets `DEADLINE_EXCEEDED` instead
//! of the 504 (and `ABORTED` instead of the 409).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use futures_util::task::AtomicWaker;
use http::{Method, Request, Response, StatusCode};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower::{BoxError, Layer, Service};

use crate::problem::{answer, is_grpc};

/// The methods the proxy's idempotency layer protects (it is built with
/// exactly these).
pub(crate) const PROTECTED_METHODS: [Method; 2] = [Method::POST, Method::PATCH];

/// Where one request's upstream exchange is, as the forwarder reports it.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Not sent upstream yet: no deadline.
    Waiting,
    /// Sent at this instant; the head has not come.
    Sent(Instant),
    /// The forwarder has its answer (the upstream's head, or its own error).
    Answered,
}

/// What the forwarder ticks and the deadline's future reads. A lock held
/// for a copy and a waker, not a channel: a watch channel and a boxed
/// future here cost a few percent of the forwarding path (perf).
struct Shared {
    phase: Mutex<Phase>,
    /// The deadline's future, woken when the phase moves.
    watcher: AtomicWaker,
}

impl Shared {
    fn phase(&self) -> MutexGuard<'_, Phase> {
        crate::lock(&self.phase)
    }

    fn set(&self, phase: Phase) {
        *self.phase() = phase;
        self.watcher.wake();
    }
}

/// A request extension the forwarder ticks as the exchange goes on.
#[derive(Clone)]
pub(crate) struct UpstreamClock {
    shared: Arc<Shared>,
    keyed: bool,
}

impl UpstreamClock {
    /// The request is about to be sent upstream.
    pub(crate) fn sent(&self) {
        self.shared.set(Phase::Sent(Instant::now()));
    }

    /// The forwarder has its answer.
    pub(crate) fn answered(&self) {
        self.shared.set(Phase::Answered);
    }

    /// Whether the idempotency layer holds a key for this request (a
    /// protected method carrying `Idempotency-Key`).
    pub(crate) fn keyed(&self) -> bool {
        self.keyed
    }
}

/// Applies [`UpstreamDeadline`].
#[derive(Clone)]
pub(crate) struct UpstreamDeadlineLayer {
    timeout: Duration,
}

impl UpstreamDeadlineLayer {
    pub(crate) fn new(timeout: Duration) -> Self {
        Self { timeout }
    }
}

impl<S> Layer<S> for UpstreamDeadlineLayer {
    type Service = UpstreamDeadline<S>;

    fn layer(&self, inner: S) -> UpstreamDeadline<S> {
        UpstreamDeadline {
            inner,
            timeout: self.timeout,
        }
    }
}

/// Answers 504 problem+json (gRPC: `DEADLINE_EXCEEDED`) when the upstream's
/// head has not come within `timeout` of the request being sent, dropping
/// the inner future.
#[derive(Clone)]
pub(crate) struct UpstreamDeadline<S> {
    inner: S,
    timeout: Duration,
}

impl<S, B> Service<Request<Body>> for UpstreamDeadline<S>
where
    S: Service<Request<Body>, Response = Response<B>>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = DeadlineFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        let keyed = PROTECTED_METHODS.contains(request.method())
            && request.headers().contains_key("idempotency-key");
        let grpc = is_grpc(request.headers());
        let shared = Arc::new(Shared {
            phase: Mutex::new(Phase::Waiting),
            watcher: AtomicWaker::new(),
        });
        request.extensions_mut().insert(UpstreamClock {
            shared: Arc::clone(&shared),
            keyed,
        });
        DeadlineFuture {
            answer: self.inner.call(request),
            timer: None,
            shared,
            timeout: self.timeout,
            keyed,
            grpc,
        }
    }
}

pin_project! {
    /// The inner service's answer, or the 504 when the upstream's head is
    /// late (the inner future is then dropped with this one).
    pub(crate) struct DeadlineFuture<F> {
        #[pin]
        answer: F,
        // Armed once the request is sent.
        #[pin]
        timer: Option<Sleep>,
        shared: Arc<Shared>,
        timeout: Duration,
        keyed: bool,
        grpc: bool,
    }
}

impl<F, B, E> Future for DeadlineFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Output = Result<Response<Body>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if let Poll::Ready(answer) = this.answer.poll(cx) {
            return Poll::Ready(answer.map(|response| response.map(Body::new)));
        }
        // Registered before the phase is read: a tick in between wakes us.
        this.shared.watcher.register(cx.waker());
        let sent_at = match *this.shared.phase() {
            Phase::Sent(at) => at,
            // No deadline before the request is sent, nor once answered.
            Phase::Waiting | Phase::Answered => return Poll::Pending,
        };
        if this.timer.is_none() {
            this.timer
                .set(Some(tokio::time::sleep_until(sent_at + *this.timeout)));
        }
        let Some(timer) = this.timer.as_pin_mut() else {
            return Poll::Pending;
        };
        match timer.poll(cx) {
            Poll::Ready(()) => {
                let (timeout, keyed) = (*this.timeout, *this.keyed);
                tracing::warn!(?timeout, keyed, "upstream timed out");
                Poll::Ready(Ok(upstream_timeout(timeout, keyed, *this.grpc)))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

fn upstream_timeout(timeout: Duration, keyed: bool, grpc: bool) -> Response<Body> {
    let seconds = timeout.as_secs_f64();
    let conflict = if grpc { "ABORTED" } else { "409" };
    let detail = if keyed {
        format!(
            "The upstream did not answer within {seconds} s. Whether it acted is not known \
             yet: the proxy awaits its answer in the background, and a retry with the same \
             Idempotency-Key gets that answer once it is known ({conflict} until then)."
        )
    } else {
        format!("The upstream did not answer within {seconds} s.")
    };
    answer(
        grpc,
        StatusCode::GATEWAY_TIMEOUT,
        "Upstream timeout",
        &detail,
    )
}
