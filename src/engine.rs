//! The engine: the whole begin / complete / release protocol in one place.
//!
//! [`Idempotency`] is what every frontend (the HTTP layer, the closure API)
//! calls, and the only thing that talks to a [`Store`]. It is also the
//! *handle*: stats, cache info, queries and maintenance are its methods.
//!
//! # Protocol for one key
//!
//! 1. [`begin`](Idempotency::begin) answers one of
//!    * [`Begin::Execute`]: no record; an in-flight marker with a short lease
//!      TTL is written and the caller runs the action, holding a [`Lease`];
//!    * [`Begin::Replay`]: the stored result of an earlier run (or, for a
//!      duplicate that waited under [`Concurrent::Wait`], of the run it waited
//!      for);
//!    * [`Begin::Mismatch`]: the key was used for a request with another
//!      fingerprint;
//!    * [`Begin::Conflict`]: another caller holds the lease and the policy is
//!      [`Concurrent::Reject`] (or the wait timed out).
//! 2. [`Lease::complete`] replaces the marker by the record with the record
//!    TTL, only if the lease is still the caller's (fencing).
//! 3. Dropping a [`Lease`] without completing it releases the marker: on an
//!    error, a panic (the lease drops while unwinding) or a cancelled future.
//!    No code path can forget it.
//!
//! While a lease is held the engine renews it every third of the lease TTL, so
//! a slow action is never taken over.
//!
//! # Single-flight
//!
//! Within one process, duplicates of a key that is being begun or run join
//! the first caller's *flight* instead of going to the store: a thousand
//! concurrent duplicates cost one store round trip. A follower with another
//! fingerprint is a mismatch at once; under `Reject` a follower is a conflict
//! at once; under `Wait` it waits for the flight's outcome, replays a result,
//! or starts over (and may become the new leader) when the flight ends
//! without one.
//!
//! # What "at most once" means
//!
//! Per key and within the record TTL, the action runs at most once while the
//! lease holder lives. If the process dies after the action's side effect but
//! before `complete`, nothing records that the effect happened: under
//! [`LeaseExpiry::Takeover`] (the default) a retry after the lease TTL runs the
//! action again; under [`LeaseExpiry::Block`] the marker stays for the record
//! TTL and retries are refused, so nothing runs twice but the key is unusable
//! until then.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::AbortHandle;

use crate::key::{Fingerprint, IdempotencyKey};
use crate::record::{Record, SharedRecord};
use crate::stats::{CacheInfo, Stats, StatsSnapshot};
use crate::store::{
    BeginOutcome, Entry, EntryKind, LeaseToken, MemoryStore, MemoryStoreBuilder, ScanEntry, Store,
    StoreError,
};

/// The default record TTL: 24 hours.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// The default lease TTL: 60 seconds.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(60);
/// The default wait budget of [`Concurrent::Wait`]: 30 seconds.
pub const DEFAULT_WAIT_TIMEOUT: Duration = Duration::from_secs(30);

/// What a duplicate gets while the first request for its key is in flight.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Concurrent {
    /// Refuse it at once (HTTP 409 with `Retry-After`), as the IETF draft says.
    #[default]
    Reject,
    /// Wait for the first to finish and replay its result. `timeout` is one
    /// budget for the whole wait, start-overs included; past it, a conflict.
    Wait {
        /// The wait budget.
        timeout: Duration,
    },
}

impl Concurrent {
    /// `Wait` with the default 30 s budget.
    pub const fn wait() -> Self {
        Self::Wait {
            timeout: DEFAULT_WAIT_TIMEOUT,
        }
    }
}

/// What happens to a lease whose holder died (its process stopped renewing it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LeaseExpiry {
    /// After the lease TTL the marker expires and a retry runs the action.
    #[default]
    Takeover,
    /// The marker lives for the record TTL: retries are refused meanwhile, so
    /// nothing ever runs twice.
    Block,
}

/// The engine's effective configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Config {
    /// How long a record is kept.
    pub ttl: Duration,
    /// How long an in-flight marker lives without renewal.
    pub lease_ttl: Duration,
    /// The default policy for duplicates of an in-flight key.
    pub concurrent: Concurrent,
    /// What happens to an abandoned lease.
    pub lease_expiry: LeaseExpiry,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            ttl: DEFAULT_TTL,
            lease_ttl: DEFAULT_LEASE_TTL,
            concurrent: Concurrent::Reject,
            lease_expiry: LeaseExpiry::Takeover,
        }
    }
}

