//! A protected request from its body to the stored record.
//!
//! The client's own future buffers the body, fingerprints it and begins: a
//! replay, a conflict or a mismatch is answered there, with no task. When the
//! request is to run, one task takes it over from the lease on. Because that
//! task, not the client's connection, owns the action, one mechanism gives all
//! three promises of the layer:
//!
//! * the response streams to the client frame by frame, through a bounded
//!   channel, while the task keeps a copy;
//! * the record is stored before the frame that ends the response is
//!   forwarded, so a client that saw the whole response and retries gets a
//!   replay;
//! * under `Disconnect::Complete` the task runs on when the client goes away
//!   (the action and its body run to the end and are stored); under
//!   `Disconnect::Cancel` it watches the client and drops the action, and
//!   with it the lease.
//!
//! A client that goes away before the lease drops only its own wait: the
//! engine ends an abandoned `begin` cleanly, and nothing has run yet.

use std::future::{poll_fn, Future};
use std::panic::AssertUnwindSafe;
use std::pin::pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::Poll;

use bytes::Bytes;
use futures_util::FutureExt;
use http::request::Parts;
use http::{Request, Response};
use http_body::Body;
use http_body_util::BodyExt;
use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tower_service::Service;

use super::body::{BoxError, Gathered, RequestBody, ResponseBody};
use super::future::Reply;
use super::layer::{Disconnect, FailMode, Settings, Shared};
use super::replay::replay;
use super::stream::stream;
use crate::engine::{Begin, Lease};
use crate::key::{canonical_json, Fingerprint, FingerprintMode, KeyParts};
use crate::problem;
use crate::stats::Stats;
use crate::store::{Store, StoreError};

pub(crate) struct Driver<Svc, S, K> {
    pub(crate) inner: Svc,
    pub(crate) shared: Arc<Shared<S, K>>,
}

pub(crate) type Sender<B, E> = oneshot::Sender<Reply<B, E>>;

/// The layer's own answer, as a reply.
pub(crate) fn answer<B, E>(response: Response<Bytes>) -> Reply<B, E> {
    Ok(response.map(ResponseBody::full))
}

/// Sends a reply to a client that may be gone; then nobody needs it.
pub(crate) fn send<B, E>(reply: Sender<B, E>, answer: Reply<B, E>) {
    let _ = reply.send(answer);
}

/// Buffers, fingerprints and begins in the client's own future: a replay,
/// a conflict or a mismatch is answered without a task. Only the execution
/// (and an unprotected fail-open call) moves to a spawned task, which owns the
/// action from there on, whatever happens to the client.
// Not an `async fn`: see the comment on the block.
#[allow(clippy::manual_async_fn)]
pub(crate) fn drive<Svc, S, K, ReqBody, ResBody>(
    driver: Driver<Svc, S, K>,
    parts: Parts,
    body: ReqBody,
    key: KeyParts,
) -> impl Future<Output = Reply<ResBody, Svc::Error>>
where
    Svc: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>> + Send + 'static,
    Svc::Future: Send,
    Svc::Error: Send + 'static,
    S: Store,
    K: Send + Sync + 'static,
    ReqBody: Body<Data = Bytes> + Send + 'static,
    ReqBody::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    // An `async` block rather than an `async fn`: the arguments are then
    // kept once in the future, not once as arguments and again as locals
    // (rust-lang/rust#62958), and this future is boxed per request.
    async move {
        let shared = &*driver.shared;
        let settings = &shared.settings;
        let counters = shared.engine.counters();
        let body = match buffer(body, settings.max_request_body).await {
            Ok(body) => body,
            Err(Unbuffered::TooLarge) => {
                Stats::incr(&counters.too_large);
                return answer(problem::too_large(settings.max_request_body));
            }
            Err(Unbuffered::Unreadable(error)) => {
                return answer(problem::unreadable_body(&error.to_string()))
            }
        };
        let (fingerprint, storage_key) = identify(&parts, &body, key, settings.fingerprint);
        // A record held in process answers here; only the rest of the
        // protocol (a flight, the store, the execution) is boxed, so a replay
        // neither carries nor moves its state.
        match shared.engine.begin_local(&storage_key, fingerprint) {
            Some(begun) => match decided(begun, settings) {
                Ok(reply) => reply,
                // `begin_local` answers replays and mismatches only: never
                // a lease. Were it to, dropping it releases the key.
                Err(_lease) => answer(problem::internal_error()),
            },
            None => Box::pin(begin_and_run(driver, parts, body, storage_key, fingerprint)).await,
        }
    }
}

