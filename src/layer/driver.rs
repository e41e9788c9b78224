//! The driver task of a protected request: buffer, begin, run, stream, store.
//!
//! One task per protected request carries it from the body to the stored
//! record. Because the task, not the client's connection, owns the action,
//! one mechanism gives all three promises of the layer:
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
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tokio::sync::oneshot;
use tower_service::Service;

use super::body::{BoxError, RequestBody, ResponseBody};
use super::future::Reply;
use super::layer::{Disconnect, FailMode, Settings};
use super::replay::replay;
use super::stream::stream;
use crate::engine::{Begin, Idempotency, Lease};
use crate::key::{canonical_json, Fingerprint, FingerprintMode, KeyParts};
use crate::problem;
use crate::stats::Stats;
use crate::store::{Store, StoreError};

pub(crate) struct Driver<Svc, S> {
    pub(crate) inner: Svc,
    pub(crate) engine: Idempotency<S>,
    pub(crate) settings: Arc<Settings>,
}

pub(crate) type Sender<B, E> = oneshot::Sender<Reply<B, E>>;

pub(crate) fn answer<B, E>(reply: Sender<B, E>, response: Response<Bytes>) {
    // The client may be gone; then nobody needs the answer.
    let _ = reply.send(Ok(response.map(ResponseBody::full)));
}

pub(crate) async fn drive<Svc, S, ReqBody, ResBody>(
    driver: Driver<Svc, S>,
    parts: Parts,
    body: ReqBody,
    key: KeyParts,
    reply: Sender<ResBody, Svc::Error>,
) where
    Svc: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>>,
    S: Store,
    ReqBody: Body<Data = Bytes>,
    ReqBody::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes>,
    ResBody::Error: Into<BoxError>,
{
    let settings = &*driver.settings;
    let counters = driver.engine.counters();
    let body = match Limited::new(body, settings.max_request_body)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(error) if error.is::<LengthLimitError>() => {
            Stats::incr(&counters.too_large);
            return answer(reply, problem::too_large(settings.max_request_body));
        }
        Err(error) => return answer(reply, problem::unreadable_body(&error.to_string())),
    };
    let path_and_query = parts
        .uri
        .path_and_query()
        .map_or_else(|| parts.uri.path(), |pq| pq.as_str());
    let canonical = match settings.fingerprint {
        FingerprintMode::JsonCanonical => canonical_json(&body),
        FingerprintMode::Exact => None,
    };
    let fingerprint = Fingerprint::of_request(
        &parts.method,
        path_and_query,
        canonical.as_deref().unwrap_or(&body),
    );
    // The params hash follows the fingerprint mode, so a reordered JSON body
    // keeps its key under `JsonCanonical`.
    let storage_key = key
        .into_key(canonical.as_deref().unwrap_or(&body))
        .to_string();
    let begun = counted_wait(
        settings,
        driver
            .engine
            .begin(storage_key, fingerprint, settings.concurrent),
    )
    .await;
    let request = Request::from_parts(parts, RequestBody::buffered(body));
    let lease = match begun {
        Ok(Begin::Execute(lease)) => lease,
        Ok(Begin::Replay { record, .. }) => {
            let response = match record.as_response() {
                Some(stored) => replay(stored, settings),
                None => {
                    tracing::error!("the key holds a value, not a response: answering 500");
                    problem::internal_error()
                }
            };
            return answer(reply, response);
        }
        Ok(Begin::Mismatch) => return answer(reply, problem::key_reused()),
        Ok(Begin::Conflict { retry_after }) => {
            let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
            return answer(reply, problem::conflict(secs));
        }
        Err(error) => return store_failed(driver.inner, request, error, settings, reply).await,
    };
    execute(
        driver.inner,
        request,
        lease,
        fingerprint,
        &driver.engine,
        settings,
        reply,
    )
    .await;
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

async fn store_failed<Svc, ReqBody, ResBody>(
    mut inner: Svc,
    request: Request<RequestBody<ReqBody>>,
    error: StoreError,
    settings: &Settings,
    mut reply: Sender<ResBody, Svc::Error>,
) where
    Svc: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>>,
{
    match settings.fail_mode {
        FailMode::Closed => {
            tracing::warn!(%error, "idempotency store failed: answering 503");
            answer(reply, problem::store_unavailable());
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
            let _ = reply.send(result.map(|r| r.map(ResponseBody::passthrough)));
        }
    }
}

async fn execute<Svc, S, ReqBody, ResBody>(
    mut inner: Svc,
    request: Request<RequestBody<ReqBody>>,
    lease: Lease<S>,
    fingerprint: Fingerprint,
    engine: &Idempotency<S>,
    settings: &Settings,
    mut reply: Sender<ResBody, Svc::Error>,
) where
    Svc: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>>,
    S: Store,
    ResBody: Body<Data = Bytes>,
    ResBody::Error: Into<BoxError>,
{
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
            let _ = reply.send(Err(error));
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
    answer(reply, problem::internal_error());
}

pub(crate) async fn release<S: Store>(lease: Lease<S>) {
    if let Err(error) = lease.release().await {
        tracing::warn!(%error, "idempotency lease release failed; it expires with its TTL");
    }
}
