//! The embedded store: completed records in a moka `sync::Cache`, in-flight
//! markers beside it in striped maps.
//!
//! Every operation is synchronous underneath (a read, or a read and a write
//! under a striped lock that is never held across an `await`), so the
//! store's futures are as small as they get and ready when first polled.

use std::collections::hash_map::{self, HashMap};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::notification::RemovalCause;
use moka::policy::EvictionPolicy;
use moka::sync::Cache;
use moka::{Equivalent, Expiry};
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError, TryLockError};

use super::{
    completed, decode_cursor, encode_cursor, BeginOutcome, Entry, EntryKind, EntryState, KeyFilter,
    KeyPage, LeaseToken, Removal, RemovalCounts, ScanEntry, Store, StoreAdmin, StoreError,
};
use crate::config::{ConfigError, MAX_DURATION};
use crate::key::Fingerprint;
use crate::record::{now_ms, Payload, Record, SharedRecord, StoredResponse};
use crate::stats::{total, CacheInfo, Striped};

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
    /// The most completed records held at once. Default 10,000. In-flight
    /// markers are held beside them and do not count: they are bounded by
    /// the requests in flight.
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
        // LRU, not moka's default TinyLFU: TinyLFU's admission filter turns
        // away a new record that has been seen no more often than the one it
        // would evict, and a just-completed record has been seen once, like
        // every other: a full cache would throw away the newest results,
        // whose retries are the most likely to come.
        let builder = Cache::builder()
            .initial_capacity(initial_capacity(self.max_entries))
            .eviction_policy(EvictionPolicy::lru())
            .expire_after(SlotExpiry)
            .eviction_listener(move |_key, _slot, cause| match cause {
                RemovalCause::Expired => listener_counters.expired(1),
                RemovalCause::Size => {
                    listener_counters.here().evicted.fetch_add(1, Relaxed);
                }
                RemovalCause::Explicit | RemovalCause::Replaced => {}
            });
        let cache = match self.max_bytes {
            None => builder
                .max_capacity(self.max_entries)
                .build_with_hasher(KeyHasher::new()),
            Some(max_bytes) => {
                let floor = max_bytes.div_ceil(self.max_entries);
                builder
                    .max_capacity(max_bytes)
                    .weigher(move |key: &RecordKey, slot: &Slot| {
                        let weight = (key.text.len() + slot.record.stored_size()) as u64;
                        u32::try_from(weight.max(floor)).unwrap_or(u32::MAX)
                    })
                    .build_with_hasher(KeyHasher::new())
            }
        };
        MemoryStore {
            cache,
            stripes: Arc::new(Stripes::new()),
            counters,
            writes: Arc::new(AtomicU64::new(0)),
            maintaining: Arc::default(),
            max_entries: self.max_entries,
            max_bytes: self.max_bytes,
            #[cfg(test)]
            walked: Arc::default(),
        }
    }
}

/// The cache's table is made for the entry bound up front (up to
/// [`MAX_INITIAL_CAPACITY`]), not grown by doubling as records come: that
/// left more heap per record (`benches/memory.rs`: 1.18x a bare moka cache's
/// heap per entry grown, 1.12x made for the bound).
fn initial_capacity(max_entries: u64) -> usize {
    usize::try_from(max_entries).map_or(MAX_INITIAL_CAPACITY, |capacity| {
        capacity.min(MAX_INITIAL_CAPACITY)
    })
}

/// The most records the cache's table is made for up front; past it, the
/// table grows as records come.
const MAX_INITIAL_CAPACITY: usize = 1 << 20;

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