/// The reply to a decision that runs nothing (a replay, a mismatch, a
/// conflict), or the lease of one that runs the request.
fn decided<S: Store, B, E>(begun: Begin<S>, settings: &Settings) -> Result<Reply<B, E>, Lease<S>> {
    let response = match begun {
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
    };
    Ok(answer(response))
}

/// Begins past the in-process copy (the flight, the store) and answers, or
/// hands the request to a task that runs it.
async fn begin_and_run<Svc, S, K, ReqBody, ResBody>(
    driver: Driver<Svc, S, K>,
    parts: Parts,
    body: Bytes,
    storage_key: String,
    fingerprint: Fingerprint,
) -> Reply<ResBody, Svc::Error>
where
    Svc: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>> + Send + 'static,
    Svc::Future: Send,
    Svc::Error: Send + 'static,
    S: Store,
    K: Send + Sync + 'static,
    ReqBody: Body<Data = Bytes> + Send + 'static,
    ReqBody::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    // Checked before a lease can exist: waits and the execution need the
    // runtime's timer and its tasks.
    let Some(runtime) = runtime() else {
        return answer(problem::internal_error());
    };
    let shared = &*driver.shared;
    let settings = &shared.settings;
    let begun = counted_wait(
        settings,
        shared
            .engine
            .begin_in_store(storage_key, fingerprint, settings.concurrent),
    )
    .await;
    let lease = match begun {
        Ok(begun) => match decided(begun, settings) {
            Ok(reply) => return reply,
            Err(lease) => lease,
        },
        Err(error) => {
            let request = Request::from_parts(parts, RequestBody::buffered(body));
            return on_task(runtime, |reply| {
                store_failed(driver.inner, request, error, driver.shared, reply)
            })
            .await;
        }
    };
    let request = Request::from_parts(parts, RequestBody::buffered(body));
    on_task(runtime, |reply| {
        execute(driver, request, lease, fingerprint, reply)
    })
    .await
}

/// The Tokio runtime the request's task will run on; without one, the
/// request is answered 500 (and this says why in the log).
fn runtime() -> Option<Handle> {
    let runtime = Handle::try_current().ok();
    if runtime.is_none() {
        tracing::error!("the idempotency layer needs a Tokio runtime for protected requests");
    }
    runtime
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
    (fingerprint, key.into_key(hashed).to_text())
}

/// Runs `task` on its own, so it goes on when the client goes away, and
/// awaits the reply it sends.
async fn on_task<B, E, Fut>(runtime: Handle, task: impl FnOnce(Sender<B, E>) -> Fut) -> Reply<B, E>
where
    Fut: Future<Output = ()> + Send + 'static,
{
    let (reply, answered) = oneshot::channel();
    runtime.spawn(task(reply));
    match answered.await {
        Ok(reply) => reply,
        // The task ended without answering: it panicked outside the service
        // (a bug) or the runtime is shutting down. Its lease dropped with it.
        Err(_closed) => answer(problem::internal_error()),
    }
}

/// Awaits `begin`, counting the request in `Settings::waiting` from its first
/// `Pending` on: by then a duplicate has joined the flight it waits for.
async fn counted_wait<T>(settings: &Settings, begin: impl Future<Output = T>) -> T {
    struct Waiting<'a>(&'a Settings);
    impl Drop for Waiting<'_> {
        fn drop(&mut self) {
            self.0.waiting.fetch_sub(1, Relaxed);
        }
    }
    let mut begin = pin!(begin);
    let mut guard = None;
    poll_fn(|cx| match begin.as_mut().poll(cx) {
        Poll::Pending => {
            if guard.is_none() {
                settings.waiting.fetch_add(1, Relaxed);
                guard = Some(Waiting(settings));
            }
            Poll::Pending
        }
        ready => ready,
    })
    .await
}

async fn store_failed<Svc, S, K, ReqBody, ResBody>(
    mut inner: Svc,
    request: Request<RequestBody<ReqBody>>,
    error: StoreError,
    shared: Arc<Shared<S, K>>,
    mut reply: Sender<ResBody, Svc::Error>,
) where
    Svc: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>>,
{
    let settings = &shared.settings;
    match settings.fail_mode {
        // The store answered, but not what it can stand by: fail-open is for
        // a store that cannot be reached, never for one that may hold a result.
        _ if !error.is_unavailable() => {
            tracing::error!(%error, "idempotency store failed: answering 500");
            send(reply, answer(problem::store_failed()));
        }
        FailMode::Closed => {
            tracing::warn!(%error, "idempotency store failed: answering 503");
            send(reply, answer(problem::store_unavailable()));
        }
        FailMode::Open => {
            tracing::warn!(%error, "idempotency store failed: running the request unprotected");
            let future = inner.call(request);
            let result = match settings.disconnect {
                Disconnect::Complete => future.await,
                Disconnect::Cancel => tokio::select! {
                    result = future => result,
                    () = reply.closed() => return,
                },
            };
            send(reply, result.map(|r| r.map(ResponseBody::passthrough)));
        }
    }
}

