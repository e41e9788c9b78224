//! A primary of a Redis Cluster killed (SIGKILL) while requests run: the fail
//! mode answers for its slots only, the other primaries' keys keep working,
//! and once its replica is promoted the same keys work again, with the same
//! server and store. Each test runs its own cluster on free ports, started by
//! `.ci/redis-cluster.sh` and stopped when the test ends, pass or fail; the
//! shared cluster and the shared Redis are never touched.
#![cfg(feature = "redis")]

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use axum::Router;
use http::StatusCode;
use tokio::time::{timeout, Instant};
use tower_idempotency::extract::HeaderKey;
use tower_idempotency::store::redis::RedisStore;
use tower_idempotency::{FailMode, IdempotencyKey, IdempotencyLayer, KeyFilter};

use crate::support::common;
use crate::support::stores::cluster;

use cluster::{cluster_store, PrivateCluster};
use common::{orders, serve, Runs, Server};

/// Keys per path: enough that every primary holds some.
const KEYS: usize = 48;
/// The limit on the whole failover, from the kill until the keys work again.
const FAILOVER_LIMIT: Duration = Duration::from_secs(60);

/// Starts a private cluster off the async runtime (the script blocks).
async fn private_cluster() -> PrivateCluster {
    timeout(
        Duration::from_secs(120),
        tokio::task::spawn_blocking(PrivateCluster::start),
    )
    .await
    .expect("the private cluster started within 120 s")
    .expect("the start task did not panic")
}

/// Which side of the kill a key's slot is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Side {
    /// Slots of the killed primary.
    Killed,
    /// Slots of the primaries that stay up.
    Surviving,
}

/// What one response was, as a user tells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    Replayed,
    /// Ran the handler (first run, or passed through unprotected).
    Ran,
    Unavailable,
    Other(u16),
}

fn outcome(reply: &common::Reply) -> Outcome {
    match reply.status {
        StatusCode::CREATED if reply.replayed() => Outcome::Replayed,
        StatusCode::CREATED => Outcome::Ran,
        StatusCode::SERVICE_UNAVAILABLE => {
            assert_eq!(reply.problem().status, 503);
            Outcome::Unavailable
        }
        other => Outcome::Other(other.as_u16()),
    }
}