/// Every this many records written, the writer runs moka's pending work
/// itself (outside any stripe lock), unless another writer is running it.
/// moka does it on its own once 64 writes wait, and at the bound each write
/// evicts a record: the request that happened to trigger it paid for 64
/// evictions at once. Smaller batches shorten that tail, but moka's
/// `run_pending_tasks` waits for its lock, and a writer that waited out
/// another's batch paid for both: every 4 writes, or every write, then cost
/// more CPU for a longer tail, so the batch was 16. A writer now skips its
/// turn when the work is already running (its writes go to that batch or
/// the next), and batches of 4 cost no more CPU than batches of 16 did: in
/// `benches/concurrent.rs` (`PROFILE="first request"`, 12 alternating runs
/// twice), the first request's p99 at the bound fell from 76 µs to 48-58
/// µs, with p50 and CPU per request unchanged (and from 56 to 39 µs in 15
/// runs alternating with the build before). Batches of 2 took the p99 to
/// 45-50 µs but p50 up by a microsecond; a count per thread instead of one
/// count lined the two workers' turns up, and the skipped turn doubled the
/// next batch.
const MAINTAIN_EVERY: u64 = 4;

/// How many locks keys are spread over: enough that unrelated keys rarely
/// wait for each other on a many-core machine.
const STRIPES: usize = 64;

/// The in-flight markers of the keys of one stripe.
type Markers = HashMap<String, Marker, KeyHasher>;

struct Stripes {
    hasher: KeyHasher,
    stripes: Box<[Mutex<Markers>]>,
}

impl Stripes {
    fn new() -> Self {
        Self {
            hasher: KeyHasher::new(),
            // Each map hashes with keys of its own: with the stripes' hasher,
            // the keys of one stripe would share the low bits that pick
            // their buckets.
            stripes: (0..STRIPES)
                .map(|_| Mutex::new(Markers::with_hasher(KeyHasher::new())))
                .collect(),
        }
    }

    /// `key` with its hash, for the stripe and the cache.
    fn query<'a>(&self, key: &'a str) -> KeyQuery<'a> {
        KeyQuery {
            hash: self.hasher.hash_one(key),
            text: key,
        }
    }

    /// Holds `key`'s stripe: every change to `key` happens under it, and
    /// `key`'s marker, if any, lives in it.
    fn lock(&self, key: KeyQuery<'_>) -> MutexGuard<'_, Markers> {
        Self::hold(&self.stripes[key.hash as usize % STRIPES])
    }

    fn hold(stripe: &Mutex<Markers>) -> MutexGuard<'_, Markers> {
        // A map's own operations leave it whole even when they panic, and
        // nothing the store does under the lock is expected to panic on any
        // input, so a poisoned lock is as good as any.
        stripe.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Every stripe, one after the other.
    fn each(&self) -> impl Iterator<Item = MutexGuard<'_, Markers>> {
        self.stripes.iter().map(Self::hold)
    }
}

/// Records and markers dropped, striped: moka's housekeeping evicts on
/// whichever request runs it, one record per write at the bound.
type RemovalCounters = Striped<Removals>;

#[derive(Debug, Default)]
struct Removals {
    expired: AtomicU64,
    evicted: AtomicU64,
}

impl Striped<Removals> {
    fn expired(&self, dropped: usize) {
        if dropped > 0 {
            self.here().expired.fetch_add(dropped as u64, Relaxed);
        }
    }
}

/// An action in flight under a lease.
struct Marker {
    fingerprint: Fingerprint,
    lease: LeaseToken,
    expires_at: Instant,
    created_at_ms: u64,
}

impl Marker {
    fn is_live(&self, now: Instant) -> bool {
        self.expires_at > now
    }

    fn expires_in(&self, now: Instant) -> Duration {
        self.expires_at.saturating_duration_since(now)
    }

    fn state(&self) -> EntryState {
        EntryState::InFlight {
            fingerprint: self.fingerprint,
            lease: self.lease,
        }
    }
}

/// Drops the expired markers of one stripe; answers how many it dropped.
fn sweep(markers: &mut Markers, now: Instant) -> usize {
    let before = markers.len();
    markers.retain(|_, marker| marker.is_live(now));
    before - markers.len()
}

/// Before an insert that would grow (or rehash) the map, drops its expired
/// markers (counted as expired), so markers whose keys nobody touches again
/// do not pile up until a cleanup. Leaves at least as many free places as
/// live markers, so a sweep is paid for by as many inserts as it visited
/// markers, give or take the map's load factor.
fn make_room(markers: &mut Markers, now: Instant, counters: &RemovalCounters) {
    if markers.len() < markers.capacity() {
        return;
    }
    counters.expired(sweep(markers, now));
    markers.reserve(markers.len().max(1));
}

