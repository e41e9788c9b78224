//! Duplicates of a request in flight: coalescing, conflicts, mismatches,
//! start-overs, wait timeouts and lease renewal, with hundreds of real
//! concurrent HTTP requests.

use crate::support::common;
use crate::support::stores;

use std::sync::Arc;
use std::time::Duration;

use axum::routing::post;
use axum::Router;
use common::*;
use http::StatusCode;
use stores::{per_store, TestStore};
use tokio::sync::mpsc;
use tower_idempotency::{problem, Concurrent, Idempotency, IdempotencyLayer};

const DUPLICATES: usize = 500;

/// [`gated_orders`] at `/orders` behind `layer`: the server (to share with
/// the tasks that send to it), the layer's handle, the run count and the gate.
async fn serve_gated(
    layer: IdempotencyLayer<TestStore>,
) -> (Arc<Server>, Idempotency<TestStore>, Runs, Gate) {
    let (runs, gate) = (Runs::default(), Gate::default());
    let app = Router::new().route("/orders", gated_orders(runs.clone(), gate.clone()));
    let (server, handle) = serve_layered(layer, app).await;
    (Arc::new(server), handle, runs, gate)
}

per_store!(
    five_hundred_waiting_duplicates_run_once_and_all_get_the_first_response,
    flavor = "multi_thread",
    worker_threads = 4
);
async fn five_hundred_waiting_duplicates_run_once_and_all_get_the_first_response(store: TestStore) {
    let layer = IdempotencyLayer::builder()
        .store(store)
        .concurrent(Concurrent::Wait {
            timeout: Duration::from_secs(60),
        })
        .build()
        .unwrap();
    let (server, handle, runs, gate) = serve_gated(layer.clone()).await;

    let tasks: Vec<_> = (0..DUPLICATES)
        .map(|_| server.spawn_post("/orders", "dup", "{\"n\":1}"))
        .collect();
    // The first is genuinely in flight, and every other request has joined it.
    gate.entered(1).await;
    until(|| layer.waiting() == DUPLICATES - 1).await;
    gate.open(1);

    let mut replies = Vec::new();
    for task in tasks {
        replies.push(within(task).await.unwrap());
    }
    assert_eq!(runs.get(), 1, "exactly one execution");
    assert!(replies.iter().all(|r| r.status == StatusCode::CREATED));
    assert!(replies.iter().all(|r| r.body == replies[0].body));
    assert_eq!(
        replies.iter().filter(|r| r.replayed()).count(),
        DUPLICATES - 1
    );
    let stats = handle.stats();
    assert_eq!(stats.executed, 1);
    assert_eq!(stats.coalesced, DUPLICATES as u64 - 1);
    assert_eq!(stats.conflicts, 0);
    assert_eq!(stats.requests, DUPLICATES as u64);
}

