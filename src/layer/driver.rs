//! A protected request from its body to the decision to run it.
//!
//! The client's own future buffers the body, fingerprints it and begins: a
//! replay, a conflict or a mismatch is answered there. A request that runs
//! runs there too: the inner service's future is polled by the layer's
//! response future, and its body, recorded by a [`Tee`](super::tee::Tee), by
//! the layer's response body, with no task and no channel in between. Only a
//! client that goes away before the end (the future or the body dropped)
//! under `Disconnect::Complete` hands what is left to a task, which finishes
//! the action and stores its record; under `Disconnect::Cancel` the action is
//! dropped with it, and its lease released.
//!
//! A client that goes away before the lease drops only its own wait: the
//! engine ends an abandoned `begin` cleanly, and nothing has run yet.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::FutureExt;
use http::request::Parts;
use http::{Request, Response};
use http_body::Body;
use http_body_util::BodyExt;
use pin_project_lite::pin_project;
use tokio::runtime::Handle;
use tower_service::Service;
use tracing::Span;

use super::body::{BoxError, Gathered, RequestBody};
use super::future::{Decision, Protected};
use super::grpc;
use super::layer::{Disconnect, FailMode, Settings, Shared};
use super::recording::{release, Recording};
use super::replay::replay;
use super::tee::Left;
use crate::engine::{Begin, Lease};
use crate::key::{canonical_json, Fingerprint, FingerprintMode, KeyParts};
use crate::problem;
use crate::stats::Stats;
use crate::store::{Store, StoreError};

pub(crate) struct Driver<Svc, S, K> {
    pub(crate) inner: Svc,
    pub(crate) shared: Arc<Shared<S, K>>,
    /// The request's span: what a client leaves behind runs on inside it.
    pub(crate) span: Span,
}

/// What the protected path answers for a service `Svc` whose responses
/// carry `ResBody`.
/// The service the layer wraps, as every step of a protected request needs
/// it: the bound list written once (a blanket impl covers every such
/// service).
pub(crate) trait Wrapped<ReqBody, ResBody>:
    Service<
    Request<RequestBody<ReqBody>>,
    Response = Response<ResBody>,
    Future: Send + 'static,
    Error: Send + 'static,
>
{
}

impl<T, ReqBody, ResBody> Wrapped<ReqBody, ResBody> for T
where
    T: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>>,
    T::Future: Send + 'static,
    T::Error: Send + 'static,
{
}

/// A body the layer buffers or records: bytes, sent across tasks, with an
/// error it can box.
pub(crate) trait BytesBody:
    Body<Data = Bytes, Error: Into<BoxError>> + Send + 'static
{
}

impl<B> BytesBody for B
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
}

/// The [`Decision`] for a request to `Svc`.
type DecisionOf<Svc, ReqBody, ResBody> = Decision<
    <Svc as Service<Request<RequestBody<ReqBody>>>>::Future,
    ResBody,
    <Svc as Service<Request<RequestBody<ReqBody>>>>::Error,
>;

/// Buffers, fingerprints and begins in the client's own future: a replay,
/// a conflict or a mismatch is answered at once; a request that runs is
/// handed back as the service's future and its recorder. `grpc`: the
/// request is a gRPC call, whose own answers are gRPC statuses.
pub(crate) fn drive<Svc, S, K, ReqBody, ResBody>(
    driver: Driver<Svc, S, K>,
    parts: Parts,
    body: ReqBody,
    key: KeyParts,
    grpc: bool,
) -> impl Future<Output = DecisionOf<Svc, ReqBody, ResBody>>
where
    Svc: Wrapped<ReqBody, ResBody> + Send + 'static,
    S: Store,
    K: Send + Sync + 'static,
    ReqBody: BytesBody,
    ResBody: BytesBody,
{
    // A combinator, not an `async` block around `decide`: a block that
    // awaits the future it holds keeps it twice.
    decide(driver, parts, body, key, grpc).map(move |decision| match decision {
        Decision::Answer(answer) => Decision::Answer(grpc::own_answer(grpc, answer)),
        run => run,
    })
}

