//! A randomized soak test of the HTTP layer, for the memory store (at its
//! entry bound), Redis, and Redis with its local tier (both on a
//! `redis-server` of the test's own, paused mid-run).
//!
//! Hundreds of clients in three scopes (`Authorization` headers) send a small
//! pool of keys through two instances on one store, each with a `Reject` and
//! a `Wait` layer (one engine per policy, the policy being the engine's): a
//! seeded random mix of retries, clients that give up mid-request, and
//! handlers that are slow, panic, answer 502 or `Cache-Control: no-store`,
//! answer more than the layer's `max_response_body` (recorded head only), or
//! cut their body off after the head (the lease abandoned). The checker then
//! holds every handler run, every answer and what the store holds at the end
//! against the promise, key by key (see `soak/check.rs`).
//!
//! The seed is printed; `SOAK_SEED=<seed>` replays a mix, `SOAK_SECS=<n>`
//! runs the three stores for about `n` seconds together (default 20).

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::{timeout, Instant};
use tower_idempotency::extract::{HeaderKey, KeyExtractor};
use tower_idempotency::store::{Entry, EntryKind, EntryState, MemoryStore, StoreAdmin};
use tower_idempotency::{Concurrent, Idempotency, IdempotencyKey, IdempotencyLayer, KeyFilter};

mod support;
mod soak {
    pub(crate) mod check;
    pub(crate) mod traffic;
    pub(crate) mod witness;
}

use soak::check::{check, Held, Observed, ScopedKey, Totals};
use soak::traffic::{
    client, endpoint, Endpoint, Outcome, Runs, LIMIT, MAX_RESPONSE_BODY, PANIC_MESSAGE, SCOPES,
};
use soak::witness::{Witness, Writes};

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

/// The engines' lease TTL: longer than a store's run with its settling
/// (about 7 s by default, and a paused Redis), so an abandoned marker
/// blocks its key to the end; the checker allows a takeover after it all
/// the same, key by key.
const LEASE_TTL: Duration = Duration::from_secs(30);

/// One instance: a `Reject` and a `Wait` engine on `store`.
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
            .lease_ttl(LEASE_TTL)
            .concurrent(concurrent)
            .build()
            .unwrap()
    })
}

/// The store a soak runs on, as the checker needs to know it.
struct Setup<S> {
    name: &'static str,
    /// Instances on one store, each store wrapped to note its writes.
    engines: Vec<Idempotency<Witness<S>>>,
    /// The writes the wrapped stores noted.
    writes: Writes,
    /// Whether the store drops records by itself (at a bound).
    can_evict: bool,
}

