//! Stores: where in-flight markers and records live.
//!
//! A [`Store`] is a small set of single-key atomic operations. It knows
//! nothing of HTTP or of the engine's policies; the engine
//! ([`Idempotency`](crate::Idempotency)) is its only caller. Keys are the text
//! form of an [`IdempotencyKey`](crate::IdempotencyKey).
//!
//! The contract every store keeps:
//!
//! * [`begin`](Store::begin) is atomic: of any number of concurrent callers
//!   for one key, exactly one gets [`BeginOutcome::Acquired`]; the others see
//!   the marker ([`BeginOutcome::InFlight`]) or the record.
//! * [`complete`](Store::complete), [`renew`](Store::renew) and
//!   [`release`](Store::release) act only when the marker still carries the
//!   caller's [`LeaseToken`] (fencing): a lease that expired and was taken over
//!   cannot overwrite or delete the newer holder's marker.
//! * Markers expire after the lease TTL they were written with, records after
//!   the record TTL; an expired entry is never returned.
//!
//! A store of your own implements [`Store`]'s four protocol methods (the
//! rest of it is optional) and works with the layer and
//! [`execute`](crate::Idempotency::execute); it implements [`StoreAdmin`] too
//! for the handle's listing and maintenance. The `conformance` suite
//! (feature `test-util`) proves both.
//!
//! The stores of this crate implement both: the embedded moka
//! [`MemoryStore`] lives here; the Redis store in `store::redis` (feature
//! `redis`) and the Postgres store in `store::postgres` (feature `postgres`),
//! each with its builder and defaults.

use std::future::Future;
use std::time::Duration;

pub use crate::engine::IntoStore;
use crate::key::Fingerprint;
pub use crate::record::{DecodeError, SharedRecord};
use crate::stats::CacheInfo;

#[cfg(feature = "test-util")]
#[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
pub mod conformance;
mod estimate;
mod memory;
mod page;
mod transaction;
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub mod postgres;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub mod redis;

pub(crate) use estimate::Estimate;
pub use estimate::ESTIMATE_MAX_AGE;
pub use memory::{MemoryStore, MemoryStoreBuilder, DEFAULT_MAX_ENTRIES};
pub(crate) use page::{decode_cursor, encode_cursor, page_of};
pub use page::{KeyFilter, KeyPage, Removal, MAX_PAGE_LIMIT};
pub use transaction::TransactionalStore;

