//! The HTTP behaviour table (ARCHITECTURE.md; `src/layer/docs.md` is the
//! authoritative one), over real HTTP: replays, mismatches, what is stored
//! and what is not.

use crate::support::common;
use crate::support::stores;

use axum::body::Body;
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use common::*;
use http::{Method, StatusCode};
use http_body::Frame;
use http_body_util::StreamBody;
use stores::{per_store, TestStore};
use tower_idempotency::problem;
use tower_idempotency::{FingerprintMode, IdempotencyLayer, KeyFilter, OversizedResponse};

per_store!(retry_after_completion_replays_status_headers_and_body);
async fn retry_after_completion_replays_status_headers_and_body(store: TestStore) {
    let layer = IdempotencyLayer::builder().store(store).build().unwrap();
    let (server, handle, runs) = serve_orders(layer).await;

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

per_store!(retry_with_another_body_or_query_is_422);
async fn retry_with_another_body_or_query_is_422(store: TestStore) {
    let layer = IdempotencyLayer::builder().store(store).build().unwrap();
    let (server, handle, runs) = serve_orders(layer).await;

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

per_store!(json_canonical_fingerprint_ignores_key_order_and_whitespace);
async fn json_canonical_fingerprint_ignores_key_order_and_whitespace(store: TestStore) {
    let layer = IdempotencyLayer::builder()
        .store(store)
        .fingerprint(FingerprintMode::JsonCanonical)
        .build()
        .unwrap();
    let (server, _, runs) = serve_orders(layer).await;

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

per_store!(one_client_is_never_replayed_another_clients_response);
async fn one_client_is_never_replayed_another_clients_response(store: TestStore) {
    let layer = IdempotencyLayer::builder().store(store).build().unwrap();
    let (server, _, runs) = serve_orders(layer).await;
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
    let alice_again = send("Bearer alice").await;
    assert!(alice_again.replayed());
    assert_eq!(alice_again.body, alice.body, "Alice gets Alice's response");
    assert_eq!(runs.get(), 2);
}

per_store!(replays_drop_date_set_cookie_and_hop_by_hop_headers);
async fn replays_drop_date_set_cookie_and_hop_by_hop_headers(store: TestStore) {
    for replay_set_cookie in [false, true] {
        let layer = IdempotencyLayer::builder()
            .store(store.clone())
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
        // Both rounds share the store: each has a key of its own.
        let key = format!("l-{replay_set_cookie}");
        let first = server.post("/login", Some(&key), "").await;
        assert_eq!(first.headers["date"], "Mon, 01 Jan 2024 00:00:00 GMT");
        assert_eq!(first.headers["set-cookie"], "session=abc");
        // The hop-by-hop headers reach the first client: only the replay
        // drops them.
        assert_eq!(first.headers["keep-alive"], "timeout=5");
        assert_eq!(first.headers["x-hop"], "1");
        let replay = server.post("/login", Some(&key), "").await;
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

per_store!(statuses_not_stored_by_policy_run_again);
async fn statuses_not_stored_by_policy_run_again(store: TestStore) {
    let layer = IdempotencyLayer::builder().store(store).build().unwrap();
    let runs = Runs::default();
    let app = Router::new().route(
        "/status/{code}",
        post({
            let runs = runs.clone();
            move |axum::extract::Path(code): axum::extract::Path<u16>| async move {
                runs.bump();
                (StatusCode::from_u16(code).unwrap(), "answer")
            }
        }),
    );
    let (server, handle) = serve_layered(layer, app).await;

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

per_store!(store_status_policy_is_configurable);
async fn store_status_policy_is_configurable(store: TestStore) {
    let layer = IdempotencyLayer::builder()
        .store(store)
        .store_status(|status: StatusCode| status.is_success())
        .build()
        .unwrap();
    let runs = Runs::default();
    let app = Router::new().route(
        "/missing",
        post({
            let runs = runs.clone();
            move || async move {
                runs.bump();
                StatusCode::NOT_FOUND
            }
        }),
    );
    let (server, _) = serve_layered(layer, app).await;
    server.post("/missing", Some("m"), "").await;
    assert!(!server.post("/missing", Some("m"), "").await.replayed());
    assert_eq!(runs.get(), 2);
}

per_store!(cache_control_no_store_is_returned_not_stored);
async fn cache_control_no_store_is_returned_not_stored(store: TestStore) {
    let layer = IdempotencyLayer::builder().store(store).build().unwrap();
    let runs = Runs::default();
    let app = Router::new().route(
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
    );
    let (server, handle) = serve_layered(layer, app).await;
    assert_eq!(server.post("/quote", Some("q"), "").await.text(), "quote 1");
    let second = server.post("/quote", Some("q"), "").await;
    assert!(!second.replayed());
    assert_eq!(second.text(), "quote 2");
    assert_eq!(handle.stats().not_stored, 2);
}

/// A handler that counts its runs and answers 500 bytes in ten frames, so a
/// limit of 100 is crossed mid-stream.
fn report(runs: Runs) -> Router {
    Router::new().route(
        "/report",
        post(move || async move {
            runs.bump();
            let chunks =
                (0..10).map(|i| Ok::<_, BoxError>(Frame::data(Bytes::from(vec![b'0' + i; 50]))));
            (
                [("location", "/reports/1")],
                Body::new(StreamBody::new(futures_util::stream::iter(chunks))),
            )
        }),
    )
}

per_store!(oversized_response_is_streamed_whole_and_its_head_replayed);
async fn oversized_response_is_streamed_whole_and_its_head_replayed(store: TestStore) {
    let layer = IdempotencyLayer::builder()
        .store(store)
        .max_response_body(100)
        .build()
        .unwrap();
    let runs = Runs::default();
    let (server, handle) = serve_layered(layer, report(runs.clone())).await;
    let first = server.post("/report", Some("r"), "").await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(
        first.body.len(),
        500,
        "the first client gets the whole body"
    );
    assert_eq!(&first.body[450..], &[b'9'; 50][..]);
    assert!(!first.replayed());
    for _ in 0..2 {
        let retry = server.post("/report", Some("r"), "").await;
        assert_eq!(retry.status, StatusCode::OK);
        assert!(retry.replayed());
        assert_eq!(retry.headers["idempotency-replay"], "omitted");
        assert_eq!(retry.headers["location"], "/reports/1");
        assert_eq!(retry.headers["content-length"], "0");
        assert!(retry.body.is_empty());
    }
    assert_eq!(runs.get(), 1, "an oversized answer never runs twice");
    let stats = handle.stats();
    assert_eq!((stats.omitted, stats.not_stored), (1, 0));
    assert_eq!(stats.replayed, 2);
}

per_store!(oversized_response_under_release_is_streamed_whole_but_not_stored);
async fn oversized_response_under_release_is_streamed_whole_but_not_stored(store: TestStore) {
    let layer = IdempotencyLayer::builder()
        .store(store)
        .max_response_body(100)
        .oversized_response(OversizedResponse::Release)
        .build()
        .unwrap();
    let runs = Runs::default();
    let (server, handle) = serve_layered(layer, report(runs.clone())).await;
    for _ in 0..2 {
        let reply = server.post("/report", Some("r"), "").await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.body.len(), 500);
        assert_eq!(&reply.body[450..], &[b'9'; 50][..]);
        assert!(!reply.replayed());
    }
    assert_eq!(runs.get(), 2);
    assert_eq!(handle.stats().not_stored, 2);
    assert_eq!(handle.stats().omitted, 0);
}

per_store!(panicking_handler_gets_500_and_does_not_wedge_the_key);
async fn panicking_handler_gets_500_and_does_not_wedge_the_key(store: TestStore) {
    let layer = IdempotencyLayer::builder().store(store).build().unwrap();
    let runs = Runs::default();
    let app = Router::new().route(
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
    );
    let (server, handle) = serve_layered(layer, app).await;
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

per_store!(the_storage_key_is_scoped_by_method_path_and_client);
async fn the_storage_key_is_scoped_by_method_path_and_client(store: TestStore) {
    // The storage key is the client's key, the method, the path without its
    // query, and the client's scope (the Authorization hash): one key sent
    // to another path, with another method or by another client is another
    // action and runs; the same key with another query is the same action
    // with another request (422).
    let layer = IdempotencyLayer::builder().store(store).build().unwrap();
    let runs = Runs::default();
    let handler = {
        let runs = runs.clone();
        move |method: Method, uri: http::Uri, body: Bytes| {
            let runs = runs.clone();
            async move {
                let id = runs.bump();
                format!("run {id}: {method} {uri} {}", body.len())
            }
        }
    };
    let router = Router::new()
        .route("/orders", post(handler.clone()).patch(handler.clone()))
        .route("/invoices", post(handler));
    let (server, _handle) = serve_layered(layer, router).await;
    let send = |method: Method, path: &'static str, auth: Option<&'static str>| {
        let mut request = server
            .request(method, path)
            .header("idempotency-key", "same");
        if let Some(auth) = auth {
            request = request.header("authorization", auth);
        }
        server.send(request.body(full("{}")).unwrap())
    };

    let first = send(Method::POST, "/orders", None).await;
    assert_eq!(first.status, StatusCode::OK);
    assert!(!first.replayed());
    let other_query = send(Method::POST, "/orders?page=2", None).await;
    assert_eq!(
        other_query.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "the query is not part of the key: it is the same key, another request"
    );
    let actions = [
        (Method::POST, "/invoices", None),
        (Method::PATCH, "/orders", None),
        (Method::POST, "/orders", Some("Bearer other")),
    ];
    let mut answers = vec![first];
    for (method, path, auth) in actions.clone() {
        let reply = send(method.clone(), path, auth).await;
        assert_eq!(reply.status, StatusCode::OK, "{method} {path} {auth:?}");
        assert!(!reply.replayed(), "{method} {path} {auth:?} was replayed");
        answers.push(reply);
    }
    assert_eq!(runs.get(), 4, "each method, path and client ran once");

    // Each retry replays its own action's answer.
    let all = std::iter::once((Method::POST, "/orders", None)).chain(actions);
    for ((method, path, auth), answer) in all.zip(&answers) {
        let retry = send(method.clone(), path, auth).await;
        assert!(retry.replayed(), "{method} {path} {auth:?} ran again");
        assert_eq!(retry.body, answer.body, "{method} {path} {auth:?}");
    }
    assert_eq!(runs.get(), 4);
}
