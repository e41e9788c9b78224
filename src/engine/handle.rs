//! The handle's side of the engine: stats, cache info, queries and
//! maintenance. None of it takes part in the protocol.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use super::Idempotency;
use crate::key::IdempotencyKey;
use crate::record::Record;
use crate::stats::{CacheInfo, Stats, StatsSnapshot};
use crate::store::{Entry, EntryKind, ScanEntry, Store, StoreAdmin, StoreError};

impl<S: Store> Idempotency<S> {
    /// The counters, with the store's own `expired` and `evicted` counts.
    pub fn stats(&self) -> StatsSnapshot {
        let mut snapshot = self.inner.stats.snapshot();
        let removals = self.inner.store.removal_counts();
        let [expired, evicted] = &self.inner.removals_baseline;
        snapshot.expired += removals.expired.saturating_sub(expired.load(Relaxed));
        snapshot.evicted += removals.evicted.saturating_sub(evicted.load(Relaxed));
        snapshot
    }

    /// Sets every counter back to zero.
    pub fn reset_stats(&self) {
        let removals = self.inner.store.removal_counts();
        let [expired, evicted] = &self.inner.removals_baseline;
        expired.store(removals.expired, Relaxed);
        evicted.store(removals.evicted, Relaxed);
        self.inner.stats.reset();
    }

    /// Drops expired entries now (moka otherwise drops them during later
    /// operations).
    ///
    /// # Errors
    ///
    /// The [`StoreError`] of a store that failed.
    pub async fn cleanup_expired(&self) -> Result<(), StoreError> {
        self.inner.store.cleanup_expired().await
    }
}

/// Listing and maintenance: these need a store that implements
/// [`StoreAdmin`] as well as [`Store`] (every store of this crate does).
impl<S: StoreAdmin> Idempotency<S> {
    /// Writes `record` under `key` whatever the key held (for results known
    /// to be done, such as `mark_executed`).
    ///
    /// # Errors
    ///
    /// The [`StoreError`] of a store that failed.
    pub(crate) async fn put(
        &self,
        key: &str,
        record: Record,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        if ttl.is_zero() {
            return Ok(());
        }
        self.counted(self.inner.store.put(key, Arc::new(record), ttl).await)
    }

    /// Entries held, the entry bound, and bytes held.
    ///
    /// # Errors
    ///
    /// The [`StoreError`] of a store that failed.
    pub async fn cache_info(&self) -> Result<CacheInfo, StoreError> {
        self.inner.store.info().await
    }

    /// Writes the store answered as done that fewer replicas than it was
    /// asked to wait for acknowledged in time (see
    /// [`StoreAdmin::unacknowledged_writes`]): 0 for a store without
    /// replicas. No round trip.
    ///
    /// ```
    /// use tower_idempotency::Idempotency;
    ///
    /// let engine = Idempotency::builder().build().unwrap();
    /// assert_eq!(engine.unacknowledged_writes(), 0);
    /// ```
    pub fn unacknowledged_writes(&self) -> u64 {
        self.inner.store.unacknowledged_writes()
    }

