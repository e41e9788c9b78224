//! The engine on the embedded store only: its entry and byte bounds, the
//! cleanup task and the configuration it refuses. Everything the engine
//! promises whatever the store is in `engine.rs`, run on both stores.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::timeout;
use tower_idempotency::store::{
    BeginOutcome, EntryState, LeaseToken, MemoryStore, Store, StoreAdmin,
};
use tower_idempotency::{Begin, Concurrent, Fingerprint, Idempotency, Record};

const LIMIT: Duration = Duration::from_secs(20);

fn fp(text: &str) -> Fingerprint {
    Fingerprint::of_bytes(text.as_bytes())
}

fn value(fingerprint: Fingerprint, text: &'static str) -> Record {
    Record::value(fingerprint, Bytes::from_static(text.as_bytes()))
}

/// Which of `keys` (oldest first) still hold a completed record, by index.
async fn held(engine: &Idempotency<MemoryStore>, keys: &[String]) -> Vec<usize> {
    let mut held = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        let entry = engine.record(key).await.unwrap();
        if matches!(entry.map(|e| e.state), Some(EntryState::Completed(_))) {
            held.push(i);
        }
    }
    held
}

/// Checks that exactly the newest `entries` of `keys` (oldest first) are
/// held, and that the `evicted` counter counts exactly the others.
async fn only_the_newest_are_held(engine: &Idempotency<MemoryStore>, keys: &[String]) {
    let entries = engine.cache_info().await.unwrap().entries as usize;
    let newest: Vec<usize> = (keys.len() - entries..keys.len()).collect();
    assert_eq!(
        held(engine, keys).await,
        newest,
        "the newest {entries} of {} records should be held",
        keys.len()
    );
    assert_eq!(
        engine.stats().evicted,
        (keys.len() - entries) as u64,
        "{:?}",
        engine.stats()
    );
}

