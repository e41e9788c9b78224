//! The Redis store on the shared Redis Cluster (127.0.0.1:7000-7005, or
//! `REDIS_CLUSTER_URLS`; started by `.ci/redis-cluster.sh` when it does not
//! answer): keys spread over every primary and listing covers them all;
//! duplicates split over two instances run once; writes acknowledged by
//! replicas. Nothing here stops or kills a node (see
//! `cluster_failover.rs` for that, on a cluster of its own).
#![cfg(feature = "redis")]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::timeout;
use tower_idempotency::store::redis::RedisStore;
use tower_idempotency::store::{EntryState, LeaseToken, Store, StoreAdmin, StoreError};
use tower_idempotency::{Begin, Concurrent, Fingerprint, Idempotency, Record};

use crate::support::stores::cluster;

use cluster::{cluster_store, shared_cluster_urls, ClusterCleanup};

const LIMIT: Duration = Duration::from_secs(20);

fn prefix() -> String {
    format!("test:cluster:{:x}:", rand::random::<u64>())
}

fn value(fp: Fingerprint, body: &'static str) -> Record {
    Record::value(fp, Bytes::from_static(body.as_bytes()))
}

/// A store on the shared cluster under a fresh prefix, and its cleanup.
async fn shared(prefix: &str) -> (RedisStore, ClusterCleanup) {
    let urls = shared_cluster_urls();
    let store = cluster_store(&urls, prefix, false).await;
    let cleanup = ClusterCleanup {
        urls,
        prefix: prefix.to_owned(),
    };
    (store, cleanup)
}