impl Config {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.ttl.is_zero() {
            return Err(ConfigError::new("ttl must be greater than zero"));
        }
        if self.lease_ttl.is_zero() {
            return Err(ConfigError::new("lease_ttl must be greater than zero"));
        }
        Ok(())
    }

    /// The TTL in-flight markers are written and renewed with.
    fn marker_ttl(&self) -> Duration {
        match self.lease_expiry {
            LeaseExpiry::Takeover => self.lease_ttl,
            LeaseExpiry::Block => self.ttl,
        }
    }
}

/// An invalid configuration, refused when the engine or layer is built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid idempotency configuration: {0}")]
pub struct ConfigError(String);

impl ConfigError {
    pub(crate) fn new(reason: impl Into<String>) -> Self {
        Self(reason.into())
    }
}

/// Something that becomes a [`Store`] when the engine is built: a store, or
/// the [`MemoryStoreBuilder`] the engine builder starts with.
pub trait IntoStore {
    /// The store it becomes.
    type Store: Store;

    /// Builds the store.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] when the store's own configuration is invalid.
    fn into_store(self) -> Result<Self::Store, ConfigError>;
}

impl<S: Store> IntoStore for S {
    type Store = S;

    fn into_store(self) -> Result<S, ConfigError> {
        Ok(self)
    }
}

impl IntoStore for MemoryStoreBuilder {
    type Store = MemoryStore;

    fn into_store(self) -> Result<MemoryStore, ConfigError> {
        self.build()
    }
}

/// Builds an [`Idempotency`] engine. Starts with the embedded moka store.
///
/// ```
/// use std::time::Duration;
/// use tower_idempotency::{Concurrent, Idempotency};
///
/// let engine = Idempotency::builder()
///     .ttl(Duration::from_secs(3600))
///     .max_entries(50_000)
///     .concurrent(Concurrent::wait())
///     .build()
///     .unwrap();
/// assert_eq!(engine.config().ttl, Duration::from_secs(3600));
///
/// assert!(Idempotency::builder().ttl(Duration::ZERO).build().is_err());
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct IdempotencyBuilder<B = MemoryStoreBuilder> {
    store: B,
    config: Config,
}

impl Default for IdempotencyBuilder {
    fn default() -> Self {
        Self {
            store: MemoryStoreBuilder::default(),
            config: Config::default(),
        }
    }
}

impl IdempotencyBuilder<MemoryStoreBuilder> {
    /// The memory store's entry bound (default 10,000).
    pub fn max_entries(mut self, max_entries: u64) -> Self {
        self.store = self.store.max_entries(max_entries);
        self
    }

    /// The memory store's byte bound (default: none).
    pub fn max_bytes(mut self, max_bytes: u64) -> Self {
        self.store = self.store.max_bytes(max_bytes);
        self
    }
}

impl<B> IdempotencyBuilder<B> {
    /// How long a record is kept (default 24 h).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.config.ttl = ttl;
        self
    }

    /// How long an in-flight marker lives without renewal (default 60 s).
    pub fn lease_ttl(mut self, lease_ttl: Duration) -> Self {
        self.config.lease_ttl = lease_ttl;
        self
    }

    /// The policy for duplicates of an in-flight key (default `Reject`).
    pub fn concurrent(mut self, concurrent: Concurrent) -> Self {
        self.config.concurrent = concurrent;
        self
    }

    /// What happens to an abandoned lease (default `Takeover`).
    pub fn lease_expiry(mut self, lease_expiry: LeaseExpiry) -> Self {
        self.config.lease_expiry = lease_expiry;
        self
    }

    /// Uses `store` instead of the embedded memory store.
    pub fn store<S: Store>(self, store: S) -> IdempotencyBuilder<S> {
        IdempotencyBuilder {
            store,
            config: self.config,
        }
    }

    /// The configuration as set so far.
    pub fn config(&self) -> Config {
        self.config
    }
}

impl<B: IntoStore> IdempotencyBuilder<B> {
    /// Builds the engine.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] for a zero TTL, a zero lease TTL or an invalid store
    /// configuration (such as a zero entry bound).
    pub fn build(self) -> Result<Idempotency<B::Store>, ConfigError> {
        self.config.validate()?;
        Ok(Idempotency::from_parts(
            self.store.into_store()?,
            self.config,
        ))
    }
}