type Tally = BTreeMap<(&'static str, Side, Outcome), usize>;

/// Which side each key of each path is on.
type Sides = HashMap<(&'static str, String), Side>;

/// One POST of every key on its path, concurrently; the outcomes by path
/// and side.
async fn round(server: &std::sync::Arc<Server>, sides: &Sides) -> Tally {
    let mut tasks = Vec::new();
    for ((path, key), side) in sides {
        let (server, path, key, side) = (server.clone(), *path, key.clone(), *side);
        tasks.push(tokio::spawn(async move {
            let reply = server.post(path, Some(&key), "order").await;
            (path, side, outcome(&reply))
        }));
    }
    let mut tally = Tally::new();
    for task in tasks {
        let (path, side, outcome) = timeout(Duration::from_secs(30), task)
            .await
            .expect("a request hung")
            .expect("a request task panicked");
        *tally.entry((path, side, outcome)).or_default() += 1;
    }
    tally
}

fn add(total: &mut Tally, round: &Tally) {
    for (key, count) in round {
        *total.entry(*key).or_default() += count;
    }
}

fn count(tally: &Tally, path: &str, side: Side, outcome: Outcome) -> usize {
    tally
        .iter()
        .filter(|((p, s, o), _)| *p == path && *s == side && *o == outcome)
        .map(|(_, count)| count)
        .sum()
}

fn total(tally: &Tally, path: &str, side: Side) -> usize {
    tally
        .iter()
        .filter(|((p, s, _), _)| *p == path && *s == side)
        .map(|(_, count)| count)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_primary_fails_its_slots_only_and_they_work_again_after_the_failover() {
    let cluster = private_cluster().await;
    let prefix = format!("test:failover:{:x}:", rand::random::<u32>());
    let store: RedisStore = cluster_store(&cluster.urls(), &prefix, false).await;

    // One store, one server: /closed answers 503 while its key's primary is
    // down, /open passes the request through unprotected.
    let layer = |fail_mode| {
        IdempotencyLayer::builder()
            .store(store.clone())
            .key_extractor(HeaderKey::new().scope(|_: &http::request::Parts| "t".to_owned()))
            .fail_mode(fail_mode)
            .build()
            .unwrap()
    };
    let (closed, open) = (layer(FailMode::Closed), layer(FailMode::Open));
    let handle = closed.handle();
    let (closed_runs, open_runs) = (Runs::default(), Runs::default());
    let app = Router::new()
        .route("/closed", orders(closed_runs.clone()).layer(closed))
        .route("/open", orders(open_runs.clone()).layer(open));
    let server = std::sync::Arc::new(serve(app).await);

    // Every key once, so that each has a record; then find where each lives.
    let keys: Vec<String> = (0..KEYS).map(|i| format!("order-{i}")).collect();
    let everywhere: Sides = ["/closed", "/open"]
        .into_iter()
        .flat_map(|path| {
            keys.iter()
                .map(move |key| ((path, key.clone()), Side::Surviving))
        })
        .collect();
    let first = round(&server, &everywhere).await;
    assert_eq!(
        count(&first, "/closed", Side::Surviving, Outcome::Ran),
        KEYS
    );
    assert_eq!(count(&first, "/open", Side::Surviving, Outcome::Ran), KEYS);
    let stored = timeout(Duration::from_secs(20), handle.keys(&KeyFilter::new()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        stored.len(),
        2 * KEYS,
        "every record listed, over all primaries"
    );
    let survivor_port = cluster.ports()[0];
    let mut primary_of_key = HashMap::new();
    for entry in &stored {
        let key = IdempotencyKey::parse(&entry.key).unwrap();
        let path = match key.action() {
            "POST /closed" => "/closed",
            "POST /open" => "/open",
            other => panic!("a key of another action: {other}"),
        };
        let slot = cluster.slot_of(&format!("{prefix}{}", entry.key)).unwrap();
        let primary = cluster
            .primary_of_slot(survivor_port, slot)
            .unwrap()
            .unwrap();
        primary_of_key.insert((path, key.signal().to_owned()), (slot, primary));
    }
    // The victim: a primary other than the node we ask about the cluster.
    let (victim_slot, victim) = primary_of_key
        .values()
        .copied()
        .find(|(_, primary)| *primary != survivor_port)
        .unwrap();
    let ask = *cluster
        .ports()
        .iter()
        .find(|port| **port != victim)
        .unwrap();
    let sides: Sides = primary_of_key
        .iter()
        .map(|(key, (_, primary))| {
            let side = if *primary == victim {
                Side::Killed
            } else {
                Side::Surviving
            };
            (key.clone(), side)
        })
        .collect();
    let killed_keys = |path: &str| {
        (sides.iter())
            .filter(|((p, _), side)| *p == path && **side == Side::Killed)
            .count()
    };
    for path in ["/closed", "/open"] {
        assert!(
            killed_keys(path) > 0 && killed_keys(path) < KEYS,
            "{path}: keys on every side"
        );
    }

    // Kill the victim, then keep the requests coming until its replica has
    // taken over and its keys work again.
    let runs_before = (closed_runs.get(), open_runs.get());
    cluster.kill(victim);
    let killed_at = Instant::now();
    let mut during = Tally::new();
    let mut rounds = 0;
    let mut saw_ping_fail = false;
    let mut saw_listing_fail = false;
    let promoted = loop {
        assert!(
            killed_at.elapsed() < FAILOVER_LIMIT,
            "no failover within {FAILOVER_LIMIT:?}: {during:?}"
        );
        if timeout(Duration::from_secs(10), handle.ping())
            .await
            .is_ok_and(|pinged| pinged.is_err())
        {
            saw_ping_fail = true;
        }
        // Listing never answers part of the keys: it fails while a primary
        // is down.
        if let Ok(listed) = timeout(Duration::from_secs(10), handle.keys(&KeyFilter::new())).await {
            match listed {
                Err(tower_idempotency::store::StoreError::Unavailable(_)) => {
                    saw_listing_fail = true
                }
                Err(other) => panic!("listing failed otherwise: {other}"),
                Ok(listed) => assert_eq!(listed.len(), 2 * KEYS, "a listing is whole or an error"),
            }
        }
        let tally = round(&server, &sides).await;
        rounds += 1;
        add(&mut during, &tally);
        let promoted = cluster.primary_of_slot(ask, victim_slot).ok().flatten();
        let recovered = count(&tally, "/closed", Side::Killed, Outcome::Unavailable) == 0
            && total(&tally, "/closed", Side::Killed) == killed_keys("/closed");
        if let Some(new_primary) = promoted.filter(|port| *port != victim) {
            if recovered {
                break new_primary;
            }
        }
    };
    let failover_time = killed_at.elapsed();

    eprintln!(
        "failover: primary {victim} killed; replica {promoted} promoted and its keys \
         answered again after {failover_time:?}, {rounds} rounds of {} requests",
        sides.len()
    );
    for ((path, side, outcome), count) in &during {
        eprintln!("  during: {path} {side:?} {outcome:?}: {count}");
    }

    // The surviving primaries' keys never failed: their records replayed.
    for path in ["/closed", "/open"] {
        assert_eq!(
            count(&during, path, Side::Surviving, Outcome::Replayed),
            total(&during, path, Side::Surviving),
            "{path}: keys of the surviving primaries replay throughout: {during:?}"
        );
    }
    // The killed primary's keys got the fail mode: 503 under Closed (the
    // handler never ran), passed through under Open (never a 503).
    assert!(count(&during, "/closed", Side::Killed, Outcome::Unavailable) > 0);
    assert_eq!(
        count(&during, "/open", Side::Killed, Outcome::Unavailable),
        0
    );
    assert!(count(&during, "/open", Side::Killed, Outcome::Ran) > 0);
    for path in ["/closed", "/open"] {
        let other = total(&during, path, Side::Killed)
            - count(&during, path, Side::Killed, Outcome::Replayed)
            - count(&during, path, Side::Killed, Outcome::Ran)
            - count(&during, path, Side::Killed, Outcome::Unavailable);
        assert_eq!(
            other, 0,
            "{path}: only the fail mode or a result: {during:?}"
        );
    }
    assert!(saw_ping_fail, "ping (/healthz) reported the cluster down");
    assert!(saw_listing_fail, "listing reported the cluster down");

    // After the failover the same keys work again, on the same server:
    // a retry replays, and the store answers ping.
    let after = round(&server, &sides).await;
    for path in ["/closed", "/open"] {
        for side in [Side::Killed, Side::Surviving] {
            assert_eq!(
                count(&after, path, side, Outcome::Replayed),
                total(&after, path, side),
                "{path} {side:?} replays after the failover: {after:?}"
            );
        }
    }
    timeout(Duration::from_secs(10), handle.ping())
        .await
        .unwrap()
        .expect("ping answers after the failover");
    // /closed ran no handler while its records were unreachable: only runs
    // for keys whose record the failover lost (replication is asynchronous).
    let closed_reruns = closed_runs.get() - runs_before.0;
    let open_reruns = open_runs.get() - runs_before.1;
    eprintln!(
        "  handler runs during the failover: /closed {closed_reruns} (records lost), \
         /open {open_reruns} (passed through)"
    );
    assert_eq!(
        closed_reruns,
        count(&during, "/closed", Side::Killed, Outcome::Ran)
    );
    assert!(closed_reruns <= killed_keys("/closed"));
}

/// Records that `complete` answered for, each with when it answered.
type Acknowledged = std::sync::Arc<std::sync::Mutex<Vec<(String, Instant)>>>;

/// Writes records on `store` from `writers` tasks until `stop`: each key
/// begun then completed; keys whose `complete` answered `true` are noted.
fn write_until(
    store: &RedisStore,
    writers: usize,
    stop: &std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> (Acknowledged, Vec<tokio::task::JoinHandle<()>>) {
    use std::sync::atomic::Ordering;
    use tower_idempotency::store::{BeginOutcome, LeaseToken, Store};
    let acknowledged = Acknowledged::default();
    let tasks = (0..writers)
        .map(|writer| {
            let (store, stop, acknowledged) = (store.clone(), stop.clone(), acknowledged.clone());
            tokio::spawn(async move {
                let fp = tower_idempotency::Fingerprint::of_bytes(b"order");
                let mut i = 0;
                while !stop.load(Ordering::SeqCst) {
                    i += 1;
                    let key = format!("w{writer}-{i}:create:acct");
                    let lease = LeaseToken::random();
                    let begun = timeout(
                        Duration::from_secs(10),
                        store.begin(&key, fp, lease, Duration::from_secs(60)),
                    )
                    .await;
                    if !matches!(begun, Ok(Ok(BeginOutcome::Acquired))) {
                        continue;
                    }
                    let record = std::sync::Arc::new(tower_idempotency::Record::value(
                        fp,
                        bytes::Bytes::from_static(b"done"),
                    ));
                    let completed = timeout(
                        Duration::from_secs(10),
                        store.complete(&key, lease, record, Duration::from_secs(600)),
                    )
                    .await;
                    if matches!(completed, Ok(Ok(true))) {
                        acknowledged.lock().unwrap().push((key, Instant::now()));
                    }
                }
            })
        })
        .collect();
    (acknowledged, tasks)
}

/// How many of the records acknowledged before `killed_at` the store no
/// longer holds, and how many there were.
async fn lost(
    store: &RedisStore,
    acknowledged: &Acknowledged,
    killed_at: Instant,
) -> (usize, usize) {
    use tower_idempotency::store::{EntryState, StoreAdmin};
    let keys: Vec<String> = acknowledged
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, at)| *at < killed_at)
        .map(|(key, _)| key.clone())
        .collect();
    let mut lost = 0;
    for key in &keys {
        let entry = timeout(Duration::from_secs(10), store.get(key))
            .await
            .expect("get answered")
            .expect("the store answers after the failover");
        if !matches!(
            entry.map(|entry| entry.state),
            Some(EntryState::Completed(_))
        ) {
            lost += 1;
        }
    }
    (lost, keys.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_replica_ack_every_acknowledged_record_survives_the_failover() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use tower_idempotency::store::StoreAdmin;
    let cluster = private_cluster().await;
    let urls = cluster.urls();
    let acked = timeout(
        Duration::from_secs(20),
        RedisStore::cluster_builder(urls.clone())
            .prefix("acked:")
            .replica_ack(1, Duration::from_secs(2))
            .build(),
    )
    .await
    .unwrap()
    .unwrap();
    let plain = cluster_store(&urls, "plain:", false).await;
    let victim = cluster.ports()[0];
    assert!(
        cluster.primaries().contains(&victim),
        "the victim is a primary"
    );
    let ask = cluster.ports()[1];
    // A slot of each of the three ranges `redis-cli --cluster create` makes.
    let victim_slot = [0, 5461, 10923]
        .into_iter()
        .find(|slot| cluster.primary_of_slot(ask, *slot).ok().flatten() == Some(victim))
        .expect("the victim serves slots");

    // Writers on both stores; the kill comes once both have written a while.
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let (acked_writes, mut tasks) = write_until(&acked, 16, &stop);
    let (plain_writes, plain_tasks) = write_until(&plain, 16, &stop);
    tasks.extend(plain_tasks);
    timeout(Duration::from_secs(60), async {
        while acked_writes.lock().unwrap().len() < 300 || plain_writes.lock().unwrap().len() < 300 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("both stores wrote 300 records within 60 s");
    cluster.kill(victim);
    let killed_at = Instant::now();
    // Let the writers run into the outage a little, then stop them.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    for task in tasks {
        timeout(Duration::from_secs(30), task)
            .await
            .unwrap()
            .unwrap();
    }

    // Wait (bounded) until the victim's slots have a new primary and the
    // stores read them again.
    let deadline = Instant::now() + FAILOVER_LIMIT;
    while cluster
        .primary_of_slot(ask, victim_slot)
        .ok()
        .flatten()
        .is_none_or(|primary| primary == victim)
    {
        assert!(
            Instant::now() < deadline,
            "no failover within {FAILOVER_LIMIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for store in [&acked, &plain] {
        while timeout(Duration::from_secs(10), store.ping())
            .await
            .map_or(true, |pinged| pinged.is_err())
        {
            assert!(Instant::now() < deadline, "the store did not recover");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    let (acked_lost, acked_total) = lost(&acked, &acked_writes, killed_at).await;
    let (plain_lost, plain_total) = lost(&plain, &plain_writes, killed_at).await;
    eprintln!(
        "records acknowledged before the kill and lost in the failover: \
         with replica_ack(1, 2s) {acked_lost} of {acked_total} \
         ({} writes unacknowledged by replicas), without {plain_lost} of {plain_total}",
        acked.unacknowledged_writes()
    );
    assert!(acked_total >= 300 && plain_total >= 300);
    // Only a write the replica did not acknowledge in time may be lost.
    assert!(
        acked_lost as u64 <= acked.unacknowledged_writes(),
        "{acked_lost} acknowledged records lost"
    );
}
