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
//!    No code path can forget it. (A `complete` dropped before the store
//!    confirmed it goes on storing the result in the background instead.)
//!
//! While a lease is held the engine renews it every third of the lease TTL, so
//! a slow action is never taken over.
//!
//! # When the store stalls
//!
//! * A `complete` that fails (the store is unreachable or times out) is
//!   retried with backoff while the lease is surely still ours: until one
//!   lease TTL after the store last confirmed it. Each failure counts in
//!   `store_errors`; a final failure is logged with the key. Duplicates
//!   waiting in this process get the result only once it is stored.
//! * A `begin` whose answer never came (it timed out, or its future was
//!   dropped while the store worked) may still have written the marker. The
//!   engine made that token and nothing ran under it, so it releases it in
//!   the background, retrying until the store answers, and the key does not
//!   stay refused for the lease TTL (or, under [`LeaseExpiry::Block`], the
//!   record TTL). Releases that failed are retried the same way.
//!
//! # Single-flight
//!
//! Within one process, duplicates of a key that is being begun or run join
//! the first caller's *flight* instead of going to the store: a thousand
//! concurrent duplicates cost one store round trip. A follower with another
//! fingerprint is a mismatch at once; under `Reject` a follower is a conflict
//! as soon as the leader's first store answer says the key is in flight (or
//! replays the result that answer found); under `Wait` it waits for the flight's outcome, replays a result,
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

mod config;
mod configure;
mod handle;
mod retry;
mod transaction;

pub use crate::store::KeyFilter;
pub use config::{
    Concurrent, Config, IdempotencyBuilder, IntoStore, LeaseExpiry, DEFAULT_LEASE_TTL, DEFAULT_TTL,
    DEFAULT_WAIT_TIMEOUT,
};

use std::borrow::Borrow;
use std::collections::HashSet;
use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use futures_util::FutureExt;
use tokio::task::AbortHandle;
use tracing::Instrument;

use crate::config::MAX_DURATION;
use crate::key::Fingerprint;
use crate::record::{Record, SharedRecord};
use crate::stats::Stats;
use crate::store::{BeginOutcome, LeaseToken, MemoryStore, Store, StoreError};

use self::retry::{complete_until_lease_expires, PendingReleases};

/// The idempotency engine and its handle. Cheap to clone (an `Arc` inside).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use bytes::Bytes;
/// use tower_idempotency::{Begin, Fingerprint, Idempotency, Record};
///
/// let engine = Idempotency::new();
/// let fp = Fingerprint::of_bytes(b"request");
///
/// let Begin::Execute(lease) = engine.begin("sig:act:tgt", fp).await.unwrap()
/// else { panic!("first call runs") };
/// lease.complete(Record::value(fp, Bytes::from_static(b"done"))).await.unwrap();
///
/// match engine.begin("sig:act:tgt", fp).await.unwrap() {
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
            .field("config", &self.inner.config())
            .finish_non_exhaustive()
    }
}

struct Inner<S> {
    store: S,
    /// Read once per `begin` (a copy under a read lock); written only by
    /// [`Idempotency::configure`].
    config: RwLock<Config>,
    stats: Stats,
    /// Store removal counts at the last `reset_stats`.
    removals_baseline: [AtomicU64; 2],
    /// The flights of this process, each under its key (which the flight
    /// holds: the key's one copy, shared with the lease).
    flights: Mutex<HashSet<FlightEntry, ahash::RandomState>>,
    heartbeat: Mutex<Option<AbortHandle>>,
    auto_cleanup: Mutex<Option<AbortHandle>>,
    /// Tokens to release once the store answers again.
    releases: PendingReleases,
}

