//! No configuration panics. Every duration setting (record TTL, lease TTL,
//! wait timeout, auto-cleanup interval, the Redis store's local-cache TTL and
//! timeouts) past `MAX_DURATION` (a century) is refused at `build()` with a
//! `ConfigError` naming the maximum; at the maximum everything works; and a
//! duration passed per call (a wait budget to `begin`, a TTL to `put` or to
//! a store) is cut to the maximum instead of overflowing a clock.

use crate::support::common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tower_idempotency::store::{
    BeginOutcome, EntryState, LeaseToken, MemoryStore, Store, StoreAdmin,
};
use tower_idempotency::{
    Begin, Concurrent, ConfigError, Fingerprint, Idempotency, IdempotencyLayer, LeaseExpiry,
    Record, MAX_DURATION,
};

use common::{serve_orders, within};

/// Durations no setting takes.
const TOO_LONG: [Duration; 3] = [
    Duration::MAX,
    Duration::from_secs(u64::MAX),
    MAX_DURATION.saturating_add(Duration::from_nanos(1)),
];

/// Checks that `error` names `setting` and the largest value accepted.
fn refuses(error: &ConfigError, setting: &str) {
    let text = error.to_string();
    assert!(text.contains(setting), "{text}");
    assert!(
        text.contains(&format!("at most {} s", MAX_DURATION.as_secs())),
        "{text}"
    );
}

fn fp() -> Fingerprint {
    Fingerprint::of_bytes(b"request")
}

fn value(text: &'static str) -> Record {
    Record::value(fp(), Bytes::from_static(text.as_bytes()))
}

/// A TTL past the maximum, handed to `mark_executed`, is cut to it.
async fn ttl_past_the_maximum_is_cut_by_mark_executed<S: StoreAdmin>(engine: &Idempotency<S>) {
    within(engine.mark_executed(
        &tower_idempotency::IdempotencyKey::new("s", "a", "put"),
        "put",
        Duration::MAX,
    ))
    .await
    .unwrap();
    let entry = within(engine.record("s:a:put")).await.unwrap().unwrap();
    assert!(entry.expires_in <= MAX_DURATION);
}

fn wait(timeout: Duration) -> Concurrent {
    Concurrent::Wait { timeout }
}

#[test]
fn the_engine_builder_refuses_each_duration_past_the_maximum() {
    for too_long in TOO_LONG {
        let built = Idempotency::builder().ttl(too_long).build();
        refuses(&built.unwrap_err(), "ttl");
        let built = Idempotency::builder().lease_ttl(too_long).build();
        refuses(&built.unwrap_err(), "lease_ttl");
        let built = Idempotency::builder().concurrent(wait(too_long)).build();
        refuses(&built.unwrap_err(), "wait timeout");
    }
}

#[test]
fn the_layer_builder_refuses_each_duration_past_the_maximum() {
    for too_long in TOO_LONG {
        let built = IdempotencyLayer::builder().ttl(too_long).build();
        refuses(&built.unwrap_err(), "ttl");
        let built = IdempotencyLayer::builder().lease_ttl(too_long).build();
        refuses(&built.unwrap_err(), "lease_ttl");
        let built = IdempotencyLayer::builder()
            .concurrent(wait(too_long))
            .build();
        refuses(&built.unwrap_err(), "wait timeout");
    }
}

#[tokio::test]
async fn auto_cleanup_refuses_an_interval_past_the_maximum() {
    let engine = Idempotency::new();
    for too_long in TOO_LONG {
        refuses(
            &engine.start_auto_cleanup(too_long).unwrap_err(),
            "auto-cleanup interval",
        );
    }
    assert!(!engine.auto_cleanup_running());
    engine.start_auto_cleanup(MAX_DURATION).unwrap();
    assert!(engine.auto_cleanup_running());
    // Its first round runs at once, and the engine keeps working beside it.
    let kept = tower_idempotency::IdempotencyKey::new("s", "a", "t");
    within(engine.mark_executed(&kept, "kept", MAX_DURATION))
        .await
        .unwrap();
    within(engine.cleanup_expired()).await.unwrap();
    assert!(within(engine.record("s:a:t")).await.unwrap().is_some());
    engine.stop_auto_cleanup();
}

#[tokio::test]
async fn an_engine_at_the_maximum_runs_waits_and_replays() {
    for lease_expiry in [LeaseExpiry::Takeover, LeaseExpiry::Block] {
        let engine = Idempotency::builder()
            .ttl(MAX_DURATION)
            .lease_ttl(MAX_DURATION)
            .concurrent(wait(MAX_DURATION))
            .lease_expiry(lease_expiry)
            .build()
            .unwrap();
        let policy = engine.config().concurrent;
        let Begin::Execute(lease) = within(engine.begin_with("s:a:t", fp(), policy))
            .await
            .unwrap()
        else {
            panic!("the first call runs");
        };
        // A duplicate waits for the run, with a century-long budget.
        let waiter = tokio::spawn({
            let engine = engine.clone();
            async move { engine.begin_with("s:a:t", fp(), policy).await }
        });
        // On this one-thread runtime the duplicate runs now, up to its wait.
        tokio::task::yield_now().await;
        assert!(within(lease.complete(value("done"))).await.unwrap());
        match within(waiter).await.unwrap().unwrap() {
            Begin::Replay {
                record,
                coalesced: true,
            } => assert_eq!(record.as_value().unwrap(), "done"),
            other => panic!("{lease_expiry:?}: {other:?}"),
        }
        let entry = within(engine.record("s:a:t")).await.unwrap().unwrap();
        assert!(entry.expires_in <= MAX_DURATION);
        assert!(entry.expires_in > MAX_DURATION - Duration::from_secs(3600));
        assert_eq!(engine.stats().executed, 1);
    }
}

