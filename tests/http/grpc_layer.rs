//! gRPC calls through the layer, in process (the tonic example's tests run
//! them over real HTTP/2): statuses decide what is stored, the layer's own
//! answers are Trailers-Only statuses, streaming paths pass through.

use crate::support::common;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use common::{within, BoxError, Runs};
use http::{HeaderMap, HeaderName, Request, Response};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use tower::{service_fn, ServiceBuilder, ServiceExt};
use tower_idempotency::{Concurrent, IdempotencyLayer, RequestBody};

/// A unary call's request: one length-prefixed message.
fn call(path: &str, key: Option<&str>, message: &[u8]) -> Request<Body> {
    let mut framed = vec![0];
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(message);
    let mut request = Request::post(path)
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    request.body(Body::from(framed)).unwrap()
}

/// A gRPC answer: a message, then trailers with `status`.
fn answer(status: u32, message: &'static str) -> Response<Body> {
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", status.into());
    trailers.insert("grpc-message", message.parse().unwrap());
    trailers.insert("x-order", "42".parse().unwrap());
    let frames = futures_util::stream::iter([
        Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"\0\0\0\0\x02ok"))),
        Ok(Frame::trailers(trailers)),
    ]);
    Response::builder()
        .header("content-type", "application/grpc")
        .body(Body::new(StreamBody::new(frames)))
        .unwrap()
}

struct Answered {
    headers: HeaderMap,
    body: Bytes,
    trailers: Option<HeaderMap>,
}

impl Answered {
    /// The `grpc-status`, from the trailers or a Trailers-Only head.
    fn status(&self) -> String {
        let from = self.trailers.as_ref().unwrap_or(&self.headers);
        from["grpc-status"].to_str().unwrap().to_owned()
    }
}

async fn send<S, B>(service: &S, request: Request<Body>) -> Answered
where
    S: tower::Service<Request<Body>, Response = Response<B>> + Clone,
    S::Error: std::fmt::Debug,
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    let response = within(service.clone().oneshot(request)).await.unwrap();
    let headers = response.headers().clone();
    let collected = within(response.into_body().collect()).await.unwrap();
    Answered {
        headers,
        trailers: collected.trailers().cloned(),
        body: collected.to_bytes(),
    }
}

#[tokio::test]
async fn statuses_that_a_retry_would_meet_again_are_stored_with_their_trailers() {
    let runs = Runs::default();
    let layer = IdempotencyLayer::new();
    let service = ServiceBuilder::new()
        .layer(layer.clone())
        .service(service_fn({
            let runs = runs.clone();
            move |request: Request<RequestBody<Body>>| {
                let runs = runs.clone();
                async move {
                    runs.bump();
                    let status = if request.uri().path().ends_with("Refuse") {
                        9
                    } else {
                        0
                    };
                    Ok::<_, BoxError>(answer(status, "done"))
                }
            }
        }));
    for path in ["/orders.Orders/Create", "/orders.Orders/Refuse"] {
        let first = send(&service, call(path, Some(path), b"m")).await;
        let retry = send(&service, call(path, Some(path), b"m")).await;
        assert!(first.headers.get("idempotent-replayed").is_none());
        assert_eq!(retry.headers["idempotent-replayed"], "true", "{path}");
        assert_eq!(retry.body, first.body);
        assert_eq!(retry.trailers, first.trailers, "{path}: same trailers");
    }
    assert_eq!(runs.get(), 2);
    assert_eq!(layer.handle().stats().replayed, 2);
}

#[tokio::test]
async fn statuses_a_retry_may_not_meet_again_release_the_key() {
    let runs = Runs::default();
    let service = ServiceBuilder::new()
        .layer(IdempotencyLayer::new())
        .service(service_fn({
            let runs = runs.clone();
            move |_: Request<RequestBody<Body>>| {
                runs.bump();
                async { Ok::<_, BoxError>(answer(14, "try later")) }
            }
        }));
    for _ in 0..2 {
        let reply = send(&service, call("/orders.Orders/Create", Some("u"), b"m")).await;
        assert_eq!(reply.status(), "14");
        assert!(reply.headers.get("idempotent-replayed").is_none());
    }
    assert_eq!(runs.get(), 2, "UNAVAILABLE is not stored: the retry runs");
}