/// Takes `key`'s marker, and the key as the marker held it, out of its
/// stripe when it is live and held by `lease`; leaves any other live marker
/// in place, and drops an expired one (counted as expired).
fn take_held(
    markers: &mut Markers,
    key: &str,
    lease: LeaseToken,
    now: Instant,
    counters: &RemovalCounters,
) -> Option<(String, Marker)> {
    // One lookup on the usual path (the holder's own call); another
    // holder's marker goes back, with the key already allocated.
    let (key, marker) = markers.remove_entry(key)?;
    if !marker.is_live(now) {
        counters.expired(1);
        None
    } else if marker.lease == lease {
        Some((key, marker))
    } else {
        markers.insert(key, marker);
        None
    }
}

/// When an entry written at `now` with `ttl` expires: a TTL past
/// [`MAX_DURATION`] (a store is called with whatever TTL its caller has) is
/// cut to it, so the addition cannot overflow.
fn expiry(now: Instant, ttl: Duration) -> Instant {
    now + ttl.min(MAX_DURATION)
}

/// A record's key as the cache holds it: its text, and the hash the store
/// made of it once. The cache hashes that hash, never the text: moka
/// rebuilds its table whenever evictions have left tombstones in a tenth of
/// it, rehashing every live key, and hashing a text means reading it from an
/// allocation of its own. At the bound, hashing texts was 10-15 % of a first
/// request's profile; with stored hashes it is gone from it, and the rebuild
/// is the walk over the table alone (about 7 %). Measured under concurrency
/// (`benches/concurrent.rs`, six alternating runs), the p99 fell a little
/// (58 to 51 µs) and the CPU per request did not move beyond the noise. The
/// same size as a `String` key (a `Box<str>` has no capacity field, and no
/// slack).
#[derive(Clone, PartialEq, Eq)]
struct RecordKey {
    hash: u64,
    text: Box<str>,
}

impl std::hash::Hash for RecordKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

/// A key looked up by its text: hashed as the [`RecordKey`] of that text.
#[derive(Clone, Copy)]
struct KeyQuery<'a> {
    hash: u64,
    text: &'a str,
}

impl KeyQuery<'_> {
    /// The record key of an owned copy of this key's text.
    fn record_key(self, text: String) -> RecordKey {
        debug_assert_eq!(text, self.text);
        RecordKey {
            hash: self.hash,
            text: text.into_boxed_str(),
        }
    }
}

impl std::hash::Hash for KeyQuery<'_> {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

impl Equivalent<RecordKey> for KeyQuery<'_> {
    fn equivalent(&self, key: &RecordKey) -> bool {
        self.hash == key.hash && *self.text == *key.text
    }
}

/// A completed record, as the cache holds it: 16 bytes beside moka's own
/// entry, since there is one per stored response (an `Instant` would make it
/// 24).
#[derive(Clone)]
struct Slot {
    record: SharedRecord,
    /// When the record expires, in nanoseconds since [`epoch`].
    expires_at: u64,
}

/// The instant slots count their expiry from: the first time one was made.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// `at` in nanoseconds since [`epoch`] (0 before it; 584 years fit).
fn since_epoch(at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(epoch()).as_nanos()).unwrap_or(u64::MAX)
}

impl Slot {
    fn new(record: SharedRecord, ttl: Duration) -> Self {
        // A store is called with whatever TTL its caller has: past
        // MAX_DURATION it is cut to it, as markers' are.
        let ttl = u64::try_from(ttl.min(MAX_DURATION).as_nanos()).unwrap_or(u64::MAX);
        Self {
            record,
            expires_at: since_epoch(Instant::now()).saturating_add(ttl),
        }
    }

    fn expires_in(&self, now: Instant) -> Duration {
        Duration::from_nanos(self.expires_at.saturating_sub(since_epoch(now)))
    }

    fn is_live(&self, now: Instant) -> bool {
        self.expires_at > since_epoch(now)
    }