impl<S> Inner<S> {
    fn config(&self) -> Config {
        *self
            .config
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl<S> Drop for Inner<S> {
    fn drop(&mut self) {
        for task in [&self.heartbeat, &self.auto_cleanup] {
            if let Some(task) = lock(task).take() {
                task.abort();
            }
        }
        self.releases.stop();
    }
}

/// One key being begun or run in this process.
struct Flight {
    /// The storage key.
    key: String,
    fingerprint: Fingerprint,
    /// Set once the leader holds the store lease; the heartbeat renews it.
    lease: std::sync::OnceLock<LeaseToken>,
    /// When the lease was last known to be ours: just before the `begin` that
    /// acquired it, or the latest `renew` that found it.
    confirmed_at: Mutex<tokio::time::Instant>,
    /// Where the flight is, and its followers' wake-up. One `Notify`, not a
    /// `watch` channel: a `watch` send wakes eight shards of waiters, sixteen
    /// lock round trips for the two sends of every run, most often with
    /// nobody waiting.
    outcome: Mutex<FlightOutcome>,
    changed: tokio::sync::Notify,
    /// Set by [`Idempotency::abandon_leases`]: the lease is left to expire,
    /// and its `Drop` must not release it.
    abandoned: std::sync::atomic::AtomicBool,
}

impl Flight {
    fn new(key: String, fingerprint: Fingerprint) -> Self {
        Self {
            key,
            fingerprint,
            abandoned: std::sync::atomic::AtomicBool::new(false),
            lease: std::sync::OnceLock::new(),
            confirmed_at: Mutex::new(tokio::time::Instant::now()),
            outcome: Mutex::new(FlightOutcome::Running),
            changed: tokio::sync::Notify::new(),
        }
    }

    /// Records that the store held the lease as of `asked_at` (when the
    /// request that found it was sent).
    fn confirm(&self, asked_at: tokio::time::Instant) {
        let mut confirmed = lock(&self.confirmed_at);
        *confirmed = (*confirmed).max(asked_at);
    }

    /// Until when the lease is surely ours, if nothing renews it: `lease_ttl`
    /// after it was last confirmed.
    fn lease_ours_until(&self, lease_ttl: Duration) -> tokio::time::Instant {
        later(*lock(&self.confirmed_at), lease_ttl)
    }

    /// Moves the flight on, and wakes its followers.
    fn set(&self, outcome: FlightOutcome) {
        *lock(&self.outcome) = outcome;
        self.changed.notify_waiters();
    }

    /// Waits until the outcome satisfies `reached`, and answers it. Every
    /// flight ends with an outcome (the leader's guards see to it), so this
    /// ends when the flight does.
    async fn wait_for(&self, reached: impl Fn(&FlightOutcome) -> bool) -> FlightOutcome {
        loop {
            // Registered before the outcome is read, so a change between the
            // read and the await still wakes this waiter.
            let mut changed = pin!(self.changed.notified());
            changed.as_mut().enable();
            {
                let outcome = lock(&self.outcome);
                if reached(&outcome) {
                    return outcome.clone();
                }
            }
            changed.await;
        }
    }
}

/// A flight in the engine's set, found by its key.
struct FlightEntry(Arc<Flight>);

impl Borrow<str> for FlightEntry {
    fn borrow(&self) -> &str {
        &self.0.key
    }
}

// Hashed and compared as its key, as `Borrow<str>` requires.
impl std::hash::Hash for FlightEntry {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.key.as_str().hash(state);
    }
}

impl PartialEq for FlightEntry {
    fn eq(&self, other: &Self) -> bool {
        self.0.key == other.0.key
    }
}

impl Eq for FlightEntry {}

#[derive(Clone)]
enum FlightOutcome {
    /// The leader is asking the store: the key may well hold a result.
    Running,
    /// The leader holds the lease and runs the action.
    Executing,
    /// The store answered that another process runs the action; the leader
    /// (under `Wait`) polls it until it ends.
    InFlightElsewhere,
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
                config: RwLock::new(config),
                stats: Stats::default(),
                removals_baseline: [AtomicU64::new(0), AtomicU64::new(0)],
                flights: Mutex::new(HashSet::default()),
                heartbeat: Mutex::new(None),
                auto_cleanup: Mutex::new(None),
                releases: PendingReleases::default(),
            }),
        }
    }

    /// The effective configuration: as built, with the changes made by
    /// [`configure`](Self::configure) since.
    pub fn config(&self) -> Config {
        self.inner.config()
    }

    /// Leaves every lease this process holds to expire instead of releasing
    /// it, and stops renewing them: for a process about to exit while
    /// actions still run (a graceful shutdown whose drain timed out). Their
    /// outcome is unknown, so their keys must not be freed for a retry; each
    /// is counted in `ambiguous`. A run that still completes stores its
    /// result as usual.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// use tower_idempotency::{Begin, Fingerprint, Idempotency};
    ///
    /// let engine = Idempotency::new();
    /// let fp = Fingerprint::of_bytes(b"job");
    /// let Begin::Execute(lease) = engine.begin("k", fp).await.unwrap() else { panic!() };
    /// engine.abandon_leases();
    /// drop(lease); // not released
    /// assert!(matches!(engine.begin("k", fp).await.unwrap(), Begin::Conflict { .. }));
    /// # }
    /// ```
    pub fn abandon_leases(&self) {
        let held: Vec<Arc<Flight>> = lock(&self.inner.flights)
            .iter()
            .filter(|FlightEntry(flight)| flight.lease.get().is_some())
            .map(|FlightEntry(flight)| flight.clone())
            .collect();
        for flight in held {
            if !flight.abandoned.swap(true, Relaxed) {
                Stats::incr(&self.inner.stats.here().ambiguous);
                tracing::warn!(
                    key = flight.key.as_str(),
                    "idempotency lease abandoned at shutdown: left to its marker's TTL"
                );
            }
            // Out of the map, so the heartbeat no longer renews it.
            let mut flights = lock(&self.inner.flights);
            if flights
                .get(flight.key.as_str())
                .is_some_and(|current| Arc::ptr_eq(&current.0, &flight))
            {
                flights.remove(flight.key.as_str());
            }
        }
    }

    /// The store: for the crate's own frontends (the transactional form of
    /// `execute`, the layer's record bound); everything else reaches it
    /// through the engine.
    pub(crate) fn store(&self) -> &S {
        &self.inner.store
    }

    pub(crate) fn counters(&self) -> &Stats {
        &self.inner.stats
    }

    /// Begins the action named by `key` for a request with `fingerprint`,
    /// under the engine's [`Concurrent`] policy (its [`config`](Self::config)
    /// when the call is made).
    ///
    /// # Errors
    ///
    /// The [`StoreError`] of a store that failed (counted in `store_errors`).
    pub async fn begin(
        &self,
        key: impl Into<String>,
        fingerprint: Fingerprint,
    ) -> Result<Begin<S>, StoreError> {
        self.begin_under(key.into(), fingerprint, None).await
    }

    /// [`begin`](Self::begin) under `concurrent` for this call instead of the
    /// engine's policy: for a frontend whose answer to a duplicate differs
    /// from the configured one (as [`execute`](Self::execute) always waits,
    /// having no "come back later" to give its caller).
    ///
    /// # Errors
    ///
    /// The [`StoreError`] of a store that failed (counted in `store_errors`).
    pub async fn begin_with(
        &self,
        key: impl Into<String>,
        fingerprint: Fingerprint,
        concurrent: Concurrent,
    ) -> Result<Begin<S>, StoreError> {
        self.begin_under(key.into(), fingerprint, Some(concurrent))
            .await
    }

    async fn begin_under(
        &self,
        key: String,
        fingerprint: Fingerprint,
        concurrent: Option<Concurrent>,
    ) -> Result<Begin<S>, StoreError> {
        if let Some(begun) = self.begin_local(&key, fingerprint) {
            return Ok(begun);
        }
        // Boxed, so that a replay answered above does not carry (or move)
        // the state of a flight and a store round trip.
        Box::pin(self.begin_in_store(key, fingerprint, concurrent)).await
    }

    /// What [`begin`](Self::begin) answers when the store holds the key's
    /// record in process: a replay, or a mismatch, counted, with no flight
    /// and no `await` (a stored record never changes). `None` when the store
    /// holds no such copy: then the answer takes
    /// [`begin_in_store`](Self::begin_in_store).
    pub(crate) fn begin_local(&self, key: &str, fingerprint: Fingerprint) -> Option<Begin<S>> {
        let record = self.inner.store.local_record(key)?;
        let result = Ok(replay_or_mismatch(record, fingerprint, false));
        self.count(&result);
        result.ok()
    }

    /// [`begin`](Self::begin) past the in-process copy: the flight, then the
    /// store. `concurrent`: the policy of this call, `None` for the engine's.
    pub(crate) fn begin_in_store(
        &self,
        key: String,
        fingerprint: Fingerprint,
        concurrent: Option<Concurrent>,
    ) -> impl Future<Output = Result<Begin<S>, StoreError>> + Send + '_ {
        let concurrent = concurrent.unwrap_or_else(|| self.inner.config().concurrent);
        let deadline = match concurrent {
            Concurrent::Wait { timeout } => {
                Some(tokio::time::Instant::now() + timeout.min(MAX_DURATION))
            }
            Concurrent::Reject => None,
        };
        // A combinator, not an `async` block: a block that awaits the
        // future it holds keeps it twice, and this one is most of a first
        // request's (boxed) state.
        self.begin_inner(key, fingerprint, deadline)
            .inspect(move |result| self.count(result))
    }

    fn count(&self, result: &Result<Begin<S>, StoreError>) {
        let stats = &self.inner.stats;
        match result {
            Ok(Begin::Execute(_)) => Stats::incr(&stats.here().executed),
            Ok(Begin::Replay {
                coalesced: true, ..
            }) => Stats::incr(&stats.here().coalesced),
            Ok(Begin::Replay { .. }) => Stats::incr(&stats.here().replayed),
            Ok(Begin::Mismatch) => Stats::incr(&stats.here().mismatches),
            Ok(Begin::Conflict { .. }) => Stats::incr(&stats.here().conflicts),
            Err(_) => Stats::incr(&stats.here().store_errors),
        }
    }

    /// Joins the key's flight as a follower, or starts it and leads it; a
    /// follower sent to start over (the flight ended without a result) goes
    /// round again, and may lead the next flight.
    async fn begin_inner(
        &self,
        mut key: String,
        fingerprint: Fingerprint,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<Begin<S>, StoreError> {
        let mut waited = false;
        loop {
            match self.join_flight(key, fingerprint) {
                Joined::Leading(flight) => {
                    return self
                        .lead_flight(flight, fingerprint, deadline, waited)
                        .await;
                }
                Joined::Following(flight, given_back) => {
                    key = given_back;
                    // Boxed, for the reason given in `lead`: a duplicate
                    // in this process is rare, a first request is not.
                    match Box::pin(follow(&flight, fingerprint, deadline)).await {
                        Followed::Answer(begun) => return Ok(begun),
                        Followed::StartOver { waited: now } => waited |= now,
                    }
                }
            }
        }
    }

    /// The key's flight in this process: the one running (and the key back),
    /// or a new one this caller leads, which takes the key.
    fn join_flight(&self, key: String, fingerprint: Fingerprint) -> Joined {
        let mut flights = lock(&self.inner.flights);
        match flights.get(key.as_str()) {
            Some(FlightEntry(flight)) => Joined::Following(flight.clone(), key),
            None => {
                let flight = Arc::new(Flight::new(key, fingerprint));
                flights.insert(FlightEntry(flight.clone()));
                Joined::Leading(flight)
            }
        }
    }

    /// The leader's turn: asks the store (see [`lead`](Self::lead)), turns
    /// its answer into the caller's, and ends the flight unless the caller
    /// now holds the lease.
    async fn lead_flight(
        &self,
        flight: Arc<Flight>,
        fingerprint: Fingerprint,
        deadline: Option<tokio::time::Instant>,
        waited: bool,
    ) -> Result<Begin<S>, StoreError> {
        // If this future is dropped while the store answers, the guard ends
        // the flight, so followers start over instead of waiting on a leader
        // that is gone, and releases the token the store was asked for: it
        // may have written the marker.
        let mut leading = Leading {
            engine: self,
            flight: &flight,
            asked: None,
        };
        let led = self
            .lead(&flight, fingerprint, deadline, &mut leading.asked)
            .await;
        if let Some(token) = leading.asked.take() {
            // The store failed to answer: the marker may be written.
            self.release_later(flight.key.clone(), token, self.marker_expiry());
        }
        std::mem::forget(leading);
        let (outcome, begun) = match led {
            Ok(Led::Acquired { token, asked_at }) => {
                flight.confirm(asked_at);
                let _ = flight.lease.set(token);
                flight.set(FlightOutcome::Executing);
                self.start_heartbeat();
                return Ok(Begin::Execute(Lease {
                    engine: self.clone(),
                    token,
                    flight,
                    state: LeaseState::Held,
                }));
            }
            Ok(Led::Completed(record)) => (
                FlightOutcome::Completed(record.clone()),
                Ok(replay_or_mismatch(record, fingerprint, waited)),
            ),
            Ok(Led::Mismatch) => (FlightOutcome::Released, Ok(Begin::Mismatch)),
            Ok(Led::Conflict) => (FlightOutcome::Released, Ok(conflict())),
            Err(error) => (FlightOutcome::Released, Err(error)),
        };
        self.end_flight(&flight, outcome);
        begun
    }

    /// The leader's part: ask the store, and under `Wait` poll it (with
    /// backoff, within the deadline) while another process holds the lease.
    /// `asked` holds the token of a `begin` sent and not answered (the store
    /// failed, or this future is dropped meanwhile): the store may have
    /// written its marker.
    async fn lead(
        &self,
        flight: &Flight,
        fingerprint: Fingerprint,
        deadline: Option<tokio::time::Instant>,
        asked: &mut Option<LeaseToken>,
    ) -> Result<Led, StoreError> {
        let key = flight.key.as_str();
        let marker_ttl = self.inner.config().marker_ttl();
        let mut backoff = Duration::from_millis(5);
        loop {
            let token = LeaseToken::random();
            let asked_at = tokio::time::Instant::now();
            *asked = Some(token);
            let answer = self
                .inner
                .store
                .begin(key, fingerprint, token, marker_ttl)
                .await;
            // Only an unanswered `begin` may have written unseen: any answer,
            // a decoding error included, says what the key holds.
            if !matches!(answer, Err(StoreError::Unavailable(_))) {
                *asked = None;
            }
            match answer? {
                BeginOutcome::Acquired => return Ok(Led::Acquired { token, asked_at }),
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
                    // Duplicates under `Reject` need not wait for the polls.
                    flight.set(FlightOutcome::InFlightElsewhere);
                    // Until the next poll, or until the store announces that
                    // the key changed (Redis pub/sub), whichever is first.
                    // Boxed: a wait on another process is rare, and its timer
                    // would otherwise make every first request's (boxed)
                    // state larger by its size.
                    Box::pin(
                        self.inner
                            .store
                            .until_changed(key, deadline.min(now + backoff)),
                    )
                    .await;
                    backoff = (backoff * 2).min(Duration::from_millis(250));
                }
            }
        }
    }

    /// Removes `flight` from the map (if it is still the one there) and tells
    /// its followers how it ended.
    fn end_flight(&self, flight: &Arc<Flight>, outcome: FlightOutcome) {
        {
            let mut flights = lock(&self.inner.flights);
            let key = flight.key.as_str();
            if flights
                .get(key)
                .is_some_and(|current| Arc::ptr_eq(&current.0, flight))
            {
                flights.remove(key);
            }
        }
        flight.set(outcome);
    }

    /// Restarts the heartbeat with the current lease TTL's period, when it
    /// ran, and has it renew every held lease at once under the new TTL: a
    /// lease granted under a shorter one would otherwise run out before the
    /// first renewal of the new period, and another instance take it over.
    fn restart_heartbeat(&self) {
        let running = lock(&self.inner.heartbeat).take();
        if let Some(task) = running {
            task.abort();
            self.spawn_heartbeat(true);
        }
    }

    /// Makes sure the task that renews every held lease each third of the
    /// lease TTL runs: one per engine, started on first use, started again if
    /// the runtime it ran on has gone. It stops when the engine is dropped.
    fn start_heartbeat(&self) {
        self.spawn_heartbeat(false);
    }

    /// Starts the heartbeat unless it runs; `at_once`: its first round
    /// renews now rather than a period from now.
    fn spawn_heartbeat(&self, at_once: bool) {
        let mut task = lock(&self.inner.heartbeat);
        if task.as_ref().is_some_and(|task| !task.is_finished()) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let engine = Arc::downgrade(&self.inner);
        let period = (self.inner.config().lease_ttl / 3).max(Duration::from_millis(1));
        *task = Some(
            runtime
                .spawn(heartbeat(engine, period, at_once))
                .abort_handle(),
        );
    }

    /// When a marker written now would expire, if nothing renewed it.
    fn marker_expiry(&self) -> tokio::time::Instant {
        later(
            tokio::time::Instant::now(),
            self.inner.config().marker_ttl(),
        )
    }

    fn counted<T>(&self, result: Result<T, StoreError>) -> Result<T, StoreError> {
        if result.is_err() {
            Stats::incr(&self.inner.stats.here().store_errors);
        }
        result
    }
}