#[tokio::test]
async fn auto_cleanup_counts_expired_entries_and_stops_on_request() {
    let store = MemoryStore::new();
    let engine = Idempotency::builder().store(store.clone()).build().unwrap();
    store
        .put(
            "s:a:t",
            Arc::new(value(fp("x"), "ok")),
            Duration::from_millis(20),
        )
        .await
        .unwrap();
    engine
        .start_auto_cleanup(Duration::from_millis(10))
        .unwrap();
    assert!(engine.auto_cleanup_running());
    timeout(LIMIT, async {
        while engine.stats().expired < 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the cleanup task drops the expired record");
    assert_eq!(engine.cache_info().await.unwrap().entries, 0);
    engine.stop_auto_cleanup();
    assert!(!engine.auto_cleanup_running());
    assert!(engine.start_auto_cleanup(Duration::ZERO).is_err());
}

#[tokio::test]
async fn the_entry_bound_evicts_and_counts() {
    let store = MemoryStore::builder().max_entries(100).build().unwrap();
    let engine = Idempotency::builder().store(store.clone()).build().unwrap();
    let keys: Vec<String> = (0..1_000).map(|i| format!("s{i}:a:t")).collect();
    for key in &keys {
        store
            .put(key, Arc::new(value(fp("x"), "ok")), Duration::from_secs(60))
            .await
            .unwrap();
    }
    engine.cleanup_expired().await.unwrap();
    let info = engine.cache_info().await.unwrap();
    assert!((99..=100).contains(&info.entries), "{info:?}");
    assert_eq!(info.max_entries, Some(100));
    // The records that went are the oldest, and only they are counted.
    only_the_newest_are_held(&engine, &keys).await;
}

#[tokio::test]
async fn the_byte_bound_evicts_large_records() {
    let store = MemoryStore::builder()
        .max_entries(1_000)
        .max_bytes(64 * 1024)
        .build()
        .unwrap();
    let engine = Idempotency::builder().store(store.clone()).build().unwrap();
    let body = Bytes::from(vec![b'x'; 8 * 1024]);
    let keys: Vec<String> = (0..64).map(|i| format!("s{i}:a:t")).collect();
    for key in &keys {
        store
            .put(
                key,
                Arc::new(Record::value(fp("x"), body.clone())),
                Duration::from_secs(60),
            )
            .await
            .unwrap();
    }
    engine.cleanup_expired().await.unwrap();
    let info = engine.cache_info().await.unwrap();
    assert!(info.weighted_bytes <= 64 * 1024, "{info:?}");
    // Each record weighs a little over 8 KiB: seven fit, and at least six
    // are kept.
    assert!((6..=7).contains(&info.entries), "{info:?}");
    only_the_newest_are_held(&engine, &keys).await;
}

#[tokio::test]
async fn requests_in_flight_never_evict_a_completed_record() {
    let store = MemoryStore::builder().max_entries(10).build().unwrap();
    let engine = Idempotency::builder().store(store.clone()).build().unwrap();
    let kept = value(fp("kept"), "kept");
    store
        .put("s:a:kept", Arc::new(kept.clone()), Duration::from_secs(60))
        .await
        .unwrap();
    // A hundred times the entry bound in flight at once.
    let mut leases = Vec::new();
    for i in 0..1_000 {
        match engine
            .begin_with(format!("s{i}:a:t"), fp("run"), Concurrent::Reject)
            .await
            .unwrap()
        {
            Begin::Execute(lease) => leases.push(lease),
            other => panic!("a new key gave {other:?}"),
        }
    }
    engine.cleanup_expired().await.unwrap();
    let info = engine.cache_info().await.unwrap();
    assert_eq!(info.entries, 1_001, "{info:?}");
    assert_eq!(engine.stats().evicted, 0, "{:?}", engine.stats());
    match engine
        .begin_with("s:a:kept", fp("kept"), Concurrent::Reject)
        .await
        .unwrap()
    {
        Begin::Replay { record, .. } => assert_eq!(*record, kept),
        other => panic!("the completed key gave {other:?}"),
    }
    // Every marker is still there, held by its lease.
    for i in [0, 500, 999] {
        let entry = engine.record(&format!("s{i}:a:t")).await.unwrap();
        assert!(
            matches!(entry.map(|e| e.state), Some(EntryState::InFlight { .. })),
            "marker {i} is gone"
        );
    }
    for lease in leases {
        assert!(lease.complete(value(fp("run"), "done")).await.unwrap());
    }
    // The records, once completed, are what the bound applies to: the kept
    // record (replayed before the first completion) and then the records
    // completed first go; the last ones completed stay.
    engine.cleanup_expired().await.unwrap();
    let info = engine.cache_info().await.unwrap();
    assert!((9..=10).contains(&info.entries), "{info:?}");
    let keys: Vec<String> = std::iter::once("s:a:kept".to_owned())
        .chain((0..1_000).map(|i| format!("s{i}:a:t")))
        .collect();
    only_the_newest_are_held(&engine, &keys).await;
}

#[tokio::test]
async fn an_expired_marker_is_taken_over_and_counted_as_expired() {
    let store = MemoryStore::new();
    let engine = Idempotency::builder().store(store.clone()).build().unwrap();
    let brief = Duration::from_millis(20);
    let (old, new) = (LeaseToken::random(), LeaseToken::random());
    let begun = store.begin("s:a:t", fp("x"), old, brief).await.unwrap();
    assert!(matches!(begun, BeginOutcome::Acquired), "{begun:?}");
    tokio::time::sleep(brief * 3).await;
    assert_eq!(engine.stats().expired, 0, "nothing touched the marker yet");

    let begun = store.begin("s:a:t", fp("x"), new, LIMIT).await.unwrap();
    assert!(matches!(begun, BeginOutcome::Acquired), "{begun:?}");
    assert_eq!(engine.stats().expired, 1, "{:?}", engine.stats());
    let stale = value(fp("x"), "stale");
    assert!(!store
        .complete("s:a:t", old, stale.into(), LIMIT)
        .await
        .unwrap());
    let fresh = value(fp("x"), "fresh");
    assert!(store
        .complete("s:a:t", new, fresh.into(), LIMIT)
        .await
        .unwrap());
    assert_eq!(engine.stats().expired, 1, "{:?}", engine.stats());

    // A marker nobody touches again is dropped by the cleanup.
    store
        .begin("s:b:t", fp("x"), LeaseToken::random(), brief)
        .await
        .unwrap();
    tokio::time::sleep(brief * 3).await;
    engine.cleanup_expired().await.unwrap();
    assert_eq!(engine.stats().expired, 2, "{:?}", engine.stats());
    assert_eq!(engine.cache_info().await.unwrap().entries, 1);
}

#[tokio::test]
async fn invalid_configuration_is_refused_at_build() {
    assert!(Idempotency::builder().ttl(Duration::ZERO).build().is_err());
    assert!(Idempotency::builder()
        .lease_ttl(Duration::ZERO)
        .build()
        .is_err());
    assert!(Idempotency::builder().max_entries(0).build().is_err());
    assert!(Idempotency::builder().max_bytes(0).build().is_err());
}