    /// Checks that the store answers.
    ///
    /// # Errors
    ///
    /// The [`StoreError`] of a store that failed.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.inner.store.ping().await
    }

    /// What `key` (the text form of an [`IdempotencyKey`]) holds.
    ///
    /// # Errors
    ///
    /// The [`StoreError`] of a store that failed.
    pub async fn record(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        self.inner.store.get(key).await
    }

    /// The live keys that match `filter`.
    ///
    /// # Errors
    ///
    /// The [`StoreError`] of a store that failed.
    pub async fn keys(&self, filter: &KeyFilter) -> Result<Vec<ScanEntry>, StoreError> {
        let entries = self.inner.store.scan().await?;
        Ok(entries
            .into_iter()
            .filter(|entry| filter.matches(entry))
            .collect())
    }

    /// The live keys whose signal is `signal`.
    ///
    /// # Errors
    ///
    /// The [`StoreError`] of a store that failed.
    pub async fn find_by_signal(&self, signal: &str) -> Result<Vec<ScanEntry>, StoreError> {
        self.keys(&KeyFilter::new().signal(signal)).await
    }

    /// The live keys whose action is `action`.
    ///
    /// # Errors
    ///
    /// The [`StoreError`] of a store that failed.
    pub async fn find_by_action(&self, action: &str) -> Result<Vec<ScanEntry>, StoreError> {
        self.keys(&KeyFilter::new().action(action)).await
    }

    /// The live keys whose target is `target`.
    ///
    /// # Errors
    ///
    /// The [`StoreError`] of a store that failed.
    pub async fn find_by_target(&self, target: &str) -> Result<Vec<ScanEntry>, StoreError> {
        self.keys(&KeyFilter::new().target(target)).await
    }

    /// The live keys that expire within `within`.
    ///
    /// # Errors
    ///
    /// The [`StoreError`] of a store that failed.
    pub async fn expiring_within(&self, within: Duration) -> Result<Vec<ScanEntry>, StoreError> {
        self.keys(&KeyFilter::new().expiring_within(within)).await
    }

    /// Deletes what `key` holds (a record, or a marker: then a retry may run
    /// the action while the first run is still going). Answers whether there
    /// was anything.
    ///
    /// # Errors
    ///
    /// The [`StoreError`] of a store that failed.
    pub async fn remove(&self, key: &str) -> Result<bool, StoreError> {
        self.inner.store.remove(key).await
    }

    /// Deletes every entry.
    ///
    /// # Errors
    ///
    /// The [`StoreError`] of a store that failed.
    pub async fn clear(&self) -> Result<(), StoreError> {
        self.inner.store.clear().await
    }

    /// Removes the `n` oldest completed records (by creation time in
    /// milliseconds, ties broken by the nearest expiry) and
    /// answers how many it removed. In-flight markers are never evicted:
    /// that would let a duplicate run while the first is still running.
    /// Removed records count as `evicted`.
    ///
    /// # Errors
    ///
    /// The [`StoreError`] of a store that failed.
    pub async fn evict_oldest(&self, n: usize) -> Result<usize, StoreError> {
        let mut records: Vec<ScanEntry> = self
            .inner
            .store
            .scan()
            .await?
            .into_iter()
            .filter(|entry| entry.kind == EntryKind::Completed)
            .collect();
        records.sort_by_key(|entry| (entry.created_at_ms, entry.expires_in));
        let mut removed = 0;
        for entry in records.into_iter().take(n) {
            if self.remove(&entry.key).await? {
                removed += 1;
                Stats::incr(&self.inner.stats.here().evicted);
            }
        }
        Ok(removed)
    }
}

/// Which keys [`Idempotency::keys`] lists. Components match the parts of an
/// [`IdempotencyKey`]; a key that is not in that form matches only a filter
/// on nothing but expiry.
///
/// ```
/// use std::time::Duration;
/// use tower_idempotency::KeyFilter;
///
/// let filter = KeyFilter::new().action("create_task").expiring_within(Duration::from_secs(60));
/// # drop(filter);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyFilter {
    signal: Option<String>,
    action: Option<String>,
    target: Option<String>,
    expiring_within: Option<Duration>,
}

impl KeyFilter {
    /// A filter that matches every key.
    pub fn new() -> Self {
        Self::default()
    }

    /// Only keys with this signal.
    pub fn signal(mut self, signal: impl Into<String>) -> Self {
        self.signal = Some(signal.into());
        self
    }

    /// Only keys with this action.
    pub fn action(mut self, action: impl Into<String>) -> Self {
        self.action = Some(action.into());
        self
    }

    /// Only keys with this target.
    pub fn target(mut self, target: impl Into<String>) -> Self {
        self.target = Some(target.into());
        self
    }

    /// Only keys that expire within `within`.
    pub fn expiring_within(mut self, within: Duration) -> Self {
        self.expiring_within = Some(within);
        self
    }

    /// Whether `entry` passes the filter.
    pub fn matches(&self, entry: &ScanEntry) -> bool {
        if self
            .expiring_within
            .is_some_and(|within| entry.expires_in > within)
        {
            return false;
        }
        if self.signal.is_none() && self.action.is_none() && self.target.is_none() {
            return true;
        }
        let Ok(key) = IdempotencyKey::parse(&entry.key) else {
            return false;
        };
        let component = |wanted: &Option<String>, actual: &str| {
            wanted.as_deref().is_none_or(|wanted| wanted == actual)
        };
        component(&self.signal, key.signal())
            && component(&self.action, key.action())
            && component(&self.target, key.target())
    }
}