/// A leader asking the store. Dropped (its `begin` future was), it ends the
/// flight and releases the token of a `begin` still unanswered.
struct Leading<'a, S: Store> {
    engine: &'a Idempotency<S>,
    flight: &'a Arc<Flight>,
    asked: Option<LeaseToken>,
}

impl<S: Store> Drop for Leading<'_, S> {
    fn drop(&mut self) {
        if let Some(token) = self.asked.take() {
            let until = self.engine.marker_expiry();
            self.engine
                .release_later(self.flight.key.clone(), token, until);
        }
        self.engine.end_flight(self.flight, FlightOutcome::Released);
    }
}

enum Led {
    Acquired {
        token: LeaseToken,
        asked_at: tokio::time::Instant,
    },
    Completed(SharedRecord),
    Mismatch,
    Conflict,
}

/// Where [`Idempotency::join_flight`] put the caller.
enum Joined {
    Leading(Arc<Flight>),
    /// The flight followed, and the caller's key given back.
    Following(Arc<Flight>, String),
}

/// How a follower's wait ended.
enum Followed<S: Store> {
    /// The caller's answer, from the flight's outcome.
    Answer(Begin<S>),
    /// The flight ended without a result: begin again. `waited`: the caller
    /// waited under `Wait` (a replay found next is then coalesced).
    StartOver { waited: bool },
}

