//! The handle's side of the engine: stats, cache info, queries and
//! maintenance. None of it takes part in the protocol.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use super::Idempotency;
use crate::record::Record;
use crate::stats::{CacheInfo, Stats, StatsSnapshot};
use crate::store::{
    Entry, EntryKind, KeyFilter, KeyPage, Removal, ScanEntry, Store, StoreAdmin, StoreError,
    MAX_PAGE_LIMIT,
};

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

    /// Entries held, the entry bound, and bytes held, from the store's
    /// counters or an estimate at most
    /// [`ESTIMATE_MAX_AGE`](crate::store::ESTIMATE_MAX_AGE) old: never a walk
    /// of the entries per call, so a dashboard may poll it (the proxy's
    /// `/stats`). [`cache_info`](Self::cache_info) counts exactly.
    ///
    /// # Errors
    ///
    /// The [`StoreError`] of a store that failed.
    pub async fn cache_info_estimate(&self) -> Result<CacheInfo, StoreError> {
        self.inner.store.info_estimate().await
    }

    /// Checks that the store answers.
    ///
    /// # Errors
    ///
    /// The [`StoreError`] of a store that failed.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.inner.store.ping().await
    }

    /// What `key` (the text form of an [`IdempotencyKey`](crate::IdempotencyKey)) holds.
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

    /// One page of the live keys that match `filter`: at most `limit` (cut
    /// to [`MAX_PAGE_LIMIT`]) from `cursor` (`None` for the first page, else
    /// the [`KeyPage::next_cursor`] of the page before). A page costs about
    /// the same however many keys the store holds, where the store can; see
    /// [`StoreAdmin::page`].
    ///
    /// # Errors
    ///
    /// The [`StoreError`] of a store that failed;
    /// [`StoreError::InvalidCursor`] for a cursor the store did not answer.
    pub async fn keys_page(
        &self,
        filter: &KeyFilter,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<KeyPage, StoreError> {
        let limit = limit.clamp(1, MAX_PAGE_LIMIT);
        self.inner.store.page(filter, cursor, limit).await
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

    /// Deletes the record `key` holds, so the next request with it runs the
    /// action again; leaves an in-flight marker in place and answers
    /// [`Removal::InFlight`] (deleting it would let a retry run the action
    /// while the first run is still going). The check and the delete are one
    /// atomic step in the store.
    ///
    /// # Errors
    ///
    /// The [`StoreError`] of a store that failed.
    pub async fn remove(&self, key: &str) -> Result<Removal, StoreError> {
        self.inner.store.remove_unless_in_flight(key).await
    }

    /// Deletes what `key` holds, an in-flight marker too: then a retry may
    /// run the action while the first run is still going. The way out of a
    /// marker that [`LeaseExpiry::Block`](crate::LeaseExpiry::Block) keeps
    /// until the record TTL. Answers whether there was anything.
    ///
    /// # Errors
    ///
    /// The [`StoreError`] of a store that failed.
    pub async fn remove_in_flight(&self, key: &str) -> Result<bool, StoreError> {
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
            if self.remove(&entry.key).await? == Removal::Removed {
                removed += 1;
                Stats::incr(&self.inner.stats.here().evicted);
            }
        }
        Ok(removed)
    }
}
