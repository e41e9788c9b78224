//! A randomized soak test of the HTTP layer, for the memory store (at its
//! entry bound), Redis, and Redis with its local tier (both on a
//! `redis-server` of the test's own, paused mid-run).
//!
//! Hundreds of clients in three scopes (`Authorization` headers) send a small
//! pool of keys through two instances on one store, each with a `Reject` and
//! a `Wait` layer (one engine per policy, the policy being the engine's): a seeded random mix of retries, clients that
//! give up mid-request, and handlers that are slow, panic, answer 502 or
//! `Cache-Control: no-store`. The checker then holds every handler run and
//! every answer against the promise (see `soak/check.rs`).
//!
//! The seed is printed; `SOAK_SEED=<seed>` replays a mix, `SOAK_SECS=<n>`
//! runs the three stores for about `n` seconds together (default 20).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::{timeout, Instant};
use tower_idempotency::store::{Entry, EntryKind, EntryState, MemoryStore, StoreAdmin};
use tower_idempotency::{Concurrent, Idempotency, IdempotencyLayer, KeyFilter};

mod support;
mod soak {
    pub(crate) mod check;
    pub(crate) mod traffic;
}

use soak::check::{check, Observed, Totals};
use soak::traffic::{client, endpoint, Endpoint, Runs, LIMIT, PANIC_MESSAGE};

/// Concurrent clients per store.
const CLIENTS: usize = 150;
/// Records the memory store keeps: fewer than the 36 keys in use at once.
const MEMORY_MAX_ENTRIES: u64 = 24;

/// `SOAK_SEED`, or a random seed.
fn seed() -> u64 {
    std::env::var("SOAK_SEED")
        .ok()
        .and_then(|seed| seed.parse().ok())
        .unwrap_or_else(rand::random)
}

/// How long each store's run lasts: a third of `SOAK_SECS` (default 20).
fn duration() -> Duration {
    let total = std::env::var("SOAK_SECS")
        .ok()
        .and_then(|secs| secs.parse().ok())
        .unwrap_or(20_u64);
    Duration::from_secs(total) / 3
}

/// Keeps the handler's deliberate panics out of the test output.
fn quiet_deliberate_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let message = info.payload().downcast_ref::<String>().map(String::as_str);
            if message != Some(PANIC_MESSAGE) {
                default(info);
            }
        }));
    });
}

/// One instance: a `Reject` and a `Wait` engine on `store`, with a lease
/// long enough to outlast a paused store.
fn engine<S: StoreAdmin + Clone>(store: S) -> [Idempotency<S>; 2] {
    [
        Concurrent::Reject,
        Concurrent::Wait {
            timeout: Duration::from_secs(3),
        },
    ]
    .map(|concurrent| {
        Idempotency::builder()
            .store(store.clone())
            .ttl(Duration::from_secs(3600))
            .lease_ttl(Duration::from_secs(30))
            .concurrent(concurrent)
            .build()
            .unwrap()
    })
}

