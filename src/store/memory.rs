//! The embedded store, on a moka `sync::Cache`.
//!
//! Every operation is synchronous underneath (a read, or a read and a write
//! under a striped lock that is never held across an `await`), so the
//! store's futures are as small as they get and ready when first polled.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::notification::RemovalCause;
use moka::ops::compute::Op;
use moka::sync::Cache;
use moka::Expiry;
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::{
    BeginOutcome, Entry, EntryKind, EntryState, LeaseToken, RemovalCounts, ScanEntry, Store,
    StoreError,
};
use crate::engine::ConfigError;
use crate::key::Fingerprint;
use crate::record::{now_ms, SharedRecord};
use crate::stats::CacheInfo;

/// How the store hashes keys: aHash, keyed at random per store, so clients
/// who choose their keys cannot aim them at one bucket, at a fraction of the
/// cost of the standard SipHash (which took a sixth of a miss).
type KeyHasher = ahash::RandomState;

/// The default entry bound.
pub const DEFAULT_MAX_ENTRIES: u64 = 10_000;

/// The in-process store: a moka cache bounded by entry count and, optionally,
/// by bytes, with a per-entry expiry (lease TTL for markers, record TTL for
/// records).
///
/// Cheap to clone: clones share one cache. It coordinates the tasks of one
/// process only; services that run on several machines need a shared store
/// (`RedisStore`, feature `redis`).
///
/// # Bounds
///
/// Without a byte bound, the cache holds at most `max_entries` entries. With
/// one, every entry weighs its stored bytes (key, headers, body), but never
/// less than `max_bytes / max_entries`, and the total weight stays within
/// `max_bytes`: so both bounds hold at once. Entries removed to stay within
/// bounds count as `evicted`, those whose TTL ran out as `expired`.
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
    cache: Cache<String, Slot, KeyHasher>,
    /// Serialises the read-then-write of one key's operations. Striped
    /// locks and plain `get`/`insert` cost a third of moka's per-key
    /// `and_compute_with`, which allocates a key lock and a waiter per call.
    stripes: Arc<Stripes>,
    counters: Arc<RemovalCounters>,
    max_entries: u64,
    weighs_bytes: bool,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("entries", &self.cache.entry_count())
            .field("max_entries", &self.max_entries)
            .finish()
    }
}

/// Builds a [`MemoryStore`].
#[derive(Debug, Clone)]
pub struct MemoryStoreBuilder {
    max_entries: u64,
    max_bytes: Option<u64>,
}

impl Default for MemoryStoreBuilder {
    fn default() -> Self {
        Self {
            max_entries: DEFAULT_MAX_ENTRIES,
            max_bytes: None,
        }
    }
}

impl MemoryStoreBuilder {
    /// The most entries (markers and records) held at once. Default 10,000.
    pub fn max_entries(mut self, max_entries: u64) -> Self {
        self.max_entries = max_entries;
        self
    }

    /// The most bytes of stored responses held at once. Default: no byte bound.
    pub fn max_bytes(mut self, max_bytes: u64) -> Self {
        self.max_bytes = Some(max_bytes);
        self
    }

    /// Builds the store.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] for a zero entry or byte bound.
    pub fn build(self) -> Result<MemoryStore, ConfigError> {
        if self.max_entries == 0 {
            return Err(ConfigError::new("max_entries must be at least 1"));
        }
        if self.max_bytes == Some(0) {
            return Err(ConfigError::new("max_bytes must be at least 1"));
        }
        Ok(self.assemble())
    }