per_store!(
    five_hundred_rejected_duplicates_run_once_and_get_409,
    flavor = "multi_thread",
    worker_threads = 4
);
async fn five_hundred_rejected_duplicates_run_once_and_get_409(store: TestStore) {
    let layer = IdempotencyLayer::builder().store(store).build().unwrap();
    let (server, handle, runs, gate) = serve_gated(layer).await;

    let (tx, mut rx) = mpsc::unbounded_channel();
    for _ in 0..DUPLICATES {
        let (server, tx) = (server.clone(), tx.clone());
        tokio::spawn(async move {
            let _ = tx.send(server.post("/orders", Some("dup"), "{\"n\":1}").await);
        });
    }
    // Every duplicate is refused while the first is held in flight.
    gate.entered(1).await;
    for _ in 0..DUPLICATES - 1 {
        let reply = within(rx.recv()).await.unwrap();
        assert_eq!(reply.status, StatusCode::CONFLICT);
        assert_eq!(reply.problem().kind, problem::CONFLICT);
        let retry_after: u64 = reply.headers["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(retry_after >= 1);
    }
    gate.open(1);
    let first = within(rx.recv()).await.unwrap();
    assert_eq!(first.status, StatusCode::CREATED);
    assert!(!first.replayed());
    assert_eq!(runs.get(), 1);
    let stats = handle.stats();
    assert_eq!(
        (stats.executed, stats.conflicts),
        (1, DUPLICATES as u64 - 1)
    );
}

per_store!(mismatched_duplicate_in_flight_is_422_not_409);
async fn mismatched_duplicate_in_flight_is_422_not_409(store: TestStore) {
    let layer = IdempotencyLayer::builder().store(store).build().unwrap();
    let (server, _, runs, gate) = serve_gated(layer).await;

    let first = server.spawn_post("/orders", "k", "{\"n\":1}");
    gate.entered(1).await;
    let other = server.post("/orders", Some("k"), "{\"n\":2}").await;
    assert_eq!(other.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(other.problem().kind, problem::KEY_REUSED);
    let same = server.post("/orders", Some("k"), "{\"n\":1}").await;
    assert_eq!(same.status, StatusCode::CONFLICT);
    gate.open(1);
    assert_eq!(within(first).await.unwrap().status, StatusCode::CREATED);
    assert_eq!(runs.get(), 1);
}

per_store!(waiters_start_over_when_the_first_ends_without_a_stored_result);
async fn waiters_start_over_when_the_first_ends_without_a_stored_result(store: TestStore) {
    let layer = IdempotencyLayer::builder()
        .store(store)
        .concurrent(Concurrent::Wait {
            timeout: Duration::from_secs(30),
        })
        .build()
        .unwrap();
    let (runs, gate) = (Runs::default(), Gate::default());
    let app = Router::new().route(
        "/orders",
        post({
            let (runs, gate) = (runs.clone(), gate.clone());
            move || {
                let (runs, gate) = (runs.clone(), gate.clone());
                async move {
                    let run = runs.bump();
                    if run == 1 {
                        gate.pass().await;
                        return (StatusCode::SERVICE_UNAVAILABLE, "try later".to_owned());
                    }
                    (StatusCode::CREATED, format!("order {run}"))
                }
            }
        }),
    );
    let (server, _) = serve_layered(layer.clone(), app).await;
    let server = Arc::new(server);

    let send = || server.spawn_post("/orders", "k", "{}");
    let first = send();
    gate.entered(1).await;
    let waiters = [send(), send()];
    until(|| layer.waiting() == 2).await;
    gate.open(1);
    assert_eq!(
        within(first).await.unwrap().status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    let [a, b] = waiters;
    let (a, b) = (within(a).await.unwrap(), within(b).await.unwrap());
    // One waiter became the new first; the other got its response.
    assert_eq!(
        (a.status, b.status),
        (StatusCode::CREATED, StatusCode::CREATED)
    );
    assert_eq!(a.body, b.body);
    assert_eq!(a.text(), "order 2");
    assert_eq!(u8::from(a.replayed()) + u8::from(b.replayed()), 1);
    assert_eq!(runs.get(), 2);
}

per_store!(wait_timeout_is_409);
async fn wait_timeout_is_409(store: TestStore) {
    // Long enough that the poll below sees the duplicate waiting even on a
    // stalled machine; under `Reject` it would never wait at all.
    let wait = Duration::from_secs(3);
    let layer = IdempotencyLayer::builder()
        .store(store)
        .concurrent(Concurrent::Wait { timeout: wait })
        .build()
        .unwrap();
    let (server, handle, _, gate) = serve_gated(layer.clone()).await;

    let first = server.spawn_post("/orders", "k", "{}");
    gate.entered(1).await;
    let started = tokio::time::Instant::now();
    let late = server.spawn_post("/orders", "k", "{}");
    until(|| layer.waiting() == 1).await;
    let late = within(late).await.unwrap();
    assert!(
        started.elapsed() >= wait,
        "the duplicate was refused before its wait timed out"
    );
    assert_eq!(late.status, StatusCode::CONFLICT);
    assert!(late.headers.contains_key("retry-after"));
    gate.open(1);
    assert_eq!(within(first).await.unwrap().status, StatusCode::CREATED);
    assert_eq!(handle.stats().conflicts, 1);
}

per_store!(a_slow_action_keeps_its_lease_past_the_lease_ttl);
async fn a_slow_action_keeps_its_lease_past_the_lease_ttl(store: TestStore) {
    // Two instances on one store: the duplicate goes to the other one, so
    // only the store's marker (kept alive by renewal) can refuse it.
    let lease_ttl = Duration::from_secs(3);
    let other_store = store.another_instance().await;
    let (runs, gate) = (Runs::default(), Gate::default());
    let instance = |store: TestStore| {
        let layer = IdempotencyLayer::builder()
            .store(store)
            .lease_ttl(lease_ttl)
            .build()
            .unwrap();
        Router::new()
            .route("/orders", gated_orders(runs.clone(), gate.clone()))
            .layer(layer)
    };
    let server = Arc::new(serve(instance(store)).await);
    let other = serve(instance(other_store)).await;

    let first = server.spawn_post("/orders", "slow", "{}");
    gate.entered(1).await;
    // Past the lease TTL: only renewal keeps the marker alive (a takeover
    // would need the heartbeat, every second, to stall for two).
    tokio::time::sleep(lease_ttl * 3 / 2).await;
    let duplicate = other.post("/orders", Some("slow"), "{}").await;
    assert_eq!(duplicate.status, StatusCode::CONFLICT);
    gate.open(1);
    let first = within(first).await.unwrap();
    assert_eq!(first.status, StatusCode::CREATED);
    let retry = other.post("/orders", Some("slow"), "{}").await;
    assert!(retry.replayed());
    assert_eq!(retry.body, first.body);
    assert_eq!(runs.get(), 1);
}
