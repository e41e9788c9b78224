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
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{Method, Request, Response, StatusCode};
use tokio::sync::watch;
use tokio::time::Instant;
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

/// A request extension the forwarder ticks as the exchange goes on.
#[derive(Clone)]
pub(crate) struct UpstreamClock {
    phase: Arc<watch::Sender<Phase>>,
    keyed: bool,
}

impl UpstreamClock {
    fn new(keyed: bool) -> (Self, watch::Receiver<Phase>) {
        let (phase, watching) = watch::channel(Phase::Waiting);
        let clock = Self {
            phase: Arc::new(phase),
            keyed,
        };
        (clock, watching)
    }

    /// The request is about to be sent upstream.
    pub(crate) fn sent(&self) {
        self.phase.send_replace(Phase::Sent(Instant::now()));
    }

    /// The forwarder has its answer.
    pub(crate) fn answered(&self) {
        self.phase.send_replace(Phase::Answered);
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

/// Answers 504 problem+json (gRPC: `DEADLINE_EXCEEDED`) when the upstream's head has not come within
/// `timeout` of the request being sent, dropping the inner future.
#[derive(Clone)]
pub(crate) struct UpstreamDeadline<S> {
    inner: S,
    timeout: Duration,
}

impl<S, B> Service<Request<Body>> for UpstreamDeadline<S>
where
    S: Service<Request<Body>, Response = Response<B>>,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        let keyed = PROTECTED_METHODS.contains(request.method())
            && request.headers().contains_key("idempotency-key");
        let grpc = is_grpc(request.headers());
        let (clock, phase) = UpstreamClock::new(keyed);
        request.extensions_mut().insert(clock);
        let answer = self.inner.call(request);
        let timeout = self.timeout;
        Box::pin(async move {
            match within(answer, phase, timeout).await {
                Some(answer) => Ok(answer?.map(Body::new)),
                None => {
                    tracing::warn!(?timeout, keyed, "upstream timed out");
                    Ok(upstream_timeout(timeout, keyed, grpc))
                }
            }
        })
    }
}

/// `answer`'s output, or `None` when `timeout` passed between the request
/// being sent and the forwarder's answer (`answer` is then dropped).
async fn within<F: Future>(
    answer: F,
    mut phase: watch::Receiver<Phase>,
    timeout: Duration,
) -> Option<F::Output> {
    let mut answer = std::pin::pin!(answer);
    let mut ticking = true;
    loop {
        let current = *phase.borrow_and_update();
        let deadline = match current {
            Phase::Waiting => None,
            Phase::Sent(at) => Some(at + timeout),
            Phase::Answered => return Some(answer.await),
        };
        let expired = async {
            match deadline {
                Some(deadline) => tokio::time::sleep_until(deadline).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            output = &mut answer => return Some(output),
            () = expired => return None,
            // The forwarder gone without a word cannot happen in this stack;
            // the answer (and the deadline, if armed) still decide.
            changed = phase.changed(), if ticking => ticking = changed.is_ok(),
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