/// Runs the traffic against `setup`'s engines while `faults` (if any) makes
/// the store fail, and checks what happened. `drops` reads the records the
/// store dropped by itself.
async fn soak<S: StoreAdmin>(
    setup: Setup<S>,
    faults: Option<Pin<Box<dyn Future<Output = ()> + '_>>>,
    drops: impl Fn() -> u64,
) {
    quiet_deliberate_panics();
    let Setup {
        name,
        engines,
        writes,
        can_evict,
    } = setup;
    let seed = seed();
    let duration = duration();
    eprintln!("soak {name}: seed {seed} for {duration:?} (SOAK_SEED={seed} replays it)");

    let start = Instant::now();
    let runs = Arc::new(Runs::new(start));
    let mut endpoints: Vec<Endpoint> = Vec::new();
    for engine in &engines {
        let layer = IdempotencyLayer::with_engine(engine.clone())
            .max_response_body(MAX_RESPONSE_BODY)
            .build()
            .unwrap();
        endpoints.push(endpoint(&layer, runs.clone()));
    }
    let endpoints = Arc::new(endpoints);
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
    // key released, or, cut off, leaves it to its lease TTL: once no other
    // marker is left, every run has ended. Wait far less than the lease
    // TTL, so a marker left behind is not mistaken for one released.
    let runs = runs.snapshot();
    let scopes = Scopes::new();
    let abandoned = abandoned(&runs);
    let markers_gone = Duration::from_secs(10);
    let (held, mut foreign) = match timeout(
        markers_gone,
        what_the_store_holds(&engines[0], &scopes, &abandoned),
    )
    .await
    {
        Ok(held) => held,
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
                "in-flight markers of keys whose last run was not cut off still held {markers_gone:?} after the last run: {held:?}"
            ));
            (HashMap::new(), Vec::new())
        }
    };
    let held_at = Instant::now();
    let mut written: HashMap<ScopedKey, Vec<Instant>> = HashMap::new();
    for (key, at) in writes.lock().unwrap().iter() {
        match scopes.of(key) {
            Some(scoped) => written.entry(scoped).or_default().extend(at),
            None => foreign.push(key.clone()),
        }
    }

    let mut totals = Totals::default();
    for engine in &engines {
        totals.add(&engine.stats());
    }
    let observed = Observed {
        start,
        runs,
        logs,
        totals,
        dropped_records: drops(),
        store_can_evict: can_evict,
        store_can_fail,
        lease_ttl: LEASE_TTL,
        writes: written,
        held,
        held_at,
        foreign,
    };
    failures.extend(check(&observed));
    let sent: u64 = observed.logs.iter().map(|log| log.sent).sum();
    eprintln!(
        "soak {name}: {sent} requests, {} runs ({} keys), {} records dropped, {:?}",
        observed.runs.len(),
        observed
            .runs
            .iter()
            .map(|run| (&run.scope, &run.key))
            .collect::<HashSet<_>>()
            .len(),
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

/// The soak's keys as the store names them: each scope's target (the hash
/// of its `Authorization`), and the client's key as the signal.
struct Scopes(HashMap<String, &'static str>);

impl Scopes {
    fn new() -> Self {
        let target = |scope: &str| {
            let (parts, ()) = http::Request::post("/orders")
                .header("authorization", scope)
                .header("idempotency-key", "k")
                .body(())
                .unwrap()
                .into_parts();
            let key = HeaderKey::new().extract(&parts).unwrap().unwrap();
            key.target
        };
        Self(SCOPES.iter().map(|&scope| (target(scope), scope)).collect())
    }

    /// The scope and client key of a storage key, if it is the soak's.
    fn of(&self, storage_key: &str) -> Option<ScopedKey> {
        let key = IdempotencyKey::parse(storage_key).ok()?;
        let scope = self.0.get(key.target())?;
        Some(((*scope).to_owned(), key.signal().to_owned()))
    }
}

/// The keys whose last run was cut off: their markers stay.
fn abandoned(runs: &[soak::traffic::Run]) -> HashSet<ScopedKey> {
    let mut last: HashMap<ScopedKey, &soak::traffic::Run> = HashMap::new();
    for run in runs {
        let slot = last
            .entry((run.scope.clone(), run.key.clone()))
            .or_insert(run);
        if run.started > slot.started {
            *slot = run;
        }
    }
    last.into_iter()
        .filter(|(_, run)| run.outcome == Outcome::CutOff)
        .map(|(scoped, _)| scoped)
        .collect()
}

/// What the store holds under each key, once it holds no in-flight marker
/// but those of `abandoned` keys (background completions and releases have
/// run); and the storage keys that are none of the soak's.
async fn what_the_store_holds<S: StoreAdmin>(
    engine: &Idempotency<S>,
    scopes: &Scopes,
    abandoned: &HashSet<ScopedKey>,
) -> (HashMap<ScopedKey, Held>, Vec<String>) {
    'ask: loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        // A store still recovering answers an error: ask again.
        let Ok(entries) = engine.keys(&KeyFilter::new()).await else {
            continue;
        };
        let markers_left = entries.iter().any(|entry| {
            entry.kind == EntryKind::InFlight
                && !scopes
                    .of(&entry.key)
                    .is_some_and(|scoped| abandoned.contains(&scoped))
        });
        if markers_left {
            continue;
        }
        let (mut held, mut foreign) = (HashMap::new(), Vec::new());
        for entry in entries {
            let Some(scoped) = scopes.of(&entry.key) else {
                foreign.push(entry.key);
                continue;
            };
            if entry.kind == EntryKind::InFlight {
                held.insert(scoped, Held::Marker);
                continue;
            }
            match engine.record(&entry.key).await {
                Ok(Some(Entry {
                    state: EntryState::Completed(record),
                    ..
                })) => match record.as_response() {
                    Some(response) => {
                        held.insert(scoped, Held::Record(response.clone()));
                    }
                    None => foreign.push(entry.key),
                },
                // Evicted since the listing.
                Ok(_) => {}
                Err(_) => continue 'ask,
            }
        }
        return (held, foreign);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_memory_store_at_its_entry_bound() {
    let store = MemoryStore::builder()
        .max_entries(MEMORY_MAX_ENTRIES)
        .build()
        .unwrap();
    let writes = Writes::default();
    let store = Witness::new(store, writes.clone());
    let engines = [engine(store.clone()), engine(store.clone())].concat();
    let first = engines[0].clone();
    let setup = Setup {
        name: "memory",
        engines,
        writes,
        can_evict: true,
    };
    soak(setup, None, move || {
        let stats = first.stats();
        stats.evicted + stats.expired
    })
    .await;
}

#[cfg(feature = "redis")]
mod redis_stores {
    use std::time::Duration;

    use tower_idempotency::store::redis::RedisStore;

    use super::{duration, engine, soak, Setup, Witness, Writes};
    use crate::support::redis::{free_port, prefix, OwnRedis};

    /// Two instances on a Redis of the test's own, paused mid-run.
    async fn soak_redis(name: &'static str, local_tier: Option<u64>) {
        let redis = OwnRedis::start(free_port()).await;
        let prefix = prefix();
        let mut engines = Vec::new();
        let writes = Writes::default();
        for _instance in 0..2 {
            let mut builder = RedisStore::builder(redis.url())
                .prefix(&prefix)
                .connection_timeout(Duration::from_millis(300))
                .response_timeout(Duration::from_millis(300));
            if let Some(entries) = local_tier {
                builder = builder.local_cache(entries);
            }
            let store = builder.build().await.unwrap();
            engines.extend(engine(Witness::new(store, writes.clone())));
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
        // record within the run: no key may run twice after a stored answer.
        let setup = Setup {
            name,
            engines,
            writes,
            can_evict: false,
        };
        soak(setup, Some(Box::pin(faults)), || 0).await;
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
