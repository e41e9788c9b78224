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

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Request, Response};
use http_body::Body;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tokio::sync::{mpsc, oneshot};
use tower_service::Service;

use super::body::{BoxError, FrameResult, RequestBody, ResponseBody};
use super::future::Reply;
use super::layer::{Disconnect, FailMode, Settings};
use crate::engine::{Begin, Idempotency, Lease};
use crate::key::{canonical_json, Fingerprint, FingerprintMode, KeyParts};
use crate::problem;
use crate::record::{Record, StoredResponse};
use crate::stats::Stats;
use crate::store::{Store, StoreError};

/// Frames buffered between the driver and a slow client.
const FRAMES_IN_FLIGHT: usize = 8;

/// The header that marks a replayed response.
pub(crate) const REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

pub(crate) struct Driver<Svc, S> {
    pub(crate) inner: Svc,
    pub(crate) engine: Idempotency<S>,
    pub(crate) settings: Arc<Settings>,
}

type Sender<B, E> = oneshot::Sender<Reply<B, E>>;

fn answer<B, E>(reply: Sender<B, E>, response: Response<Bytes>) {
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
    let storage_key = key.into_key(&body).to_string();
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

async fn release<S: Store>(lease: Lease<S>) {
    if let Err(error) = lease.release().await {
        tracing::warn!(%error, "idempotency lease release failed; it expires with its TTL");
    }
}

/// What a first response is recorded as, while it streams.
struct Recording<S: Store> {
    lease: Lease<S>,
    fingerprint: Fingerprint,
    status: http::StatusCode,
    headers: HeaderMap,
    chunks: Vec<Bytes>,
    len: usize,
}

impl<S: Store> Recording<S> {
    async fn complete(self, engine: &Idempotency<S>) {
        let body = match self.chunks.len() {
            0 => Bytes::new(),
            1 => self.chunks.into_iter().next().unwrap_or_default(),
            _ => {
                let mut body = BytesMut::with_capacity(self.len);
                self.chunks
                    .iter()
                    .for_each(|chunk| body.extend_from_slice(chunk));
                body.freeze()
            }
        };
        let response = StoredResponse {
            status: self.status,
            headers: self.headers,
            body,
        };
        match self
            .lease
            .complete(Record::response(self.fingerprint, response))
            .await
        {
            Ok(true) => {}
            Ok(false) => {
                Stats::incr(&engine.counters().not_stored);
                tracing::warn!("idempotency lease was lost before the response was stored");
            }
            Err(error) => tracing::warn!(%error, "storing the idempotent response failed"),
        }
    }
}

async fn stream<S, ResBody, E>(
    response: Response<ResBody>,
    lease: Lease<S>,
    fingerprint: Fingerprint,
    engine: &Idempotency<S>,
    settings: &Settings,
    reply: Sender<ResBody, E>,
) where
    S: Store,
    ResBody: Body<Data = Bytes>,
    ResBody::Error: Into<BoxError>,
{
    let cancel = settings.disconnect == Disconnect::Cancel;
    let not_stored = &engine.counters().not_stored;
    let (head, body) = response.into_parts();
    let mut recording = if storable(&head, settings) {
        Some(Recording {
            lease,
            fingerprint,
            status: head.status,
            headers: stored_headers(&head.headers, settings),
            chunks: Vec::new(),
            len: 0,
        })
    } else {
        // Not stored: free the key before the client can see the answer, so
        // its retry runs the action again instead of meeting a stale marker.
        Stats::incr(not_stored);
        release(lease).await;
        None
    };
    let mut body = pin!(body);
    if body.is_end_stream() {
        // Nothing to stream: the head ends the response, so store first.
        if let Some(recording) = recording.take() {
            recording.complete(engine).await;
        }
        let _ = reply.send(Ok(Response::from_parts(
            head,
            ResponseBody::full(Bytes::new()),
        )));
        return;
    }
    // The frame that reaches the declared length ends the response for the
    // client even before the body says so.
    let known_len = body.size_hint().exact().or_else(|| {
        head.headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse().ok())
    });
    let (frames, receiver) = mpsc::channel::<FrameResult>(FRAMES_IN_FLIGHT);
    let mut client = Some(frames);
    let response = Response::from_parts(head, ResponseBody::channel(receiver, body.size_hint()));
    if reply.send(Ok(response)).is_err() {
        if cancel {
            return; // the recording drops with its lease: released
        }
        client = None;
    }
    let mut received: u64 = 0;
    loop {
        if client.is_none() && recording.is_none() {
            return; // nobody to answer and nothing to store
        }
        // Errors become `BoxError` inside the poll, so no `ResBody::Error` (which
        // need not be `Send`) is held across an await.
        let next = AssertUnwindSafe(poll_fn(|cx| {
            body.as_mut()
                .poll_frame(cx)
                .map(|frame| frame.map(|f| f.map_err(Into::<BoxError>::into)))
        }))
        .catch_unwind();
        let next = match (&client, cancel) {
            (Some(frames), true) => tokio::select! {
                next = next => next,
                () = frames.closed() => return,
            },
            _ => next.await,
        };
        let frame = match next {
            Ok(None) => {
                if let Some(recording) = recording.take() {
                    recording.complete(engine).await;
                }
                return; // dropping the sender ends the client's body
            }
            Ok(Some(Ok(frame))) => frame,
            Ok(Some(Err(error))) => {
                if let Some(recording) = recording.take() {
                    release(recording.lease).await;
                }
                forward(&mut client, Err(error)).await;
                return;
            }
            Err(_panic) => {
                tracing::error!("the response body panicked: lease released");
                if let Some(recording) = recording.take() {
                    release(recording.lease).await;
                }
                forward(&mut client, Err("the response body panicked".into())).await;
                return;
            }
        };
        let last = match frame.data_ref() {
            Some(data) => {
                received += data.len() as u64;
                if let Some(rec) = recording.as_mut() {
                    if rec.len + data.len() > settings.max_response_body {
                        Stats::incr(not_stored);
                        if let Some(recording) = recording.take() {
                            release(recording.lease).await;
                        }
                    } else {
                        rec.len += data.len();
                        rec.chunks.push(data.clone());
                    }
                }
                body.is_end_stream() || known_len == Some(received)
            }
            // Trailers end a body; they are forwarded but not stored.
            None => true,
        };
        if last {
            if let Some(recording) = recording.take() {
                recording.complete(engine).await;
            }
        }
        if !forward(&mut client, Ok(frame)).await && cancel {
            if let Some(recording) = recording.take() {
                release(recording.lease).await;
            }
            return;
        }
        if body.is_end_stream() {
            return;
        }
    }
}