#[tokio::test]
async fn the_layers_own_answers_are_trailers_only_statuses() {
    let gate = Arc::new(tokio::sync::Notify::new());
    let (entered_tx, mut entered) = tokio::sync::mpsc::unbounded_channel();
    let layer = IdempotencyLayer::builder()
        .require_key(true)
        .build()
        .unwrap();
    let service = ServiceBuilder::new().layer(layer).service(service_fn({
        let gate = gate.clone();
        move |_: Request<RequestBody<Body>>| {
            let (gate, entered) = (gate.clone(), entered_tx.clone());
            async move {
                let _ = entered.send(());
                gate.notified().await;
                Ok::<_, BoxError>(answer(0, "done"))
            }
        }
    }));
    let missing = send(&service, call("/orders.Orders/Create", None, b"m")).await;
    assert_eq!(missing.status(), "3", "no key: INVALID_ARGUMENT");
    assert!(missing.trailers.is_none() && missing.body.is_empty());
    assert_eq!(missing.headers["content-type"], "application/grpc");

    let first = tokio::spawn(service.clone().oneshot(call(
        "/orders.Orders/Create",
        Some("k"),
        b"m",
    )));
    within(entered.recv()).await.unwrap();
    // The duplicate meets the first in flight: ABORTED with a pushback.
    let duplicate = send(&service, call("/orders.Orders/Create", Some("k"), b"m")).await;
    assert_eq!(duplicate.status(), "10");
    assert_eq!(duplicate.headers["grpc-retry-pushback-ms"], "1000");
    let message = duplicate.headers["grpc-message"].to_str().unwrap();
    assert!(message.contains("still being processed"), "{message}");
    let mismatch = send(&service, call("/orders.Orders/Create", Some("k"), b"other")).await;
    assert_eq!(
        mismatch.status(),
        "9",
        "another message: FAILED_PRECONDITION"
    );
    gate.notify_one();
    let first = within(first).await.unwrap().unwrap();
    let collected = within(first.into_body().collect()).await.unwrap();
    assert_eq!(collected.trailers().unwrap()["grpc-status"], "0");
}

#[tokio::test]
async fn a_listed_streaming_call_passes_and_an_unlisted_one_ends_with_a_status() {
    let runs = Runs::default();
    let layer = IdempotencyLayer::builder()
        .grpc_streaming_paths(["/chat.Chat/Talk"])
        .grpc_request_timeout(Duration::from_millis(200))
        .concurrent(Concurrent::wait())
        .build()
        .unwrap();
    let handle = layer.handle();
    let service = ServiceBuilder::new().layer(layer).service(service_fn({
        let runs = runs.clone();
        move |_: Request<RequestBody<Body>>| {
            runs.bump();
            async { Ok::<_, BoxError>(answer(0, "hello")) }
        }
    }));
    // A request stream that never ends, as a bidirectional client's that
    // waits for a reply first.
    let endless = |path: &str| {
        let (_keep, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(1);
        let stream = tokio_stream_from(rx, _keep);
        Request::post(path)
            .header("content-type", "application/grpc")
            .header("idempotency-key", "s")
            .body(Body::new(StreamBody::new(stream)))
            .unwrap()
    };
    let listed = send(&service, endless("/chat.Chat/Talk")).await;
    assert_eq!(
        listed.status(),
        "0",
        "a listed streaming call reaches the service"
    );
    let unlisted = send(&service, endless("/chat.Chat/Other")).await;
    assert_eq!(unlisted.status(), "12", "UNIMPLEMENTED, not a hang");
    let message = unlisted.headers["grpc-message"].to_str().unwrap();
    assert!(message.contains("grpc_streaming_paths"), "{message}");
    assert_eq!(runs.get(), 1, "the unlisted call never ran");
    assert_eq!(
        handle.stats().executed,
        0,
        "a streaming call is not protected"
    );
}

/// A stream of the frames `rx` yields, holding `tx` so it never ends.
fn tokio_stream_from(
    rx: tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, BoxError>>,
    tx: tokio::sync::mpsc::Sender<Result<Frame<Bytes>, BoxError>>,
) -> impl futures_util::Stream<Item = Result<Frame<Bytes>, BoxError>> {
    futures_util::stream::unfold((rx, tx), |(mut rx, tx)| async move {
        let frame = rx.recv().await?;
        Some((frame, (rx, tx)))
    })
}

#[tokio::test]
async fn an_ok_answer_too_large_to_keep_replays_as_completed_not_kept() {
    let runs = Runs::default();
    let layer = IdempotencyLayer::builder()
        .max_response_body(4)
        .replay_header(HeaderName::from_static("idempotency-replayed"))
        .build()
        .unwrap();
    let service = ServiceBuilder::new().layer(layer).service(service_fn({
        let runs = runs.clone();
        move |_: Request<RequestBody<Body>>| {
            runs.bump();
            async { Ok::<_, BoxError>(answer(0, "done")) }
        }
    }));
    let first = send(&service, call("/orders.Orders/Create", Some("big"), b"m")).await;
    assert_eq!(first.status(), "0");
    assert_eq!(first.body.len(), 7);
    let retry = send(&service, call("/orders.Orders/Create", Some("big"), b"m")).await;
    assert_eq!(retry.headers["idempotency-replayed"], "true");
    assert!(retry.headers.get("idempotent-replayed").is_none());
    assert_eq!(retry.headers["idempotency-replay"], "omitted");
    assert!(retry.body.is_empty());
    assert_eq!(retry.status(), "6", "ALREADY_EXISTS: the call completed");
    let trailers = retry.trailers.unwrap();
    assert!(trailers["grpc-message"]
        .to_str()
        .unwrap()
        .contains("not kept"));
    assert_eq!(trailers["x-order"], "42");
    assert_eq!(runs.get(), 1);
}
