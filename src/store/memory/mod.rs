//! The embedded store: completed records in a moka `sync::Cache`, in-flight
//! markers beside it in striped maps.
//!
//! Every operation is synchronous underneath (a read, or a read and a write
//! under a striped lock that is never held across an `await`), so the
//! store's futures are as small as they get and ready when first polled.

mod admin;
mod builder;
mod markers;
mod records;
#[cfg(test)]
mod tests;

pub use builder::MemoryStoreBuilder;

use std::collections::hash_map;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::sync::Cache;
use std::sync::Mutex;

use self::markers::{expiry, make_room, take_held, Marker, RemovalCounters, Stripes};
use self::records::{RecordKey, Slot};
use super::{completed, BeginOutcome, LeaseToken, RemovalCounts, Store, StoreAdmin, StoreError};
use crate::key::Fingerprint;
use crate::record::{now_ms, SharedRecord};
use crate::stats::total;

/// How the store hashes keys: aHash, keyed at random per store, so clients
/// who choose their keys cannot aim them at one bucket, at a fraction of the
/// cost of the standard SipHash (which took a sixth of a miss).
type KeyHasher = ahash::RandomState;

/// The default entry bound.
pub const DEFAULT_MAX_ENTRIES: u64 = 10_000;

/// The in-process store: completed records in a moka cache bounded by entry
/// count and, optionally, by bytes, each expiring after its record TTL; and
/// in-flight markers beside the cache, each expiring after its lease TTL.
///
/// Cheap to clone: clones share one cache and one set of markers. It
/// coordinates the tasks of one process only; services that run on several
/// machines need a shared store (`RedisStore`, feature `redis`).
///
/// # Markers and records
///
/// A key holds an in-flight marker (its action runs under a lease) or a
/// completed record, never both. Markers are kept out of the cache, in the
/// striped maps whose locks order each key's operations: a miss writes the
/// cache once (the record, at `complete`), not twice, and a marker is never
/// weighed, counted against the bounds nor evicted. Markers are bounded by
/// the requests in flight, and one whose lease TTL ran out counts as absent
/// and is dropped (counted as `expired`) when its key is next touched, when
/// its map next needs room, or by
/// [`cleanup_expired`](Store::cleanup_expired).
///
/// # Bounds
///
/// The bounds apply to stored records, so a flood of requests in flight
/// never evicts a completed record. Without a byte bound, the cache holds at
/// most `max_entries` records. With one, every record weighs its stored bytes
/// (key, headers, body), but never less than `max_bytes / max_entries`, and
/// the total weight stays within `max_bytes`: so both bounds hold at once.
/// Records removed to stay within bounds count as `evicted`, entries whose
/// TTL ran out as `expired`.
///
/// # Eviction rule: the oldest go first
///
/// Every completed record is admitted, and the bounds are kept by evicting
/// the least recently used records (written or replayed longest ago): a
/// record is evicted only once `max_entries` newer or more recently used
/// records exist, or, under a byte bound, once the newer ones fill it. So
/// the retry of a recent request always finds its record, however full the
/// cache (moka's LRU policy; its default, TinyLFU, may turn a new record
/// away, and with it the result its retry needs).
///
/// # Example
///
/// ```
/// use tower_idempotency::store::MemoryStore;
///
/// let store = MemoryStore::builder()
///     .max_entries(50_000)
///     .max_bytes(64 * 1024 * 1024)
///     .build()
///     .unwrap();
/// # drop(store);
/// ```
#[derive(Clone)]
pub struct MemoryStore {
    /// Completed records only.
    cache: Cache<RecordKey, Slot, KeyHasher>,
    /// The in-flight markers, and the locks that serialise the
    /// read-then-write of one key's operations. Striped locks and plain
    /// `get`/`insert` cost a third of moka's per-key `and_compute_with`,
    /// which allocates a key lock and a waiter per call.
    stripes: Arc<Stripes>,
    counters: Arc<RemovalCounters>,
    /// Records written, for [`written`](Self::written).
    writes: Arc<AtomicU64>,
    /// Held by the writer running moka's pending work; see
    /// [`written`](Self::written).
    maintaining: Arc<Mutex<()>>,
    max_entries: u64,
    /// The byte bound, when records are weighed.
    max_bytes: Option<u64>,
    /// Entries a listing walked, for the tests that bound it.
    #[cfg(test)]
    walked: Arc<AtomicU64>,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("records", &self.cache.entry_count())
            .field("max_entries", &self.max_entries)
            .finish_non_exhaustive()
    }
}

impl MemoryStore {
    /// A builder with the defaults: 10,000 entries, no byte bound.
    pub fn builder() -> MemoryStoreBuilder {
        MemoryStoreBuilder::default()
    }