    fn to_entry(&self, now: Instant) -> Entry {
        Entry {
            state: EntryState::Completed(self.record.clone()),
            expires_in: self.expires_in(now),
        }
    }
}

struct SlotExpiry;

/// moka expires a record at the slot's own `expires_at` (stamped a moment
/// before the insert, so moka never keeps one past it).
impl Expiry<RecordKey, Slot> for SlotExpiry {
    fn expire_after_create(&self, _key: &RecordKey, slot: &Slot, at: Instant) -> Option<Duration> {
        Some(slot.expires_in(at))
    }

    fn expire_after_update(
        &self,
        _key: &RecordKey,
        slot: &Slot,
        at: Instant,
        _remaining: Option<Duration>,
    ) -> Option<Duration> {
        Some(slot.expires_in(at))
    }
}

impl MemoryStore {
    /// Counts one entry a listing walked (tests only).
    fn visited(&self) {
        #[cfg(test)]
        self.walked.fetch_add(1, Relaxed);
    }

    /// The live record under `key`.
    fn live(&self, key: KeyQuery<'_>, now: Instant) -> Option<Slot> {
        self.cache.get(&key).filter(|slot| slot.is_live(now))
    }

    /// Records whose TTL has not run out. moka's timer wheel drops expired
    /// entries only about a second late, so `entry_count` may still hold them.
    fn live_records(&self, now: Instant) -> u64 {
        self.cache
            .iter()
            .filter(|(_, slot)| slot.is_live(now))
            .count() as u64
    }

    /// Drops every expired marker (counted as expired) and answers how many
    /// live ones are left.
    fn sweep_markers(&self, now: Instant) -> u64 {
        let mut live = 0;
        for mut markers in self.stripes.each() {
            self.counters.expired(sweep(&mut markers, now));
            live += markers.len() as u64;
        }
        live
    }

    /// Counts a record written, and every [`MAINTAIN_EVERY`] writes runs
    /// moka's pending work (evictions at the bound among it), unless another
    /// writer is running it.
    fn written(&self) {
        if self.writes.fetch_add(1, Relaxed) % MAINTAIN_EVERY != MAINTAIN_EVERY - 1 {
            return;
        }
        // The lock guards nothing but the turn: a poisoned one still gives it.
        let turn = match self.maintaining.try_lock() {
            Ok(turn) => turn,
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => return,
        };
        self.cache.run_pending_tasks();
        drop(turn);
    }

    /// Runs moka's maintenance and drops expired markers; answers the live
    /// entries, markers and records.
    fn maintain(&self) -> u64 {
        self.cache.run_pending_tasks();
        let now = Instant::now();
        self.sweep_markers(now) + self.live_records(now)
    }
}