// Not an `async fn`: see the comment on the block.
#[allow(clippy::manual_async_fn)]
fn decide<Svc, S, K, ReqBody, ResBody>(
    driver: Driver<Svc, S, K>,
    parts: Parts,
    body: ReqBody,
    key: KeyParts,
    grpc: bool,
) -> impl Future<Output = DecisionOf<Svc, ReqBody, ResBody>>
where
    Svc: Wrapped<ReqBody, ResBody> + Send + 'static,
    S: Store,
    K: Send + Sync + 'static,
    ReqBody: BytesBody,
    ResBody: BytesBody,
{
    // An `async` block rather than an `async fn`: the arguments are then
    // kept once in the future, not once as arguments and again as locals
    // (rust-lang/rust#62958), and this future is boxed per request.
    async move {
        let shared = &*driver.shared;
        let settings = &shared.settings;
        let counters = shared.engine.counters();
        let buffered = if grpc && has_runtime() {
            // A gRPC call is read to the end of its request stream: a
            // streaming call not listed as one would wait here for ever.
            match tokio::time::timeout(
                settings.grpc_request_timeout,
                buffer(body, settings.max_request_body),
            )
            .await
            {
                Ok(buffered) => buffered,
                Err(_elapsed) => return Decision::Answer(grpc::unfinished_request()),
            }
        } else {
            buffer(body, settings.max_request_body).await
        };
        let body = match buffered {
            Ok(body) => body,
            Err(Unbuffered::TooLarge) => {
                Stats::incr(&counters.here().too_large);
                return Decision::Answer(problem::too_large(settings.max_request_body));
            }
            Err(Unbuffered::Unreadable(error)) => {
                return Decision::Answer(problem::unreadable_body(&error.to_string()))
            }
        };
        let (fingerprint, storage_key) = identify(&parts, &body, key, settings.fingerprint);
        if let Some(begin) = shared.engine.begin_local(&storage_key, fingerprint) {
            return match answer_or_lease(begin, settings) {
                Ok(response) => Decision::Answer(response),
                // `begin_local` answers replays and mismatches only: never
                // a lease. Were it to, dropping it releases the key.
                Err(_lease) => Decision::Answer(problem::internal_error()),
            };
        }
        // Checked before a lease can exist: waits need the runtime's timer,
        // and a client that goes away hands its request to the runtime's
        // tasks.
        if !has_runtime() {
            return Decision::Answer(problem::internal_error());
        }
        // The rest of the protocol (a flight, the store) is boxed: it is
        // most of a first request's state, and a replay answered above
        // carries none of it. Each box stays under 1 KiB, where glibc's
        // malloc serves it from its per-thread cache; a larger one took
        // its slow path and consolidated its free lists on every first
        // request (about 3 % of its CPU in `perf`).
        let begin = Box::pin(counted_wait(
            &shared.waiting,
            shared.engine.begin_in_store(storage_key, fingerprint, None),
        ))
        .await;
        let request = |body| Request::from_parts(parts, RequestBody::buffered(body));
        // The one wait left, the release after a panic in `call`, is
        // boxed: it is rare, and rustc keeps the moved-from locals above
        // beside it, which grew this future by a third.
        let panicked = match begin {
            Ok(begin) => match answer_or_lease(begin, settings) {
                Ok(response) => return Decision::Answer(response),
                Err(lease) => match run(driver, request(body), lease, fingerprint) {
                    Ok(running) => return running,
                    Err(lease) => lease,
                },
            },
            Err(error) => return store_failed(driver, request(body), error),
        };
        Box::pin(release(panicked)).await;
        Decision::Answer(problem::internal_error())
    }
}

/// The answer to a decision that runs nothing (a replay, a mismatch, a
/// conflict), or the lease of one that runs the request.
fn answer_or_lease<S: Store>(
    begin: Begin<S>,
    settings: &Settings,
) -> Result<Response<Bytes>, Lease<S>> {
    Ok(match begin {
        Begin::Execute(lease) => return Err(lease),
        Begin::Replay { record, .. } => match record.as_response() {
            Some(stored) => replay(stored, settings),
            None => {
                tracing::error!("the key holds a value, not a response: answering 500");
                problem::internal_error()
            }
        },
        Begin::Mismatch => problem::key_reused(),
        Begin::Conflict { retry_after } => {
            let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
            problem::conflict(secs)
        }
    })
}

/// Whether a Tokio runtime is there; without one, the request is answered
/// 500 (and this says why in the log).
fn has_runtime() -> bool {
    let found = Handle::try_current().is_ok();
    if !found {
        tracing::error!("the idempotency layer needs a Tokio runtime for protected requests");
    }
    found
}

/// What a client leaves behind when it goes away: run on to the end and
/// stored, or dropped.
fn left(settings: &Settings) -> Left {
    match settings.disconnect {
        Disconnect::Complete => Left::Finish,
        Disconnect::Cancel => Left::StoreOnly,
    }
}