#[tokio::test]
async fn durations_passed_per_call_are_cut_to_the_maximum() {
    let engine = Idempotency::new();
    let Begin::Execute(lease) = within(engine.begin_with("s:a:t", fp(), wait(Duration::MAX)))
        .await
        .unwrap()
    else {
        panic!("the first call runs");
    };
    let waiter = tokio::spawn({
        let engine = engine.clone();
        async move { engine.begin_with("s:a:t", fp(), wait(Duration::MAX)).await }
    });
    tokio::task::yield_now().await;
    assert!(within(lease.complete(value("done"))).await.unwrap());
    assert!(matches!(
        within(waiter).await.unwrap().unwrap(),
        Begin::Replay {
            coalesced: true,
            ..
        }
    ));

    ttl_past_the_maximum_is_cut_by_mark_executed(&engine).await;

    // A store is called with whatever TTL its caller has.
    let store = MemoryStore::new();
    let token = LeaseToken::random();
    let begun = within(store.begin("s:a:m", fp(), token, Duration::MAX))
        .await
        .unwrap();
    assert!(matches!(begun, BeginOutcome::Acquired), "{begun:?}");
    assert!(within(store.renew("s:a:m", token, Duration::MAX))
        .await
        .unwrap());
    let record = Arc::new(value("stored"));
    assert!(
        within(store.complete("s:a:m", token, record, Duration::MAX))
            .await
            .unwrap()
    );
    let entry = within(store.get("s:a:m")).await.unwrap().unwrap();
    assert!(matches!(entry.state, EntryState::Completed(_)));
    assert!(entry.expires_in <= MAX_DURATION);
}

#[tokio::test]
async fn a_layer_at_the_maximum_serves_and_replays() {
    let layer = IdempotencyLayer::builder()
        .ttl(MAX_DURATION)
        .lease_ttl(MAX_DURATION)
        .concurrent(wait(MAX_DURATION))
        .build()
        .unwrap();
    let (server, _handle, runs) = serve_orders(layer).await;
    let first = server.post("/orders", Some("k"), "x").await;
    assert_eq!(first.status, 201);
    let retry = server.post("/orders", Some("k"), "x").await;
    assert!(retry.replayed());
    assert_eq!(retry.body, first.body);
    assert_eq!(runs.get(), 1);
}

#[cfg(feature = "redis")]
mod redis_store {
    use super::*;
    use tower_idempotency::store::redis::RedisStore;
    use tower_idempotency::store::StoreError;
    use tower_idempotency::IdempotencyKey;

    fn url() -> String {
        std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
    }

    fn prefix() -> String {
        format!("test:pressure-config:{:x}:", rand::random::<u64>())
    }

    /// Checks that a store build failed on `setting`, for a `ConfigError`.
    fn refuses_store(error: StoreError, setting: &str) {
        let StoreError::Backend(source) = error else {
            panic!("{error:?}");
        };
        let config = source
            .downcast_ref::<ConfigError>()
            .expect("the source is a ConfigError");
        refuses(config, setting);
    }

    #[tokio::test]
    async fn the_redis_builder_refuses_each_duration_past_the_maximum() {
        for too_long in TOO_LONG {
            let builder = || RedisStore::builder(url()).prefix(prefix());
            let built = builder().local_cache(10).local_cache_ttl(too_long);
            refuses_store(built.build_lazy().unwrap_err(), "local_cache_ttl");
            let built = builder().connection_timeout(too_long);
            refuses_store(built.build_lazy().unwrap_err(), "connection_timeout");
            let built = builder().response_timeout(too_long);
            refuses_store(built.build_lazy().unwrap_err(), "response_timeout");
            let built = builder().response_timeout(too_long);
            refuses_store(within(built.build()).await.unwrap_err(), "response_timeout");
        }
    }

    #[tokio::test]
    async fn a_redis_store_at_the_maximum_executes_once_and_replays() {
        let store = within(
            RedisStore::builder(url())
                .prefix(prefix())
                .local_cache(10)
                .local_cache_ttl(MAX_DURATION)
                .connection_timeout(MAX_DURATION)
                .response_timeout(MAX_DURATION)
                .build(),
        )
        .await
        .expect("Redis answers on REDIS_URL or 127.0.0.1:6379");
        let engine = Idempotency::builder()
            .ttl(MAX_DURATION)
            .lease_ttl(MAX_DURATION)
            .store(store)
            .build()
            .unwrap();
        let key = IdempotencyKey::new("signal", "action", "target");
        let mut runs = 0;
        for _ in 0..3 {
            let card: String = within(engine.execute(&key, || {
                runs += 1;
                async { Ok::<_, std::io::Error>("card-1".to_owned()) }
            }))
            .await
            .unwrap();
            assert_eq!(card, "card-1");
        }
        assert_eq!(runs, 1);
        ttl_past_the_maximum_is_cut_by_mark_executed(&engine).await;
        within(engine.clear()).await.unwrap();
    }
}
