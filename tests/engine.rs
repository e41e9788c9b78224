//! The engine's protocol: single-flight, policies, leases, stats and the
//! handle, on each store (`name::memory`, `name::redis`). What only the
//! embedded store has (bounds, the cleanup task) is in `engine/memory.rs`.

mod support;
mod engine {
    mod abandon;
    mod actions;
    mod conformance;
    mod decoders;
    mod eviction;
    mod header_key;
    mod heartbeat;
    mod keys;
    mod memory;
    mod mixed_policies;
    mod pressure_config;
    mod replay_storm;
    mod runtime_config;
}

use support::stores;

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use stores::{per_store, TestStore};
use tokio::sync::Barrier;
use tokio::time::timeout;
use tower_idempotency::store::{
    BeginOutcome, Entry, EntryState, LeaseToken, ScanEntry, Store, StoreAdmin, StoreError,
};
use tower_idempotency::{
    Begin, CacheInfo, Concurrent, Fingerprint, Idempotency, IdempotencyBuilder, KeyFilter, Lease,
    LeaseExpiry, Record,
};

const LIMIT: Duration = Duration::from_secs(20);

/// A real store that also counts the round trips the engine makes to it.
#[derive(Clone)]
struct CountingStore {
    inner: TestStore,
    begins: Arc<AtomicUsize>,
    completes: Arc<AtomicUsize>,
    /// Records read in process, without a store round trip.
    local_hits: Arc<AtomicUsize>,
}

impl Store for CountingStore {
    async fn begin(
        &self,
        key: &str,
        fingerprint: Fingerprint,
        lease: LeaseToken,
        lease_ttl: Duration,
    ) -> Result<BeginOutcome, StoreError> {
        self.begins.fetch_add(1, SeqCst);
        self.inner.begin(key, fingerprint, lease, lease_ttl).await
    }
    fn local_record(&self, key: &str) -> Option<Arc<Record>> {
        let record = self.inner.local_record(key);
        if record.is_some() {
            self.local_hits.fetch_add(1, SeqCst);
        }
        record
    }
    async fn renew(&self, key: &str, lease: LeaseToken, ttl: Duration) -> Result<bool, StoreError> {
        self.inner.renew(key, lease, ttl).await
    }
    async fn complete(
        &self,
        key: &str,
        lease: LeaseToken,
        record: Arc<Record>,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        self.completes.fetch_add(1, SeqCst);
        self.inner.complete(key, lease, record, ttl).await
    }
    async fn release(&self, key: &str, lease: LeaseToken) -> Result<bool, StoreError> {
        self.inner.release(key, lease).await
    }
    async fn completed_record(
        &self,
        key: &str,
    ) -> Result<Option<tower_idempotency::store::SharedRecord>, StoreError> {
        self.inner.completed_record(key).await
    }
}

impl StoreAdmin for CountingStore {
    async fn put(&self, key: &str, record: Arc<Record>, ttl: Duration) -> Result<(), StoreError> {
        self.inner.put(key, record, ttl).await
    }
    async fn get(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        self.inner.get(key).await
    }
    async fn remove(&self, key: &str) -> Result<bool, StoreError> {
        self.inner.remove(key).await
    }
    async fn remove_unless_in_flight(
        &self,
        key: &str,
    ) -> Result<tower_idempotency::store::Removal, StoreError> {
        self.inner.remove_unless_in_flight(key).await
    }
    async fn clear(&self) -> Result<(), StoreError> {
        self.inner.clear().await
    }
    async fn scan(&self) -> Result<Vec<ScanEntry>, StoreError> {
        self.inner.scan().await
    }
    async fn len(&self) -> Result<u64, StoreError> {
        self.inner.len().await
    }
    async fn info(&self) -> Result<CacheInfo, StoreError> {
        self.inner.info().await
    }
}

/// An engine builder on `store`.
fn on(store: &TestStore) -> IdempotencyBuilder<TestStore> {
    Idempotency::builder().store(store.clone())
}