/// The store could not begin: 503, or the request runs unprotected.
fn store_failed<Svc, S, K, ReqBody, ResBody>(
    driver: Driver<Svc, S, K>,
    request: Request<RequestBody<ReqBody>>,
    error: StoreError,
) -> DecisionOf<Svc, ReqBody, ResBody>
where
    Svc: Wrapped<ReqBody, ResBody>,
    ResBody: BytesBody,
{
    let settings = &driver.shared.settings;
    match settings.fail_mode {
        // The store answered, but not what it can stand by: fail-open is for
        // a store that cannot be reached, never for one that may hold a result.
        _ if !error.is_unavailable() => {
            tracing::error!(%error, "idempotency store failed: answering 500");
            Decision::Answer(problem::store_failed())
        }
        FailMode::Closed => {
            tracing::warn!(%error, "idempotency store failed: answering 503");
            Decision::Answer(problem::store_unavailable())
        }
        FailMode::Open => {
            tracing::warn!(%error, "idempotency store failed: running the request unprotected");
            let left = left(settings);
            let Driver {
                mut inner, span, ..
            } = driver;
            match call(&mut inner, request) {
                Some(future) => Decision::Run(Protected::new(future, None, span, left)),
                None => Decision::Answer(problem::internal_error()),
            }
        }
    }
}

/// Calls the service under the lease; its future is recorded as it runs.
/// If `call` panicked, the lease comes back, to be released.
fn run<Svc, S, K, ReqBody, ResBody>(
    driver: Driver<Svc, S, K>,
    request: Request<RequestBody<ReqBody>>,
    lease: Lease<S>,
    fingerprint: Fingerprint,
) -> Result<DecisionOf<Svc, ReqBody, ResBody>, Lease<S>>
where
    Svc: Wrapped<ReqBody, ResBody>,
    S: Store,
    K: Send + Sync + 'static,
    ResBody: BytesBody,
{
    let Driver {
        mut inner,
        shared,
        span,
    } = driver;
    let Some(future) = call(&mut inner, request) else {
        tracing::error!(
            key = lease.key(),
            "the service panicked: lease released, answering 500"
        );
        return Err(lease);
    };
    let left = left(&shared.settings);
    let recorder = Box::new(Recording::new(lease, fingerprint, shared));
    Ok(Decision::Run(Protected::new(
        future,
        Some(recorder),
        span,
        left,
    )))
}

/// Calls the service; `None` if `call` panicked (a panic must not leave the
/// key held nor the client unanswered).
fn call<Svc, R>(inner: &mut Svc, request: R) -> Option<Svc::Future>
where
    Svc: Service<R>,
{
    std::panic::catch_unwind(AssertUnwindSafe(|| inner.call(request))).ok()
}

enum Unbuffered {
    TooLarge,
    Unreadable(BoxError),
}

/// Reads the whole body, refusing it past `limit` bytes.
async fn buffer<B>(body: B, limit: usize) -> Result<Bytes, Unbuffered>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let mut body = pin!(body);
    let mut gathered = Gathered::default();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|error| Unbuffered::Unreadable(error.into()))?;
        // Trailers are not part of what the request asked for.
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if gathered.len() + data.len() > limit {
            return Err(Unbuffered::TooLarge);
        }
        gathered.push(data);
    }
    Ok(gathered.into_bytes())
}

/// The request's fingerprint and storage key. The params hash in the key
/// follows the fingerprint mode, so a reordered JSON body keeps its key under
/// `JsonCanonical`.
fn identify(
    parts: &Parts,
    body: &Bytes,
    key: KeyParts,
    mode: FingerprintMode,
) -> (Fingerprint, String) {
    let path_and_query = parts
        .uri
        .path_and_query()
        .map_or_else(|| parts.uri.path(), |pq| pq.as_str());
    let canonical = match mode {
        FingerprintMode::JsonCanonical => canonical_json(body),
        FingerprintMode::Exact => None,
    };
    let hashed = canonical.as_deref().unwrap_or(body);
    let fingerprint = Fingerprint::of_request(&parts.method, path_and_query, hashed);
    (fingerprint, key.into_storage_key(hashed))
}

pin_project! {
    /// Awaits `begin`, counting the request in `waiting` from its first
    /// `Pending` on: by then a duplicate has joined the flight it waits for.
    ///
    /// A future of its own, not an `async fn`: an `async fn` would keep
    /// `begin` twice (as its argument and as the pinned local it polls),
    /// and `begin` is most of a first request's boxed state.
    struct CountedWait<'a, F> {
        #[pin]
        begin: F,
        waiting: &'a AtomicUsize,
        counted: Option<Waiting<'a>>,
    }
}

fn counted_wait<F: Future>(waiting: &AtomicUsize, begin: F) -> CountedWait<'_, F> {
    CountedWait {
        begin,
        waiting,
        counted: None,
    }
}

/// Takes the request off the count when its wait ends, however it ends.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

impl<F: Future> Future for CountedWait<'_, F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let answer = this.begin.poll(cx);
        if answer.is_pending() && this.counted.is_none() {
            this.waiting.fetch_add(1, Relaxed);
            *this.counted = Some(Waiting(this.waiting));
        }
        answer
    }
}

#[cfg(test)]
mod tests;