    /// Builds a store from bounds already checked to be non-zero.
    fn assemble(self) -> MemoryStore {
        let counters = Arc::new(RemovalCounters::default());
        let listener_counters = counters.clone();
        let builder = Cache::builder().expire_after(SlotExpiry).eviction_listener(
            move |_key, _slot, cause| match cause {
                RemovalCause::Expired => {
                    listener_counters.expired.fetch_add(1, Relaxed);
                }
                RemovalCause::Size => {
                    listener_counters.evicted.fetch_add(1, Relaxed);
                }
                RemovalCause::Explicit | RemovalCause::Replaced => {}
            },
        );
        let cache = match self.max_bytes {
            None => builder
                .max_capacity(self.max_entries)
                .build_with_hasher(KeyHasher::new()),
            Some(max_bytes) => {
                let floor = max_bytes.div_ceil(self.max_entries);
                builder
                    .max_capacity(max_bytes)
                    .weigher(move |key: &String, slot: &Slot| {
                        let weight = (key.len() + slot.stored_size()) as u64;
                        u32::try_from(weight.max(floor)).unwrap_or(u32::MAX)
                    })
                    .build_with_hasher(KeyHasher::new())
            }
        };
        MemoryStore {
            cache,
            stripes: Arc::new(Stripes::new()),
            counters,
            max_entries: self.max_entries,
            weighs_bytes: self.max_bytes.is_some(),
        }
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

impl MemoryStore {
    /// Entries whose TTL has not run out. moka's timer wheel drops expired
    /// entries only about a second late, so `entry_count` may still hold them.
    fn live_entries(&self) -> u64 {
        let now = Instant::now();
        self.cache
            .iter()
            .filter(|(_, slot)| slot.is_live(now))
            .count() as u64
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

/// How many locks keys are spread over: enough that unrelated keys rarely
/// wait for each other on a many-core machine.
const STRIPES: usize = 64;

struct Stripes {
    hasher: KeyHasher,
    locks: Box<[Mutex<()>]>,
}

impl Stripes {
    fn new() -> Self {
        Self {
            hasher: KeyHasher::new(),
            locks: (0..STRIPES).map(|_| Mutex::new(())).collect(),
        }
    }

    /// Holds `key`'s stripe: every change to `key` happens under it.
    fn lock(&self, key: &str) -> MutexGuard<'_, ()> {
        let stripe = self.hasher.hash_one(key) as usize % STRIPES;
        // The lock guards no data of its own (only the order of reads and
        // writes to the cache), so a poisoned one is as good as any.
        self.locks[stripe]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

#[derive(Debug, Default)]
struct RemovalCounters {
    expired: AtomicU64,
    evicted: AtomicU64,
}

#[derive(Clone)]
struct Slot {
    state: EntryState,
    ttl: Duration,
    expires_at: Instant,
    created_at_ms: u64,
}

impl Slot {
    fn new(state: EntryState, ttl: Duration, created_at_ms: u64) -> Self {
        Self {
            state,
            ttl,
            expires_at: Instant::now() + ttl,
            created_at_ms,
        }
    }

    fn stored_size(&self) -> usize {
        match &self.state {
            EntryState::InFlight { .. } => 0,
            EntryState::Completed(record) => record.stored_size(),
        }
    }

    fn is_live(&self, now: Instant) -> bool {
        self.expires_at > now
    }

    fn held_by(&self, lease: LeaseToken, now: Instant) -> bool {
        self.is_live(now)
            && matches!(self.state, EntryState::InFlight { lease: held, .. } if held == lease)
    }

    fn to_entry(&self, now: Instant) -> Entry {
        Entry {
            state: self.state.clone(),
            expires_in: self.expires_at.saturating_duration_since(now),
        }
    }
}

struct SlotExpiry;

impl Expiry<String, Slot> for SlotExpiry {
    fn expire_after_create(&self, _key: &String, slot: &Slot, _at: Instant) -> Option<Duration> {
        Some(slot.ttl)
    }

    fn expire_after_update(
        &self,
        _key: &String,
        slot: &Slot,
        _at: Instant,
        _remaining: Option<Duration>,
    ) -> Option<Duration> {
        Some(slot.ttl)
    }
}

impl MemoryStore {
    /// The live slot under `key`.
    fn live(&self, key: &str, now: Instant) -> Option<Slot> {
        self.cache.get(key).filter(|slot| slot.is_live(now))
    }

    /// Applies `op` to the slot under `key` only while `lease` holds it
    /// (fencing), atomically for that key: under the key's stripe. Answers
    /// whether it applied.
    fn if_held(&self, key: &str, lease: LeaseToken, op: impl FnOnce(Slot) -> Op<Slot>) -> bool {
        let _stripe = self.stripes.lock(key);
        let now = Instant::now();
        match self.live(key, now) {
            Some(slot) if slot.held_by(lease, now) => match op(slot) {
                Op::Put(slot) => {
                    self.cache.insert(key.to_owned(), slot);
                    true
                }
                Op::Remove => {
                    self.cache.invalidate(key);
                    true
                }
                _ => false,
            },
            _ => false,
        }
    }
}

impl Store for MemoryStore {
    async fn begin(
        &self,
        key: &str,
        fingerprint: Fingerprint,
        lease: LeaseToken,
        lease_ttl: Duration,
    ) -> Result<BeginOutcome, StoreError> {
        let found = |slot: Slot, now: Instant| match slot.state {
            EntryState::Completed(record) => BeginOutcome::Completed(record),
            EntryState::InFlight { fingerprint, .. } => BeginOutcome::InFlight {
                fingerprint,
                expires_in: slot.expires_at.saturating_duration_since(now),
            },
        };
        // The engine reads completed records through `local_record` before
        // it begins, so this read is under the lock.
        let _stripe = self.stripes.lock(key);
        let now = Instant::now();
        if let Some(slot) = self.live(key, now) {
            return Ok(found(slot, now));
        }
        let marker = Slot::new(
            EntryState::InFlight { fingerprint, lease },
            lease_ttl,
            now_ms(),
        );
        self.cache.insert(key.to_owned(), marker);
        Ok(BeginOutcome::Acquired)
    }

    fn local_record(&self, key: &str) -> Option<SharedRecord> {
        // moka answers no entry past its expiry, which it stamps a moment
        // after the slot's own `expires_at`: for a record, that moment is
        // not worth a second clock read on every replay.
        match self.cache.get(key)?.state {
            EntryState::Completed(record) => Some(record),
            EntryState::InFlight { .. } => None,
        }
    }

    async fn renew(
        &self,
        key: &str,
        lease: LeaseToken,
        lease_ttl: Duration,
    ) -> Result<bool, StoreError> {
        Ok(self.if_held(key, lease, |slot| {
            Op::Put(Slot::new(slot.state, lease_ttl, slot.created_at_ms))
        }))
    }

    async fn complete(
        &self,
        key: &str,
        lease: LeaseToken,
        record: SharedRecord,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let created_at_ms = record.created_at_ms;
        Ok(self.if_held(key, lease, |_| {
            Op::Put(Slot::new(EntryState::Completed(record), ttl, created_at_ms))
        }))
    }

    async fn release(&self, key: &str, lease: LeaseToken) -> Result<bool, StoreError> {
        Ok(self.if_held(key, lease, |_| Op::Remove))
    }

    async fn put(&self, key: &str, record: SharedRecord, ttl: Duration) -> Result<(), StoreError> {
        let created_at_ms = record.created_at_ms;
        let _stripe = self.stripes.lock(key);
        self.cache.insert(
            key.to_owned(),
            Slot::new(EntryState::Completed(record), ttl, created_at_ms),
        );
        Ok(())
    }

    async fn get(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        let now = Instant::now();
        Ok(self
            .cache
            .get(key)
            .filter(|slot| slot.is_live(now))
            .map(|slot| slot.to_entry(now)))
    }

    async fn remove(&self, key: &str) -> Result<bool, StoreError> {
        let _stripe = self.stripes.lock(key);
        let now = Instant::now();
        Ok(self.cache.remove(key).is_some_and(|slot| slot.is_live(now)))
    }

    async fn clear(&self) -> Result<(), StoreError> {
        self.cache.invalidate_all();
        self.cache.run_pending_tasks();
        Ok(())
    }

    async fn scan(&self) -> Result<Vec<ScanEntry>, StoreError> {
        let now = Instant::now();
        Ok(self
            .cache
            .iter()
            .filter(|(_, slot)| slot.is_live(now))
            .map(|(key, slot)| ScanEntry {
                key: key.as_ref().clone(),
                kind: match slot.state {
                    EntryState::InFlight { .. } => EntryKind::InFlight,
                    EntryState::Completed(_) => EntryKind::Completed,
                },
                expires_in: slot.expires_at.saturating_duration_since(now),
                created_at_ms: slot.created_at_ms,
            })
            .collect())
    }

    async fn len(&self) -> Result<u64, StoreError> {
        self.cache.run_pending_tasks();
        Ok(self.live_entries())
    }

    async fn info(&self) -> Result<CacheInfo, StoreError> {
        self.cache.run_pending_tasks();
        Ok(CacheInfo {
            entries: self.live_entries(),
            max_entries: Some(self.max_entries),
            // Without a byte bound every entry weighs 1: that is no byte count.
            weighted_bytes: if self.weighs_bytes {
                self.cache.weighted_size()
            } else {
                0
            },
        })
    }

    fn removal_counts(&self) -> RemovalCounts {
        RemovalCounts {
            expired: self.counters.expired.load(Relaxed),
            evicted: self.counters.evicted.load(Relaxed),
        }
    }

    async fn cleanup_expired(&self) -> Result<(), StoreError> {
        self.cache.run_pending_tasks();
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}
