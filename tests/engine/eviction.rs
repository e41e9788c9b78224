//! A full cache evicts its oldest records, never its newest: once the entry
//! bound is reached, every one of the last `max_entries - 1` results still
//! replays, and the `evicted` counter counts only the records that went.
//! Checked through the engine, through the HTTP layer over loopback, and on
//! the Redis store's local tier.

use crate::support::common;

#[cfg(feature = "redis")]
use std::time::Duration;

use bytes::Bytes;
use tower_idempotency::store::{EntryState, Store, StoreAdmin};
use tower_idempotency::{Begin, Concurrent, Fingerprint, Idempotency, IdempotencyLayer, Record};

use common::{serve_orders, within};

/// The entry bound of these tests.
const BOUND: u64 = 64;
/// Records written: several times the bound, so most of them must go.
const WRITTEN: u64 = 5 * BOUND;

fn key(i: u64) -> String {
    format!("s{i}:act:tgt")
}

fn fingerprint(i: u64) -> Fingerprint {
    Fingerprint::of_bytes(format!("request {i}").as_bytes())
}

/// Begins and completes record `i` through `engine`: one run of its action.
async fn run<S: Store>(engine: &Idempotency<S>, i: u64) {
    let begun = within(engine.begin_with(key(i), fingerprint(i), Concurrent::Reject))
        .await
        .unwrap();
    let Begin::Execute(lease) = begun else {
        panic!("record {i} runs first, got {begun:?}");
    };
    let result = Record::value(fingerprint(i), Bytes::from(format!("result {i}")));
    assert!(within(lease.complete(result)).await.unwrap());
}

/// Whether `engine` hands record `i`'s own result to a retry of it.
async fn replays<S: Store>(engine: &Idempotency<S>, i: u64) -> bool {
    match within(engine.begin_with(key(i), fingerprint(i), Concurrent::Reject))
        .await
        .unwrap()
    {
        Begin::Replay { record, .. } => {
            assert_eq!(
                record.as_value().unwrap(),
                &Bytes::from(format!("result {i}"))
            );
            true
        }
        Begin::Execute(lease) => {
            drop(lease);
            false
        }
        other => panic!("record {i}: {other:?}"),
    }
}

/// Checks which of the records `written` (oldest first) are held, read
/// without touching the protocol: exactly the newest `held`, none older.
async fn only_the_newest_are_held<S: StoreAdmin>(
    engine: &Idempotency<S>,
    written: std::ops::Range<u64>,
    held: u64,
) {
    let oldest_held = written.end - held;
    for i in written.clone() {
        let entry = engine.record(&key(i)).await.unwrap();
        let is_held = matches!(
            entry.map(|entry| entry.state),
            Some(EntryState::Completed(_))
        );
        assert_eq!(
            is_held,
            i >= oldest_held,
            "record {i} of {written:?} held: {is_held}; the newest {held} should be"
        );
    }
}

#[tokio::test]
async fn a_full_memory_store_evicts_exactly_the_oldest_records() {
    let engine = Idempotency::builder().max_entries(BOUND).build().unwrap();
    for i in 0..WRITTEN {
        run(&engine, i).await;
    }
    // Runs moka's pending maintenance, so every eviction is done and counted.
    engine.cleanup_expired().await.unwrap();

    let held = engine.cache_info().await.unwrap().entries;
    assert!(
        (BOUND - 1..=BOUND).contains(&held),
        "{held} records held at a bound of {BOUND}"
    );
    only_the_newest_are_held(&engine, 0..WRITTEN, held).await;
    let stats = engine.stats();
    assert_eq!(stats.evicted, WRITTEN - held, "only the oldest are counted");
    assert_eq!(stats.executed, WRITTEN);

    // And their retries are replays, not second runs.
    for i in WRITTEN - (BOUND - 1)..WRITTEN {
        assert!(replays(&engine, i).await, "record {i} replays");
    }
    assert_eq!(engine.stats().executed, WRITTEN);
}

#[tokio::test]
async fn a_retry_shortly_after_its_original_replays_at_the_bound() {
    // The steady state of a busy service: the cache is full, and a retry
    // comes a few requests after its original.
    const LAG: u64 = 20;
    let engine = Idempotency::builder().max_entries(BOUND).build().unwrap();
    for i in 0..WRITTEN {
        run(&engine, i).await;
        if i >= LAG {
            assert!(
                replays(&engine, i - LAG).await,
                "the retry of record {} sent {LAG} requests after it ran again",
                i - LAG
            );
        }
    }
    assert_eq!(engine.stats().executed, WRITTEN);
    assert_eq!(engine.stats().replayed, WRITTEN - LAG);
}

