//! The Redis store's values and handle: corrupt and foreign values are typed
//! errors, the handle's queries and maintenance stay within the prefix, the
//! local tier saves round trips, and settings are checked at build.
#![cfg(feature = "redis")]

use std::sync::Arc;
use std::time::Duration;

use tokio::time::timeout;
use tower_idempotency::store::redis::RedisStore;
use tower_idempotency::store::{
    EntryKind, EntryState, LeaseToken, ScanEntry, Store, StoreAdmin, StoreError,
};
use tower_idempotency::{Begin, Concurrent, Fingerprint, IdempotencyKey, KeyFilter};

use crate::support::redis as support;

use support::{cleaned_prefix, engine, redis_url, store, value, LIMIT};

#[tokio::test]
async fn a_corrupt_value_is_a_typed_error() {
    let (prefix, _cleanup) = cleaned_prefix();
    let store = store(&prefix).await;
    let engine = engine(store.clone(), Concurrent::Reject);
    let mut connection = store.connection();
    redis::cmd("SET")
        .arg(store.redis_key("s:a:bad"))
        .arg("TIR\x09not a record of this version")
        .query_async::<()>(&mut connection)
        .await
        .unwrap();
    let fp = Fingerprint::of_bytes(b"x");
    let begun = engine.begin_with("s:a:bad", fp, Concurrent::Reject).await;
    assert!(
        matches!(&begun, Err(StoreError::Corrupt { key, .. }) if key == "s:a:bad"),
        "{begun:?}"
    );
    let record = engine.record("s:a:bad").await;
    assert!(
        matches!(record, Err(StoreError::Corrupt { .. })),
        "{record:?}"
    );
    assert_eq!(
        engine.remove("s:a:bad").await.unwrap(),
        tower_idempotency::store::Removal::Removed
    );
    assert!(matches!(
        engine
            .begin_with("s:a:bad", fp, Concurrent::Reject)
            .await
            .unwrap(),
        Begin::Execute(_)
    ));
    engine.clear().await.unwrap();
}

#[tokio::test]
async fn a_key_of_another_redis_type_is_corrupt_and_does_not_break_listing() {
    let (prefix, _cleanup) = cleaned_prefix();
    let store = store(&prefix).await;
    let engine = engine(store.clone(), Concurrent::Reject);
    let mut connection = store.connection();
    redis::cmd("HSET")
        .arg(store.redis_key("s:a:hash"))
        .arg("field")
        .arg("value")
        .query_async::<()>(&mut connection)
        .await
        .unwrap();
    let fp = Fingerprint::of_bytes(b"x");
    store
        .put(
            "s:a:fine",
            Arc::new(value(fp, "fine")),
            Duration::from_secs(60),
        )
        .await
        .unwrap();

    let begun = engine.begin_with("s:a:hash", fp, Concurrent::Reject).await;
    assert!(
        matches!(begun, Err(StoreError::Corrupt { .. })),
        "{begun:?}"
    );
    let lease = LeaseToken::random();
    let record = Arc::new(value(fp, "x"));
    let ttl = Duration::from_secs(60);
    assert!(!store
        .complete("s:a:hash", lease, record, ttl)
        .await
        .unwrap());
    assert!(!store.release("s:a:hash", lease).await.unwrap());
    let listed: Vec<String> = engine
        .keys(&KeyFilter::new())
        .await
        .unwrap()
        .into_iter()
        .map(|entry| entry.key)
        .collect();
    assert_eq!(listed, ["s:a:fine"]);
    engine.clear().await.unwrap();
    assert_eq!(store.len().await.unwrap(), 0);
}

#[tokio::test]
async fn a_store_on_your_own_connection_manager_works() {
    let client = redis::Client::open(redis_url()).unwrap();
    let manager = timeout(LIMIT, redis::aio::ConnectionManager::new(client))
        .await
        .unwrap()
        .unwrap();
    let (prefix, _cleanup) = cleaned_prefix();
    let engine = engine(RedisStore::new(manager, prefix), Concurrent::Reject);
    let fp = Fingerprint::of_bytes(b"x");
    let Begin::Execute(lease) = engine
        .begin_with("s:a:own", fp, Concurrent::Reject)
        .await
        .unwrap()
    else {
        panic!("the first call runs");
    };
    assert!(lease.complete(value(fp, "own")).await.unwrap());
    assert!(matches!(
        engine
            .begin_with("s:a:own", fp, Concurrent::Reject)
            .await
            .unwrap(),
        Begin::Replay { .. }
    ));
    engine.clear().await.unwrap();
}

#[tokio::test]
async fn invalid_settings_are_refused_at_build() {
    let refused = [
        RedisStore::builder("not a url").build_lazy(),
        RedisStore::builder(redis_url()).local_cache(0).build_lazy(),
        RedisStore::builder(redis_url())
            .response_timeout(Duration::ZERO)
            .build_lazy(),
    ];
    for built in refused {
        assert!(matches!(built, Err(StoreError::Backend(_))), "{built:?}");
    }
}