fn fp(text: &str) -> Fingerprint {
    Fingerprint::of_bytes(text.as_bytes())
}

fn value(fingerprint: Fingerprint, text: &'static str) -> Record {
    Record::value(fingerprint, Bytes::from_static(text.as_bytes()))
}

/// Begins the key `s:a:t` with the fingerprint of `x` under `Concurrent::Reject`.
async fn begin(engine: &Idempotency<TestStore>) -> Begin<TestStore> {
    engine
        .begin_with("s:a:t", fp("x"), Concurrent::Reject)
        .await
        .unwrap()
}

/// [`begin`] as the key's first caller: it runs the action.
async fn first_runs(engine: &Idempotency<TestStore>) -> Lease<TestStore> {
    let Begin::Execute(lease) = begin(engine).await else {
        panic!("first runs")
    };
    lease
}

// One thread, so that a caller that has counted itself in `asked` has also
// joined the flight: `begin` joins before its first `await`.
per_store!(
    a_thousand_waiting_duplicates_cost_one_execution_and_one_store_begin,
    flavor = "current_thread"
);
async fn a_thousand_waiting_duplicates_cost_one_execution_and_one_store_begin(store: TestStore) {
    let store = CountingStore {
        inner: store,
        begins: Arc::default(),
        completes: Arc::default(),
        local_hits: Arc::default(),
    };
    let engine = Idempotency::builder()
        .store(store.clone())
        .concurrent(Concurrent::wait())
        .build()
        .unwrap();
    let executions = Arc::new(AtomicUsize::new(0));
    let asked = Arc::new(AtomicUsize::new(0));
    let all_started = Arc::new(Barrier::new(1001));
    let mut tasks = Vec::new();
    for _ in 0..1000 {
        let engine = engine.clone();
        let executions = executions.clone();
        let asked = asked.clone();
        let all_started = all_started.clone();
        tasks.push(tokio::spawn(async move {
            all_started.wait().await;
            asked.fetch_add(1, SeqCst);
            match engine
                .begin_with("sig:pay:acct", fp("same"), Concurrent::wait())
                .await?
            {
                Begin::Execute(lease) => {
                    executions.fetch_add(1, SeqCst);
                    // Hold the action until every duplicate has joined.
                    timeout(LIMIT, async {
                        while asked.load(SeqCst) < 1000 {
                            tokio::task::yield_now().await;
                        }
                    })
                    .await
                    .expect("every caller asks");
                    lease.complete(value(fp("same"), "paid")).await?;
                    Ok::<_, StoreError>(Bytes::from_static(b"paid"))
                }
                Begin::Replay { record, .. } => Ok(record.as_value().unwrap().clone()),
                other => panic!("unexpected {other:?}"),
            }
        }));
    }
    all_started.wait().await;
    for task in tasks {
        let body = timeout(LIMIT, task).await.unwrap().unwrap().unwrap();
        assert_eq!(body, "paid");
    }
    assert_eq!(executions.load(SeqCst), 1);
    let stats = engine.stats();
    assert_eq!(stats.executed, 1);
    assert_eq!(stats.coalesced + stats.replayed, 999);
    assert_eq!(stats.coalesced, 999, "every duplicate joined the one run");
    assert_eq!(store.begins.load(SeqCst), 1, "one store begin for all");
    assert_eq!(store.completes.load(SeqCst), 1);
    // Duplicates that arrived while the first was in flight never reached the
    // store; only those that came after it completed read the record, in
    // process where the store keeps a copy, or else with a begin.
    assert_eq!(
        (store.begins.load(SeqCst) + store.local_hits.load(SeqCst)) as u64,
        1 + stats.replayed,
        "coalesced duplicates must not touch the store"
    );
}