/// The protocol a store keeps: in-flight markers and records, each under one
/// key.
///
/// **Implement these four: [`begin`](Self::begin), [`renew`](Self::renew),
/// [`complete`](Self::complete) and [`release`](Self::release); the rest are
/// optional.** A store with only the four works under the HTTP layer and
/// [`execute`](crate::Idempotency::execute). The optional methods have
/// defaults that are always correct; a store overrides them to be faster
/// ([`local_record`](Self::local_record),
/// [`until_changed`](Self::until_changed),
/// [`completed_record`](Self::completed_record)), to keep bounded space
/// ([`cleanup_expired`](Self::cleanup_expired)) or to report what it dropped
/// ([`removal_counts`](Self::removal_counts)).
///
/// Listing and maintenance (get, put, remove, clear, scan, ...) are the
/// second trait, [`StoreAdmin`]: the handle's queries and
/// [`mark_executed`](crate::Idempotency::mark_executed) need it, the
/// protocol does not.
///
/// Methods return `impl Future + Send` so that stores are used without boxing;
/// implement them with `async fn`.
///
/// # Example
///
/// A store of one process, with the protocol only (expiry left out for
/// brevity; a real store drops markers after their lease TTL and records
/// after their TTL, and `store::conformance` proves it):
///
/// ```
/// use std::collections::HashMap;
/// use std::sync::Mutex;
/// use std::time::Duration;
/// use tower_idempotency::store::{BeginOutcome, LeaseToken, SharedRecord, Store, StoreError};
/// use tower_idempotency::{Fingerprint, Idempotency};
///
/// enum Held {
///     InFlight(Fingerprint, LeaseToken),
///     Completed(SharedRecord),
/// }
///
/// #[derive(Default)]
/// struct MapStore(Mutex<HashMap<String, Held>>);
///
/// impl Store for MapStore {
///     async fn begin(
///         &self,
///         key: &str,
///         fingerprint: Fingerprint,
///         lease: LeaseToken,
///         lease_ttl: Duration,
///     ) -> Result<BeginOutcome, StoreError> {
///         let mut map = self.0.lock().map_err(|_| StoreError::backend("poisoned"))?;
///         Ok(match map.get(key) {
///             Some(Held::Completed(record)) => BeginOutcome::Completed(record.clone()),
///             Some(Held::InFlight(fingerprint, _)) => {
///                 BeginOutcome::InFlight { fingerprint: *fingerprint, expires_in: lease_ttl }
///             }
///             None => {
///                 map.insert(key.to_owned(), Held::InFlight(fingerprint, lease));
///                 BeginOutcome::Acquired
///             }
///         })
///     }
///
///     async fn renew(&self, key: &str, lease: LeaseToken, _: Duration) -> Result<bool, StoreError> {
///         let map = self.0.lock().map_err(|_| StoreError::backend("poisoned"))?;
///         Ok(matches!(map.get(key), Some(Held::InFlight(_, held)) if *held == lease))
///     }
///
///     async fn complete(
///         &self,
///         key: &str,
///         lease: LeaseToken,
///         record: SharedRecord,
///         _ttl: Duration,
///     ) -> Result<bool, StoreError> {
///         let mut map = self.0.lock().map_err(|_| StoreError::backend("poisoned"))?;
///         let ours = matches!(map.get(key), Some(Held::InFlight(_, held)) if *held == lease);
///         if ours {
///             map.insert(key.to_owned(), Held::Completed(record));
///         }
///         Ok(ours)
///     }
///
///     async fn release(&self, key: &str, lease: LeaseToken) -> Result<bool, StoreError> {
///         let mut map = self.0.lock().map_err(|_| StoreError::backend("poisoned"))?;
///         let ours = matches!(map.get(key), Some(Held::InFlight(_, held)) if *held == lease);
///         if ours {
///             map.remove(key);
///         }
///         Ok(ours)
///     }
/// }
///
/// let engine = Idempotency::builder().store(MapStore::default()).build().unwrap();
/// # drop(engine);
/// ```
pub trait Store: Send + Sync + 'static {
    /// Atomically: when `key` holds nothing, writes an in-flight marker with
    /// `lease` and `fingerprint` that expires after `lease_ttl`, and answers
    /// [`BeginOutcome::Acquired`]; otherwise answers what the key holds.
    fn begin(
        &self,
        key: &str,
        fingerprint: Fingerprint,
        lease: LeaseToken,
        lease_ttl: Duration,
    ) -> impl Future<Output = Result<BeginOutcome, StoreError>> + Send;

    /// Extends the marker's expiry to `lease_ttl` from now, if it still holds
    /// `lease`. Answers whether it did.
    fn renew(
        &self,
        key: &str,
        lease: LeaseToken,
        lease_ttl: Duration,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Optional: renews many leases at once, each as [`renew`](Self::renew)
    /// would: extends the marker's expiry to `lease_ttl` from now if it still
    /// holds its lease. Answers one result per lease, in the order given:
    /// whether that marker was renewed, or the error that kept the store
    /// from asking.
    ///
    /// The engine's heartbeat renews every lease it holds through this, in
    /// batches, each third of the lease TTL; a store that renews a batch in
    /// one round trip (a pipeline, one statement) keeps that round short
    /// however many leases are held. The default renews one lease after
    /// another.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// use std::time::Duration;
    /// use tower_idempotency::store::{LeaseToken, MemoryStore, Store};
    /// use tower_idempotency::Fingerprint;
    ///
    /// let store = MemoryStore::new();
    /// let (held, other) = (LeaseToken::random(), LeaseToken::random());
    /// let minute = Duration::from_secs(60);
    /// store.begin("a", Fingerprint::of_bytes(b"a"), held, minute).await.unwrap();
    /// let renewed = store.renew_many(&[("a", held), ("a", other), ("b", held)], minute).await;
    /// let renewed: Vec<bool> = renewed.into_iter().map(Result::unwrap).collect();
    /// assert_eq!(renewed, [true, false, false]);
    /// # }
    /// ```
    fn renew_many(
        &self,
        leases: &[(&str, LeaseToken)],
        lease_ttl: Duration,
    ) -> impl Future<Output = Vec<Result<bool, StoreError>>> + Send {
        async move {
            let mut renewed = Vec::with_capacity(leases.len());
            for &(key, lease) in leases {
                renewed.push(self.renew(key, lease, lease_ttl).await);
            }
            renewed
        }
    }

    /// Replaces the marker by `record`, expiring after `ttl`, if the marker
    /// still holds `lease`. Answers whether it did.
    fn complete(
        &self,
        key: &str,
        lease: LeaseToken,
        record: SharedRecord,
        ttl: Duration,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Deletes the marker if it still holds `lease`. Answers whether it did.
    fn release(
        &self,
        key: &str,
        lease: LeaseToken,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Optional: the completed record under `key`, if the key holds one. The
    /// engine asks only after a [`complete`](Self::complete) whose answer was
    /// lost and whose retry found no marker, to learn whether the first
    /// attempt landed.
    ///
    /// The default answers `None`: the engine then reports the lease as lost
    /// (`complete` answers `false`), although the record may be stored; the
    /// next retry finds it through [`begin`](Self::begin) all the same.
    fn completed_record(
        &self,
        key: &str,
    ) -> impl Future<Output = Result<Option<SharedRecord>, StoreError>> + Send {
        let _ = key;
        async { Ok(None) }
    }

    /// Optional: entries the store itself dropped since it was made (TTL ran
    /// out, or to stay within bounds), added to the engine's stats. Stores
    /// that cannot tell answer zeros, the default.
    fn removal_counts(&self) -> RemovalCounts {
        RemovalCounts::default()
    }

    /// Optional: drops expired entries now, where the store keeps them until
    /// a later maintenance pass (the engine's auto-cleanup task calls it).
    /// The default does nothing.
    fn cleanup_expired(&self) -> impl Future<Output = Result<(), StoreError>> + Send {
        async { Ok(()) }
    }

    /// Optional: the completed record under `key` when this store holds it in
    /// the process (the memory store; Redis's local tier), answered at once,
    /// without a round trip or an `await`; `None` when it does not, or holds
    /// no such copy (the default).
    ///
    /// A record never changes once stored, so the engine replays what this
    /// answers without joining the key's flight or taking any lock: a replay
    /// costs one local read. Anything else (a miss, an in-flight marker)
    /// goes on to [`begin`](Store::begin).
    fn local_record(&self, key: &str) -> Option<SharedRecord> {
        let _ = key;
        None
    }

    /// The largest record, in [stored size](crate::Record::stored_size),
    /// that the store keeps: `None` (the default) when it takes any. The
    /// layer records a larger response's head only, so that no record is
    /// reported stored and then dropped at once.
    fn max_record_size(&self) -> Option<usize> {
        None
    }

    /// Optional: resolves at `deadline`, or earlier when the store learns that
    /// `key` was completed or released by another process. The engine waits
    /// on it between polls of [`begin`](Store::begin) while another process
    /// holds the key's lease. The default waits until `deadline` (plain
    /// polling); a store that can announce changes (Redis pub/sub) wakes
    /// waiters early.
    fn until_changed(
        &self,
        key: &str,
        deadline: tokio::time::Instant,
    ) -> impl Future<Output = ()> + Send {
        let _ = key;
        tokio::time::sleep_until(deadline)
    }
}

/// Listing and maintenance: what the handle's queries
/// ([`Idempotency::keys`](crate::Idempotency::keys),
/// [`cache_info`](crate::Idempotency::cache_info),
/// [`remove`](crate::Idempotency::remove), ...) and
/// [`mark_executed`](crate::Idempotency::mark_executed) need of a store,
/// beyond the [`Store`] protocol. The stores of this crate implement both; a
/// store of your own may implement only [`Store`].
// `len` counts a remote backend's entries; an `is_empty` would be the same round trip.
#[allow(clippy::len_without_is_empty)]
pub trait StoreAdmin: Store {
    /// Writes `record` under `key`, expiring after `ttl`, whatever the key held.
    fn put(
        &self,
        key: &str,
        record: SharedRecord,
        ttl: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// What `key` holds, if anything.
    fn get(&self, key: &str) -> impl Future<Output = Result<Option<Entry>, StoreError>> + Send;

    /// Deletes whatever `key` holds, an in-flight marker too. Answers
    /// whether there was anything.
    fn remove(&self, key: &str) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Deletes what `key` holds unless it is a live in-flight marker, in one
    /// atomic step (a single script, statement or locked section, never a
    /// read then a delete: a marker written in between must not be deleted).
    fn remove_unless_in_flight(
        &self,
        key: &str,
    ) -> impl Future<Output = Result<Removal, StoreError>> + Send;

    /// One page of the live entries that `filter` matches: at most `limit`
    /// of them, from `cursor` (`None`: the first page; otherwise a
    /// [`KeyPage::next_cursor`] this store answered). A page costs about the
    /// same however many entries the store holds, where the store can
    /// (the crate's remote stores; the memory store walks its entries, at
    /// most its entry bound).
    ///
    /// The default lists every entry ([`scan`](Self::scan)) and answers a
    /// page of them in key order: right for any store, and O(n) per page.
    ///
    /// # Errors
    ///
    /// [`StoreError::InvalidCursor`] for a cursor this store did not answer.
    fn page(
        &self,
        filter: &KeyFilter,
        cursor: Option<&str>,
        limit: usize,
    ) -> impl Future<Output = Result<KeyPage, StoreError>> + Send {
        async move { page_of(self.scan().await?, filter, cursor, limit) }
    }

    /// Deletes every entry of this store (and only this store's, for a shared
    /// backend such as Redis under a prefix).
    fn clear(&self) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Every live entry, without its payload.
    fn scan(&self) -> impl Future<Output = Result<Vec<ScanEntry>, StoreError>> + Send;

    /// How many entries the store holds.
    fn len(&self) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Size and bounds of the store.
    fn info(&self) -> impl Future<Output = Result<CacheInfo, StoreError>> + Send;

    /// Writes the store answered as done although fewer replicas than it
    /// was asked to wait for acknowledged them in time, since it was made
    /// (the Redis store with
    /// [`replica_ack`](crate::store::redis::RedisStoreBuilder::replica_ack)):
    /// each holds on its primary, but a failover before replication catches
    /// up may lose it. Read from a counter in the process, no round trip. A
    /// store without replicas answers 0, the default.
    ///
    /// ```
    /// use tower_idempotency::store::{MemoryStore, StoreAdmin};
    ///
    /// assert_eq!(MemoryStore::new().unacknowledged_writes(), 0);
    /// ```
    fn unacknowledged_writes(&self) -> u64 {
        0
    }

    /// Size and bounds of the store from counters, or an estimate at most
    /// [`ESTIMATE_MAX_AGE`] old, never a walk of its entries per call: what a
    /// dashboard that polls may ask for. The default is [`info`](Self::info).
    fn info_estimate(&self) -> impl Future<Output = Result<CacheInfo, StoreError>> + Send {
        self.info()
    }

    /// Checks that the store answers (`/healthz`). The default asks for
    /// [`len`](Self::len).
    fn ping(&self) -> impl Future<Output = Result<(), StoreError>> + Send {
        async {
            self.len().await?;
            Ok(())
        }
    }
}

/// The record of an entry that holds one: the crate's stores answer
/// [`Store::completed_record`] from [`StoreAdmin::get`].
pub(crate) fn completed(entry: Option<Entry>) -> Option<SharedRecord> {
    match entry {
        Some(Entry {
            state: EntryState::Completed(record),
            ..
        }) => Some(record),
        _ => None,
    }
}

/// `error` as the answer of each of `leases` leases of a batch it failed
/// whole (the backend could not be asked at all).
#[cfg_attr(not(any(feature = "redis", feature = "postgres")), allow(dead_code))]
pub(crate) fn each_failed(error: StoreError, leases: usize) -> Vec<Result<bool, StoreError>> {
    let mut failed: Vec<_> = (1..leases).map(|_| Err(error.again())).collect();
    if leases > 0 {
        failed.push(Err(error));
    }
    failed
}

/// A random token that names one holder of one lease.
///
/// ```
/// use tower_idempotency::store::LeaseToken;
///
/// let token = LeaseToken::random();
/// assert_ne!(token, LeaseToken::random());
/// assert_eq!(LeaseToken::parse(&token.to_string()), Some(token));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LeaseToken(u128);

impl LeaseToken {
    /// A fresh token (128 random bits).
    pub fn random() -> Self {
        Self(rand::random())
    }

    /// The token as a number, for the crate's stores that keep it binary. A
    /// store of your own keeps its text form (`Display`, read back with
    /// [`parse`](Self::parse)).
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) const fn as_u128(self) -> u128 {
        self.0
    }

    /// A token from the number a store kept.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) const fn from_u128(value: u128) -> Self {
        Self(value)
    }

    /// Parses the 32 hex characters written by `Display`.
    pub fn parse(text: &str) -> Option<Self> {
        if text.len() != 32 {
            return None;
        }
        u128::from_str_radix(text, 16).ok().map(Self)
    }
}

impl std::fmt::Display for LeaseToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// What [`Store::begin`] found.
#[derive(Debug, Clone)]
pub enum BeginOutcome {
    /// The key was free; the caller's marker is written and the caller runs the action.
    Acquired,
    /// The action completed; here is its record.
    Completed(SharedRecord),
    /// Another caller holds the lease.
    InFlight {
        /// Fingerprint of the request that holds the lease.
        fingerprint: Fingerprint,
        /// Time left before the marker expires.
        expires_in: Duration,
    },
}

/// What a key holds.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The marker or the record.
    pub state: EntryState,
    /// Time left before the entry expires.
    pub expires_in: Duration,
}