#[tokio::test]
async fn handle_methods_work_on_redis_and_stay_within_the_prefix() {
    let (neighbour_prefix, _neighbour_cleanup) = cleaned_prefix();
    let neighbour_store = store(&neighbour_prefix).await;
    let neighbour = engine(neighbour_store.clone(), Concurrent::Reject);
    let (prefix, _cleanup) = cleaned_prefix();
    let own_store = store(&prefix).await;
    let engine = engine(own_store.clone(), Concurrent::Reject);
    let fp = Fingerprint::of_bytes(b"x");
    let key = |signal, action, target| IdempotencyKey::new(signal, action, target).to_string();
    let (short, long) = (Duration::from_secs(30), Duration::from_secs(3600));
    own_store
        .put(
            &key("evt-1", "create_task", "trello"),
            Arc::new(value(fp, "1")),
            long,
        )
        .await
        .unwrap();
    own_store
        .put(
            &key("evt-1", "notify", "slack"),
            Arc::new(value(fp, "2")),
            short,
        )
        .await
        .unwrap();
    own_store
        .put(
            &key("evt-2", "create_task", "jira"),
            Arc::new(value(fp, "3")),
            long,
        )
        .await
        .unwrap();
    let Begin::Execute(_running) = engine
        .begin_with(key("evt-3", "notify", "slack"), fp, Concurrent::Reject)
        .await
        .unwrap()
    else {
        panic!("the first call runs");
    };
    neighbour_store
        .put(
            &key("evt-1", "create_task", "trello"),
            Arc::new(value(fp, "n")),
            long,
        )
        .await
        .unwrap();

    let names = |entries: Vec<ScanEntry>| {
        let mut keys: Vec<String> = entries.into_iter().map(|e| e.key).collect();
        keys.sort();
        keys
    };
    assert_eq!(
        names(engine.find_by_signal("evt-1").await.unwrap()),
        [
            key("evt-1", "create_task", "trello"),
            key("evt-1", "notify", "slack")
        ]
    );
    assert_eq!(
        names(engine.find_by_action("create_task").await.unwrap()),
        [
            key("evt-1", "create_task", "trello"),
            key("evt-2", "create_task", "jira")
        ]
    );
    assert_eq!(
        names(engine.find_by_target("slack").await.unwrap()),
        [
            key("evt-1", "notify", "slack"),
            key("evt-3", "notify", "slack")
        ]
    );
    let in_flight = engine
        .keys(&KeyFilter::new().action("notify"))
        .await
        .unwrap();
    assert!(in_flight
        .iter()
        .any(|e| e.key == key("evt-3", "notify", "slack") && e.kind == EntryKind::InFlight));
    // The marker's lease TTL (60 s) and the short record are within 2 minutes.
    assert_eq!(
        names(
            engine
                .expiring_within(Duration::from_secs(120))
                .await
                .unwrap()
        ),
        [
            key("evt-1", "notify", "slack"),
            key("evt-3", "notify", "slack")
        ]
    );
    let entry = engine
        .record(&key("evt-2", "create_task", "jira"))
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(entry.state, EntryState::Completed(r) if r.as_value().unwrap() == "3"));

    let info = engine.cache_info().await.unwrap();
    assert_eq!((info.entries, info.max_entries), (4, None));
    assert_eq!(
        engine
            .remove(&key("evt-2", "create_task", "jira"))
            .await
            .unwrap(),
        tower_idempotency::store::Removal::Removed
    );
    assert_eq!(engine.cache_info().await.unwrap().entries, 3);

    engine.clear().await.unwrap();
    assert_eq!(engine.cache_info().await.unwrap().entries, 0);
    assert!(engine.keys(&KeyFilter::new()).await.unwrap().is_empty());
    // Another prefix on the same Redis is untouched.
    assert_eq!(neighbour.cache_info().await.unwrap().entries, 1);
    neighbour.clear().await.unwrap();
}

#[tokio::test]
async fn the_local_tier_replays_without_a_round_trip_until_removed() {
    let (prefix, _cleanup) = cleaned_prefix();
    let store = RedisStore::builder(redis_url())
        .prefix(prefix)
        .local_cache(100)
        .build()
        .await
        .unwrap();
    let engine = engine(store.clone(), Concurrent::Reject);
    let fp = Fingerprint::of_bytes(b"x");
    let Begin::Execute(lease) = engine
        .begin_with("s:a:hot", fp, Concurrent::Reject)
        .await
        .unwrap()
    else {
        panic!("the first call runs");
    };
    assert!(lease.complete(value(fp, "hot")).await.unwrap());
    // Delete the record behind the store's back: a replay that still works
    // was served from the local tier, without asking Redis.
    let mut connection = store.connection();
    redis::cmd("DEL")
        .arg(store.redis_key("s:a:hot"))
        .query_async::<()>(&mut connection)
        .await
        .unwrap();
    assert!(matches!(
        engine
            .begin_with("s:a:hot", fp, Concurrent::Reject)
            .await
            .unwrap(),
        Begin::Replay { .. }
    ));
    // remove invalidates the local tier: the next call runs the action.
    let _ = engine.remove("s:a:hot").await.unwrap();
    assert!(matches!(
        engine
            .begin_with("s:a:hot", fp, Concurrent::Reject)
            .await
            .unwrap(),
        Begin::Execute(_)
    ));
    engine.clear().await.unwrap();
}