/// The idempotency engine and its handle. Cheap to clone (an `Arc` inside).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use bytes::Bytes;
/// use tower_idempotency::{Begin, Concurrent, Fingerprint, Idempotency, Record};
///
/// let engine = Idempotency::new();
/// let fp = Fingerprint::of_bytes(b"request");
///
/// let Begin::Execute(lease) = engine.begin("sig:act:tgt", fp, Concurrent::Reject).await.unwrap()
/// else { panic!("first call runs") };
/// lease.complete(Record::value(fp, Bytes::from_static(b"done"))).await.unwrap();
///
/// match engine.begin("sig:act:tgt", fp, Concurrent::Reject).await.unwrap() {
///     Begin::Replay { record, .. } => assert_eq!(record.as_value().unwrap(), "done"),
///     _ => panic!("second call replays"),
/// }
/// assert_eq!(engine.stats().executed, 1);
/// assert_eq!(engine.stats().replayed, 1);
/// # }
/// ```
pub struct Idempotency<S = MemoryStore> {
    inner: Arc<Inner<S>>,
}

impl<S> Clone for Idempotency<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<S> std::fmt::Debug for Idempotency<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Idempotency")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

struct Inner<S> {
    store: S,
    config: Config,
    stats: Stats,
    /// Store removal counts at the last `reset_stats`.
    removals_baseline: [AtomicU64; 2],
    flights: Mutex<HashMap<String, Arc<Flight>>>,
    heartbeat: Mutex<Option<AbortHandle>>,
    auto_cleanup: Mutex<Option<AbortHandle>>,
}

impl<S> Drop for Inner<S> {
    fn drop(&mut self) {
        for task in [&self.heartbeat, &self.auto_cleanup] {
            if let Some(task) = lock(task).take() {
                task.abort();
            }
        }
    }
}

/// One key being begun or run in this process.
struct Flight {
    fingerprint: Fingerprint,
    /// Set once the leader holds the store lease; the heartbeat renews it.
    lease: std::sync::OnceLock<LeaseToken>,
    outcome: watch::Sender<FlightOutcome>,
}

#[derive(Clone)]
enum FlightOutcome {
    /// The leader is asking the store: the key may well hold a result.
    Running,
    /// The leader holds the lease and runs the action.
    Executing,
    Completed(SharedRecord),
    /// Ended without a stored result: waiters start over.
    Released,
}

/// What [`Idempotency::begin`] decided for one call.
pub enum Begin<S: Store> {
    /// The caller runs the action, then completes or drops the lease.
    Execute(Lease<S>),
    /// The stored result to hand back.
    Replay {
        /// The record of the first run.
        record: SharedRecord,
        /// Whether the caller waited for a run in flight (`true`) or found
        /// the result stored (`false`).
        coalesced: bool,
    },
    /// The key was used for a request with another fingerprint.
    Mismatch,
    /// The first request is still in flight.
    Conflict {
        /// When it is worth retrying.
        retry_after: Duration,
    },
}

impl<S: Store> std::fmt::Debug for Begin<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Execute(lease) => f.debug_tuple("Execute").field(lease).finish(),
            Self::Replay { record, coalesced } => f
                .debug_struct("Replay")
                .field("record", record)
                .field("coalesced", coalesced)
                .finish(),
            Self::Mismatch => f.write_str("Mismatch"),
            Self::Conflict { retry_after } => f
                .debug_struct("Conflict")
                .field("retry_after", retry_after)
                .finish(),
        }
    }
}

impl Idempotency<MemoryStore> {
    /// An engine on a memory store, with the defaults.
    pub fn new() -> Self {
        Self::from_parts(MemoryStore::new(), Config::default())
    }

    /// A builder, starting from the memory store and the defaults.
    pub fn builder() -> IdempotencyBuilder {
        IdempotencyBuilder::default()
    }
}

impl Default for Idempotency<MemoryStore> {
    fn default() -> Self {
        Self::new()
    }
}