/// The answer to a duplicate that found a conflict.
fn conflict<S: Store>() -> Begin<S> {
    Begin::Conflict {
        retry_after: Duration::from_secs(1),
    }
}

/// The follower's turn: the answer a duplicate gets from the flight it
/// joined. No store round trip of its own.
async fn follow<S: Store>(
    flight: &Flight,
    fingerprint: Fingerprint,
    deadline: Option<tokio::time::Instant>,
) -> Followed<S> {
    if flight.fingerprint != fingerprint {
        return Followed::Answer(Begin::Mismatch);
    }
    let Some(deadline) = deadline else {
        // Under `Reject` a duplicate conflicts with a run, not with a leader
        // that is still asking the store: most often that leader finds the
        // stored result, and this caller replays it too. The wait lasts one
        // store answer.
        let answered = flight
            .wait_for(|o| !matches!(o, FlightOutcome::Running))
            .await;
        return match answered {
            FlightOutcome::Completed(record) => {
                Followed::Answer(replay_or_mismatch(record, fingerprint, false))
            }
            FlightOutcome::Executing | FlightOutcome::InFlightElsewhere => {
                Followed::Answer(conflict())
            }
            FlightOutcome::Released | FlightOutcome::Running => {
                Followed::StartOver { waited: false }
            }
        };
    };
    let ended = tokio::time::timeout_at(
        deadline,
        flight.wait_for(|o| matches!(o, FlightOutcome::Completed(_) | FlightOutcome::Released)),
    )
    .await;
    match ended {
        Err(_elapsed) => Followed::Answer(conflict()),
        Ok(FlightOutcome::Completed(record)) => {
            Followed::Answer(replay_or_mismatch(record, fingerprint, true))
        }
        Ok(_) => Followed::StartOver { waited: true },
    }
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

/// How many leases one [`Store::renew_many`] call renews: large enough that
/// thousands of leases cost a few round trips, small enough that one batch
/// (one pipeline, one statement) stays well within a store's time limit.
const HEARTBEAT_BATCH: usize = 500;

async fn heartbeat<S: Store>(engine: Weak<Inner<S>>, period: Duration, at_once: bool) {
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    if !at_once {
        // The first tick is now: a lease just begun needs no renewal yet.
        ticks.tick().await;
    }
    loop {
        ticks.tick().await;
        let Some(inner) = engine.upgrade() else {
            return;
        };
        let held: Vec<(LeaseToken, Arc<Flight>)> = lock(&inner.flights)
            .iter()
            .filter_map(|FlightEntry(flight)| Some((*flight.lease.get()?, flight.clone())))
            .collect();
        let marker_ttl = inner.config().marker_ttl();
        for batch in held.chunks(HEARTBEAT_BATCH) {
            let leases: Vec<(&str, LeaseToken)> = batch
                .iter()
                .map(|(token, flight)| (flight.key.as_str(), *token))
                .collect();
            let asked_at = tokio::time::Instant::now();
            let renewed = inner.store.renew_many(&leases, marker_ttl).await;
            if renewed.len() != batch.len() {
                // A store that answers a batch with the wrong count breaks
                // the trait's contract; nothing of it can be trusted.
                Stats::incr(&inner.stats.here().store_errors);
                tracing::warn!(
                    asked = batch.len(),
                    answered = renewed.len(),
                    "idempotency lease renewal answered the wrong number of leases"
                );
                continue;
            }
            for ((_, flight), result) in batch.iter().zip(renewed) {
                match result {
                    Ok(true) => flight.confirm(asked_at),
                    Ok(false) => {}
                    Err(error) => {
                        Stats::incr(&inner.stats.here().store_errors);
                        let key = flight.key.as_str();
                        tracing::warn!(%error, key, "idempotency lease renewal failed");
                    }
                }
            }
        }
    }
}

/// `instant + duration`, or a year on when that would overflow (a TTL of
/// `Duration::MAX`): far enough never to come in a process's lifetime.
fn later(instant: tokio::time::Instant, duration: Duration) -> tokio::time::Instant {
    instant
        .checked_add(duration)
        .unwrap_or_else(|| instant + Duration::from_secs(365 * 24 * 60 * 60))
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
    token: LeaseToken,
    flight: Arc<Flight>,
    state: LeaseState,
}

/// What dropping the lease must still do.
enum LeaseState {
    /// Release the key: the action did not produce a result to keep.
    Held,
    /// Finish storing this result in the background: `complete` was dropped
    /// before the store confirmed it.
    Completing(SharedRecord),
    /// Nothing: completed or released.
    Finished,
}

impl<S: Store> std::fmt::Debug for Lease<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("key", &self.flight.key)
            .field("token", &self.token)
            .finish()
    }
}