/// Runs the traffic against `engines` (instances on one store) while
/// `faults` (if any) makes the store fail, and checks what happened. `drops`
/// reads the records the store dropped by itself.
async fn soak<S: StoreAdmin>(
    name: &str,
    engines: Vec<Idempotency<S>>,
    faults: Option<Pin<Box<dyn Future<Output = ()> + '_>>>,
    drops: impl Fn() -> u64,
) {
    quiet_deliberate_panics();
    let seed = seed();
    let duration = duration();
    eprintln!("soak {name}: seed {seed} for {duration:?} (SOAK_SEED={seed} replays it)");

    let runs = Arc::new(Runs::default());
    let mut endpoints: Vec<Endpoint> = Vec::new();
    for engine in &engines {
        let layer = IdempotencyLayer::with_engine(engine.clone())
            .build()
            .unwrap();
        endpoints.push(endpoint(&layer, runs.clone()));
    }
    let endpoints = Arc::new(endpoints);
    let start = Instant::now();
    let until = start + duration;
    let clients: Vec<_> = (0..CLIENTS)
        .map(|id| tokio::spawn(client(id, seed, endpoints.clone(), start, until)))
        .collect();

    let store_can_fail = faults.is_some();
    if let Some(faults) = faults {
        faults.await;
    }

    let mut failures = Vec::new();
    let mut logs = Vec::new();
    for client in clients {
        match timeout(duration + LIMIT * 2, client).await {
            Ok(Ok(log)) => logs.push(log),
            Ok(Err(error)) => failures.push(format!("a client panicked: {error}")),
            Err(_) => failures.push("a client hung".to_owned()),
        }
    }
    // Runs whose client gave up go on in the background: wait for them.
    let settled = timeout(LIMIT, async {
        while runs.running() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    if settled.is_err() {
        failures.push(format!(
            "{} runs still running after {LIMIT:?}",
            runs.running()
        ));
    }

    // Every run holds its key's marker until its result is stored or its
    // key released: once no marker is left, every run has ended. Wait far
    // less than the lease TTL, so a marker left behind is not mistaken for
    // one released.
    let markers_gone = Duration::from_secs(10);
    let stored = match timeout(markers_gone, what_the_store_holds(&engines[0])).await {
        Ok(stored) => stored,
        Err(_) => {
            let keys = timeout(LIMIT, engines[0].keys(&KeyFilter::new())).await;
            let held = keys.map(|keys| {
                keys.map(|entries| {
                    let markers = entries
                        .into_iter()
                        .filter(|e| e.kind == EntryKind::InFlight);
                    markers.map(|e| e.key).collect::<Vec<_>>()
                })
            });
            failures.push(format!(
                "in-flight markers still held {markers_gone:?} after the last run: {held:?}"
            ));
            Vec::new()
        }
    };

    let mut totals = Totals::default();
    for engine in &engines {
        totals.add(&engine.stats());
    }
    let observed = Observed {
        runs: runs.snapshot(),
        logs,
        totals,
        dropped_records: drops(),
        stored,
        store_can_fail,
    };
    failures.extend(check(&observed));
    let sent: u64 = observed.logs.iter().map(|log| log.sent).sum();
    eprintln!(
        "soak {name}: {sent} requests, {} runs, {} records dropped, {:?}",
        observed.runs.len(),
        observed.dropped_records,
        observed.totals
    );
    assert!(
        failures.is_empty(),
        "soak {name} (seed {seed}, SOAK_SEED={seed} replays it): {} failures:\n{}",
        failures.len(),
        failures
            .iter()
            .take(30)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// The body of every record the store holds, once it holds no in-flight
/// marker any more (background completions and releases have run).
async fn what_the_store_holds<S: StoreAdmin>(engine: &Idempotency<S>) -> Vec<Bytes> {
    loop {
        // A store still recovering answers an error: ask again.
        let entries = engine.keys(&KeyFilter::new()).await.unwrap_or_default();
        if !entries.is_empty() && entries.iter().all(|e| e.kind == EntryKind::Completed) {
            let mut bodies = Vec::new();
            for entry in entries {
                if let Ok(Some(Entry {
                    state: EntryState::Completed(record),
                    ..
                })) = engine.record(&entry.key).await
                {
                    bodies.extend(record.as_response().map(|response| response.body()));
                }
            }
            return bodies;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_memory_store_at_its_entry_bound() {
    let store = MemoryStore::builder()
        .max_entries(MEMORY_MAX_ENTRIES)
        .build()
        .unwrap();
    let engines = [engine(store.clone()), engine(store.clone())].concat();
    let first = engines[0].clone();
    soak("memory", engines, None, move || {
        let stats = first.stats();
        stats.evicted + stats.expired
    })
    .await;
}

#[cfg(feature = "redis")]
mod redis_stores {
    use std::time::Duration;

    use tower_idempotency::store::redis::RedisStore;

    use super::{duration, engine, soak};
    use crate::support::redis::{free_port, prefix, OwnRedis};

    /// Two instances on a Redis of the test's own, paused mid-run.
    async fn soak_redis(name: &str, local_tier: Option<u64>) {
        let redis = OwnRedis::start(free_port()).await;
        let prefix = prefix();
        let mut engines = Vec::new();
        for _instance in 0..2 {
            let mut builder = RedisStore::builder(redis.url())
                .prefix(&prefix)
                .connection_timeout(Duration::from_millis(300))
                .response_timeout(Duration::from_millis(300));
            if let Some(entries) = local_tier {
                builder = builder.local_cache(entries);
            }
            engines.extend(engine(builder.build().await.unwrap()));
        }
        // Mid-run Redis stops answering for a while (commands sent meanwhile
        // run when it resumes), then refuses every write for a while (they
        // are lost): begins fail (503 or 500), completes are retried.
        // Once per six seconds or so of the run.
        let duration = duration();
        let cycles = (duration.as_secs() / 6).max(1) as u32;
        let cycle = duration / cycles;
        let redis = &redis;
        let faults = async move {
            for _ in 0..cycles {
                tokio::time::sleep(cycle * 3 / 10).await;
                redis.pause();
                tokio::time::sleep(Duration::from_millis(1500)).await;
                redis.resume();
                tokio::time::sleep(cycle / 5).await;
                redis.refuse_writes().await;
                tokio::time::sleep(Duration::from_millis(1000)).await;
                redis.accept_writes().await;
                tokio::time::sleep(cycle / 2 - Duration::from_millis(2500).min(cycle / 2)).await;
            }
        };
        // Redis neither evicts (its policy is `noeviction`) nor expires a
        // record within the run: no key may run twice.
        soak(name, engines, Some(Box::pin(faults)), || 0).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn soak_redis_paused_mid_run() {
        soak_redis("redis", None).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn soak_redis_with_a_full_local_tier_paused_mid_run() {
        soak_redis("redis with local tier", Some(8)).await;
    }
}