impl<S: Store> Idempotency<S> {
    fn from_parts(store: S, config: Config) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                config,
                stats: Stats::default(),
                removals_baseline: [AtomicU64::new(0), AtomicU64::new(0)],
                flights: Mutex::new(HashMap::new()),
                heartbeat: Mutex::new(None),
                auto_cleanup: Mutex::new(None),
            }),
        }
    }

    /// The effective configuration.
    pub fn config(&self) -> Config {
        self.inner.config
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.inner.store
    }

    pub(crate) fn counters(&self) -> &Stats {
        &self.inner.stats
    }

    /// Begins the action named by `key` for a request with `fingerprint`.
    ///
    /// # Errors
    ///
    /// The [`StoreError`] of a store that failed (counted in `store_errors`).
    pub async fn begin(
        &self,
        key: impl Into<String>,
        fingerprint: Fingerprint,
        concurrent: Concurrent,
    ) -> Result<Begin<S>, StoreError> {
        let key = key.into();
        let deadline = match concurrent {
            Concurrent::Wait { timeout } => Some(tokio::time::Instant::now() + timeout),
            Concurrent::Reject => None,
        };
        let result = self.begin_inner(key, fingerprint, deadline).await;
        let stats = &self.inner.stats;
        match &result {
            Ok(Begin::Execute(_)) => Stats::incr(&stats.executed),
            Ok(Begin::Replay {
                coalesced: true, ..
            }) => Stats::incr(&stats.coalesced),
            Ok(Begin::Replay { .. }) => Stats::incr(&stats.replayed),
            Ok(Begin::Mismatch) => Stats::incr(&stats.mismatches),
            Ok(Begin::Conflict { .. }) => Stats::incr(&stats.conflicts),
            Err(_) => Stats::incr(&stats.store_errors),
        }
        result
    }

    async fn begin_inner(
        &self,
        key: String,
        fingerprint: Fingerprint,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<Begin<S>, StoreError> {
        let conflict = Begin::Conflict {
            retry_after: Duration::from_secs(1),
        };
        let mut waited = false;
        loop {
            let (flight, leading) = {
                let mut flights = lock(&self.inner.flights);
                match flights.get(&key) {
                    Some(flight) => (flight.clone(), false),
                    None => {
                        let flight = Arc::new(Flight {
                            fingerprint,
                            lease: std::sync::OnceLock::new(),
                            outcome: watch::Sender::new(FlightOutcome::Running),
                        });
                        flights.insert(key.clone(), flight.clone());
                        (flight, true)
                    }
                }
            };

            if !leading {
                if flight.fingerprint != fingerprint {
                    return Ok(Begin::Mismatch);
                }
                let mut outcome = flight.outcome.subscribe();
                drop(flight);
                let Some(deadline) = deadline else {
                    // Under `Reject` a duplicate conflicts with a run, not
                    // with a leader that is still asking the store: most
                    // often that leader finds the stored result, and this
                    // caller replays it too. The wait lasts one store answer.
                    let answered = outcome
                        .wait_for(|o| !matches!(o, FlightOutcome::Running))
                        .await
                        .map(|o| o.clone());
                    match answered {
                        Ok(FlightOutcome::Completed(record)) => {
                            return Ok(replay_or_mismatch(record, fingerprint, false));
                        }
                        Ok(FlightOutcome::Executing) => return Ok(conflict),
                        // Released, or the leader vanished: start over.
                        Ok(_) | Err(_) => continue,
                    }
                };
                let ended = tokio::time::timeout_at(
                    deadline,
                    outcome.wait_for(|o| {
                        matches!(o, FlightOutcome::Completed(_) | FlightOutcome::Released)
                    }),
                )
                .await;
                match ended {
                    Err(_elapsed) => return Ok(conflict),
                    Ok(Ok(done)) => {
                        if let FlightOutcome::Completed(record) = &*done {
                            return Ok(replay_or_mismatch(record.clone(), fingerprint, true));
                        }
                    }
                    // The leader vanished without an outcome: start over.
                    Ok(Err(_closed)) => {}
                }
                waited = true;
                continue;
            }

            // If this future is dropped while the store answers, the guard
            // ends the flight, so followers start over instead of waiting on
            // a leader that is gone. (A marker the store wrote meanwhile
            // expires with its lease TTL.)
            let abandoned = EndFlightOnDrop {
                engine: self,
                key: &key,
                flight: &flight,
            };
            let led = self.lead(&key, fingerprint, deadline).await;
            std::mem::forget(abandoned);
            match led {
                Ok(Led::Acquired(token)) => {
                    let _ = flight.lease.set(token);
                    flight.outcome.send_replace(FlightOutcome::Executing);
                    self.start_heartbeat();
                    return Ok(Begin::Execute(Lease {
                        engine: self.clone(),
                        key,
                        token,
                        flight,
                        finished: false,
                    }));
                }
                Ok(Led::Completed(record)) => {
                    self.end_flight(&key, &flight, FlightOutcome::Completed(record.clone()));
                    return Ok(replay_or_mismatch(record, fingerprint, waited));
                }
                Ok(Led::Mismatch) => {
                    self.end_flight(&key, &flight, FlightOutcome::Released);
                    return Ok(Begin::Mismatch);
                }
                Ok(Led::Conflict) => {
                    self.end_flight(&key, &flight, FlightOutcome::Released);
                    return Ok(conflict);
                }
                Err(error) => {
                    self.end_flight(&key, &flight, FlightOutcome::Released);
                    return Err(error);
                }
            }
        }
    }

    /// The leader's part: ask the store, and under `Wait` poll it (with
    /// backoff, within the deadline) while another process holds the lease.
    async fn lead(
        &self,
        key: &str,
        fingerprint: Fingerprint,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<Led, StoreError> {
        let marker_ttl = self.inner.config.marker_ttl();
        let mut backoff = Duration::from_millis(5);
        loop {
            let token = LeaseToken::random();
            match self
                .inner
                .store
                .begin(key, fingerprint, token, marker_ttl)
                .await?
            {
                BeginOutcome::Acquired => return Ok(Led::Acquired(token)),
                BeginOutcome::Completed(record) => return Ok(Led::Completed(record)),
                BeginOutcome::InFlight {
                    fingerprint: held, ..
                } => {
                    if held != fingerprint {
                        return Ok(Led::Mismatch);
                    }
                    let Some(deadline) = deadline else {
                        return Ok(Led::Conflict);
                    };
                    let now = tokio::time::Instant::now();
                    if now >= deadline {
                        return Ok(Led::Conflict);
                    }
                    // Until the next poll, or until the store announces that
                    // the key changed (Redis pub/sub), whichever is first.
                    self.inner
                        .store
                        .until_changed(key, deadline.min(now + backoff))
                        .await;
                    backoff = (backoff * 2).min(Duration::from_millis(250));
                }
            }
        }
    }

    /// Removes `flight` from the map (if it is still the one there) and tells
    /// its followers how it ended.
    fn end_flight(&self, key: &str, flight: &Arc<Flight>, outcome: FlightOutcome) {
        {
            let mut flights = lock(&self.inner.flights);
            if flights
                .get(key)
                .is_some_and(|current| Arc::ptr_eq(current, flight))
            {
                flights.remove(key);
            }
        }
        flight.outcome.send_replace(outcome);
    }

    /// Makes sure the task that renews every held lease each third of the
    /// lease TTL runs: one per engine, started on first use, started again if
    /// the runtime it ran on has gone. It stops when the engine is dropped.
    fn start_heartbeat(&self) {
        let mut task = lock(&self.inner.heartbeat);
        if task.as_ref().is_some_and(|task| !task.is_finished()) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let engine = Arc::downgrade(&self.inner);
        let period = (self.inner.config.lease_ttl / 3).max(Duration::from_millis(1));
        *task = Some(runtime.spawn(heartbeat(engine, period)).abort_handle());
    }

    /// Writes `record` under `key` whatever the key held (for results known
    /// to be done, such as `mark_executed`).
    ///
    /// # Errors
    ///
    /// The [`StoreError`] of a store that failed.
    pub async fn put(&self, key: &str, record: Record, ttl: Duration) -> Result<(), StoreError> {
        if ttl.is_zero() {
            return Ok(());
        }
        self.counted(self.inner.store.put(key, Arc::new(record), ttl).await)
    }

    fn counted<T>(&self, result: Result<T, StoreError>) -> Result<T, StoreError> {
        if result.is_err() {
            Stats::incr(&self.inner.stats.store_errors);
        }
        result
    }

    /// The counters, with the store's own `expired` and `evicted` counts.
    pub fn stats(&self) -> StatsSnapshot {
        let mut snapshot = self.inner.stats.snapshot();
        let removals = self.inner.store.removal_counts();
        let [expired, evicted] = &self.inner.removals_baseline;
        snapshot.expired += removals.expired.saturating_sub(expired.load(Relaxed));
        snapshot.evicted += removals.evicted.saturating_sub(evicted.load(Relaxed));
        snapshot
    }

    /// Sets every counter back to zero.
    pub fn reset_stats(&self) {
        let removals = self.inner.store.removal_counts();
        let [expired, evicted] = &self.inner.removals_baseline;
        expired.store(removals.expired, Relaxed);
        evicted.store(removals.evicted, Relaxed);
        self.inner.stats.reset();
    }

    /// Entries held, the entry bound, and bytes held.
    ///
    /// # Errors
    ///
    /// The [`StoreError`] of a store that failed.
    pub async fn cache_info(&self) -> Result<CacheInfo, StoreError> {
        self.inner.store.info().await
    }

    /// Checks that the store answers.
    ///
    /// # Errors
    ///
    /// The [`StoreError`] of a store that failed.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.inner.store.ping().await
    }

    /// What `key` (the text form of an [`IdempotencyKey`]) holds.
    ///
    /// # Errors
    ///
    /// The [`StoreError`] of a store that failed.
    pub async fn record(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        self.inner.store.get(key).await
    }

    /// The live keys that match `filter`.
    ///
    /// # Errors
    ///
    /// The [`StoreError`] of a store that failed.
    pub async fn keys(&self, filter: &KeyFilter) -> Result<Vec<ScanEntry>, StoreError> {
        let entries = self.inner.store.scan().await?;
        Ok(entries
            .into_iter()
            .filter(|entry| filter.matches(entry))
            .collect())
    }

    /// The live keys whose signal is `signal`.
    ///
    /// # Errors
    ///
    /// The [`StoreError`] of a store that failed.
    pub async fn find_by_signal(&self, signal: &str) -> Result<Vec<ScanEntry>, StoreError> {
        self.keys(&KeyFilter::new().signal(signal)).await
    }

    /// The live keys whose action is `action`.
    ///
    /// # Errors
    ///
    /// The [`StoreError`] of a store that failed.
    pub async fn find_by_action(&self, action: &str) -> Result<Vec<ScanEntry>, StoreError> {
        self.keys(&KeyFilter::new().action(action)).await
    }

    /// The live keys whose target is `target`.
    ///
    /// # Errors
    ///
    /// The [`StoreError`] of a store that failed.
    pub async fn find_by_target(&self, target: &str) -> Result<Vec<ScanEntry>, StoreError> {
        self.keys(&KeyFilter::new().target(target)).await
    }

    /// The live keys that expire within `within`.
    ///
    /// # Errors
    ///
    /// The [`StoreError`] of a store that failed.
    pub async fn expiring_within(&self, within: Duration) -> Result<Vec<ScanEntry>, StoreError> {
        self.keys(&KeyFilter::new().expiring_within(within)).await
    }

    /// Deletes what `key` holds (a record, or a marker: then a retry may run
    /// the action while the first run is still going). Answers whether there
    /// was anything.
    ///
    /// # Errors
    ///
    /// The [`StoreError`] of a store that failed.
    pub async fn remove(&self, key: &str) -> Result<bool, StoreError> {
        self.inner.store.remove(key).await
    }

    /// Deletes every entry.
    ///
    /// # Errors
    ///
    /// The [`StoreError`] of a store that failed.
    pub async fn clear(&self) -> Result<(), StoreError> {
        self.inner.store.clear().await
    }

    /// Drops expired entries now (moka otherwise drops them during later
    /// operations).
    ///
    /// # Errors
    ///
    /// The [`StoreError`] of a store that failed.
    pub async fn cleanup_expired(&self) -> Result<(), StoreError> {
        self.inner.store.cleanup_expired().await
    }

    /// Removes the `n` oldest completed records (by creation time in
    /// milliseconds, ties broken by the nearest expiry) and
    /// answers how many it removed. In-flight markers are never evicted:
    /// that would let a duplicate run while the first is still running.
    /// Removed records count as `evicted`.
    ///
    /// # Errors
    ///
    /// The [`StoreError`] of a store that failed.
    pub async fn evict_oldest(&self, n: usize) -> Result<usize, StoreError> {
        let mut records: Vec<ScanEntry> = self
            .inner
            .store
            .scan()
            .await?
            .into_iter()
            .filter(|entry| entry.kind == EntryKind::Completed)
            .collect();
        records.sort_by_key(|entry| (entry.created_at_ms, entry.expires_in));
        let mut removed = 0;
        for entry in records.into_iter().take(n) {
            if self.remove(&entry.key).await? {
                removed += 1;
                Stats::incr(&self.inner.stats.evicted);
            }
        }
        Ok(removed)
    }

    /// Starts a task that runs the store's maintenance (dropping expired
    /// entries, so the `expired` counter and `cache_info` are current) every
    /// `interval`. Replaces a task already running; stops when
    /// [`stop_auto_cleanup`](Self::stop_auto_cleanup) is called or the engine
    /// is dropped.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] for a zero interval or when called outside a Tokio runtime.
    pub fn start_auto_cleanup(&self, interval: Duration) -> Result<(), ConfigError> {
        if interval.is_zero() {
            return Err(ConfigError::new(
                "auto-cleanup interval must be greater than zero",
            ));
        }
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| ConfigError::new("auto-cleanup needs a Tokio runtime"))?;
        let engine = Arc::downgrade(&self.inner);
        let task = runtime.spawn(async move {
            let mut ticks = tokio::time::interval(interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let Some(inner) = engine.upgrade() else {
                    return;
                };
                if let Err(error) = inner.store.cleanup_expired().await {
                    tracing::warn!(%error, "idempotency auto-cleanup failed");
                }
            }
        });
        if let Some(previous) = lock(&self.inner.auto_cleanup).replace(task.abort_handle()) {
            previous.abort();
        }
        Ok(())
    }

    /// Stops the auto-cleanup task, if one runs.
    pub fn stop_auto_cleanup(&self) {
        if let Some(task) = lock(&self.inner.auto_cleanup).take() {
            task.abort();
        }
    }

    /// Whether an auto-cleanup task runs.
    pub fn auto_cleanup_running(&self) -> bool {
        lock(&self.inner.auto_cleanup)
            .as_ref()
            .is_some_and(|task| !task.is_finished())
    }
}

