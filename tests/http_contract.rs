//! The HTTP behaviour table of DESIGN.md, row by row, over real HTTP.

mod common;

use std::sync::Arc;

use axum::body::Body;
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use common::*;
use http::{Method, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use tokio::sync::{mpsc, Semaphore};
use tokio_stream_shim::ReceiverStream;
use tower_idempotency::problem;
use tower_idempotency::{FingerprintMode, IdempotencyLayer, KeyFilter};

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

#[tokio::test]
async fn unprotected_method_passes_through_untouched_and_unbuffered() {
    let layer = IdempotencyLayer::builder()
        .max_request_body(16)
        .build()
        .unwrap();
    let handle = layer.handle();
    let (seen, runs) = (Arc::new(Semaphore::new(0)), Runs::default());
    let app = Router::new()
        .route("/echo", first_frame_echo(seen.clone(), runs.clone()))
        .layer(layer);
    let server = serve(app).await;

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

#[tokio::test]
async fn no_key_passes_through_untouched_and_unbuffered() {
    let layer = IdempotencyLayer::builder()
        .max_request_body(16)
        .build()
        .unwrap();
    let handle = layer.handle();
    let (seen, runs) = (Arc::new(Semaphore::new(0)), Runs::default());
    let app = Router::new()
        .route("/echo", first_frame_echo(seen.clone(), runs.clone()))
        .layer(layer);
    let server = serve(app).await;

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

#[tokio::test]
async fn missing_key_under_require_key_is_400() {
    let layer = IdempotencyLayer::builder()
        .require_key(true)
        .build()
        .unwrap();
    let handle = layer.handle();
    let runs = Runs::default();
    let app = Router::new()
        .route("/orders", orders(runs.clone()).get(|| async { "listed" }))
        .layer(layer);
    let server = serve(app).await;

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

#[tokio::test]
async fn malformed_keys_are_400_and_valid_forms_are_one_key() {
    let layer = IdempotencyLayer::new();
    let handle = layer.handle();
    let runs = Runs::default();
    let app = Router::new()
        .route("/orders", orders(runs.clone()))
        .layer(layer);
    let server = serve(app).await;

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

#[tokio::test]
async fn oversized_request_body_is_413_and_the_service_is_not_called() {
    let layer = IdempotencyLayer::builder()
        .max_request_body(16)
        .build()
        .unwrap();
    let handle = layer.handle();
    let runs = Runs::default();
    let app = Router::new()
        .route("/orders", orders(runs.clone()))
        .layer(layer);
    let server = serve(app).await;

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

#[tokio::test]
async fn retry_after_completion_replays_status_headers_and_body() {
    let layer = IdempotencyLayer::new();
    let handle = layer.handle();
    let runs = Runs::default();
    let app = Router::new()
        .route("/orders", orders(runs.clone()))
        .layer(layer);
    let server = serve(app).await;

    let first = server
        .post("/orders", Some("order-1"), r#"{"item":"book"}"#)
        .await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert!(!first.replayed(), "a first response carries no replay mark");
    for _ in 0..3 {
        let retry = server
            .post("/orders", Some("order-1"), r#"{"item":"book"}"#)
            .await;
        assert_eq!(retry.status, StatusCode::CREATED);
        assert!(retry.replayed());
        assert_eq!(retry.body, first.body);
        assert_eq!(retry.headers["content-type"], "application/json");
    }
    assert_eq!(runs.get(), 1);
    let stats = handle.stats();
    assert_eq!((stats.executed, stats.replayed), (1, 3));
}

#[tokio::test]
async fn retry_with_another_body_or_query_is_422() {
    let layer = IdempotencyLayer::new();
    let handle = layer.handle();
    let runs = Runs::default();
    let app = Router::new()
        .route("/orders", orders(runs.clone()))
        .layer(layer);
    let server = serve(app).await;

    assert_eq!(
        server.post("/orders", Some("k"), "{\"n\":1}").await.status,
        StatusCode::CREATED
    );
    let body = server.post("/orders", Some("k"), "{\"n\":2}").await;
    assert_eq!(body.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body.problem().kind, problem::KEY_REUSED);
    let query = server.post("/orders?draft=1", Some("k"), "{\"n\":1}").await;
    assert_eq!(query.status, StatusCode::UNPROCESSABLE_ENTITY);
    // Another path or method is another key, not a mismatch.
    let patch = server
        .call(Method::PATCH, "/orders", Some("k"), "{\"n\":2}")
        .await;
    assert_eq!(patch.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(runs.get(), 1);
    assert_eq!(handle.stats().mismatches, 2);
}

#[tokio::test]
async fn json_canonical_fingerprint_ignores_key_order_and_whitespace() {
    let layer = IdempotencyLayer::builder()
        .fingerprint(FingerprintMode::JsonCanonical)
        .build()
        .unwrap();
    let runs = Runs::default();
    let app = Router::new()
        .route("/orders", orders(runs.clone()))
        .layer(layer);
    let server = serve(app).await;

    let first = server
        .post("/orders", Some("j"), r#"{"a":1,"b":[1,2]}"#)
        .await;
    let same = server
        .post("/orders", Some("j"), "{ \"b\": [1, 2],\n \"a\": 1 }")
        .await;
    assert!(same.replayed());
    assert_eq!(same.body, first.body);
    let other = server
        .post("/orders", Some("j"), r#"{"a":1,"b":[2,1]}"#)
        .await;
    assert_eq!(other.status, StatusCode::UNPROCESSABLE_ENTITY);
    // Not JSON: hashed as it is.
    server.post("/orders", Some("t"), "plain text").await;
    assert!(server
        .post("/orders", Some("t"), "plain text")
        .await
        .replayed());
    assert_eq!(
        server
            .post("/orders", Some("t"), "plain  text")
            .await
            .status,
        StatusCode::UNPROCESSABLE_ENTITY
    );
    assert_eq!(runs.get(), 2);
}

#[tokio::test]
async fn one_client_is_never_replayed_another_clients_response() {
    let layer = IdempotencyLayer::new();
    let runs = Runs::default();
    let app = Router::new()
        .route("/orders", orders(runs.clone()))
        .layer(layer);
    let server = serve(app).await;
    let send = |auth: &'static str| {
        let request = server
            .request(Method::POST, "/orders")
            .header("idempotency-key", "same")
            .header("authorization", auth)
            .body(full("{}"))
            .unwrap();
        server.send(request)
    };
    let alice = send("Bearer alice").await;
    let bob = send("Bearer bob").await;
    assert!(!bob.replayed());
    assert_ne!(alice.body, bob.body);
    assert!(send("Bearer alice").await.replayed());
    assert_eq!(runs.get(), 2);
}

#[tokio::test]
async fn replays_drop_date_set_cookie_and_hop_by_hop_headers() {
    for replay_set_cookie in [false, true] {
        let layer = IdempotencyLayer::builder()
            .replay_set_cookie(replay_set_cookie)
            .build()
            .unwrap();
        let app = Router::new()
            .route(
                "/login",
                post(|| async {
                    (
                        StatusCode::OK,
                        [
                            ("date", "Mon, 01 Jan 2024 00:00:00 GMT"),
                            ("set-cookie", "session=abc"),
                            ("keep-alive", "timeout=5"),
                            ("connection", "x-hop"),
                            ("x-hop", "1"),
                            ("x-kept", "yes"),
                        ],
                        "welcome",
                    )
                }),
            )
            .layer(layer);
        let server = serve(app).await;
        let first = server.post("/login", Some("l"), "").await;
        assert_eq!(first.headers["date"], "Mon, 01 Jan 2024 00:00:00 GMT");
        assert_eq!(first.headers["set-cookie"], "session=abc");
        let replay = server.post("/login", Some("l"), "").await;
        assert!(replay.replayed());
        assert_eq!(replay.text(), "welcome");
        assert_eq!(replay.headers["x-kept"], "yes");
        // The server writes a fresh Date.
        assert_ne!(replay.headers["date"], "Mon, 01 Jan 2024 00:00:00 GMT");
        assert!(replay.headers.get("keep-alive").is_none());
        assert!(replay.headers.get("x-hop").is_none());
        assert_eq!(
            replay.headers.get("set-cookie").is_some(),
            replay_set_cookie
        );
    }
}

#[tokio::test]
async fn statuses_not_stored_by_policy_run_again() {
    let layer = IdempotencyLayer::new();
    let handle = layer.handle();
    let runs = Runs::default();
    let app = Router::new()
        .route(
            "/status/{code}",
            post({
                let runs = runs.clone();
                move |axum::extract::Path(code): axum::extract::Path<u16>| async move {
                    runs.bump();
                    (StatusCode::from_u16(code).unwrap(), "answer")
                }
            }),
        )
        .layer(layer);
    let server = serve(app).await;

    for code in [500, 503, 408, 429] {
        let path = format!("/status/{code}");
        for _ in 0..2 {
            let reply = server.post(&path, Some("s"), "").await;
            assert_eq!(reply.status.as_u16(), code);
            assert!(!reply.replayed());
        }
    }
    assert_eq!(runs.get(), 8);
    // 4xx other than 408/429 are stored: the request itself was wrong.
    server.post("/status/404", Some("s"), "").await;
    assert!(server.post("/status/404", Some("s"), "").await.replayed());
    assert_eq!(runs.get(), 9);
    assert_eq!(handle.stats().not_stored, 8);
    assert!(handle
        .keys(&KeyFilter::new().action("POST /status/500"))
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn store_status_policy_is_configurable() {
    let layer = IdempotencyLayer::builder()
        .store_status(|status: StatusCode| status.is_success())
        .build()
        .unwrap();
    let runs = Runs::default();
    let app = Router::new()
        .route(
            "/missing",
            post({
                let runs = runs.clone();
                move || async move {
                    runs.bump();
                    StatusCode::NOT_FOUND
                }
            }),
        )
        .layer(layer);
    let server = serve(app).await;
    server.post("/missing", Some("m"), "").await;
    assert!(!server.post("/missing", Some("m"), "").await.replayed());
    assert_eq!(runs.get(), 2);
}

#[tokio::test]
async fn cache_control_no_store_is_returned_not_stored() {
    let layer = IdempotencyLayer::new();
    let handle = layer.handle();
    let runs = Runs::default();
    let app = Router::new()
        .route(
            "/quote",
            post({
                let runs = runs.clone();
                move || async move {
                    let n = runs.bump();
                    (
                        [("cache-control", "private, no-store")],
                        format!("quote {n}"),
                    )
                }
            }),
        )
        .layer(layer);
    let server = serve(app).await;
    assert_eq!(server.post("/quote", Some("q"), "").await.text(), "quote 1");
    let second = server.post("/quote", Some("q"), "").await;
    assert!(!second.replayed());
    assert_eq!(second.text(), "quote 2");
    assert_eq!(handle.stats().not_stored, 2);
}

#[tokio::test]
async fn oversized_response_is_streamed_whole_but_not_stored() {
    let layer = IdempotencyLayer::builder()
        .max_response_body(100)
        .build()
        .unwrap();
    let handle = layer.handle();
    let runs = Runs::default();
    let app = Router::new()
        .route(
            "/report",
            post({
                let runs = runs.clone();
                move || async move {
                    runs.bump();
                    // Several frames, so the limit is crossed mid-stream.
                    let chunks = (0..10)
                        .map(|i| Ok::<_, BoxError>(Frame::data(Bytes::from(vec![b'0' + i; 50]))));
                    Body::new(StreamBody::new(futures_util::stream::iter(chunks)))
                }
            }),
        )
        .layer(layer);
    let server = serve(app).await;
    for _ in 0..2 {
        let reply = server.post("/report", Some("r"), "").await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.body.len(), 500);
        assert_eq!(&reply.body[450..], &[b'9'; 50][..]);
        assert!(!reply.replayed());
    }
    assert_eq!(runs.get(), 2);
    assert_eq!(handle.stats().not_stored, 2);
}

#[tokio::test]
async fn panicking_handler_gets_500_and_does_not_wedge_the_key() {
    let layer = IdempotencyLayer::new();
    let handle = layer.handle();
    let runs = Runs::default();
    let app = Router::new()
        .route(
            "/flaky",
            post({
                let runs = runs.clone();
                move || async move {
                    if runs.bump() == 1 {
                        panic!("first run fails");
                    }
                    (StatusCode::CREATED, "made")
                }
            }),
        )
        .layer(layer);
    let server = serve(app).await;
    let first = server.post("/flaky", Some("p"), "").await;
    assert_eq!(first.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(first.problem().kind, problem::INTERNAL_ERROR);
    let retry = server.post("/flaky", Some("p"), "").await;
    assert_eq!(
        (retry.status, retry.text().as_str()),
        (StatusCode::CREATED, "made")
    );
    assert!(!retry.replayed());
    assert!(server.post("/flaky", Some("p"), "").await.replayed());
    assert_eq!(runs.get(), 2);
    assert_eq!(handle.stats().executed, 2);
}