impl MemoryStore {
    /// `record` as the cache can keep it: a response heavier than the whole
    /// byte bound (which moka would drop the moment it is inserted, after
    /// `complete` reported it stored) loses its body, as the layer's
    /// [`OversizedResponse::RecordHead`](crate::OversizedResponse) does; a
    /// value, or a head still too heavy, is refused with an error, so the
    /// key stays marked rather than freed.
    fn fitted(&self, key: &str, record: SharedRecord) -> Result<SharedRecord, StoreError> {
        let Some(max_bytes) = self.max_bytes else {
            return Ok(record);
        };
        let weighs = |record: &Record| (key.len() + record.stored_size()) as u64;
        if weighs(&record) <= max_bytes {
            return Ok(record);
        }
        if let Some(response) = record.as_response() {
            let head = StoredResponse::head_only(
                response.status(),
                &response.headers(),
                &response.trailers(),
            );
            let head = Record {
                payload: Payload::Response(head),
                ..(*record).clone()
            };
            if weighs(&head) <= max_bytes {
                tracing::warn!(
                    key,
                    "idempotency record heavier than the memory store's byte bound: its body is not kept"
                );
                return Ok(Arc::new(head));
            }
        }
        Err(StoreError::backend(format!(
            "the record weighs {} bytes, more than the memory store's byte bound of {max_bytes}",
            weighs(&record)
        )))
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

impl StoreAdmin for MemoryStore {
    async fn put(&self, key: &str, record: SharedRecord, ttl: Duration) -> Result<(), StoreError> {
        let query = self.stripes.query(key);
        let mut markers = self.stripes.lock(query);
        if let Some(marker) = markers.remove(key) {
            // A live marker is replaced, as a write replaces what a key holds.
            self.counters
                .expired(usize::from(!marker.is_live(Instant::now())));
        }
        self.cache
            .insert(query.record_key(key.to_owned()), Slot::new(record, ttl));
        drop(markers);
        self.written();
        Ok(())
    }

    async fn get(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        let query = self.stripes.query(key);
        let mut markers = self.stripes.lock(query);
        let now = Instant::now();
        if let Some(marker) = markers.get(key) {
            if marker.is_live(now) {
                return Ok(Some(Entry {
                    state: marker.state(),
                    expires_in: marker.expires_in(now),
                }));
            }
            markers.remove(key);
            self.counters.expired(1);
        }
        Ok(self.live(query, now).map(|slot| slot.to_entry(now)))
    }

    async fn remove(&self, key: &str) -> Result<bool, StoreError> {
        let query = self.stripes.query(key);
        let mut markers = self.stripes.lock(query);
        let now = Instant::now();
        let marker = markers.remove(key).map(|marker| marker.is_live(now));
        self.counters.expired(usize::from(marker == Some(false)));
        let record = self.cache.remove(&query).map(|slot| slot.is_live(now));
        Ok(marker == Some(true) || record == Some(true))
    }

    async fn remove_unless_in_flight(&self, key: &str) -> Result<Removal, StoreError> {
        let query = self.stripes.query(key);
        // Under the key's stripe lock, as `begin`: no marker appears meanwhile.
        let mut markers = self.stripes.lock(query);
        let now = Instant::now();
        if let Some(marker) = markers.get(key) {
            if marker.is_live(now) {
                return Ok(Removal::InFlight);
            }
            markers.remove(key);
            self.counters.expired(1);
        }
        let record = self.cache.remove(&query).map(|slot| slot.is_live(now));
        Ok(if record == Some(true) {
            Removal::Removed
        } else {
            Removal::Absent
        })
    }

    /// Pages in the order of the keys' stored hashes, and each page walks
    /// every marker and record once (O(n), n at most the entry bound plus
    /// the markers), keeping only the `limit` next ones: an ordered index
    /// would cost every write, to make a listing cheaper. The cursor is the
    /// last key's hash and text.
    async fn page(
        &self,
        filter: &KeyFilter,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<KeyPage, StoreError> {
        let after = cursor.map(parse_cursor).transpose()?;
        let mut walk = PageWalk::new(after, limit);
        let now = Instant::now();
        for markers in self.stripes.each() {
            for (key, marker) in markers.iter() {
                self.visited();
                if !marker.is_live(now) || !filter.matches_key(key) {
                    continue;
                }
                walk.offer(self.stripes.query(key).hash, key, || ScanEntry {
                    key: key.clone(),
                    kind: EntryKind::InFlight,
                    expires_in: marker.expires_in(now),
                    created_at_ms: marker.created_at_ms,
                });
            }
        }
        for (key, slot) in self.cache.iter() {
            self.visited();
            if !slot.is_live(now) || !filter.matches_key(&key.text) {
                continue;
            }
            walk.offer(key.hash, &key.text, || ScanEntry {
                key: key.text.to_string(),
                kind: EntryKind::Completed,
                expires_in: slot.expires_in(now),
                created_at_ms: slot.record.created_at_ms,
            });
        }
        Ok(walk.finish(filter))
    }

    async fn clear(&self) -> Result<(), StoreError> {
        let now = Instant::now();
        for mut markers in self.stripes.each() {
            self.counters.expired(sweep(&mut markers, now));
            markers.clear();
        }
        self.cache.invalidate_all();
        self.cache.run_pending_tasks();
        Ok(())
    }

    async fn scan(&self) -> Result<Vec<ScanEntry>, StoreError> {
        let now = Instant::now();
        let mut entries = Vec::new();
        for markers in self.stripes.each() {
            entries.extend(
                markers
                    .iter()
                    .filter(|(_, marker)| marker.is_live(now))
                    .map(|(key, marker)| ScanEntry {
                        key: key.clone(),
                        kind: EntryKind::InFlight,
                        expires_in: marker.expires_in(now),
                        created_at_ms: marker.created_at_ms,
                    }),
            );
        }
        entries.extend(self.cache.iter().filter(|(_, slot)| slot.is_live(now)).map(
            |(key, slot)| ScanEntry {
                key: key.text.to_string(),
                kind: EntryKind::Completed,
                expires_in: slot.expires_in(now),
                created_at_ms: slot.record.created_at_ms,
            },
        ));
        Ok(entries)
    }

    async fn len(&self) -> Result<u64, StoreError> {
        Ok(self.maintain())
    }

    async fn info(&self) -> Result<CacheInfo, StoreError> {
        Ok(CacheInfo {
            entries: self.maintain(),
            max_entries: Some(self.max_entries),
            // Without a byte bound every record weighs 1: that is no byte count.
            weighted_bytes: if self.max_bytes.is_some() {
                self.cache.weighted_size()
            } else {
                0
            },
        })
    }

    /// From moka's entry count (after its pending work, which is bounded)
    /// and the markers' maps: no walk. Records whose TTL ran out may count
    /// until moka drops them, about a second late.
    async fn info_estimate(&self) -> Result<CacheInfo, StoreError> {
        self.cache.run_pending_tasks();
        let markers: usize = self.stripes.each().map(|markers| markers.len()).sum();
        Ok(CacheInfo {
            entries: self.cache.entry_count() + markers as u64,
            max_entries: Some(self.max_entries),
            weighted_bytes: if self.max_bytes.is_some() {
                self.cache.weighted_size()
            } else {
                0
            },
        })
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// A page cursor's hash and key text.
fn parse_cursor(cursor: &str) -> Result<(u64, Vec<u8>), StoreError> {
    let bytes = decode_cursor(cursor)?;
    let (hash, key) = bytes.split_at_checked(8).ok_or(StoreError::InvalidCursor)?;
    let hash = u64::from_be_bytes(hash.try_into().map_err(|_| StoreError::InvalidCursor)?);
    Ok((hash, key.to_vec()))
}

/// The entries of one page, in (hash, key) order: the `limit + 1` smallest
/// past the cursor (the last one only tells that there is a next page).
struct PageWalk {
    after: Option<(u64, Vec<u8>)>,
    limit: usize,
    /// A max-heap: its top is the first to give up its place.
    best: std::collections::BinaryHeap<Candidate>,
}

struct Candidate {
    hash: u64,
    entry: ScanEntry,
}

impl Candidate {
    fn order(&self) -> (u64, &[u8]) {
        (self.hash, self.entry.key.as_bytes())
    }
}

impl PartialEq for Candidate {
    fn eq(&self, other: &Self) -> bool {
        self.order() == other.order()
    }
}

impl Eq for Candidate {}

impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.order().cmp(&other.order())
    }
}

impl PageWalk {
    fn new(after: Option<(u64, Vec<u8>)>, limit: usize) -> Self {
        Self {
            after,
            limit,
            best: std::collections::BinaryHeap::with_capacity(limit.saturating_add(1).min(1 << 12)),
        }
    }

    /// Keeps the entry `make` builds when `(hash, key)` is past the cursor
    /// and among the smallest yet; builds nothing otherwise.
    fn offer(&mut self, hash: u64, key: &str, make: impl FnOnce() -> ScanEntry) {
        let at = (hash, key.as_bytes());
        if self
            .after
            .as_ref()
            .is_some_and(|(h, k)| at <= (*h, k.as_slice()))
        {
            return;
        }
        if self.best.len() > self.limit {
            match self.best.peek() {
                Some(top) if at < top.order() => {
                    self.best.pop();
                }
                _ => return,
            }
        }
        self.best.push(Candidate {
            hash,
            entry: make(),
        });
    }

    fn finish(self, filter: &KeyFilter) -> KeyPage {
        let mut best = self.best.into_sorted_vec();
        let more = best.len() > self.limit;
        best.truncate(self.limit);
        let next_cursor = more
            .then(|| {
                best.last().map(|last| {
                    let mut bytes = last.hash.to_be_bytes().to_vec();
                    bytes.extend_from_slice(last.entry.key.as_bytes());
                    encode_cursor(&bytes)
                })
            })
            .flatten();
        KeyPage {
            keys: best
                .into_iter()
                .map(|candidate| candidate.entry)
                .filter(|entry| filter.matches(entry))
                .collect(),
            next_cursor,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn marker_count(store: &MemoryStore) -> usize {
        store.stripes.each().map(|markers| markers.len()).sum()
    }

    /// The cache finds records by the stored hash, but a key is its text: two
    /// texts whose hashes collide are two records, each found by its own text.
    #[tokio::test]
    async fn keys_whose_hashes_collide_stay_apart() {
        let store = MemoryStore::new();
        let record = |body: &'static str| {
            Arc::new(crate::record::Record::value(
                Fingerprint::of_bytes(body.as_bytes()),
                bytes::Bytes::from_static(body.as_bytes()),
            ))
        };
        let colliding = |text: &'static str| KeyQuery { hash: 42, text };
        for (text, body) in [("alice:pay:1", "alice's"), ("bob:pay:1", "bob's")] {
            store.cache.insert(
                colliding(text).record_key(text.to_owned()),
                Slot::new(record(body), Duration::from_secs(60)),
            );
        }
        for (text, body) in [("alice:pay:1", "alice's"), ("bob:pay:1", "bob's")] {
            let found = store.cache.get(&colliding(text)).map(|slot| slot.record);
            assert_eq!(found.and_then(|r| r.as_value().cloned()), Some(body.into()));
        }
        assert!(store.cache.get(&colliding("carol:pay:1")).is_none());
        // And by text through the store's own hash, as the engine looks.
        store
            .put("carol:pay:1", record("carol's"), Duration::from_secs(60))
            .await
            .unwrap();
        let carol = store.local_record("carol:pay:1").unwrap();
        assert_eq!(carol.as_value().unwrap(), "carol's");
        assert!(store.local_record("carol:pay:2").is_none());
    }

    /// Markers abandoned past their lease, whose keys nobody touches again,
    /// are dropped when their stripe next needs room, without a cleanup.
    #[tokio::test]
    async fn abandoned_markers_make_room_for_new_ones() {
        let store = MemoryStore::new();
        let brief = Duration::from_millis(5);
        for i in 0..1_000 {
            let key = format!("s{i}:a:gone");
            store
                .begin(
                    &key,
                    Fingerprint::of_bytes(b"x"),
                    LeaseToken::random(),
                    brief,
                )
                .await
                .unwrap();
        }
        tokio::time::sleep(brief * 4).await;
        let long = Duration::from_secs(60);
        for i in 0..10_000 {
            let key = format!("s{i}:a:held");
            let begun = store
                .begin(
                    &key,
                    Fingerprint::of_bytes(b"x"),
                    LeaseToken::random(),
                    long,
                )
                .await
                .unwrap();
            assert!(matches!(begun, BeginOutcome::Acquired), "{begun:?}");
        }
        // Ten thousand new markers over 64 stripes outgrow what the first
        // thousand left free in every one of them.
        assert_eq!(store.removal_counts().expired, 1_000);
        assert_eq!(marker_count(&store), 10_000);
        assert_eq!(store.len().await.unwrap(), 10_000);
    }

    /// A writer whose turn to run moka's pending work comes while another
    /// writer runs it goes on without waiting, and a later turn does the
    /// work the skipped ones left: the bound holds, on the newest records.
    #[test]
    fn a_writer_skips_its_maintenance_turn_while_another_runs_it() {
        const BOUND: u64 = 8;
        let store = MemoryStore::builder().max_entries(BOUND).build().unwrap();
        let record: SharedRecord = Arc::new(crate::record::Record::value(
            Fingerprint::of_bytes(b"x"),
            bytes::Bytes::from_static(b"r"),
        ));
        let write = |store: &MemoryStore, from: u64, to: u64| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            for i in from..to {
                let key = format!("k{i}");
                let put = store.put(&key, record.clone(), Duration::from_secs(60));
                runtime.block_on(put).unwrap();
            }
        };
        let turn = store.maintaining.lock().unwrap();
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::scope(|scope| {
            let store = &store;
            scope.spawn(move || {
                // Four turns come while the turn is held here.
                write(store, 0, 4 * MAINTAIN_EVERY);
                done.send(()).unwrap();
            });
            let waited = finished.recv_timeout(Duration::from_secs(30)).is_err();
            // Let a writer that waits finish before the scope joins it.
            drop(turn);
            assert!(!waited, "a writer waited for another's maintenance");
        });
        write(&store, 4 * MAINTAIN_EVERY, 5 * MAINTAIN_EVERY);
        assert_eq!(store.cache.entry_count(), BOUND);
        let written = 5 * MAINTAIN_EVERY;
        for i in 0..written {
            let kept = store.local_record(&format!("k{i}")).is_some();
            assert_eq!(kept, i >= written - BOUND, "record k{i}");
        }
    }

    /// A marker and a record never share a key: `put` replaces a marker,
    /// `remove` removes either, and neither leaves the other behind.
    #[tokio::test]
    async fn a_key_holds_a_marker_or_a_record() {
        let store = MemoryStore::new();
        let long = Duration::from_secs(60);
        let lease = LeaseToken::random();
        let record: SharedRecord = Arc::new(crate::record::Record::value(
            Fingerprint::of_bytes(b"x"),
            bytes::Bytes::from_static(b"r"),
        ));
        store
            .begin("k", Fingerprint::of_bytes(b"x"), lease, long)
            .await
            .unwrap();
        assert!(store.local_record("k").is_none());
        store.put("k", record.clone(), long).await.unwrap();
        assert_eq!(marker_count(&store), 0);
        assert!(store.local_record("k").is_some());
        assert!(!store
            .complete("k", lease, record.clone(), long)
            .await
            .unwrap());
        assert!(store.remove("k").await.unwrap());
        assert!(store.get("k").await.unwrap().is_none());
        store
            .begin("k", Fingerprint::of_bytes(b"x"), lease, long)
            .await
            .unwrap();
        assert!(store.complete("k", lease, record, long).await.unwrap());
        assert_eq!(marker_count(&store), 0);
        assert_eq!(store.len().await.unwrap(), 1);
    }
}

#[cfg(test)]
mod paging {
    use super::*;
    use crate::record::Record;

    /// A store of `n` records, built for them, and `limit` keys a page.
    async fn filled(n: usize) -> MemoryStore {
        let store = MemoryStore::builder()
            .max_entries(n as u64 + 10)
            .build()
            .unwrap();
        let record: SharedRecord = Arc::new(Record::value(
            Fingerprint::of_bytes(b"r"),
            bytes::Bytes::from_static(b"r"),
        ));
        for i in 0..n {
            store
                .put(
                    &format!("s:a:t{i}"),
                    record.clone(),
                    Duration::from_secs(600),
                )
                .await
                .unwrap();
        }
        store
    }

    /// What one `/stats` and one page cost, in entries walked, at 100 and at
    /// 100,000 records: the estimate walks none; a page walks each entry
    /// once (the documented O(n), bounded by the entry bound) and answers
    /// its limit.
    #[tokio::test]
    async fn a_page_and_an_estimate_at_100_and_100_000_keys() {
        for n in [100, 100_000] {
            let store = filled(n).await;
            store.walked.store(0, Relaxed);
            let info = store.info_estimate().await.unwrap();
            assert_eq!(info.entries, n as u64);
            assert_eq!(store.walked.load(Relaxed), 0, "the estimate walked entries");
            let page = store.page(&KeyFilter::new(), None, 100).await.unwrap();
            assert_eq!(page.keys.len(), 100);
            assert_eq!(page.next_cursor.is_some(), n > 100);
            assert_eq!(store.walked.load(Relaxed), n as u64);
        }
    }
}