#[tokio::test]
async fn the_byte_bound_also_evicts_the_oldest_records() {
    // Every record weighs the same (its key and its value), so the byte
    // bound holds BOUND of them.
    let weight = (key(100).len() + "result 100".len()) as u64;
    let engine = Idempotency::builder()
        .max_entries(10 * BOUND)
        .max_bytes(BOUND * weight)
        .build()
        .unwrap();
    for i in 100..100 + WRITTEN {
        run(&engine, i).await;
    }
    engine.cleanup_expired().await.unwrap();
    let held = engine.cache_info().await.unwrap().entries;
    assert!(
        (BOUND - 1..=BOUND).contains(&held),
        "{held} records held at a byte bound of {BOUND} records"
    );
    only_the_newest_are_held(&engine, 100..100 + WRITTEN, held).await;
    assert_eq!(engine.stats().evicted, WRITTEN - held);
    for i in 100 + WRITTEN - (BOUND - 1)..100 + WRITTEN {
        assert!(replays(&engine, i).await, "record {i} replays");
    }
    assert_eq!(engine.stats().executed, WRITTEN);
}

#[tokio::test]
async fn over_http_the_last_records_replay_at_the_bound() {
    let layer = IdempotencyLayer::builder()
        .max_entries(BOUND)
        .build()
        .unwrap();
    let (server, handle, runs) = serve_orders(layer).await;
    let mut firsts = Vec::new();
    for i in 0..WRITTEN {
        let reply = server
            .post("/orders", Some(&format!("key-{i}")), &format!("order {i}"))
            .await;
        assert_eq!(reply.status, 201);
        assert!(!reply.replayed());
        firsts.push(reply.body);
    }
    assert_eq!(runs.get() as u64, WRITTEN);

    // The newest BOUND - 1 retries, newest first (a replay makes a record
    // recently used: from the oldest up, each retry would look only at
    // records no replay had touched).
    for i in (WRITTEN - (BOUND - 1)..WRITTEN).rev() {
        let reply = server
            .post("/orders", Some(&format!("key-{i}")), &format!("order {i}"))
            .await;
        assert_eq!(reply.status, 201);
        assert!(reply.replayed(), "the retry of request {i} ran again");
        assert_eq!(reply.body, firsts[i as usize], "request {i}");
    }
    assert_eq!(runs.get() as u64, WRITTEN, "no retry ran the handler");

    handle.cleanup_expired().await.unwrap();
    let held = handle.cache_info().await.unwrap().entries;
    assert!((BOUND - 1..=BOUND).contains(&held), "{held} held");
    let stats = handle.stats();
    assert_eq!(stats.evicted, WRITTEN - held);
    assert_eq!(stats.replayed, BOUND - 1);

    // The evicted ones are the oldest: the first request's retry runs again.
    let reply = server.post("/orders", Some("key-0"), "order 0").await;
    assert!(!reply.replayed());
    assert_eq!(runs.get() as u64, WRITTEN + 1);
}

#[cfg(feature = "redis")]
#[tokio::test]
async fn the_redis_local_tier_keeps_the_newest_records() {
    use tower_idempotency::store::redis::RedisStore;

    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let prefix = format!("test:eviction:{:x}:", rand::random::<u64>());
    let store = within(
        RedisStore::builder(url)
            .prefix(&prefix)
            .local_cache(BOUND)
            .local_cache_ttl(Duration::from_secs(60))
            .build(),
    )
    .await
    .expect("Redis answers on REDIS_URL or 127.0.0.1:6379");
    // Records left behind by a failed run go with their TTL.
    let engine = Idempotency::builder()
        .ttl(Duration::from_secs(60))
        .store(store.clone())
        .build()
        .unwrap();
    for i in 0..WRITTEN {
        run(&engine, i).await;
    }
    // Each of the newest records is answered in process, without Redis.
    for i in WRITTEN - (BOUND - 1)..WRITTEN {
        let record = store.local_record(&key(i));
        assert!(record.is_some(), "record {i} left the local tier");
        assert_eq!(
            record.unwrap().as_value().unwrap(),
            &Bytes::from(format!("result {i}"))
        );
    }
    within(engine.clear()).await.unwrap();
}