/// The two things a key can hold.
#[derive(Debug, Clone)]
pub enum EntryState {
    /// An action is running under a lease.
    InFlight {
        /// Fingerprint of the request that holds the lease.
        fingerprint: Fingerprint,
        /// The lease's token.
        lease: LeaseToken,
    },
    /// The action completed.
    Completed(SharedRecord),
}

/// One entry as [`StoreAdmin::scan`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanEntry {
    /// The storage key.
    pub key: String,
    /// Marker or record.
    pub kind: EntryKind,
    /// Time left before the entry expires.
    pub expires_in: Duration,
    /// When the entry was written, in milliseconds since the Unix epoch.
    pub created_at_ms: u64,
}

/// Serialized as `{"key", "state": "in_flight"|"completed", "expires_in_ms",
/// "created_at_ms"}`, the form the proxy's `GET /keys` answers.
impl serde::Serialize for ScanEntry {
    fn serialize<Ser: serde::Serializer>(&self, serializer: Ser) -> Result<Ser::Ok, Ser::Error> {
        use serde::ser::SerializeStruct;
        let mut out = serializer.serialize_struct("ScanEntry", 4)?;
        out.serialize_field("key", &self.key)?;
        out.serialize_field("state", &self.kind)?;
        out.serialize_field("expires_in_ms", &(self.expires_in.as_millis() as u64))?;
        out.serialize_field("created_at_ms", &self.created_at_ms)?;
        out.end()
    }
}

