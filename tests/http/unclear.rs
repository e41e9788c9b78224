//! At most once when the outcome is unclear: a body cut off after its head,
//! a response the service marks `OutcomeUnknown`, and a record too heavy for
//! the store's byte bound never free the key for a second run.

use crate::support::common;
use crate::support::stores;

use std::time::Duration;

use axum::body::Body;
use axum::response::IntoResponse;
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use common::*;
use http::{Method, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use stores::{per_store, TestStore};
use tower_idempotency::problem;
use tower_idempotency::{Concurrent, IdempotencyLayer, OutcomeUnknown, UnclearOutcome};

/// Answers its head and one frame, then fails the body (an upstream that
/// closed the connection half way, say).
fn cut_off(runs: Runs) -> Router {
    Router::new().route(
        "/cut",
        post(move || async move {
            runs.bump();
            let frames = futures_util::stream::iter([
                Ok::<_, BoxError>(Frame::data(Bytes::from("half of it;"))),
                Err("the connection broke".into()),
            ]);
            (StatusCode::CREATED, Body::new(StreamBody::new(frames)))
        }),
    )
}

/// Sends a POST to `/cut` and reads it: the client must see an error, at
/// the head or in the body, never a complete response.
async fn cut_request(server: &Server) {
    let request = server
        .request(Method::POST, "/cut")
        .header("idempotency-key", "c")
        .body(full(""))
        .unwrap();
    match within(server.client.request(request)).await {
        Err(_) => {}
        Ok(response) => assert!(within(response.into_body().collect()).await.is_err()),
    }
}

per_store!(a_body_cut_off_after_its_head_leaves_the_key_to_its_marker);
async fn a_body_cut_off_after_its_head_leaves_the_key_to_its_marker(store: TestStore) {
    let layer = IdempotencyLayer::builder().store(store).build().unwrap();
    let runs = Runs::default();
    let (server, handle) = serve_layered(layer, cut_off(runs.clone())).await;
    cut_request(&server).await;
    let fresh = Server {
        addr: server.addr,
        client: client(),
    };
    for _ in 0..2 {
        let retry = fresh.post("/cut", Some("c"), "").await;
        assert_eq!(retry.status, StatusCode::CONFLICT);
        assert_eq!(retry.problem().kind, problem::CONFLICT);
        assert!(retry.headers.contains_key("retry-after"));
    }
    assert_eq!(
        runs.get(),
        1,
        "the action may have run: no retry runs it again"
    );
    let stats = handle.stats();
    assert_eq!((stats.ambiguous, stats.not_stored), (1, 0));
}

per_store!(a_body_cut_off_under_unclear_outcome_release_runs_again);
async fn a_body_cut_off_under_unclear_outcome_release_runs_again(store: TestStore) {
    let layer = IdempotencyLayer::builder()
        .store(store)
        .unclear_outcome(UnclearOutcome::Release)
        .build()
        .unwrap();
    let runs = Runs::default();
    let (server, handle) = serve_layered(layer, cut_off(runs.clone())).await;
    cut_request(&server).await;
    let fresh = Server {
        addr: server.addr,
        client: client(),
    };
    cut_request(&fresh).await;
    assert_eq!(runs.get(), 2, "the opt-in keeps the old release");
    assert_eq!(handle.stats().ambiguous, 0);
}

/// Answers 504 marked [`OutcomeUnknown`], as a proxy whose upstream timed
/// out does, once the gate lets it.
fn unknown(runs: Runs, gate: Gate) -> Router {
    Router::new().route(
        "/charge",
        post(move || async move {
            runs.bump();
            gate.pass().await;
            let mut response = (StatusCode::GATEWAY_TIMEOUT, "outcome unknown").into_response();
            response.extensions_mut().insert(OutcomeUnknown);
            response
        }),
    )
}

per_store!(a_response_marked_outcome_unknown_is_answered_and_never_run_again);
async fn a_response_marked_outcome_unknown_is_answered_and_never_run_again(store: TestStore) {
    let layer = IdempotencyLayer::builder().store(store).build().unwrap();
    let (runs, gate) = (Runs::default(), Gate::default());
    gate.open(10);
    let (server, handle) = serve_layered(layer, unknown(runs.clone(), gate)).await;
    let first = server.post("/charge", Some("k"), "{}").await;
    assert_eq!(first.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(first.text(), "outcome unknown");
    assert!(!first.replayed());
    let retry = server.post("/charge", Some("k"), "{}").await;
    assert_eq!(retry.status, StatusCode::CONFLICT);
    assert_eq!(runs.get(), 1);
    let stats = handle.stats();
    assert_eq!(
        (stats.ambiguous, stats.executed, stats.conflicts),
        (1, 1, 1)
    );
}

per_store!(a_duplicate_waiting_on_an_unclear_run_waits_for_the_marker_and_never_runs);
async fn a_duplicate_waiting_on_an_unclear_run_waits_for_the_marker_and_never_runs(
    store: TestStore,
) {
    let layer = IdempotencyLayer::builder()
        .store(store)
        .concurrent(Concurrent::Wait {
            timeout: Duration::from_millis(600),
        })
        .build()
        .unwrap();
    let (runs, gate) = (Runs::default(), Gate::default());
    let (server, handle) = serve_layered(layer, unknown(runs.clone(), gate.clone())).await;
    let server = std::sync::Arc::new(server);
    let first = server.spawn_post("/charge", "w", "{}");
    gate.entered(1).await;
    let waiter = server.spawn_post("/charge", "w", "{}");
    // The waiter is waiting on the first run once the layer counts it.
    until(|| handle.stats().requests >= 2).await;
    gate.open(1);
    let first = within(first).await.unwrap();
    assert_eq!(first.status, StatusCode::GATEWAY_TIMEOUT);
    let waiter = within(waiter).await.unwrap();
    assert_eq!(
        waiter.status,
        StatusCode::CONFLICT,
        "the waiter finds the marker until its wait budget runs out"
    );
    assert_eq!(runs.get(), 1);
    assert_eq!(handle.stats().ambiguous, 1);
}

#[tokio::test]
async fn a_record_heavier_than_the_memory_stores_byte_bound_keeps_its_head() {
    let layer = IdempotencyLayer::builder().max_bytes(4096).build().unwrap();
    let runs = Runs::default();
    let app = Router::new().route(
        "/export",
        post({
            let runs = runs.clone();
            move || async move {
                runs.bump();
                (StatusCode::CREATED, vec![b'x'; 10_000])
            }
        }),
    );
    let (server, handle) = serve_layered(layer, app).await;
    let first = server.post("/export", Some("e"), "").await;
    assert_eq!(
        (first.status, first.body.len()),
        (StatusCode::CREATED, 10_000)
    );
    let retry = server.post("/export", Some("e"), "").await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(retry.replayed());
    assert_eq!(retry.headers["idempotency-replay"], "omitted");
    assert!(retry.body.is_empty());
    assert_eq!(runs.get(), 1, "never reported stored, then dropped");
    assert_eq!(handle.stats().omitted, 1);
    assert_eq!(handle.stats().evicted, 0);
}
