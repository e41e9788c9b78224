//! Counters of what the engine and its frontends did, and what the store holds.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::OnceLock;

use crossbeam_utils::CachePadded;
use serde::Serialize;

/// A value kept once per stripe, each stripe on cache lines of its own, and
/// each thread writing to one stripe.
///
/// Every request bumps a counter or two. With one atomic per counter, every
/// bump on one core takes the cache line from the others: on the 2-core
/// bench machine that cost about 70 ns per request on the path that does
/// nothing else (a POST without a key). A thread bumps its own stripe's
/// copy instead, and a read adds the stripes up.
#[derive(Debug)]
pub(crate) struct Striped<T> {
    stripes: Box<[CachePadded<T>]>,
}

impl<T: Default> Default for Striped<T> {
    fn default() -> Self {
        Self {
            stripes: (0..stripe_count())
                .map(|_| CachePadded::default())
                .collect(),
        }
    }
}

/// Several stripes per core, so that two busy threads rarely share one
/// (threads take stripes in the order they first count). Worked out once:
/// `available_parallelism` may read the cgroup files on every call, and
/// every engine and memory store makes striped counters.
fn stripe_count() -> usize {
    static COUNT: OnceLock<usize> = OnceLock::new();
    *COUNT.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        (cores * 4).next_power_of_two().clamp(8, 256)
    })
}

impl<T> Striped<T> {
    /// The calling thread's stripe.
    pub(crate) fn here(&self) -> &T {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        thread_local! {
            static STRIPE: usize = NEXT.fetch_add(1, Relaxed);
        }
        // The stripe count is a power of two.
        &self.stripes[STRIPE.with(|stripe| *stripe) & (self.stripes.len() - 1)]
    }

    /// Every stripe, for a read that adds them up.
    pub(crate) fn each(&self) -> impl Iterator<Item = &T> {
        self.stripes.iter().map(|stripe| &**stripe)
    }
}

/// The sum of one counter over every stripe.
pub(crate) fn total<T>(striped: &Striped<T>, counter: impl Fn(&T) -> &AtomicU64) -> u64 {
    striped.each().fold(0, |sum, stripe| {
        sum.wrapping_add(counter(stripe).load(Relaxed))
    })
}

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        /// One stripe of the live counters.
        #[derive(Debug, Default)]
        pub(crate) struct Counts {
            $(pub(crate) $name: AtomicU64,)*
        }

        /// Live counters, striped; bump them as
        /// `Stats::incr(&stats.here().requests)`, read them with
        /// [`Idempotency::stats`](crate::Idempotency::stats).
        pub(crate) type Stats = Striped<Counts>;

        impl Striped<Counts> {
            pub(crate) fn snapshot(&self) -> StatsSnapshot {
                StatsSnapshot { $($name: total(self, |counts| &counts.$name),)* }
            }

            /// Zeroes every counter. Bumps made while it runs may be kept
            /// or lost, as with a single atomic.
            pub(crate) fn reset(&self) {
                for counts in self.each() {
                    $(counts.$name.store(0, Relaxed);)*
                }
            }
        }

        /// The counters at one moment.
        ///
        /// ```
        /// let stats = tower_idempotency::StatsSnapshot::default();
        /// assert_eq!(stats.duplicates_prevented(), 0);
        /// assert_eq!(stats.hit_rate(), 0.0);
        /// ```
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
        #[non_exhaustive]
        pub struct StatsSnapshot {
            $($(#[$doc])* pub $name: u64,)*
        }
    };
}

counters! {
    /// Every request the layer saw, protected or not.
    requests,
    /// Actions run: leases acquired.
    executed,
    /// Stored results handed to a retry that came after completion.
    replayed,
    /// Results handed to a duplicate that waited for the first (`Concurrent::Wait`).
    coalesced,
    /// Duplicates refused because the first was still in flight (409).
    conflicts,
    /// Retries whose fingerprint differed from the first request's (422).
    mismatches,
    /// Requests refused for a missing or malformed key (400).
    rejected_keys,
    /// Requests refused for a body over the limit (413).
    too_large,
    /// Results returned but not stored (status policy, `no-store`, a lease
    /// lost before the record was written).
    not_stored,
    /// Responses recorded without their body, which was larger than what is
    /// stored (`OversizedResponse::RecordHead`): a retry gets their status
    /// and headers, never a second run.
    omitted,
    /// Leases left to expire because the action may have run but gave no
    /// definite answer (an upstream timeout or broken connection, a body cut
    /// off after its head, a shutdown with runs still going): not released,
    /// so no retry runs the action again while the marker lives.
    ambiguous,
    /// Store operations of the request path (begin, complete, release, renew,
    /// put) that failed, each answered by the fail mode. Admin queries that
    /// fail return their error and are not counted here.
    store_errors,
    /// Entries the store dropped because their TTL ran out.
    expired,
    /// Entries the store dropped to stay within its bounds.
    evicted,
}

impl Striped<Counts> {
    pub(crate) fn incr(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }
}

impl StatsSnapshot {
    /// Duplicates that did not run the action again: replayed + coalesced + conflicts.
    pub fn duplicates_prevented(&self) -> u64 {
        self.replayed + self.coalesced + self.conflicts
    }

    /// Percent of answered actions that were served from a result:
    /// (replayed + coalesced) / (replayed + coalesced + executed) × 100; 0 when
    /// nothing has been seen.
    pub fn hit_rate(&self) -> f64 {
        let hits = self.replayed + self.coalesced;
        let total = hits + self.executed;
        if total == 0 {
            0.0
        } else {
            hits as f64 * 100.0 / total as f64
        }
    }
}

/// What the store holds now.
///
/// ```
/// let info = tower_idempotency::CacheInfo { entries: 5, max_entries: Some(10), weighted_bytes: 0 };
/// assert_eq!(info.utilization_percent(), 50.0);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CacheInfo {
    /// Entries (in-flight markers and records) held now.
    pub entries: u64,
    /// The entry bound, when the store has one. The memory store bounds its
    /// completed records by it; its in-flight markers are held beside them
    /// and not counted against it, so while many requests are in flight
    /// `entries` may exceed it.
    pub max_entries: Option<u64>,
    /// Bytes held, as the store weighs them (0 when the store does not
    /// weigh). The memory store weighs its records only.
    pub weighted_bytes: u64,
}

impl CacheInfo {
    /// `entries` as a percent of `max_entries` (0 when unbounded).
    pub fn utilization_percent(&self) -> f64 {
        match self.max_entries {
            Some(max) if max > 0 => self.entries as f64 * 100.0 / max as f64,
            _ => 0.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bumps_from_many_threads_add_up_and_reset_to_zero() {
        let stats = Stats::default();
        // More threads than stripes, so stripes are shared as well as
        // apart.
        let threads = stats.each().count() * 3;
        std::thread::scope(|scope| {
            for _ in 0..threads {
                scope.spawn(|| {
                    for _ in 0..1_000 {
                        Stats::incr(&stats.here().requests);
                    }
                    Stats::incr(&stats.here().executed);
                });
            }
        });
        let snapshot = stats.snapshot();
        assert_eq!(snapshot.requests, threads as u64 * 1_000);
        assert_eq!(snapshot.executed, threads as u64);
        assert_eq!(snapshot.replayed, 0);
        stats.reset();
        assert_eq!(stats.snapshot(), StatsSnapshot::default());
    }
}