async fn execute<Svc, S, K, ReqBody, ResBody>(
    driver: Driver<Svc, S, K>,
    request: Request<RequestBody<ReqBody>>,
    lease: Lease<S>,
    fingerprint: Fingerprint,
    mut reply: Sender<ResBody, Svc::Error>,
) where
    Svc: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>>,
    S: Store,
    ResBody: Body<Data = Bytes>,
    ResBody::Error: Into<BoxError>,
{
    let Driver { mut inner, shared } = driver;
    let Shared {
        engine, settings, ..
    } = &*shared;
    let cancel = settings.disconnect == Disconnect::Cancel;
    // A panic in the service must not kill the task with the lease
    // unreleased and the client unanswered: catch it, release, answer 500.
    let Ok(future) = std::panic::catch_unwind(AssertUnwindSafe(|| inner.call(request))) else {
        return panicked(lease, reply).await;
    };
    let future = AssertUnwindSafe(future).catch_unwind();
    let outcome = if cancel {
        tokio::select! {
            outcome = future => outcome,
            () = reply.closed() => return release(lease).await,
        }
    } else {
        future.await
    };
    let response = match outcome {
        Ok(Ok(response)) => response,
        Ok(Err(error)) => {
            release(lease).await;
            send(reply, Err(error));
            return;
        }
        Err(_panic) => return panicked(lease, reply).await,
    };
    stream(response, lease, fingerprint, engine, settings, reply).await;
}

async fn panicked<S: Store, B, E>(lease: Lease<S>, reply: Sender<B, E>) {
    tracing::error!(
        key = lease.key(),
        "the service panicked: lease released, answering 500"
    );
    release(lease).await;
    send(reply, answer(problem::internal_error()));
}

pub(crate) async fn release<S: Store>(lease: Lease<S>) {
    if let Err(error) = lease.release().await {
        tracing::warn!(%error, "idempotency lease release failed; it expires with its TTL");
    }
}

#[cfg(test)]
mod tests {
    use http_body::Frame;
    use http_body_util::StreamBody;

    use super::*;

    type Frames = futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, BoxError>>>;

    fn frames(frames: Vec<Result<Frame<Bytes>, BoxError>>) -> StreamBody<Frames> {
        StreamBody::new(futures_util::stream::iter(frames))
    }

    fn data(text: &'static str) -> Result<Frame<Bytes>, BoxError> {
        Ok(Frame::data(Bytes::from_static(text.as_bytes())))
    }

    #[tokio::test]
    async fn frames_are_joined_in_order_and_trailers_left_out() {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("x-sum", http::HeaderValue::from_static("1"));
        let body = frames(vec![
            data(""),
            data("ab"),
            data(""),
            data("cd"),
            Ok(Frame::trailers(trailers)),
        ]);
        let Ok(bytes) = buffer(body, 4).await else {
            panic!("four bytes fit a limit of four");
        };
        assert_eq!(bytes, "abcd");
    }

    #[tokio::test]
    async fn a_single_frame_is_handed_on_as_it_came() {
        let sent = Bytes::from(vec![b'x'; 100]);
        let Ok(bytes) = buffer(http_body_util::Full::new(sent.clone()), 100).await else {
            panic!("a body at the limit is read");
        };
        assert_eq!(bytes.as_ptr(), sent.as_ptr(), "no copy of a single frame");
        let Ok(empty) = buffer(http_body_util::Empty::<Bytes>::new(), 0).await else {
            panic!("an empty body is read");
        };
        assert!(empty.is_empty());
    }

    #[tokio::test]
    async fn a_body_past_the_limit_or_failing_is_refused() {
        let over = buffer(frames(vec![data("abc"), data("de")]), 4).await;
        assert!(matches!(over, Err(Unbuffered::TooLarge)));
        let failing = buffer(frames(vec![data("ab"), Err("reset".into())]), 4).await;
        assert!(matches!(failing, Err(Unbuffered::Unreadable(e)) if e.to_string() == "reset"));
    }
}
