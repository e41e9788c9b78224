//! `FailMode::Open` passes requests through only when the store cannot be
//! reached. A store that answers with a value it cannot read (corrupt, of an
//! unknown version, another program's, another Redis type) under the
//! request's key gets the request a 500 problem+json, counted in
//! `store_errors`, and the handler does not run: whatever the fail mode, and
//! for the closure API too.
#![cfg(feature = "redis")]

use crate::support::common;
use crate::support::redis as support;

use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
use std::time::Duration;

use tower_idempotency::problem::{STORE_FAILED, STORE_UNAVAILABLE};
use tower_idempotency::store::redis::RedisStore;
use tower_idempotency::{ExecuteError, FailMode, Idempotency, IdempotencyKey, IdempotencyLayer};

use common::{serve_orders, within};
use support::{cleaned_prefix, free_port, redis_url};

/// What another program (or a newer or broken build) may leave under a key.
const UNREADABLE: [(&str, &[u8]); 4] = [
    ("corrupt record", b"TIR\x01\x01truncated"),
    ("unknown version", b"TIR\x09from a newer build"),
    ("foreign value", b"{\"session\":\"not ours\"}"),
    ("corrupt marker", b"TIM\x01short"),
];

async fn redis_store(prefix: &str) -> RedisStore {
    within(RedisStore::builder(redis_url()).prefix(prefix).build())
        .await
        .expect("Redis answers on REDIS_URL or 127.0.0.1:6379")
}

/// The one Redis key under `prefix`.
async fn only_key(store: &RedisStore, prefix: &str) -> String {
    let mut connection = store.connection();
    let keys: Vec<String> = within(
        redis::cmd("KEYS")
            .arg(format!("{prefix}*"))
            .query_async(&mut connection),
    )
    .await
    .unwrap();
    let ours: Vec<_> = keys
        .into_iter()
        .filter(|key| key != &format!("{prefix}changes"))
        .collect();
    assert_eq!(ours.len(), 1, "{ours:?}");
    ours.into_iter().next().unwrap()
}

async fn overwrite(store: &RedisStore, redis_key: &str, value: &[u8]) {
    let mut connection = store.connection();
    within(
        redis::cmd("SET")
            .arg(redis_key)
            .arg(value)
            .arg("PX")
            .arg(60_000)
            .query_async::<()>(&mut connection),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn fail_open_never_runs_a_request_whose_key_holds_an_unreadable_value() {
    let (prefix, _cleanup) = cleaned_prefix();
    let store = redis_store(&prefix).await;
    let layer = IdempotencyLayer::builder()
        .ttl(Duration::from_secs(60))
        .store(store.clone())
        .fail_mode(FailMode::Open)
        .build()
        .unwrap();
    let (server, handle, runs) = serve_orders(layer).await;

    let first = server.post("/orders", Some("order-1"), "one").await;
    assert_eq!(first.status, 201);
    assert_eq!(runs.get(), 1);
    let redis_key = only_key(&store, &prefix).await;

    for (n, (what, value)) in UNREADABLE.iter().enumerate() {
        overwrite(&store, &redis_key, value).await;
        let retry = server.post("/orders", Some("order-1"), "one").await;
        assert_eq!(retry.status, 500, "{what}: {retry:?}");
        assert_eq!(retry.problem().kind, STORE_FAILED, "{what}");
        assert_eq!(runs.get(), 1, "{what}: the handler ran unprotected");
        assert_eq!(handle.stats().store_errors, n as u64 + 1, "{what}");
    }

    // A key of another Redis type is no better.
    let mut connection = store.connection();
    within(
        redis::pipe()
            .del(&redis_key)
            .hset(&redis_key, "field", "value")
            .pexpire(&redis_key, 60_000)
            .query_async::<()>(&mut connection),
    )
    .await
    .unwrap();
    let retry = server.post("/orders", Some("order-1"), "one").await;
    assert_eq!(retry.status, 500, "{retry:?}");
    assert_eq!(retry.problem().kind, STORE_FAILED);
    assert_eq!(runs.get(), 1);

    // Once the value is removed, the key works again.
    within(handle.clear()).await.unwrap();
    let again = server.post("/orders", Some("order-1"), "one").await;
    assert_eq!(again.status, 201);
    assert_eq!(runs.get(), 2);
    within(handle.clear()).await.unwrap();
}

#[tokio::test]
async fn fail_closed_answers_the_same_500_for_an_unreadable_value() {
    let (prefix, _cleanup) = cleaned_prefix();
    let store = redis_store(&prefix).await;
    let layer = IdempotencyLayer::builder()
        .ttl(Duration::from_secs(60))
        .store(store.clone())
        .build()
        .unwrap();
    let (server, handle, runs) = serve_orders(layer).await;
    assert_eq!(server.post("/orders", Some("k"), "x").await.status, 201);
    let redis_key = only_key(&store, &prefix).await;
    overwrite(&store, &redis_key, b"TIR\x09from a newer build").await;
    let retry = server.post("/orders", Some("k"), "x").await;
    assert_eq!(retry.status, 500);
    assert_eq!(retry.problem().kind, STORE_FAILED);
    assert_eq!(runs.get(), 1);
    assert_eq!(handle.stats().store_errors, 1);
    within(handle.clear()).await.unwrap();
}

#[tokio::test]
async fn fail_open_still_passes_requests_through_an_unreachable_store() {
    // Nothing listens there: every store operation fails to connect.
    let store = RedisStore::builder(format!("redis://127.0.0.1:{}", free_port()))
        .connection_timeout(Duration::from_millis(200))
        .response_timeout(Duration::from_millis(200))
        .notifications(false)
        .build_lazy()
        .unwrap();
    let open = IdempotencyLayer::builder()
        .store(store.clone())
        .fail_mode(FailMode::Open)
        .build()
        .unwrap();
    let (server, handle, runs) = serve_orders(open).await;
    let reply = server.post("/orders", Some("k"), "x").await;
    assert_eq!(reply.status, 201, "{reply:?}");
    assert_eq!(runs.get(), 1);
    assert_eq!(handle.stats().store_errors, 1);

    let closed = IdempotencyLayer::builder().store(store).build().unwrap();
    let (server, _handle, runs) = serve_orders(closed).await;
    let reply = server.post("/orders", Some("k"), "x").await;
    assert_eq!(reply.status, 503);
    assert_eq!(reply.problem().kind, STORE_UNAVAILABLE);
    assert_eq!(runs.get(), 0);
}

#[tokio::test]
async fn execute_refuses_a_key_that_holds_an_unreadable_value() {
    let (prefix, _cleanup) = cleaned_prefix();
    let store = redis_store(&prefix).await;
    let engine = Idempotency::builder()
        .ttl(Duration::from_secs(60))
        .store(store.clone())
        .build()
        .unwrap();
    let key = IdempotencyKey::new("signal-1", "create_card", "trello");
    overwrite(&store, &store.redis_key(&key.to_string()), b"not a record").await;
    let runs = AtomicU32::new(0);
    let result = within(engine.execute(&key, || async {
        runs.fetch_add(1, SeqCst);
        Ok::<_, std::io::Error>("card-1".to_owned())
    }))
    .await;
    match result {
        Err(ExecuteError::Store(error)) => {
            assert!(!error.is_unavailable(), "{error}");
            assert!(error.to_string().contains(&key.to_string()), "{error}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(runs.load(SeqCst), 0, "the action ran");
    assert_eq!(engine.stats().store_errors, 1);
    within(engine.clear()).await.unwrap();
}