/// How many keys under `prefix` each primary of the shared cluster holds,
/// asked of each node directly.
fn keys_per_primary(prefix: &str) -> HashMap<String, usize> {
    let mut held = HashMap::new();
    for url in shared_cluster_urls() {
        let client = redis::Client::open(url.as_str()).unwrap();
        let mut node = client
            .get_connection_with_timeout(Duration::from_secs(5))
            .unwrap();
        node.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let role: Vec<redis::Value> = redis::cmd("ROLE").query(&mut node).unwrap();
        if !matches!(role.first(), Some(redis::Value::BulkString(r)) if r == b"master") {
            continue;
        }
        let mut count = 0;
        let mut cursor = 0_u64;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{prefix}*"))
                .arg("COUNT")
                .arg(1000)
                .query(&mut node)
                .unwrap();
            count += keys.len();
            if next == 0 {
                break;
            }
            cursor = next;
        }
        held.insert(url, count);
    }
    held
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_spread_over_every_primary_and_listing_and_clear_cover_them_all() {
    let prefix = prefix();
    let (store, _cleanup) = shared(&prefix).await;
    let engine = Idempotency::builder().store(store).build().unwrap();
    let fp = Fingerprint::of_bytes(b"order");
    const KEYS: usize = 90;
    for i in 0..KEYS {
        let key = format!("sig-{i}:create:acct");
        let begun = timeout(LIMIT, engine.begin_with(&key, fp, Concurrent::Reject))
            .await
            .unwrap()
            .unwrap();
        let Begin::Execute(lease) = begun else {
            panic!("a new key runs")
        };
        assert!(lease.complete(value(fp, "done")).await.unwrap());
    }

    let held = keys_per_primary(&prefix);
    assert_eq!(held.len(), 3, "three primaries: {held:?}");
    assert!(
        held.values().all(|count| *count > 0),
        "every primary holds some keys: {held:?}"
    );
    assert_eq!(held.values().sum::<usize>(), KEYS);

    // The handle lists and counts the keys of every primary.
    let listed = timeout(LIMIT, engine.find_by_action("create"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(listed.len(), KEYS);
    let info = timeout(LIMIT, engine.cache_info()).await.unwrap().unwrap();
    assert_eq!(info.entries, KEYS as u64);
    timeout(LIMIT, engine.ping()).await.unwrap().unwrap();

    timeout(LIMIT, engine.clear()).await.unwrap().unwrap();
    assert_eq!(keys_per_primary(&prefix).values().sum::<usize>(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_duplicates_split_over_two_instances_run_once() {
    const DUPLICATES: usize = 200;
    let prefix = prefix();
    let (first, _cleanup) = shared(&prefix).await;
    let (second, _second_cleanup) = shared(&prefix).await;
    let wait = Concurrent::Wait { timeout: LIMIT };
    let instances = [first, second].map(|store| {
        Idempotency::builder()
            .store(store)
            .concurrent(wait)
            .build()
            .unwrap()
    });
    crate::support::redis::duplicates_over_two_instances_run_once(instances, wait, DUPLICATES)
        .await;
}

/// With `replica_ack(1, ..)`, `complete` answers only once the replica of the
/// key's primary holds the record: read from that replica right away, it is
/// there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_replica_ack_the_replica_holds_the_record_when_complete_answers() {
    let prefix = prefix();
    let urls = shared_cluster_urls();
    let _cleanup = ClusterCleanup {
        urls: urls.clone(),
        prefix: prefix.clone(),
    };
    let store = timeout(
        LIMIT,
        RedisStore::cluster_builder(urls.clone())
            .prefix(&prefix)
            .replica_ack(1, Duration::from_secs(2))
            .build(),
    )
    .await
    .unwrap()
    .unwrap();
    let fp = Fingerprint::of_bytes(b"x");
    let replicas = replica_connections(&urls);
    for i in 0..30 {
        let key = format!("sig-{i}:a:t");
        let lease = LeaseToken::random();
        let begun = store.begin(&key, fp, lease, LIMIT);
        assert!(matches!(
            timeout(LIMIT, begun).await.unwrap().unwrap(),
            tower_idempotency::store::BeginOutcome::Acquired
        ));
        let record = Arc::new(value(fp, "done"));
        let completed = store.complete(&key, lease, record, Duration::from_secs(60));
        assert!(timeout(LIMIT, completed).await.unwrap().unwrap());
        // Some replica (the one of the key's primary) holds the record now.
        let redis_key = store.redis_key(&key);
        let held = replicas.iter().filter(|replica| {
            let mut replica = replica.lock().unwrap();
            let value: Option<Vec<u8>> = redis::cmd("GET")
                .arg(&redis_key)
                .query(&mut *replica)
                .unwrap_or(None);
            value.is_some_and(|value| value.starts_with(b"TIR"))
        });
        assert_eq!(held.count(), 1, "{redis_key} is on its replica");
    }
    assert_eq!(store.unacknowledged_writes(), 0);
    let entry = timeout(LIMIT, store.get("sig-0:a:t"))
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(
        entry.map(|entry| entry.state),
        Some(EntryState::Completed(_))
    ));
}

/// Connections to every replica of the shared cluster, in `READONLY` mode
/// (a replica then answers reads of its own slots instead of redirecting).
fn replica_connections(urls: &[String]) -> Vec<std::sync::Mutex<redis::Connection>> {
    let mut replicas = Vec::new();
    for url in urls {
        let client = redis::Client::open(url.as_str()).unwrap();
        let mut node = client
            .get_connection_with_timeout(Duration::from_secs(5))
            .unwrap();
        node.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let role: Vec<redis::Value> = redis::cmd("ROLE").query(&mut node).unwrap();
        if matches!(role.first(), Some(redis::Value::BulkString(r)) if r == b"slave") {
            redis::cmd("READONLY").query::<()>(&mut node).unwrap();
            replicas.push(std::sync::Mutex::new(node));
        }
    }
    assert_eq!(replicas.len(), 3, "one replica per primary");
    replicas
}

/// A Redis without replicas cannot acknowledge: the writes still succeed,
/// answered as usual, and each is counted (and logged) as unacknowledged.
#[tokio::test]
async fn writes_that_no_replica_acknowledges_are_returned_and_counted() {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let prefix = prefix();
    let store = timeout(
        LIMIT,
        RedisStore::builder(&url)
            .prefix(&prefix)
            .replica_ack(1, Duration::from_millis(20))
            .build(),
    )
    .await
    .unwrap()
    .expect("Redis answers on REDIS_URL or 127.0.0.1:6379");
    let engine = Idempotency::builder().store(store.clone()).build().unwrap();
    let fp = Fingerprint::of_bytes(b"x");
    let Begin::Execute(lease) = timeout(LIMIT, engine.begin_with("s:a:t", fp, Concurrent::Reject))
        .await
        .unwrap()
        .unwrap()
    else {
        panic!("a new key runs");
    };
    assert!(lease.complete(value(fp, "done")).await.unwrap());
    assert_eq!(store.unacknowledged_writes(), 2, "begin and complete");
    let Begin::Replay { record, .. } =
        timeout(LIMIT, engine.begin_with("s:a:t", fp, Concurrent::Reject))
            .await
            .unwrap()
            .unwrap()
    else {
        panic!("the record replays");
    };
    assert_eq!(record.as_value().unwrap(), "done");
    // A replay writes nothing, so nothing more is waited for or counted.
    assert_eq!(store.unacknowledged_writes(), 2);
    timeout(LIMIT, store.clear()).await.unwrap().unwrap();
}

#[tokio::test]
async fn replica_ack_settings_that_cannot_work_are_refused() {
    for (replicas, wait) in [(0, Duration::from_millis(100)), (1, Duration::ZERO)] {
        let built = RedisStore::cluster_builder(shared_cluster_urls())
            .replica_ack(replicas, wait)
            .build_lazy();
        assert!(
            matches!(built, Err(StoreError::Backend(_))),
            "{replicas} {wait:?}: {built:?}"
        );
    }
    let no_seeds = RedisStore::cluster_builder(Vec::<String>::new()).build_lazy();
    assert!(matches!(no_seeds, Err(StoreError::Backend(_))));
}