/// Whether an entry is an in-flight marker or a completed record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    /// An in-flight marker.
    InFlight,
    /// A completed record.
    Completed,
}

/// Entries a store dropped by itself, since it was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RemovalCounts {
    /// Dropped because their TTL ran out.
    pub expired: u64,
    /// Dropped to stay within the store's bounds.
    pub evicted: u64,
}

/// A store operation that failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The backend could not be reached or did not answer.
    #[error("store unavailable: {0}")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A stored value could not be decoded.
    #[error("corrupt value under key {key:?}: {source}")]
    Corrupt {
        /// The key whose value is corrupt.
        key: String,
        /// What is wrong with it.
        #[source]
        source: DecodeError,
    },
    /// A listing's cursor that this store did not answer.
    #[error("the cursor is not one this store answered")]
    InvalidCursor,
    /// Any other backend failure.
    #[error("store error: {0}")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A write the database refused because it conflicted with a concurrent
    /// transaction (Postgres SQLSTATE `40001`, serialization failure, or
    /// `40P01`, deadlock), in a transaction at `REPEATABLE READ` or
    /// `SERIALIZABLE`: the transaction rolled back and nothing of it was
    /// kept. Calling again is safe and may succeed
    /// ([`is_retryable`](Self::is_retryable)).
    #[error("store write conflicted with a concurrent transaction: {0}")]
    SerializationFailure(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl StoreError {
    /// A backend that could not be reached, from any error.
    pub fn unavailable(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::Unavailable(error.into())
    }

    /// Any other backend failure, from any error.
    pub fn backend(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::Backend(error.into())
    }

    /// Whether the store could not be reached or did not answer in time
    /// ([`Unavailable`](Self::Unavailable)): the only failure on which
    /// [`FailMode::Open`](crate::FailMode::Open) lets a request through
    /// unprotected. Anything else means the store answered, with a value it
    /// cannot read (corrupt, foreign, of an unknown version) or an error: it
    /// cannot say whether the action already ran, so running it unprotected
    /// could run it twice. Such a request gets a 500 whatever the fail mode.
    ///
    /// ```
    /// use tower_idempotency::store::StoreError;
    ///
    /// assert!(StoreError::unavailable("connection refused").is_unavailable());
    /// assert!(!StoreError::backend("WRONGTYPE").is_unavailable());
    /// ```
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }

    /// Whether the operation failed only because it conflicted with a
    /// concurrent transaction ([`SerializationFailure`](Self::SerializationFailure)):
    /// nothing was committed, and the same call made again may succeed.
    ///
    /// ```
    /// use tower_idempotency::store::StoreError;
    ///
    /// assert!(StoreError::SerializationFailure("40001".into()).is_retryable());
    /// assert!(!StoreError::backend("WRONGTYPE").is_retryable());
    /// ```
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::SerializationFailure(_))
    }

    /// The same failure again, for each lease of a batch that one error
    /// failed ([`Store::renew_many`]): same kind, the source kept as text.
    #[cfg_attr(not(any(feature = "redis", feature = "postgres")), allow(dead_code))]
    pub(crate) fn again(&self) -> Self {
        let text = self.to_string();
        match self {
            Self::Unavailable(_) => Self::Unavailable(text.into()),
            Self::SerializationFailure(_) => Self::SerializationFailure(text.into()),
            _ => Self::Backend(text.into()),
        }
    }
}
