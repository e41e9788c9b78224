//! The in-flight markers: striped maps beside the cache, each under its own
//! lock, which also orders each key's operations.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::records::KeyQuery;
use super::KeyHasher;
use super::MemoryStore;
use crate::config::MAX_DURATION;
use crate::key::Fingerprint;
use crate::stats::Striped;
use crate::store::{EntryState, LeaseToken};

/// How many locks keys are spread over: enough that unrelated keys rarely
/// wait for each other on a many-core machine.
pub(super) const STRIPES: usize = 64;

/// The in-flight markers of the keys of one stripe.
pub(super) type Markers = HashMap<String, Marker, KeyHasher>;

pub(super) struct Stripes {
    pub(super) hasher: KeyHasher,
    pub(super) stripes: Box<[Mutex<Markers>]>,
}

impl Stripes {
    pub(super) fn new() -> Self {
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
    pub(super) fn query<'a>(&self, key: &'a str) -> KeyQuery<'a> {
        KeyQuery {
            hash: self.hasher.hash_one(key),
            text: key,
        }
    }

    /// Holds `key`'s stripe: every change to `key` happens under it, and
    /// `key`'s marker, if any, lives in it.
    pub(super) fn lock(&self, key: KeyQuery<'_>) -> MutexGuard<'_, Markers> {
        Self::hold(&self.stripes[key.hash as usize % STRIPES])
    }

    pub(super) fn hold(stripe: &Mutex<Markers>) -> MutexGuard<'_, Markers> {
        // A map's own operations leave it whole even when they panic, and
        // nothing the store does under the lock is expected to panic on any
        // input, so a poisoned lock is as good as any.
        stripe.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Every stripe, one after the other.
    pub(super) fn each(&self) -> impl Iterator<Item = MutexGuard<'_, Markers>> {
        self.stripes.iter().map(Self::hold)
    }
}

/// Records and markers dropped, striped: moka's housekeeping evicts on
/// whichever request runs it, one record per write at the bound.
pub(super) type RemovalCounters = Striped<Removals>;

#[derive(Debug, Default)]
pub(super) struct Removals {
    pub(super) expired: AtomicU64,
    pub(super) evicted: AtomicU64,
}

impl Striped<Removals> {
    pub(super) fn expired(&self, dropped: usize) {
        if dropped > 0 {
            self.here().expired.fetch_add(dropped as u64, Relaxed);
        }
    }
}

/// An action in flight under a lease.
pub(super) struct Marker {
    pub(super) fingerprint: Fingerprint,
    pub(super) lease: LeaseToken,
    pub(super) expires_at: Instant,
    pub(super) created_at_ms: u64,
}

impl Marker {
    pub(super) fn is_live(&self, now: Instant) -> bool {
        self.expires_at > now
    }

    pub(super) fn expires_in(&self, now: Instant) -> Duration {
        self.expires_at.saturating_duration_since(now)
    }

    pub(super) fn state(&self) -> EntryState {
        EntryState::InFlight {
            fingerprint: self.fingerprint,
            lease: self.lease,
        }
    }
}

/// Drops the expired markers of one stripe; answers how many it dropped.
pub(super) fn sweep(markers: &mut Markers, now: Instant) -> usize {
    let before = markers.len();
    markers.retain(|_, marker| marker.is_live(now));
    before - markers.len()
}

/// Before an insert that would grow (or rehash) the map, drops its expired
/// markers (counted as expired), so markers whose keys nobody touches again
/// do not pile up until a cleanup. Leaves at least as many free places as
/// live markers, so a sweep is paid for by as many inserts as it visited
/// markers, give or take the map's load factor.
pub(super) fn make_room(markers: &mut Markers, now: Instant, counters: &RemovalCounters) {
    if markers.len() < markers.capacity() {
        return;
    }
    counters.expired(sweep(markers, now));
    markers.reserve(markers.len().max(1));
}

/// Takes `key`'s marker, and the key as the marker held it, out of its
/// stripe when it is live and held by `lease`; leaves any other live marker
/// in place, and drops an expired one (counted as expired).
pub(super) fn take_held(
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
pub(super) fn expiry(now: Instant, ttl: Duration) -> Instant {
    now + ttl.min(MAX_DURATION)
}

impl MemoryStore {
    /// Drops every expired marker (counted as expired) and answers how many
    /// live ones are left.
    pub(super) fn sweep_markers(&self, now: Instant) -> u64 {
        let mut live = 0;
        for mut markers in self.stripes.each() {
            self.counters.expired(sweep(&mut markers, now));
            live += markers.len() as u64;
        }
        live
    }
}
