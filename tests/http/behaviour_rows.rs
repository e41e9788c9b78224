//! Rows of the README's "HTTP behaviour" table that no other test covers end
//! to end: PATCH protected by default, the order of the checks, a
//! mismatched duplicate in flight under `Concurrent::Wait`, and a panic in
//! the service's synchronous `call`.

use std::convert::Infallible;
use std::future::{ready, Ready};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::routing::patch;
use axum::Router;
use http::{Method, Request, Response, StatusCode};

use crate::support::common::*;
use crate::support::stores::{per_store, TestStore};
use tower_idempotency::{problem, Concurrent, IdempotencyLayer};

per_store!(a_patch_is_protected_by_default_and_replayed);
async fn a_patch_is_protected_by_default_and_replayed(store: TestStore) {
    let layer = IdempotencyLayer::builder().store(store).build().unwrap();
    let runs = Runs::default();
    let counted = runs.clone();
    let app = Router::new()
        .route(
            "/orders/7",
            patch(move || {
                let runs = counted.clone();
                async move { (StatusCode::OK, format!("patched {}", runs.bump())) }
            }),
        )
        .layer(layer);
    let server = serve(app).await;

    let first = server
        .call(Method::PATCH, "/orders/7", Some("p"), "{\"qty\":2}")
        .await;
    assert_eq!(first.status, StatusCode::OK);
    assert!(!first.replayed());
    let retry = server
        .call(Method::PATCH, "/orders/7", Some("p"), "{\"qty\":2}")
        .await;
    assert!(retry.replayed(), "PATCH is protected without configuration");
    assert_eq!(retry.body, first.body);
    assert_eq!(runs.get(), 1);
}

per_store!(checks_run_in_order_method_key_body_size_fingerprint);
async fn checks_run_in_order_method_key_body_size_fingerprint(store: TestStore) {
    let limit = 64;
    let layer = IdempotencyLayer::builder()
        .store(store)
        .max_request_body(limit)
        .build()
        .unwrap();
    let runs = Runs::default();
    let listed = runs.clone();
    let app = Router::new()
        .route(
            "/orders",
            orders(runs.clone()).get(move || {
                let runs = listed.clone();
                async move { format!("list {}", runs.bump()) }
            }),
        )
        .layer(layer);
    let server = serve(app).await;
    let oversized = "x".repeat(limit + 1);

    // Method before key: an unprotected method with a malformed key passes.
    let get = server.call(Method::GET, "/orders", Some(""), "").await;
    assert_eq!(get.status, StatusCode::OK);
    assert_eq!(get.text(), "list 1");

    // Key (400) before body size (413).
    let bad_key = server.post("/orders", Some(""), &oversized).await;
    assert_eq!(bad_key.status, StatusCode::BAD_REQUEST);
    assert_eq!(bad_key.problem().kind, problem::MALFORMED_KEY);

    // Body size (413) before fingerprint (422): the key is taken by another
    // body, yet an oversized retry is refused for its size.
    let first = server.post("/orders", Some("k"), "{}").await;
    assert_eq!(first.status, StatusCode::CREATED);
    let too_large = server.post("/orders", Some("k"), &oversized).await;
    assert_eq!(too_large.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(too_large.problem().kind, problem::BODY_TOO_LARGE);
    let mismatch = server.post("/orders", Some("k"), "{\"n\":1}").await;
    assert_eq!(mismatch.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        runs.get(),
        2,
        "the GET and the first POST ran, nothing else"
    );
}

per_store!(
    a_mismatched_duplicate_in_flight_is_422_under_wait,
    flavor = "multi_thread",
    worker_threads = 2
);
async fn a_mismatched_duplicate_in_flight_is_422_under_wait(store: TestStore) {
    let layer = IdempotencyLayer::builder()
        .store(store)
        .concurrent(Concurrent::Wait {
            timeout: Duration::from_secs(30),
        })
        .build()
        .unwrap();
    let (runs, gate) = (Runs::default(), Gate::default());
    let app = Router::new().route("/orders", gated_orders(runs.clone(), gate.clone()));
    let (server, handle) = serve_layered(layer, app).await;
    let server = Arc::new(server);

    let first = server.spawn_post("/orders", "k", "{\"n\":1}");
    gate.entered(1).await;
    // Answered while the first is still held: the mismatch does not wait.
    let other_body = server.post("/orders", Some("k"), "{\"n\":2}").await;
    assert_eq!(other_body.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(other_body.problem().kind, problem::KEY_REUSED);
    assert_eq!(runs.get(), 1);
    gate.open(1);
    assert_eq!(within(first).await.unwrap().status, StatusCode::CREATED);
    assert_eq!(runs.get(), 1);
    assert_eq!(handle.stats().mismatches, 1);
}

/// A service whose first `call` panics before it returns a future.
#[derive(Clone, Default)]
struct PanicsInCallOnce {
    panicked: Arc<AtomicBool>,
}

impl tower::Service<Request<Body>> for PanicsInCallOnce {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Ready<Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _request: Request<Body>) -> Self::Future {
        if !self.panicked.swap(true, SeqCst) {
            panic!("deliberate panic in call");
        }
        let response = Response::builder()
            .status(StatusCode::CREATED)
            .body(Body::from("created"))
            .unwrap();
        ready(Ok(response))
    }
}

per_store!(a_panic_in_the_synchronous_call_is_500_and_releases_the_key);
async fn a_panic_in_the_synchronous_call_is_500_and_releases_the_key(store: TestStore) {
    let layer = IdempotencyLayer::builder().store(store).build().unwrap();
    let app = Router::new()
        .route_service("/orders", PanicsInCallOnce::default())
        .layer(layer);
    let server = serve(app).await;

    let first = server.post("/orders", Some("k"), "{}").await;
    assert_eq!(first.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(first.problem().kind, problem::INTERNAL_ERROR);
    let retry = server.post("/orders", Some("k"), "{}").await;
    assert_eq!(retry.status, StatusCode::CREATED, "the key was released");
    assert!(!retry.replayed());
    assert_eq!(retry.text(), "created");
}