impl<S: Store> Lease<S> {
    /// The storage key this lease is for.
    pub fn key(&self) -> &str {
        &self.flight.key
    }

    /// Stores `record` as the key's result and hands it to the duplicates
    /// waiting in this process. Answers `false` when the lease had been lost
    /// (it expired and another caller took the key over): the record is then
    /// not stored.
    ///
    /// A write that fails (the store is unreachable or times out) is retried
    /// with backoff, each failure counted in `store_errors`, for as long as
    /// the lease is surely still ours: until one lease TTL after the store
    /// last confirmed it (the `begin`, or the latest renewal). The future
    /// ends when the record is stored or the retries give up. Dropped before
    /// then, it goes on storing the record in the background rather than
    /// releasing the key: the action ran, and its result is the only record
    /// that it did.
    ///
    /// Duplicates waiting in this process are handed `record` only once it
    /// is stored. Meanwhile they wait (within their own wait budget); if it
    /// is never stored (lease lost, retries exhausted) they start over as
    /// after a release, and find the key as the store holds it.
    ///
    /// # Errors
    ///
    /// The last [`StoreError`] once the retries gave up (logged with the
    /// key). The marker is not released: under `LeaseExpiry::Takeover` it
    /// expires with its lease TTL and a retry then runs the action again;
    /// under `LeaseExpiry::Block` it refuses retries until the record TTL.
    pub async fn complete(mut self, record: Record) -> Result<bool, StoreError> {
        let record = Arc::new(record);
        self.state = LeaseState::Completing(record.clone());
        let stored =
            complete_until_lease_expires(&self.engine, self.token, &self.flight, &record, false)
                .await;
        self.state = LeaseState::Finished;
        stored
    }