/// Sends a frame to the client; answers whether the client is still there.
async fn forward(client: &mut Option<mpsc::Sender<FrameResult>>, frame: FrameResult) -> bool {
    let Some(frames) = client else {
        return false;
    };
    if frames.send(frame).await.is_err() {
        *client = None;
        return false;
    }
    true
}

fn storable(head: &http::response::Parts, settings: &Settings) -> bool {
    (settings.store_status)(head.status) && !no_store(&head.headers)
}

/// Whether `Cache-Control` carries the `no-store` directive.
fn no_store(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|directive| directive.trim().eq_ignore_ascii_case("no-store"))
}

const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// The headers a replay may carry: no hop-by-hop headers (those named by
/// `Connection` included), no `Date` (the server writes a fresh one), no
/// `Set-Cookie` unless asked, and no stale replay mark.
fn stored_headers(headers: &HeaderMap, settings: &Settings) -> HeaderMap {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    let mut kept = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        let dropped = HOP_BY_HOP.contains(name)
            || listed.contains(name)
            || name == header::DATE
            || name == REPLAYED
            || (name == header::SET_COOKIE && !settings.replay_set_cookie);
        if !dropped {
            kept.append(name.clone(), value.clone());
        }
    }
    kept
}

fn replay(stored: &StoredResponse, settings: &Settings) -> Response<Bytes> {
    let mut response = Response::new(stored.body.clone());
    *response.status_mut() = stored.status;
    // Filter again: the record may come from another writer or configuration.
    *response.headers_mut() = stored_headers(&stored.headers, settings);
    response
        .headers_mut()
        .insert(REPLAYED, HeaderValue::from_static("true"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_store_directive() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("private, No-Store"),
        );
        assert!(no_store(&headers));
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        assert!(!no_store(&headers));
    }
}