per_store!(
    under_reject_duplicates_of_an_in_flight_key_conflict,
    flavor = "multi_thread",
    worker_threads = 2
);
async fn under_reject_duplicates_of_an_in_flight_key_conflict(store: TestStore) {
    let engine = on(&store).build().unwrap();
    let lease = first_runs(&engine).await;
    let mut tasks = Vec::new();
    for _ in 0..499 {
        let engine = engine.clone();
        tasks.push(tokio::spawn(async move {
            engine
                .begin_with("s:a:t", fp("x"), Concurrent::Reject)
                .await
        }));
    }
    for task in tasks {
        let outcome = timeout(LIMIT, task).await.unwrap().unwrap().unwrap();
        assert!(
            matches!(outcome, Begin::Conflict { retry_after } if retry_after >= Duration::from_secs(1))
        );
    }
    lease.complete(value(fp("x"), "ok")).await.unwrap();
    let stats = engine.stats();
    assert_eq!((stats.executed, stats.conflicts), (1, 499));
    assert_eq!(stats.duplicates_prevented(), 499);
}

per_store!(a_duplicate_with_another_fingerprint_is_a_mismatch_in_flight_and_after);
async fn a_duplicate_with_another_fingerprint_is_a_mismatch_in_flight_and_after(store: TestStore) {
    let engine = on(&store).build().unwrap();
    let Begin::Execute(lease) = engine
        .begin_with("s:a:t", fp("one"), Concurrent::wait())
        .await
        .unwrap()
    else {
        panic!("first runs")
    };
    let in_flight = engine.begin_with("s:a:t", fp("two"), Concurrent::wait());
    assert!(matches!(
        timeout(LIMIT, in_flight).await.unwrap().unwrap(),
        Begin::Mismatch
    ));
    lease.complete(value(fp("one"), "ok")).await.unwrap();
    let after = engine
        .begin_with("s:a:t", fp("two"), Concurrent::Reject)
        .await;
    assert!(matches!(after.unwrap(), Begin::Mismatch));
    assert_eq!(engine.stats().mismatches, 2);
}

per_store!(
    a_dropped_lease_lets_a_waiting_duplicate_run_the_action,
    flavor = "multi_thread",
    worker_threads = 2
);
async fn a_dropped_lease_lets_a_waiting_duplicate_run_the_action(store: TestStore) {
    let engine = on(&store).build().unwrap();
    let Begin::Execute(lease) = engine
        .begin_with("s:a:t", fp("x"), Concurrent::wait())
        .await
        .unwrap()
    else {
        panic!("first runs")
    };
    let waiter = tokio::spawn({
        let engine = engine.clone();
        async move {
            match engine
                .begin_with("s:a:t", fp("x"), Concurrent::wait())
                .await?
            {
                Begin::Execute(lease) => lease.complete(value(fp("x"), "second")).await,
                other => panic!("the waiter should run the action, got {other:?}"),
            }
        }
    });
    // Whether the waiter has joined the flight by now or arrives after the
    // release, the outcome a user sees is the same: the duplicate runs.
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    drop(lease);
    assert!(timeout(LIMIT, waiter).await.unwrap().unwrap().unwrap());
    assert_eq!(engine.stats().executed, 2);
}

per_store!(
    a_panicking_action_does_not_wedge_the_key,
    flavor = "multi_thread",
    worker_threads = 2
);
async fn a_panicking_action_does_not_wedge_the_key(store: TestStore) {
    let engine = on(&store).build().unwrap();
    let panicked = tokio::spawn({
        let engine = engine.clone();
        async move {
            let _lease = first_runs(&engine).await;
            panic!("the action blew up");
        }
    });
    assert!(timeout(LIMIT, panicked).await.unwrap().is_err());
    // The release runs on a task of its own; wait for it rather than guess.
    let retry = timeout(LIMIT, async {
        loop {
            match begin(&engine).await {
                Begin::Execute(lease) => return lease,
                Begin::Conflict { .. } => tokio::task::yield_now().await,
                other => panic!("unexpected {other:?}"),
            }
        }
    })
    .await
    .unwrap();
    assert!(retry.complete(value(fp("x"), "ok")).await.unwrap());
}