    /// Deletes the marker now, so the next retry runs the action.
    ///
    /// # Errors
    ///
    /// The [`StoreError`] of a store that failed; the engine then retries the
    /// release in the background until the store answers or the marker
    /// expires.
    pub async fn release(mut self) -> Result<(), StoreError> {
        let result = self
            .engine
            .inner
            .store
            .release(&self.flight.key, self.token)
            .await;
        self.state = LeaseState::Finished;
        if result.is_err() {
            self.release_later();
        }
        self.engine
            .end_flight(&self.flight, FlightOutcome::Released);
        self.engine.counted(result).map(drop)
    }

    /// Leaves the key to its marker: not released, no longer renewed. For an
    /// action that may have run but gave no definite answer (an upstream
    /// that timed out or broke the connection after the request was sent, a
    /// response body cut off after its head): releasing would let the next
    /// retry run it a second time, perhaps while the first still runs.
    ///
    /// The marker then lives out its TTL (the lease TTL since its last
    /// renewal; under [`LeaseExpiry::Block`] the record TTL), after which
    /// [`LeaseExpiry`] decides as for a process that died holding it:
    /// `Takeover` lets a retry run the action again, `Block` never does.
    /// Duplicates waiting in this process start over and find the marker:
    /// a conflict, or under [`Concurrent::Wait`] a wait until it goes.
    /// Counted in `ambiguous`.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// use tower_idempotency::{Begin, Fingerprint, Idempotency};
    ///
    /// let engine = Idempotency::new();
    /// let fp = Fingerprint::of_bytes(b"charge");
    /// let Begin::Execute(lease) = engine.begin("k", fp).await.unwrap() else { panic!() };
    /// // ... the payment provider's connection broke after the request went out.
    /// lease.abandon();
    /// assert!(matches!(engine.begin("k", fp).await.unwrap(), Begin::Conflict { .. }));
    /// assert_eq!(engine.stats().ambiguous, 1);
    /// # }
    /// ```
    pub fn abandon(mut self) {
        self.state = LeaseState::Finished;
        Stats::incr(&self.engine.inner.stats.here().ambiguous);
        tracing::warn!(
            key = self.flight.key.as_str(),
            "idempotency outcome unknown: the key is left to its marker's TTL, not released"
        );
        self.engine
            .end_flight(&self.flight, FlightOutcome::Released);
    }

