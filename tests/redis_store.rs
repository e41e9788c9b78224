//! The Redis store against a real Redis: engines sharing one Redis behave as
//! instances of one service. Redis answers on 127.0.0.1:6379 unless
//! `REDIS_URL` says otherwise; each test works under its own random prefix.
#![cfg(feature = "redis")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Barrier;
use tokio::time::timeout;
use tower_idempotency::store::{EntryKind, EntryState, LeaseToken, Store, StoreError};
use tower_idempotency::{
    Begin, Concurrent, Fingerprint, Idempotency, IdempotencyKey, KeyFilter, RedisStore,
};

mod support;

use support::{engine, prefix, redis_url, store, value, LIMIT};

const DUPLICATES: usize = 200;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_wait_run_the_action_once_and_share_its_result() {
    let prefix = prefix();
    let wait = Concurrent::Wait {
        timeout: Duration::from_secs(20),
    };
    let instances = [
        engine(store(&prefix).await, wait),
        engine(store(&prefix).await, wait),
    ];
    let fp = Fingerprint::of_bytes(b"charge 42");
    let runs = Arc::new(AtomicUsize::new(0));
    let barrier = Arc::new(Barrier::new(DUPLICATES));
    let tasks: Vec<_> = (0..DUPLICATES)
        .map(|i| {
            let engine = instances[i % 2].clone();
            let (runs, barrier) = (runs.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                match engine.begin("sig:charge:acct-1", fp, wait).await.unwrap() {
                    Begin::Execute(lease) => {
                        let run = runs.fetch_add(1, Ordering::SeqCst);
                        // Hold the lease a little so duplicates pile up on
                        // both instances; the assertions do not depend on it.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        let body = if run == 0 { "charged" } else { "charged again" };
                        let record = value(fp, body);
                        assert!(lease.complete(record.clone()).await.unwrap());
                        Bytes::from_static(body.as_bytes())
                    }
                    Begin::Replay { record, .. } => record.as_value().unwrap().clone(),
                    other => panic!("a duplicate got {other:?}"),
                }
            })
        })
        .collect();
    for task in tasks {
        let body = timeout(LIMIT, task).await.unwrap().unwrap();
        assert_eq!(body, "charged");
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    let [a, b] = [instances[0].stats(), instances[1].stats()];
    assert_eq!(a.executed + b.executed, 1);
    assert_eq!(
        a.coalesced + a.replayed + b.coalesced + b.replayed,
        DUPLICATES as u64 - 1
    );
    instances[0].clear().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_reject_run_the_action_once_and_refuse_the_rest() {
    let prefix = prefix();
    let instances = [
        engine(store(&prefix).await, Concurrent::Reject),
        engine(store(&prefix).await, Concurrent::Reject),
    ];
    let fp = Fingerprint::of_bytes(b"ship order 7");
    let barrier = Arc::new(Barrier::new(DUPLICATES));
    let tasks: Vec<_> = (0..DUPLICATES)
        .map(|i| {
            let engine = instances[i % 2].clone();
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                engine
                    .begin("sig:ship:order-7", fp, Concurrent::Reject)
                    .await
                    .unwrap()
            })
        })
        .collect();
    // Every outcome is collected while the one lease is still held (it is
    // one of the outcomes), so every duplicate saw the key in flight.
    let mut leases = Vec::new();
    let mut conflicts = 0;
    for task in tasks {
        match timeout(LIMIT, task).await.unwrap().unwrap() {
            Begin::Execute(lease) => leases.push(lease),
            Begin::Conflict { .. } => conflicts += 1,
            other => panic!("a duplicate got {other:?}"),
        }
    }
    assert_eq!(leases.len(), 1);
    assert_eq!(conflicts, DUPLICATES - 1);
    let lease = leases.pop().unwrap();
    assert!(lease.complete(value(fp, "shipped")).await.unwrap());
    for engine in &instances {
        match engine
            .begin("sig:ship:order-7", fp, Concurrent::Reject)
            .await
            .unwrap()
        {
            Begin::Replay { record, .. } => assert_eq!(record.as_value().unwrap(), "shipped"),
            other => panic!("a retry after completion got {other:?}"),
        }
    }
    instances[0].clear().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_lease_is_renewed_in_redis_so_the_other_instance_never_takes_over() {
    let prefix = prefix();
    let lease_ttl = Duration::from_millis(300);
    let instance = |store| {
        Idempotency::builder()
            .store(store)
            .lease_ttl(lease_ttl)
            .build()
            .unwrap()
    };
    let (a, b) = (
        instance(store(&prefix).await),
        instance(store(&prefix).await),
    );
    let fp = Fingerprint::of_bytes(b"slow report");
    let Begin::Execute(lease) = a
        .begin("s:report:q3", fp, Concurrent::Reject)
        .await
        .unwrap()
    else {
        panic!("the first call runs");
    };
    // A slow action: four lease TTLs later, A's heartbeat has kept the marker.
    for _ in 0..4 {
        tokio::time::sleep(lease_ttl).await;
        let outcome = b
            .begin("s:report:q3", fp, Concurrent::Reject)
            .await
            .unwrap();
        assert!(
            matches!(outcome, Begin::Conflict { .. }),
            "taken over: {outcome:?}"
        );
    }
    assert!(lease.complete(value(fp, "report")).await.unwrap());
    assert!(matches!(
        b.begin("s:report:q3", fp, Concurrent::Reject)
            .await
            .unwrap(),
        Begin::Replay { .. }
    ));
    a.clear().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_on_another_instance_is_woken_by_the_change_notice() {
    let prefix = prefix();
    let (a, b) = (store(&prefix).await, store(&prefix).await);
    let fp = Fingerprint::of_bytes(b"x");
    let ttl = Duration::from_secs(60);
    // Deadlines an hour away: within LIMIT, only a notice ends these waits.
    let far = || tokio::time::Instant::now() + Duration::from_secs(3600);

    let lease = LeaseToken::random();
    a.begin("s:a:done", fp, lease, ttl).await.unwrap();
    let (woken, completed) = tokio::join!(
        timeout(LIMIT, b.until_changed("s:a:done", far())),
        a.complete("s:a:done", lease, Arc::new(value(fp, "done")), ttl),
    );
    assert!(completed.unwrap());
    woken.expect("instance B was not told of the completion");

    let lease = LeaseToken::random();
    a.begin("s:a:dropped", fp, lease, ttl).await.unwrap();
    let (woken, released) = tokio::join!(
        timeout(LIMIT, b.until_changed("s:a:dropped", far())),
        a.release("s:a:dropped", lease),
    );
    assert!(released.unwrap());
    woken.expect("instance B was not told of the release");
    a.clear().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_lease_is_taken_over_and_cannot_overwrite_the_new_result() {
    let prefix = prefix();
    let store = store(&prefix).await;
    let survivor = engine(store.clone(), Concurrent::Reject);
    let fp = Fingerprint::of_bytes(b"send mail");
    let key = "sig:mail:user-1";

    // An instance took the lease and died: nobody renews its marker.
    let dead = LeaseToken::random();
    store
        .begin(key, fp, dead, Duration::from_millis(300))
        .await
        .unwrap();
    assert!(matches!(
        survivor.begin(key, fp, Concurrent::Reject).await.unwrap(),
        Begin::Conflict { .. }
    ));
    tokio::time::sleep(Duration::from_millis(600)).await;

    let Begin::Execute(lease) = survivor.begin(key, fp, Concurrent::Reject).await.unwrap() else {
        panic!("the expired lease was not taken over");
    };
    // The dead instance wakes up: its lease no longer counts.
    let stale = Arc::new(value(fp, "stale"));
    assert!(!store
        .complete(key, dead, stale, Duration::from_secs(60))
        .await
        .unwrap());
    assert!(!store.release(key, dead).await.unwrap());
    assert!(lease.complete(value(fp, "fresh")).await.unwrap());
    let entry = survivor.record(key).await.unwrap().unwrap();
    let EntryState::Completed(record) = entry.state else {
        panic!("no record after completion");
    };
    assert_eq!(record.as_value().unwrap(), "fresh");
    survivor.clear().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_removed_by_another_instance_cannot_complete_over_the_new_one() {
    let prefix = prefix();
    let a = engine(store(&prefix).await, Concurrent::Reject);
    let b = engine(store(&prefix).await, Concurrent::Reject);
    let fp = Fingerprint::of_bytes(b"post");
    let key = "sig:post:feed";
    let Begin::Execute(first) = a.begin(key, fp, Concurrent::Reject).await.unwrap() else {
        panic!("the first call runs");
    };
    // An operator drops the marker through instance B; a retry runs there.
    assert!(b.remove(key).await.unwrap());
    let Begin::Execute(second) = b.begin(key, fp, Concurrent::Reject).await.unwrap() else {
        panic!("the retry runs once the marker is gone");
    };
    assert!(!first.complete(value(fp, "first")).await.unwrap());
    assert!(second.complete(value(fp, "second")).await.unwrap());
    match a.begin(key, fp, Concurrent::Reject).await.unwrap() {
        Begin::Replay { record, .. } => assert_eq!(record.as_value().unwrap(), "second"),
        other => panic!("got {other:?}"),
    }
    a.clear().await.unwrap();
}

#[tokio::test]
async fn a_corrupt_value_is_a_typed_error() {
    let store = store(&prefix()).await;
    let engine = engine(store.clone(), Concurrent::Reject);
    let mut connection = store.connection();
    redis::cmd("SET")
        .arg(store.redis_key("s:a:bad"))
        .arg("TIR\x09not a record of this version")
        .query_async::<()>(&mut connection)
        .await
        .unwrap();
    let fp = Fingerprint::of_bytes(b"x");
    let begun = engine.begin("s:a:bad", fp, Concurrent::Reject).await;
    assert!(
        matches!(&begun, Err(StoreError::Corrupt { key, .. }) if key == "s:a:bad"),
        "{begun:?}"
    );
    let record = engine.record("s:a:bad").await;
    assert!(
        matches!(record, Err(StoreError::Corrupt { .. })),
        "{record:?}"
    );
    assert!(engine.remove("s:a:bad").await.unwrap());
    assert!(matches!(
        engine
            .begin("s:a:bad", fp, Concurrent::Reject)
            .await
            .unwrap(),
        Begin::Execute(_)
    ));
    engine.clear().await.unwrap();
}

#[tokio::test]
async fn a_key_of_another_redis_type_is_corrupt_and_does_not_break_listing() {
    let store = store(&prefix()).await;
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
    engine
        .put("s:a:fine", value(fp, "fine"), Duration::from_secs(60))
        .await
        .unwrap();

    let begun = engine.begin("s:a:hash", fp, Concurrent::Reject).await;
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
    let engine = engine(RedisStore::new(manager, prefix()), Concurrent::Reject);
    let fp = Fingerprint::of_bytes(b"x");
    let Begin::Execute(lease) = engine
        .begin("s:a:own", fp, Concurrent::Reject)
        .await
        .unwrap()
    else {
        panic!("the first call runs");
    };
    assert!(lease.complete(value(fp, "own")).await.unwrap());
    assert!(matches!(
        engine
            .begin("s:a:own", fp, Concurrent::Reject)
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
    let neighbour = engine(store(&prefix()).await, Concurrent::Reject);
    let engine = engine(store(&prefix()).await, Concurrent::Reject);
    let fp = Fingerprint::of_bytes(b"x");
    let key = |signal, action, target| IdempotencyKey::new(signal, action, target).to_string();
    let (short, long) = (Duration::from_secs(30), Duration::from_secs(3600));
    engine
        .put(&key("evt-1", "create_task", "trello"), value(fp, "1"), long)
        .await
        .unwrap();
    engine
        .put(&key("evt-1", "notify", "slack"), value(fp, "2"), short)
        .await
        .unwrap();
    engine
        .put(&key("evt-2", "create_task", "jira"), value(fp, "3"), long)
        .await
        .unwrap();
    let Begin::Execute(_running) = engine
        .begin(key("evt-3", "notify", "slack"), fp, Concurrent::Reject)
        .await
        .unwrap()
    else {
        panic!("the first call runs");
    };
    neighbour
        .put(&key("evt-1", "create_task", "trello"), value(fp, "n"), long)
        .await
        .unwrap();

    let names = |entries: Vec<tower_idempotency::store::ScanEntry>| {
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
    assert!(engine
        .remove(&key("evt-2", "create_task", "jira"))
        .await
        .unwrap());
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
    let store = RedisStore::builder(redis_url())
        .prefix(prefix())
        .local_cache(100)
        .build()
        .await
        .unwrap();
    let engine = engine(store.clone(), Concurrent::Reject);
    let fp = Fingerprint::of_bytes(b"x");
    let Begin::Execute(lease) = engine
        .begin("s:a:hot", fp, Concurrent::Reject)
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
            .begin("s:a:hot", fp, Concurrent::Reject)
            .await
            .unwrap(),
        Begin::Replay { .. }
    ));
    // remove invalidates the local tier: the next call runs the action.
    engine.remove("s:a:hot").await.unwrap();
    assert!(matches!(
        engine
            .begin("s:a:hot", fp, Concurrent::Reject)
            .await
            .unwrap(),
        Begin::Execute(_)
    ));
    engine.clear().await.unwrap();
}
