//! The Redis store against a real Redis: engines sharing one Redis behave as
//! instances of one service. Redis answers on 127.0.0.1:6379 unless
//! `REDIS_URL` says otherwise; each test works under its own random prefix.
#![cfg(feature = "redis")]

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Barrier;
use tokio::time::timeout;
use tower_idempotency::store::{EntryState, LeaseToken, Store, StoreAdmin};
use tower_idempotency::{Begin, Concurrent, Fingerprint, Idempotency};

use crate::support::redis as support;

use support::{cleaned_prefix, engine, store, value, LIMIT};

const DUPLICATES: usize = 200;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_wait_run_the_action_once_and_share_its_result() {
    let (prefix, _cleanup) = cleaned_prefix();
    let wait = Concurrent::Wait {
        timeout: Duration::from_secs(20),
    };
    let instances = [
        engine(store(&prefix).await, wait),
        engine(store(&prefix).await, wait),
    ];
    support::duplicates_over_two_instances_run_once(instances.clone(), wait, DUPLICATES).await;
    instances[0].clear().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_reject_run_the_action_once_and_refuse_the_rest() {
    let (prefix, _cleanup) = cleaned_prefix();
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
                    .begin_with("sig:ship:order-7", fp, Concurrent::Reject)
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
            .begin_with("sig:ship:order-7", fp, Concurrent::Reject)
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
    let (prefix, _cleanup) = cleaned_prefix();
    // A takeover would need the heartbeat (every second) to stall for two.
    let lease_ttl = Duration::from_secs(3);
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
        .begin_with("s:report:q3", fp, Concurrent::Reject)
        .await
        .unwrap()
    else {
        panic!("the first call runs");
    };
    // A slow action: past the lease TTL, twice, A's heartbeat has kept the
    // marker.
    for _ in 0..2 {
        tokio::time::sleep(lease_ttl * 3 / 4).await;
        let outcome = b
            .begin_with("s:report:q3", fp, Concurrent::Reject)
            .await
            .unwrap();
        assert!(
            matches!(outcome, Begin::Conflict { .. }),
            "taken over: {outcome:?}"
        );
    }
    assert!(lease.complete(value(fp, "report")).await.unwrap());
    assert!(matches!(
        b.begin_with("s:report:q3", fp, Concurrent::Reject)
            .await
            .unwrap(),
        Begin::Replay { .. }
    ));
    a.clear().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_on_another_instance_is_woken_by_the_change_notice() {
    let (prefix, _cleanup) = cleaned_prefix();
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
    let (prefix, _cleanup) = cleaned_prefix();
    let store = store(&prefix).await;
    let survivor = engine(store.clone(), Concurrent::Reject);
    let fp = Fingerprint::of_bytes(b"send mail");
    let key = "sig:mail:user-1";

    // An instance took the lease and died: nobody renews its marker.
    let dead = LeaseToken::random();
    store
        .begin(key, fp, dead, Duration::from_secs(2))
        .await
        .unwrap();
    assert!(matches!(
        survivor
            .begin_with(key, fp, Concurrent::Reject)
            .await
            .unwrap(),
        Begin::Conflict { .. }
    ));
    tokio::time::sleep(Duration::from_millis(2500)).await;

    let Begin::Execute(lease) = survivor
        .begin_with(key, fp, Concurrent::Reject)
        .await
        .unwrap()
    else {
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
    let (prefix, _cleanup) = cleaned_prefix();
    let a = engine(store(&prefix).await, Concurrent::Reject);
    let b = engine(store(&prefix).await, Concurrent::Reject);
    let fp = Fingerprint::of_bytes(b"post");
    let key = "sig:post:feed";
    let Begin::Execute(first) = a.begin_with(key, fp, Concurrent::Reject).await.unwrap() else {
        panic!("the first call runs");
    };
    // An operator drops the marker through instance B (a plain `remove`
    // refuses: it is in flight); a retry runs there.
    assert_eq!(
        b.remove(key).await.unwrap(),
        tower_idempotency::store::Removal::InFlight
    );
    assert!(b.remove_in_flight(key).await.unwrap());
    let Begin::Execute(second) = b.begin_with(key, fp, Concurrent::Reject).await.unwrap() else {
        panic!("the retry runs once the marker is gone");
    };
    assert!(!first.complete(value(fp, "first")).await.unwrap());
    assert!(second.complete(value(fp, "second")).await.unwrap());
    match a.begin_with(key, fp, Concurrent::Reject).await.unwrap() {
        Begin::Replay { record, .. } => assert_eq!(record.as_value().unwrap(), "second"),
        other => panic!("got {other:?}"),
    }
    a.clear().await.unwrap();
}