per_store!(
    a_live_lease_is_renewed_past_its_ttl,
    flavor = "multi_thread",
    worker_threads = 2
);
async fn a_live_lease_is_renewed_past_its_ttl(store: TestStore) {
    // Renewal runs every third of the lease TTL: a takeover here would need
    // the heartbeat to stall for two thirds of it (2 s), which a busy
    // machine does not do.
    let lease_ttl = Duration::from_secs(3);
    let first = on(&store).lease_ttl(lease_ttl).build().unwrap();
    let second = on(&store).lease_ttl(lease_ttl).build().unwrap();
    let lease = first_runs(&first).await;
    // Past the lease TTL, twice, the heartbeat has kept the marker alive.
    for _ in 0..2 {
        tokio::time::sleep(lease_ttl * 3 / 4).await;
        let outcome = begin(&second).await;
        assert!(
            matches!(outcome, Begin::Conflict { .. }),
            "taken over: {outcome:?}"
        );
    }
    assert!(lease.complete(value(fp("x"), "slow")).await.unwrap());
    assert!(matches!(
        begin(&second).await,
        Begin::Replay {
            coalesced: false,
            ..
        }
    ));
}

/// Drops `lease` where no runtime can release it: to the store, its holder
/// died with the marker in place.
fn die_holding<S: Store>(lease: tower_idempotency::Lease<S>) {
    std::thread::spawn(move || drop(lease)).join().unwrap();
}

per_store!(an_abandoned_lease_is_taken_over_after_the_lease_ttl);
async fn an_abandoned_lease_is_taken_over_after_the_lease_ttl(store: TestStore) {
    // Long enough that no stall between the begin and the first check
    // lets the lease lapse early.
    let engine = on(&store)
        .lease_ttl(Duration::from_secs(2))
        .build()
        .unwrap();
    let lease = first_runs(&engine).await;
    // The marker carries the lease's token.
    let Some(Entry {
        state: EntryState::InFlight { lease: token, .. },
        ..
    }) = store.get("s:a:t").await.unwrap()
    else {
        panic!("the first caller's marker holds the key")
    };
    die_holding(lease);
    assert!(matches!(begin(&engine).await, Begin::Conflict { .. }));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let Begin::Execute(second) = begin(&engine).await else {
        panic!("the retry takes over")
    };
    // The dead holder's token no longer fences the key.
    assert!(!store
        .complete(
            "s:a:t",
            token,
            Arc::new(value(fp("x"), "stale")),
            Duration::from_secs(9)
        )
        .await
        .unwrap());
    assert!(second.complete(value(fp("x"), "fresh")).await.unwrap());
}

per_store!(under_block_an_abandoned_lease_keeps_refusing_retries);
async fn under_block_an_abandoned_lease_keeps_refusing_retries(store: TestStore) {
    let engine = on(&store)
        .lease_ttl(Duration::from_millis(300))
        .lease_expiry(LeaseExpiry::Block)
        .build()
        .unwrap();
    let lease = first_runs(&engine).await;
    die_holding(lease);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(matches!(begin(&engine).await, Begin::Conflict { .. }));
}

per_store!(under_block_an_abandoned_lease_refuses_until_the_record_ttl);
async fn under_block_an_abandoned_lease_refuses_until_the_record_ttl(store: TestStore) {
    // The lease lapses long before the record TTL; a stall shorter than the
    // record TTL cannot turn the first check into a run.
    let ttl = Duration::from_secs(6);
    let engine = on(&store)
        .ttl(ttl)
        .lease_ttl(Duration::from_millis(300))
        .lease_expiry(LeaseExpiry::Block)
        .build()
        .unwrap();
    let begun = tokio::time::Instant::now();
    let lease = first_runs(&engine).await;
    die_holding(lease);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        matches!(begin(&engine).await, Begin::Conflict { .. }),
        "past the lease TTL the key is still blocked"
    );
    tokio::time::sleep_until(begun + ttl + Duration::from_millis(500)).await;
    assert!(
        matches!(begin(&engine).await, Begin::Execute(_)),
        "past the record TTL the key runs again"
    );
}