/// Ends a flight whose leader's `begin` future was dropped mid-way.
struct EndFlightOnDrop<'a, S: Store> {
    engine: &'a Idempotency<S>,
    key: &'a str,
    flight: &'a Arc<Flight>,
}

impl<S: Store> Drop for EndFlightOnDrop<'_, S> {
    fn drop(&mut self) {
        self.engine
            .end_flight(self.key, self.flight, FlightOutcome::Released);
    }
}

enum Led {
    Acquired(LeaseToken),
    Completed(SharedRecord),
    Mismatch,
    Conflict,
}

fn replay_or_mismatch<S: Store>(
    record: SharedRecord,
    fingerprint: Fingerprint,
    coalesced: bool,
) -> Begin<S> {
    if record.fingerprint == fingerprint {
        Begin::Replay { record, coalesced }
    } else {
        Begin::Mismatch
    }
}

async fn heartbeat<S: Store>(engine: Weak<Inner<S>>, period: Duration) {
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        let Some(inner) = engine.upgrade() else {
            return;
        };
        let held: Vec<(String, LeaseToken)> = lock(&inner.flights)
            .iter()
            .filter_map(|(key, flight)| flight.lease.get().map(|token| (key.clone(), *token)))
            .collect();
        let marker_ttl = inner.config.marker_ttl();
        for (key, token) in held {
            if let Err(error) = inner.store.renew(&key, token, marker_ttl).await {
                Stats::incr(&inner.stats.store_errors);
                tracing::warn!(%error, key, "idempotency lease renewal failed");
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The map stays consistent even if a holder panicked: every critical
    // section is a single insert, get or remove.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The right to run one action: hold it while the action runs, then
/// [`complete`](Lease::complete) it with the result. Dropped without
/// completing (error, panic, cancellation), it releases the marker so the next
/// retry runs the action.
#[must_use = "dropping a lease releases it: complete it with the action's result"]
pub struct Lease<S: Store> {
    engine: Idempotency<S>,
    key: String,
    token: LeaseToken,
    flight: Arc<Flight>,
    finished: bool,
}

impl<S: Store> std::fmt::Debug for Lease<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("key", &self.key)
            .field("token", &self.token)
            .finish()
    }
}

impl<S: Store> Lease<S> {
    /// The storage key this lease is for.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The lease's token.
    pub fn token(&self) -> LeaseToken {
        self.token
    }

    /// The engine the lease belongs to.
    pub fn engine(&self) -> &Idempotency<S> {
        &self.engine
    }

    /// Stores `record` as the key's result and hands it to the duplicates
    /// waiting in this process. Answers `false` when the lease had been lost
    /// (it expired and another caller took the key over): the record is then
    /// not stored.
    ///
    /// # Errors
    ///
    /// The [`StoreError`] of a store that failed; the marker is then left to
    /// expire with its lease TTL.
    pub async fn complete(mut self, record: Record) -> Result<bool, StoreError> {
        let record = Arc::new(record);
        let inner = &self.engine.inner;
        let result = inner
            .store
            .complete(&self.key, self.token, record.clone(), inner.config.ttl)
            .await;
        self.finished = true;
        let outcome = match &result {
            Ok(_) => FlightOutcome::Completed(record),
            Err(_) => FlightOutcome::Released,
        };
        self.engine.end_flight(&self.key, &self.flight, outcome);
        self.engine.counted(result)
    }

    /// Deletes the marker now, so the next retry runs the action.
    ///
    /// # Errors
    ///
    /// The [`StoreError`] of a store that failed; the marker is then left to
    /// expire with its lease TTL.
    pub async fn release(mut self) -> Result<(), StoreError> {
        let result = self.engine.inner.store.release(&self.key, self.token).await;
        self.finished = true;
        self.engine
            .end_flight(&self.key, &self.flight, FlightOutcome::Released);
        self.engine.counted(result).map(drop)
    }
}

impl<S: Store> Drop for Lease<S> {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let engine = self.engine.clone();
        let key = std::mem::take(&mut self.key);
        let token = self.token;
        let flight = self.flight.clone();
        match tokio::runtime::Handle::try_current() {
            // Release before telling the waiters, so the one that starts
            // over finds the key free rather than polling a stale marker.
            Ok(runtime) => {
                runtime.spawn(async move {
                    let result = engine.inner.store.release(&key, token).await;
                    if let Err(error) = engine.counted(result) {
                        tracing::warn!(%error, key, "idempotency lease release failed");
                    }
                    engine.end_flight(&key, &flight, FlightOutcome::Released);
                });
            }
            Err(_) => engine.end_flight(&key, &flight, FlightOutcome::Released),
        }
    }
}