    /// A store with the defaults.
    pub fn new() -> Self {
        MemoryStoreBuilder::default().assemble()
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl Store for MemoryStore {
    fn max_record_size(&self) -> Option<usize> {
        self.max_bytes
            .map(|max| usize::try_from(max).unwrap_or(usize::MAX))
    }

    async fn begin(
        &self,
        key: &str,
        fingerprint: Fingerprint,
        lease: LeaseToken,
        lease_ttl: Duration,
    ) -> Result<BeginOutcome, StoreError> {
        let query = self.stripes.query(key);
        let mut markers = self.stripes.lock(query);
        let now = Instant::now();
        make_room(&mut markers, now, &self.counters);
        let entry = markers.entry(key.to_owned());
        if let hash_map::Entry::Occupied(held) = &entry {
            let marker = held.get();
            if marker.is_live(now) {
                return Ok(BeginOutcome::InFlight {
                    fingerprint: marker.fingerprint,
                    expires_in: marker.expires_in(now),
                });
            }
        }
        // The engine reads completed records through `local_record` before
        // it begins, so this read is under the lock, where a record cannot
        // appear or go meanwhile. `contains_key` first: it records no read
        // (a `get` queues one for moka's housekeeping on every first
        // request), and a record is rarely there, since `local_record` just
        // missed it.
        if let Some(slot) = self
            .cache
            .contains_key(&query)
            .then(|| self.live(query, now))
            .flatten()
        {
            if let hash_map::Entry::Occupied(expired) = entry {
                expired.remove();
                self.counters.expired(1);
            }
            return Ok(BeginOutcome::Completed(slot.record));
        }
        let marker = Marker {
            fingerprint,
            lease,
            expires_at: expiry(now, lease_ttl),
            created_at_ms: now_ms(),
        };
        match entry {
            // An expired marker: its lease is over, the new holder takes
            // the key over.
            hash_map::Entry::Occupied(mut expired) => {
                self.counters.expired(1);
                expired.insert(marker);
            }
            hash_map::Entry::Vacant(free) => {
                free.insert(marker);
            }
        }
        Ok(BeginOutcome::Acquired)
    }

    fn local_record(&self, key: &str) -> Option<SharedRecord> {
        // moka answers no entry past its expiry, which is the slot's own
        // `expires_at` (see `SlotExpiry`): no second clock read needed. The
        // cache holds no markers.
        self.cache
            .get(&self.stripes.query(key))
            .map(|slot| slot.record)
    }

    async fn renew(
        &self,
        key: &str,
        lease: LeaseToken,
        lease_ttl: Duration,
    ) -> Result<bool, StoreError> {
        let mut markers = self.stripes.lock(self.stripes.query(key));
        let now = Instant::now();
        let Some(marker) = markers.get_mut(key) else {
            return Ok(false);
        };
        if !marker.is_live(now) {
            markers.remove(key);
            self.counters.expired(1);
            return Ok(false);
        }
        if marker.lease != lease {
            return Ok(false);
        }
        marker.expires_at = expiry(now, lease_ttl);
        Ok(true)
    }

    async fn complete(
        &self,
        key: &str,
        lease: LeaseToken,
        record: SharedRecord,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let query = self.stripes.query(key);
        let mut markers = self.stripes.lock(query);
        let now = Instant::now();
        let record = self.fitted(key, record)?;
        let Some((key, _marker)) = take_held(&mut markers, key, lease, now, &self.counters) else {
            return Ok(false);
        };
        // Under the lock still: no `begin` sees the key free in between. The
        // marker's key becomes the record's: no second copy of it.
        self.cache
            .insert(query.record_key(key), Slot::new(record, ttl));
        drop(markers);
        self.written();
        Ok(true)
    }

    async fn release(&self, key: &str, lease: LeaseToken) -> Result<bool, StoreError> {
        let mut markers = self.stripes.lock(self.stripes.query(key));
        let now = Instant::now();
        Ok(take_held(&mut markers, key, lease, now, &self.counters).is_some())
    }

    async fn completed_record(&self, key: &str) -> Result<Option<SharedRecord>, StoreError> {
        Ok(completed(self.get(key).await?))
    }

    fn removal_counts(&self) -> RemovalCounts {
        RemovalCounts {
            expired: total(&self.counters, |removals| &removals.expired),
            evicted: total(&self.counters, |removals| &removals.evicted),
        }
    }

    async fn cleanup_expired(&self) -> Result<(), StoreError> {
        self.cache.run_pending_tasks();
        self.sweep_markers(Instant::now());
        Ok(())
    }
}
