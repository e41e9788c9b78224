//! A deadline on the arrival of each request body.
//!
//! It sits in front of the idempotency layer, which reads a protected
//! request's whole body before it takes a key: a body that runs out of time
//! fails that read, so no lease is ever taken for it, and this layer turns
//! whatever the inner service answered into a 408. It buffers nothing.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{header, HeaderValue, Request, Response, StatusCode, Version};
use http_body::{Frame, SizeHint};
use tokio::time::{Instant, Sleep};
use tower::{BoxError, Layer, Service};

use crate::limits::EdgeStats;
use crate::problem::problem;

/// The error a request body yields once its deadline has passed.
#[derive(Debug)]
pub(crate) struct BodyTimedOut;

impl std::fmt::Display for BodyTimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the request body did not arrive in time")
    }
}

impl std::error::Error for BodyTimedOut {}

/// Applies [`BodyTimeout`].
#[derive(Clone)]
pub(crate) struct BodyTimeoutLayer {
    timeout: Duration,
    stats: Arc<EdgeStats>,
}

impl BodyTimeoutLayer {
    pub(crate) fn new(timeout: Duration, stats: Arc<EdgeStats>) -> Self {
        Self { timeout, stats }
    }
}

impl<S> Layer<S> for BodyTimeoutLayer {
    type Service = BodyTimeout<S>;

    fn layer(&self, inner: S) -> BodyTimeout<S> {
        BodyTimeout {
            inner,
            timeout: self.timeout,
            stats: Arc::clone(&self.stats),
        }
    }
}

/// Gives each request body `timeout` to arrive, and answers 408
/// problem+json for a request whose body did not.
#[derive(Clone)]
pub(crate) struct BodyTimeout<S> {
    inner: S,
    timeout: Duration,
    stats: Arc<EdgeStats>,
}

impl<S, B> Service<Request<Body>> for BodyTimeout<S>
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

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        if http_body::Body::is_end_stream(request.body()) {
            // Nothing left to arrive: no deadline to keep.
            let answer = self.inner.call(request);
            return Box::pin(async move { Ok(answer.await?.map(Body::new)) });
        }
        let timed_out = Arc::new(AtomicBool::new(false));
        let version = request.version();
        let deadline = Instant::now() + self.timeout;
        let request = request.map(|body| {
            Body::new(TimedBody {
                body,
                deadline: Box::pin(tokio::time::sleep_until(deadline)),
                timed_out: Arc::clone(&timed_out),
            })
        });
        let answer = self.inner.call(request);
        let timeout = self.timeout;
        let stats = Arc::clone(&self.stats);
        Box::pin(async move {
            let response = answer.await?;
            if !timed_out.load(Ordering::SeqCst) {
                return Ok(response.map(Body::new));
            }
            EdgeStats::incr(&stats.body_timeouts);
            tracing::info!(?timeout, "request body did not arrive in time");
            Ok(request_timeout(timeout, version))
        })
    }
}

fn request_timeout(timeout: Duration, version: Version) -> Response<Body> {
    let mut response = problem(
        StatusCode::REQUEST_TIMEOUT,
        "Request body timeout",
        &format!(
            "The request body did not arrive within {} s.",
            timeout.as_secs_f64()
        ),
    );
    // The rest of the body may still be on its way: the connection cannot
    // carry another request. (HTTP/2 ends just the stream.)
    if version <= Version::HTTP_11 {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// A request body that fails with [`BodyTimedOut`] when it is still
/// waiting for data at its deadline.
struct TimedBody {
    body: Body,
    deadline: Pin<Box<Sleep>>,
    timed_out: Arc<AtomicBool>,
}

impl http_body::Body for TimedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        if self.timed_out.load(Ordering::SeqCst) {
            return Poll::Ready(Some(Err(axum::Error::new(BodyTimedOut))));
        }
        if let Poll::Ready(frame) = Pin::new(&mut self.body).poll_frame(cx) {
            return Poll::Ready(frame);
        }
        if self.deadline.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        self.timed_out.store(true, Ordering::SeqCst);
        Poll::Ready(Some(Err(axum::Error::new(BodyTimedOut))))
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
