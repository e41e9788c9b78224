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

mod admin;
#[cfg(feature = "test-util")]
#[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
pub mod conformance;
mod entry;
mod error;
mod estimate;
mod memory;
pub(crate) mod page;
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub mod postgres;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub mod redis;
mod transaction;

pub(crate) use admin::completed;
pub use admin::StoreAdmin;
pub use entry::{BeginOutcome, Entry, EntryKind, EntryState, LeaseToken, RemovalCounts, ScanEntry};
#[cfg(any(feature = "redis", feature = "postgres"))]
pub(crate) use error::each_failed;
pub use error::StoreError;
#[cfg(any(feature = "redis", feature = "postgres"))]
pub(crate) use estimate::Estimate;
pub use estimate::ESTIMATE_MAX_AGE;
pub use memory::{MemoryStore, MemoryStoreBuilder, DEFAULT_MAX_ENTRIES};
pub(crate) use page::{decode_cursor, encode_cursor};
// `KeyFilter` is public at the crate's root, its one path.
pub(crate) use page::KeyFilter;
pub use page::{KeyPage, Removal, MAX_PAGE_LIMIT};
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
