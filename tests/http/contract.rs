//! The HTTP behaviour table (ARCHITECTURE.md; `src/layer/docs.md` is the
//! authoritative one), over real HTTP: what reaches the service
//! (pass-through, keys, 400, 413). Replays and storage policy are in
//! `replay.rs`.

use crate::support::common;
use crate::support::stores;

use std::sync::Arc;

use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use common::*;
use http::{Method, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use stores::{per_store, TestStore};
use tokio::sync::{mpsc, Semaphore};
use tokio_stream_shim::ReceiverStream;
use tower_idempotency::problem;
use tower_idempotency::{Idempotency, IdempotencyLayer, KeyFilter};

/// A tiny `Stream` over an mpsc receiver, so tests need no extra crate.
mod tokio_stream_shim {
    use std::pin::Pin;
    use std::task::{Context, Poll};
    use tokio::sync::mpsc;

    pub(crate) struct ReceiverStream<T>(pub(crate) mpsc::Receiver<T>);

    impl<T> futures_util::Stream for ReceiverStream<T> {
        type Item = T;
        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
            self.0.poll_recv(cx)
        }
    }
}

type FrameTx = mpsc::Sender<Result<Frame<Bytes>, BoxError>>;

fn streaming_body() -> (FrameTx, ClientBody) {
    let (tx, rx) = mpsc::channel(4);
    (tx, StreamBody::new(ReceiverStream(rx)).boxed())
}

/// A handler that reads the first request frame, says so, then reads the rest.
fn first_frame_echo(seen: Arc<Semaphore>, runs: Runs) -> axum::routing::MethodRouter {
    let handler = move |request: axum::extract::Request| {
        let seen = seen.clone();
        let runs = runs.clone();
        async move {
            runs.bump();
            let mut body = request.into_body();
            let mut len = 0;
            let mut first = true;
            while let Some(frame) = body.frame().await {
                len += frame.unwrap().into_data().map_or(0, |d| d.len());
                if first {
                    seen.add_permits(1);
                    first = false;
                }
            }
            len.to_string()
        }
    };
    post(handler.clone()).put(handler)
}

/// [`first_frame_echo`] at `/echo` behind a layer with a 16-byte request
/// body limit: the server, the layer's handle, the handler's first-frame
/// signal and its run count.
async fn serve_echo(store: TestStore) -> (Server, Idempotency<TestStore>, Arc<Semaphore>, Runs) {
    let layer = IdempotencyLayer::builder()
        .store(store)
        .max_request_body(16)
        .build()
        .unwrap();
    let (seen, runs) = (Arc::new(Semaphore::new(0)), Runs::default());
    let app = Router::new().route("/echo", first_frame_echo(seen.clone(), runs.clone()));
    let (server, handle) = serve_layered(layer, app).await;
    (server, handle, seen, runs)
}

/// Sends two 32-byte chunks; the second only after the handler saw the
/// first. A layer that buffered the body would never let the handler see the
/// first chunk alone: the test would time out.
async fn send_streamed(
    server: &Server,
    method: Method,
    key: Option<&str>,
    seen: &Semaphore,
) -> Reply {
    let (tx, body) = streaming_body();
    let mut request = server.request(method, "/echo");
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    let request = request.body(body).unwrap();
    let client = server.client.clone();
    let response = tokio::spawn(async move { client.request(request).await });
    tx.send(Ok(Frame::data(Bytes::from(vec![b'a'; 32]))))
        .await
        .unwrap();
    within(seen.acquire()).await.unwrap().forget();
    tx.send(Ok(Frame::data(Bytes::from(vec![b'b'; 32]))))
        .await
        .unwrap();
    drop(tx);
    let response = within(response).await.unwrap().unwrap();
    let (parts, body) = response.into_parts();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: within(body.collect()).await.unwrap().to_bytes(),
    }
}

per_store!(unprotected_method_passes_through_untouched_and_unbuffered);
async fn unprotected_method_passes_through_untouched_and_unbuffered(store: TestStore) {
    let (server, handle, seen, runs) = serve_echo(store).await;

    for _ in 0..2 {
        // 64 bytes, over the 16-byte limit: no 413, since PUT is not protected.
        let reply = send_streamed(&server, Method::PUT, Some("k1"), &seen).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.text(), "64");
        assert!(!reply.replayed());
    }
    assert_eq!(runs.get(), 2);
    assert!(handle.keys(&KeyFilter::new()).await.unwrap().is_empty());
    assert_eq!(handle.stats().requests, 2);
    assert_eq!(handle.stats().executed, 0);
}