/// Which keys [`Idempotency::keys`] lists. Components match the parts of an
/// [`IdempotencyKey`]; a key that is not in that form matches only a filter
/// on nothing but expiry.
///
/// ```
/// use std::time::Duration;
/// use tower_idempotency::KeyFilter;
///
/// let filter = KeyFilter::new().action("create_task").expiring_within(Duration::from_secs(60));
/// # drop(filter);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyFilter {
    signal: Option<String>,
    action: Option<String>,
    target: Option<String>,
    expiring_within: Option<Duration>,
}

impl KeyFilter {
    /// A filter that matches every key.
    pub fn new() -> Self {
        Self::default()
    }

    /// Only keys with this signal.
    pub fn signal(mut self, signal: impl Into<String>) -> Self {
        self.signal = Some(signal.into());
        self
    }

    /// Only keys with this action.
    pub fn action(mut self, action: impl Into<String>) -> Self {
        self.action = Some(action.into());
        self
    }

    /// Only keys with this target.
    pub fn target(mut self, target: impl Into<String>) -> Self {
        self.target = Some(target.into());
        self
    }

    /// Only keys that expire within `within`.
    pub fn expiring_within(mut self, within: Duration) -> Self {
        self.expiring_within = Some(within);
        self
    }

    /// Whether `entry` passes the filter.
    pub fn matches(&self, entry: &ScanEntry) -> bool {
        if self
            .expiring_within
            .is_some_and(|within| entry.expires_in > within)
        {
            return false;
        }
        if self.signal.is_none() && self.action.is_none() && self.target.is_none() {
            return true;
        }
        let Ok(key) = IdempotencyKey::parse(&entry.key) else {
            return false;
        };
        let component = |wanted: &Option<String>, actual: &str| {
            wanted.as_deref().is_none_or(|wanted| wanted == actual)
        };
        component(&self.signal, key.signal())
            && component(&self.action, key.action())
            && component(&self.target, key.target())
    }
}
