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
mod flight;
mod handle;
mod heartbeat;
mod lease;
mod retry;
mod transaction;

pub use crate::store::page::KeyFilter;
pub use config::{
    Concurrent, Config, IdempotencyBuilder, IntoStore, LeaseExpiry, DEFAULT_LEASE_TTL, DEFAULT_TTL,
    DEFAULT_WAIT_TIMEOUT,
};

use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures_util::FutureExt;
use tokio::task::AbortHandle;

use crate::config::MAX_DURATION;
use crate::key::Fingerprint;
use crate::record::SharedRecord;
use crate::stats::Stats;
use crate::store::{MemoryStore, Store, StoreError};

pub use self::lease::Lease;

use self::flight::{replay_or_mismatch, FlightEntry};
use self::retry::PendingReleases;

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