per_store!(no_key_passes_through_untouched_and_unbuffered);
async fn no_key_passes_through_untouched_and_unbuffered(store: TestStore) {
    let (server, handle, seen, runs) = serve_echo(store).await;

    for _ in 0..2 {
        let reply = send_streamed(&server, Method::POST, None, &seen).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.text(), "64");
        assert!(!reply.replayed());
    }
    assert_eq!(runs.get(), 2);
    assert!(handle.keys(&KeyFilter::new()).await.unwrap().is_empty());
    let stats = handle.stats();
    assert_eq!((stats.requests, stats.executed, stats.too_large), (2, 0, 0));
}

per_store!(missing_key_under_require_key_is_400);
async fn missing_key_under_require_key_is_400(store: TestStore) {
    let layer = IdempotencyLayer::builder()
        .store(store)
        .require_key(true)
        .build()
        .unwrap();
    let runs = Runs::default();
    let app = Router::new().route("/orders", orders(runs.clone()).get(|| async { "listed" }));
    let (server, handle) = serve_layered(layer, app).await;

    let reply = server.post("/orders", None, "{}").await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.problem().kind, problem::MISSING_KEY);
    assert_eq!(runs.get(), 0);
    // GET is not protected: no key needed.
    let reply = server.call(Method::GET, "/orders", None, "").await;
    assert_eq!(
        (reply.status, reply.text().as_str()),
        (StatusCode::OK, "listed")
    );
    assert_eq!(handle.stats().rejected_keys, 1);
}

per_store!(malformed_keys_are_400_and_valid_forms_are_one_key);
async fn malformed_keys_are_400_and_valid_forms_are_one_key(store: TestStore) {
    let layer = IdempotencyLayer::builder().store(store).build().unwrap();
    let (server, handle, runs) = serve_orders(layer).await;

    let too_long = "k".repeat(256);
    let quoted_too_long = format!("\"{too_long}\"");
    let malformed = [
        "",
        "\"\"",
        too_long.as_str(),
        quoted_too_long.as_str(),
        "a\tb",
        "\"a\tb\"",
        "\"abc",
        "\"a\"b\"",
        "a\"b",
        "a,b",
        "a\\b",
        "\"a\", \"b\"",
    ];
    for key in malformed {
        let reply = server.post("/orders", Some(key), "{}").await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "key {key:?}");
        assert_eq!(reply.problem().kind, problem::MALFORMED_KEY);
    }
    // Two Idempotency-Key fields.
    let request = server
        .request(Method::POST, "/orders")
        .header("idempotency-key", "a")
        .header("idempotency-key", "b")
        .body(full("{}"))
        .unwrap();
    let reply = server.send(request).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.problem().kind, problem::MALFORMED_KEY);
    assert_eq!(runs.get(), 0);
    assert_eq!(handle.stats().rejected_keys, malformed.len() as u64 + 1);

    // A Stripe-style UUID starting with a digit, bare; then quoted: one key.
    let uuid = "8e03978e-40d5-43e8-bc93-6894a57f9324";
    let first = server.post("/orders", Some(uuid), "{}").await;
    assert_eq!(first.status, StatusCode::CREATED);
    let again = server
        .post("/orders", Some(&format!("\"{uuid}\"")), "{}")
        .await;
    assert!(again.replayed());
    assert_eq!(again.body, first.body);
    // 255 characters is fine; a quoted key may hold spaces.
    let longest = "k".repeat(255);
    assert_eq!(
        server.post("/orders", Some(&longest), "{}").await.status,
        StatusCode::CREATED
    );
    assert_eq!(
        server.post("/orders", Some("\"a b\""), "{}").await.status,
        StatusCode::CREATED
    );
    assert_eq!(runs.get(), 3);
}

per_store!(oversized_request_body_is_413_and_the_service_is_not_called);
async fn oversized_request_body_is_413_and_the_service_is_not_called(store: TestStore) {
    let layer = IdempotencyLayer::builder()
        .store(store)
        .max_request_body(16)
        .build()
        .unwrap();
    let (server, handle, runs) = serve_orders(layer).await;

    // Declared length over the limit.
    let reply = server.post("/orders", Some("big"), &"x".repeat(17)).await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(reply.problem().kind, problem::BODY_TOO_LARGE);
    // No declared length: the limit is found while buffering.
    let (tx, body) = streaming_body();
    let request = server
        .request(Method::POST, "/orders")
        .header("idempotency-key", "big2")
        .body(body)
        .unwrap();
    let client = server.client.clone();
    let response = tokio::spawn(async move { client.request(request).await });
    for _ in 0..3 {
        // The server may answer 413 before it reads everything.
        let _ = tx
            .send(Ok(Frame::data(Bytes::from_static(b"0123456789"))))
            .await;
    }
    drop(tx);
    let response = within(response).await.unwrap().unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    // At the limit is fine.
    let reply = server.post("/orders", Some("fits"), &"x".repeat(16)).await;
    assert_eq!(reply.status, StatusCode::CREATED);
    assert_eq!(runs.get(), 1);
    assert_eq!(handle.stats().too_large, 2);
}
