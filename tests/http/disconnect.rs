//! Clients that go away, processes that die holding a lease, and TTLs.

use crate::support::common;
use crate::support::stores;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use common::*;
use http::{Method, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Incoming;
use stores::{per_store, TestStore};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tower_idempotency::store::{EntryKind, ScanEntry};
use tower_idempotency::{
    Begin, Concurrent, Disconnect, Fingerprint, Idempotency, IdempotencyKey, IdempotencyLayer,
    KeyFilter, LeaseExpiry,
};

/// An outer middleware that signals `dropped` when the server drops the
/// request's future (the client went away) before it finished.
fn probe(router: Router, dropped: Arc<Semaphore>) -> Router {
    router.layer(axum::middleware::from_fn(
        move |request: axum::extract::Request, next: axum::middleware::Next| {
            let signal = DropSignal(Some(dropped.clone()));
            async move {
                let response = next.run(request).await;
                signal.defuse();
                response
            }
        },
    ))
}

/// Sends a raw POST and answers the open connection, response unread.
async fn raw_post(server: &Server, path: &str, key: &str) -> TcpStream {
    let mut stream = within(TcpStream::connect(server.addr)).await.unwrap();
    let request = format!(
        "POST {path} HTTP/1.1\r\nhost: x\r\nidempotency-key: {key}\r\ncontent-length: 2\r\n\r\n{{}}"
    );
    within(stream.write_all(request.as_bytes())).await.unwrap();
    stream
}

/// A keyed POST to `/export`: the first data frame of its response, and the
/// rest of the body, unread.
async fn export_first_part(server: &Server, key: &str) -> (Bytes, Incoming) {
    let request = server
        .request(Method::POST, "/export")
        .header("idempotency-key", key)
        .body(full(""))
        .unwrap();
    let mut body = server.raw(request).await.into_body();
    let first = within(body.frame())
        .await
        .unwrap()
        .unwrap()
        .into_data()
        .unwrap();
    (first, body)
}

/// Waits (within the tests' limit) until the store's entries satisfy `done`.
async fn until_keys(handle: &Idempotency<TestStore>, done: impl Fn(&[ScanEntry]) -> bool) {
    within(async {
        while !done(&handle.keys(&KeyFilter::new()).await.unwrap()) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
}

async fn until_completed(handle: &Idempotency<TestStore>, n: usize) {
    until_keys(handle, |keys| {
        keys.iter()
            .filter(|k| k.kind == EntryKind::Completed)
            .count()
            == n
    })
    .await
}

per_store!(a_client_that_disconnects_mid_request_does_not_cause_a_second_run);
async fn a_client_that_disconnects_mid_request_does_not_cause_a_second_run(store: TestStore) {
    let layer = IdempotencyLayer::builder().store(store).build().unwrap();
    let handle = layer.handle();
    let (runs, gate, dropped) = (
        Runs::default(),
        Gate::default(),
        Arc::new(Semaphore::new(0)),
    );
    let app = Router::new()
        .route("/orders", gated_orders(runs.clone(), gate.clone()))
        .layer(layer);
    let server = serve(probe(app, dropped.clone())).await;

    let stream = raw_post(&server, "/orders", "gone").await;
    gate.entered(1).await;
    drop(stream);
    // The server noticed: the request's future is gone, the action is not.
    within(dropped.acquire()).await.unwrap().forget();
    gate.open(1);
    until_completed(&handle, 1).await;

    let retry = server.post("/orders", Some("gone"), "{}").await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(retry.replayed());
    assert_eq!(retry.text(), r#"{"id":1,"len":2}"#);
    assert_eq!(runs.get(), 1);
}

per_store!(a_client_that_leaves_mid_body_still_gets_its_response_stored);
async fn a_client_that_leaves_mid_body_still_gets_its_response_stored(store: TestStore) {
    let layer = IdempotencyLayer::builder().store(store).build().unwrap();
    let (runs, gate) = (Runs::default(), Gate::default());
    let app = Router::new().route(
        "/export",
        post({
            let (runs, gate) = (runs.clone(), gate.clone());
            move || {
                let (runs, gate) = (runs.clone(), gate.clone());
                async move {
                    runs.bump();
                    let chunks = futures_util::stream::unfold(0, move |step| {
                        let gate = gate.clone();
                        async move {
                            match step {
                                0 => {
                                    Some((Ok::<_, BoxError>(Frame::data(Bytes::from("part1,"))), 1))
                                }
                                1 => {
                                    gate.pass().await;
                                    Some((Ok(Frame::data(Bytes::from("part2"))), 2))
                                }
                                _ => None,
                            }
                        }
                    });
                    Body::new(StreamBody::new(chunks))
                }
            }
        }),
    );
    let (server, _) = serve_layered(layer, app).await;

    // The first part arrives while the handler is still producing the rest.
    let (first, body) = export_first_part(&server, "e").await;
    assert_eq!(first, "part1,");
    gate.entered(1).await;
    drop(body);
    gate.open(1);

    let retry = within(async {
        loop {
            let retry = server.post("/export", Some("e"), "").await;
            if retry.status != StatusCode::CONFLICT {
                return retry;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(retry.replayed());
    assert_eq!(retry.text(), "part1,part2");
    assert_eq!(runs.get(), 1);
}

/// The layer under `Disconnect::Cancel`.
fn cancelling_layer(store: TestStore) -> IdempotencyLayer<TestStore> {
    IdempotencyLayer::builder()
        .store(store)
        .disconnect(Disconnect::Cancel)
        .build()
        .unwrap()
}

per_store!(disconnect_cancel_drops_the_action_and_releases_the_key);
async fn disconnect_cancel_drops_the_action_and_releases_the_key(store: TestStore) {
    let layer = cancelling_layer(store);
    let (runs, gate, cancelled) = (
        Runs::default(),
        Gate::default(),
        Arc::new(Semaphore::new(0)),
    );
    let app = Router::new().route(
        "/orders",
        post({
            let (runs, gate, cancelled) = (runs.clone(), gate.clone(), cancelled.clone());
            move || {
                let (runs, gate, cancelled) = (runs.clone(), gate.clone(), cancelled.clone());
                async move {
                    let run = runs.bump();
                    let signal = DropSignal(Some(cancelled));
                    gate.pass().await;
                    signal.defuse();
                    (StatusCode::CREATED, format!("order {run}"))
                }
            }
        }),
    );
    let (server, handle) = serve_layered(layer, app).await;

    let stream = raw_post(&server, "/orders", "c").await;
    gate.entered(1).await;
    drop(stream);
    // The handler's future was dropped, and the key released.
    within(cancelled.acquire()).await.unwrap().forget();
    until_keys(&handle, <[ScanEntry]>::is_empty).await;

    gate.open(1);
    let retry = server.post("/orders", Some("c"), "{}").await;
    assert_eq!(
        (retry.status, retry.text().as_str()),
        (StatusCode::CREATED, "order 2")
    );
    assert!(!retry.replayed());
    assert_eq!(runs.get(), 2);
}

per_store!(disconnect_cancel_drops_the_body_mid_stream_and_releases_the_key);
async fn disconnect_cancel_drops_the_body_mid_stream_and_releases_the_key(store: TestStore) {
    let layer = cancelling_layer(store);
    let (runs, gate, body_dropped) = (
        Runs::default(),
        Gate::default(),
        Arc::new(Semaphore::new(0)),
    );
    let app = Router::new().route(
        "/export",
        post({
            let (runs, gate, body_dropped) = (runs.clone(), gate.clone(), body_dropped.clone());
            move || {
                let (runs, gate) = (runs.clone(), gate.clone());
                let signal = DropSignal(Some(body_dropped.clone()));
                async move {
                    let run = runs.bump();
                    let chunks =
                        futures_util::stream::unfold((0, Some(signal)), move |(step, signal)| {
                            let gate = gate.clone();
                            async move {
                                match step {
                                    0 => {
                                        let part = Frame::data(Bytes::from(format!("run {run},")));
                                        Some((Ok::<_, BoxError>(part), (1, signal)))
                                    }
                                    1 => {
                                        gate.pass().await;
                                        // Ran to its end: no drop to signal.
                                        if let Some(signal) = signal {
                                            signal.defuse();
                                        }
                                        Some((Ok(Frame::data(Bytes::from("end"))), (2, None)))
                                    }
                                    _ => None,
                                }
                            }
                        });
                    Body::new(StreamBody::new(chunks))
                }
            }
        }),
    );
    let (server, handle) = serve_layered(layer, app).await;

    let (first, body) = export_first_part(&server, "x").await;
    assert_eq!(first, "run 1,");
    gate.entered(1).await;
    drop(body);
    // The body was dropped mid-stream, and the key released.
    within(body_dropped.acquire()).await.unwrap().forget();
    until_keys(&handle, <[ScanEntry]>::is_empty).await;

    gate.open(1);
    let retry = server.post("/export", Some("x"), "").await;
    assert!(!retry.replayed());
    assert_eq!(retry.text(), "run 2,end");
    assert_eq!(runs.get(), 2);
}

per_store!(records_expire_after_the_ttl);
async fn records_expire_after_the_ttl(store: TestStore) {
    let layer = IdempotencyLayer::builder()
        .store(store)
        .ttl(Duration::from_secs(5))
        .build()
        .unwrap();
    let (server, _, runs) = serve_orders(layer).await;

    // A TTL no stall of a busy machine outlasts between the two first posts.
    server.post("/orders", Some("t"), "{}").await;
    assert!(server.post("/orders", Some("t"), "{}").await.replayed());
    tokio::time::sleep(Duration::from_millis(5500)).await;
    let after = server.post("/orders", Some("t"), "{}").await;
    assert!(!after.replayed());
    assert!(after.text().contains("\"id\":2"));
    assert_eq!(runs.get(), 2);
}

/// Begins `key` on `store` from an engine on its own runtime, then lets the
/// runtime go with the lease unreleased and unrenewed: what a process that
/// died mid-action leaves behind.
fn die_holding_the_lease(store: &TestStore, expiry: LeaseExpiry, lease_ttl: Duration) {
    let store = store.clone();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            // The test's runtime is blocked on this thread meanwhile: the
            // dead process needs a connection of its own.
            let store = tokio::time::timeout(T, store.another_instance())
                .await
                .unwrap();
            let engine = Idempotency::builder()
                .store(store)
                .lease_ttl(lease_ttl)
                .lease_expiry(expiry)
                .build()
                .unwrap();
            let key = IdempotencyKey::new("k", "POST /orders", "").to_string();
            let fingerprint = Fingerprint::of_request(&Method::POST, "/orders", b"{}");
            let Ok(Begin::Execute(lease)) = engine
                .begin_with(key, fingerprint, Concurrent::Reject)
                .await
            else {
                panic!("the dead process held the key first");
            };
            std::mem::forget(lease);
        });
    })
    .join()
    .unwrap();
}

per_store!(an_abandoned_lease_is_taken_over_after_the_lease_ttl);
async fn an_abandoned_lease_is_taken_over_after_the_lease_ttl(store: TestStore) {
    // Long enough that no stall before the first check lets it lapse.
    let lease_ttl = Duration::from_secs(2);
    die_holding_the_lease(&store, LeaseExpiry::Takeover, lease_ttl);
    let layer = IdempotencyLayer::builder()
        .store(store)
        .lease_ttl(lease_ttl)
        .build()
        .unwrap();
    let (server, _, runs) = serve_orders(layer).await;

    assert_eq!(
        server.post("/orders", Some("k"), "{}").await.status,
        StatusCode::CONFLICT
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let retry = server.post("/orders", Some("k"), "{}").await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert_eq!(runs.get(), 1);
}

per_store!(an_abandoned_lease_blocks_the_key_under_lease_expiry_block);
async fn an_abandoned_lease_blocks_the_key_under_lease_expiry_block(store: TestStore) {
    let lease_ttl = Duration::from_millis(300);
    die_holding_the_lease(&store, LeaseExpiry::Block, lease_ttl);
    let layer = IdempotencyLayer::builder()
        .store(store)
        .lease_ttl(lease_ttl)
        .lease_expiry(LeaseExpiry::Block)
        .build()
        .unwrap();
    let (server, _, runs) = serve_orders(layer).await;

    tokio::time::sleep(Duration::from_millis(600)).await;
    let retry = server.post("/orders", Some("k"), "{}").await;
    assert_eq!(retry.status, StatusCode::CONFLICT);
    assert_eq!(runs.get(), 0, "nothing runs twice");
}