    /// Hands the release to the engine's background queue.
    fn release_later(&self) {
        let marker_ttl = self.engine.inner.config().marker_ttl();
        let until = self.flight.lease_ours_until(marker_ttl);
        self.engine
            .release_later(self.flight.key.clone(), self.token, until);
    }
}

impl<S: Store> Drop for Lease<S> {
    fn drop(&mut self) {
        let state = std::mem::replace(&mut self.state, LeaseState::Finished);
        if matches!(state, LeaseState::Finished) {
            return;
        }
        if matches!(state, LeaseState::Held) && self.flight.abandoned.load(Relaxed) {
            // Left to expire by `abandon_leases`: the action may have run.
            self.engine
                .end_flight(&self.flight, FlightOutcome::Released);
            return;
        }
        let engine = self.engine.clone();
        let token = self.token;
        let flight = self.flight.clone();
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            engine.end_flight(&flight, FlightOutcome::Released);
            return;
        };
        match state {
            LeaseState::Completing(record) => {
                runtime.spawn(
                    async move {
                        let _ =
                            complete_until_lease_expires(&engine, token, &flight, &record, true)
                                .await;
                    }
                    .in_current_span(),
                );
            }
            // Release before telling the waiters, so the one that starts
            // over finds the key free rather than polling a stale marker.
            LeaseState::Held => {
                runtime.spawn(release_now(engine, token, flight).in_current_span());
            }
            LeaseState::Finished => {}
        }
    }
}

/// Releases a dropped lease's key, queueing the release to be retried if the
/// store fails, then tells the waiters.
async fn release_now<S: Store>(engine: Idempotency<S>, token: LeaseToken, flight: Arc<Flight>) {
    let key = flight.key.as_str();
    let result = engine.inner.store.release(key, token).await;
    if let Err(error) = engine.counted(result) {
        tracing::warn!(%error, key, "idempotency lease release failed; retrying in the background");
        let until = flight.lease_ours_until(engine.inner.config().marker_ttl());
        engine.release_later(key.to_owned(), token, until);
    }
    engine.end_flight(&flight, FlightOutcome::Released);
}
