//! The completed records, as moka's cache holds them: their keys (hashed
//! once), their slots and expiry, and the cache's maintenance.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, OnceLock, TryLockError};
use std::time::{Duration, Instant};

use moka::{Equivalent, Expiry};

use super::MemoryStore;
use crate::config::MAX_DURATION;
use crate::record::{Payload, Record, SharedRecord, StoredResponse};
use crate::store::{Entry, EntryState, StoreError};

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
pub(super) const MAINTAIN_EVERY: u64 = 4;

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
pub(super) struct RecordKey {
    pub(super) hash: u64,
    pub(super) text: Box<str>,
}

impl std::hash::Hash for RecordKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

/// A key looked up by its text: hashed as the [`RecordKey`] of that text.
#[derive(Clone, Copy)]
pub(super) struct KeyQuery<'a> {
    pub(super) hash: u64,
    pub(super) text: &'a str,
}

impl KeyQuery<'_> {
    /// The record key of an owned copy of this key's text.
    pub(super) fn record_key(self, text: String) -> RecordKey {
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
pub(super) struct Slot {
    pub(super) record: SharedRecord,
    /// When the record expires, in nanoseconds since [`epoch`].
    pub(super) expires_at: u64,
}

/// The instant slots count their expiry from: the first time one was made.
pub(super) fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// `at` in nanoseconds since [`epoch`] (0 before it; 584 years fit).
pub(super) fn since_epoch(at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(epoch()).as_nanos()).unwrap_or(u64::MAX)
}

impl Slot {
    pub(super) fn new(record: SharedRecord, ttl: Duration) -> Self {
        // A store is called with whatever TTL its caller has: past
        // MAX_DURATION it is cut to it, as markers' are.
        let ttl = u64::try_from(ttl.min(MAX_DURATION).as_nanos()).unwrap_or(u64::MAX);
        Self {
            record,
            expires_at: since_epoch(Instant::now()).saturating_add(ttl),
        }
    }

    pub(super) fn expires_in(&self, now: Instant) -> Duration {
        Duration::from_nanos(self.expires_at.saturating_sub(since_epoch(now)))
    }

    pub(super) fn is_live(&self, now: Instant) -> bool {
        self.expires_at > since_epoch(now)
    }

    pub(super) fn to_entry(&self, now: Instant) -> Entry {
        Entry {
            state: EntryState::Completed(self.record.clone()),
            expires_in: self.expires_in(now),
        }
    }
}

pub(super) struct SlotExpiry;

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
    pub(super) fn visited(&self) {
        #[cfg(test)]
        self.walked.fetch_add(1, Relaxed);
    }

    /// The live record under `key`.
    pub(super) fn live(&self, key: KeyQuery<'_>, now: Instant) -> Option<Slot> {
        self.cache.get(&key).filter(|slot| slot.is_live(now))
    }

    /// Records whose TTL has not run out. moka's timer wheel drops expired
    /// entries only about a second late, so `entry_count` may still hold them.
    pub(super) fn live_records(&self, now: Instant) -> u64 {
        self.cache
            .iter()
            .filter(|(_, slot)| slot.is_live(now))
            .count() as u64
    }

    /// Counts a record written, and every [`MAINTAIN_EVERY`] writes runs
    /// moka's pending work (evictions at the bound among it), unless another
    /// writer is running it.
    pub(super) fn written(&self) {
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
    pub(super) fn maintain(&self) -> u64 {
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
    pub(super) fn fitted(
        &self,
        key: &str,
        record: SharedRecord,
    ) -> Result<SharedRecord, StoreError> {
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
