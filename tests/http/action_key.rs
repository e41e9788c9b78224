//! `ActionKey` on the HTTP layer, over real HTTP on 127.0.0.1, on each store.

use crate::support::stores;

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use http::StatusCode;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use stores::{per_store, TestStore};
use tower_idempotency::extract::{fixed, from_header, from_path_segment, ActionKey};
use tower_idempotency::{FingerprintMode, Idempotency, IdempotencyLayer};

struct Server {
    base: String,
    runs: Arc<AtomicU64>,
    handle: Idempotency<TestStore>,
    client: Client<HttpConnector, Full<Bytes>>,
}

/// `POST /boards/{board}/cards` behind the layer with an action key: signal
/// from `x-signal-id`, action `create_task`, target the board.
async fn serve(store: TestStore, params_in_key: bool) -> Server {
    serve_with(store, params_in_key, FingerprintMode::Exact).await
}

async fn serve_with(store: TestStore, params_in_key: bool, fingerprint: FingerprintMode) -> Server {
    let runs = Arc::new(AtomicU64::new(0));
    let layer = IdempotencyLayer::builder()
        .store(store)
        .fingerprint(fingerprint)
        .key_extractor(
            ActionKey::new(
                from_header("x-signal-id"),
                fixed("create_task"),
                from_path_segment(1),
            )
            .include_params_in_key(params_in_key),
        )
        .build()
        .unwrap();
    let handle = layer.handle();
    let counter = runs.clone();
    let app = Router::new()
        .route(
            "/boards/{board}/cards",
            post(move |body: Bytes| {
                let counter = counter.clone();
                async move {
                    let n = counter.fetch_add(1, SeqCst) + 1;
                    (
                        StatusCode::CREATED,
                        format!("card-{n} {}", String::from_utf8_lossy(&body)),
                    )
                }
            }),
        )
        .route("/boards", post(|| async { "no board" }))
        .layer(layer);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Server {
        base,
        runs,
        handle,
        client: Client::builder(TokioExecutor::new()).build_http(),
    }
}

impl Server {
    async fn post(
        &self,
        path: &str,
        signal: Option<&str>,
        body: &str,
    ) -> (StatusCode, bool, String) {
        let mut request = http::Request::post(format!("{}{path}", self.base));
        if let Some(signal) = signal {
            request = request.header("x-signal-id", signal);
        }
        let request = request
            .body(Full::new(Bytes::from(body.to_owned())))
            .unwrap();
        let exchange = async {
            let response = self.client.request(request).await.unwrap();
            let status = response.status();
            let replayed = response.headers().contains_key("idempotent-replayed");
            let body = response.into_body().collect().await.unwrap().to_bytes();
            (
                status,
                replayed,
                String::from_utf8_lossy(&body).into_owned(),
            )
        };
        tokio::time::timeout(Duration::from_secs(10), exchange)
            .await
            .expect("request timed out")
    }
}

per_store!(a_retried_action_runs_once_and_is_replayed);
async fn a_retried_action_runs_once_and_is_replayed(store: TestStore) {
    let server = serve(store, true).await;
    let first = server
        .post("/boards/b1/cards", Some("sig-1"), r#"{"t":1}"#)
        .await;
    assert_eq!(
        first,
        (StatusCode::CREATED, false, r#"card-1 {"t":1}"#.to_owned())
    );
    let retry = server
        .post("/boards/b1/cards", Some("sig-1"), r#"{"t":1}"#)
        .await;
    assert_eq!(
        retry,
        (StatusCode::CREATED, true, r#"card-1 {"t":1}"#.to_owned())
    );
    assert_eq!(server.runs.load(SeqCst), 1);

    // Another board is another target: another action.
    let other = server
        .post("/boards/b2/cards", Some("sig-1"), r#"{"t":1}"#)
        .await;
    assert_eq!(other.2, r#"card-2 {"t":1}"#);

    // The stored keys are action keys the handle can query.
    let keys = tokio::time::timeout(Duration::from_secs(5), server.handle.find_by_target("b1"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(keys.len(), 1);
    assert!(
        keys[0].key.starts_with("sig-1:create_task:b1:"),
        "{}",
        keys[0].key
    );
}

per_store!(params_in_the_key_make_another_body_another_action);
async fn params_in_the_key_make_another_body_another_action(store: TestStore) {
    let server = serve(store, true).await;
    server
        .post("/boards/b1/cards", Some("sig-1"), r#"{"t":1}"#)
        .await;
    let changed = server
        .post("/boards/b1/cards", Some("sig-1"), r#"{"t":2}"#)
        .await;
    assert_eq!(
        changed,
        (StatusCode::CREATED, false, r#"card-2 {"t":2}"#.to_owned())
    );
}

per_store!(without_params_in_the_key_another_body_is_a_mismatch);
async fn without_params_in_the_key_another_body_is_a_mismatch(store: TestStore) {
    let server = serve(store, false).await;
    server
        .post("/boards/b1/cards", Some("sig-1"), r#"{"t":1}"#)
        .await;
    let changed = server
        .post("/boards/b1/cards", Some("sig-1"), r#"{"t":2}"#)
        .await;
    assert_eq!(changed.0, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(server.runs.load(SeqCst), 1);
    let keys = tokio::time::timeout(
        Duration::from_secs(5),
        server.handle.find_by_signal("sig-1"),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0].key, "sig-1:create_task:b1");
}

per_store!(no_signal_passes_through_and_a_partial_key_is_a_400);
async fn no_signal_passes_through_and_a_partial_key_is_a_400(store: TestStore) {
    let server = serve(store, true).await;
    // No signal: not protected, runs every time, stores nothing.
    server.post("/boards/b1/cards", None, "x").await;
    server.post("/boards/b1/cards", None, "x").await;
    assert_eq!(server.runs.load(SeqCst), 2);
    let info = tokio::time::timeout(Duration::from_secs(5), server.handle.cache_info())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(info.entries, 0);

    // A signal but no board segment: the target is missing.
    let partial = server.post("/boards", Some("sig-1"), "x").await;
    assert_eq!(partial.0, StatusCode::BAD_REQUEST);
    assert!(partial.2.contains("no target"), "{}", partial.2);
}

per_store!(under_json_canonical_a_reordered_body_keeps_its_params_key_and_replays);
async fn under_json_canonical_a_reordered_body_keeps_its_params_key_and_replays(store: TestStore) {
    let server = serve_with(store, true, FingerprintMode::JsonCanonical).await;
    let first = server
        .post(
            "/boards/7/cards",
            Some("evt-9"),
            r#"{"title":"a","list":"todo"}"#,
        )
        .await;
    let reordered = server
        .post(
            "/boards/7/cards",
            Some("evt-9"),
            r#"{ "list": "todo", "title": "a" }"#,
        )
        .await;
    assert_eq!(first.0, StatusCode::CREATED);
    assert!(
        reordered.1,
        "the reordered body is the same params: a replay"
    );
    assert_eq!(reordered.2, first.2);
    assert_eq!(server.runs.load(SeqCst), 1);
}