per_store!(records_expire_after_the_ttl_and_the_key_runs_again);
async fn records_expire_after_the_ttl_and_the_key_runs_again(store: TestStore) {
    // A TTL no stall of a busy machine outlasts between the write and the
    // first read.
    let engine = on(&store).ttl(Duration::from_secs(5)).build().unwrap();
    let lease = first_runs(&engine).await;
    lease.complete(value(fp("x"), "ok")).await.unwrap();
    assert!(engine.record("s:a:t").await.unwrap().is_some());
    tokio::time::sleep(Duration::from_millis(5500)).await;
    assert!(engine.record("s:a:t").await.unwrap().is_none());
    assert!(matches!(begin(&engine).await, Begin::Execute(_)));
}

per_store!(queries_and_maintenance_work_through_the_handle);
async fn queries_and_maintenance_work_through_the_handle(store: TestStore) {
    let engine = on(&store).build().unwrap();
    let hour = Duration::from_secs(3600);
    store
        .put(
            "evt1:create_task:trello",
            Arc::new(value(fp("a"), "1")),
            hour,
        )
        .await
        .unwrap();
    // Distinct creation times (milliseconds), so "oldest" is well defined.
    tokio::time::sleep(Duration::from_millis(3)).await;
    store
        .put(
            "evt1:send:slack",
            Arc::new(value(fp("b"), "2")),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    store
        .put(
            "evt2:create_task:drive",
            Arc::new(value(fp("c"), "3")),
            hour,
        )
        .await
        .unwrap();

    let mut signal: Vec<String> = engine
        .find_by_signal("evt1")
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.key)
        .collect();
    signal.sort();
    assert_eq!(signal, ["evt1:create_task:trello", "evt1:send:slack"]);
    let action = engine
        .keys(&KeyFilter::new().action("create_task").target("drive"))
        .await
        .unwrap();
    assert_eq!(action.len(), 1);
    assert_eq!(action[0].key, "evt2:create_task:drive");
    let soon = engine
        .expiring_within(Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(soon.len(), 1);
    assert_eq!(soon[0].key, "evt1:send:slack");

    assert_eq!(engine.evict_oldest(1).await.unwrap(), 1);
    assert!(engine
        .record("evt1:create_task:trello")
        .await
        .unwrap()
        .is_none());
    assert_eq!(
        engine.remove("evt1:send:slack").await.unwrap(),
        tower_idempotency::store::Removal::Removed
    );
    assert_eq!(
        engine.remove("evt1:send:slack").await.unwrap(),
        tower_idempotency::store::Removal::Absent
    );
    engine.clear().await.unwrap();
    assert_eq!(engine.cache_info().await.unwrap().entries, 0);

    engine.reset_stats();
    assert_eq!(engine.stats(), Default::default());
}

per_store!(a_begin_dropped_while_the_store_answers_does_not_wedge_the_key);
async fn a_begin_dropped_while_the_store_answers_does_not_wedge_the_key(store: TestStore) {
    let engine = on(&store)
        .lease_ttl(Duration::from_secs(2))
        .concurrent(Concurrent::wait())
        .build()
        .unwrap();
    // A holder that died leaves a marker the first caller polls on (for a
    // lease TTL that no stall of a busy machine outlasts before the first
    // caller gives up)...
    let lease = first_runs(&engine).await;
    die_holding(lease);
    // ...and that caller gives up (a timeout drops its `begin` mid-poll).
    let gave_up = timeout(
        Duration::from_millis(50),
        engine.begin_with("s:a:t", fp("x"), Concurrent::wait()),
    )
    .await;
    assert!(gave_up.is_err(), "the first caller was still polling");
    // The next caller is not stuck behind the abandoned flight: once the
    // dead holder's lease runs out, it runs the action.
    let next = timeout(
        LIMIT,
        engine.begin_with("s:a:t", fp("x"), Concurrent::wait()),
    )
    .await
    .expect("not wedged")
    .unwrap();
    assert!(matches!(next, Begin::Execute(_)), "{next:?}");
}
