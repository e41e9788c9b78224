//! A store that passes every call to the store it wraps and notes, per
//! storage key, when a record was written: the one per-key trace of the
//! store that no client sees.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tower_idempotency::store::{
    BeginOutcome, Entry, KeyPage, LeaseToken, Removal, RemovalCounts, ScanEntry, SharedRecord,
    Store, StoreAdmin, StoreError,
};
use tower_idempotency::{CacheInfo, Fingerprint, KeyFilter};

/// Per storage key, when `complete` answered that it wrote the record;
/// shared by the wrappers of one store's instances.
pub(crate) type Writes = Arc<Mutex<HashMap<String, Vec<Instant>>>>;

/// `S`, noting every `complete` that wrote its record in [`Writes`].
#[derive(Clone)]
pub(crate) struct Witness<S> {
    inner: S,
    writes: Writes,
}

impl<S> Witness<S> {
    pub(crate) fn new(inner: S, writes: Writes) -> Self {
        Self { inner, writes }
    }
}

impl<S: Store> Store for Witness<S> {
    async fn begin(
        &self,
        key: &str,
        fingerprint: Fingerprint,
        lease: LeaseToken,
        lease_ttl: Duration,
    ) -> Result<BeginOutcome, StoreError> {
        self.inner.begin(key, fingerprint, lease, lease_ttl).await
    }

    async fn renew(
        &self,
        key: &str,
        lease: LeaseToken,
        lease_ttl: Duration,
    ) -> Result<bool, StoreError> {
        self.inner.renew(key, lease, lease_ttl).await
    }

    async fn complete(
        &self,
        key: &str,
        lease: LeaseToken,
        record: SharedRecord,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let written = self.inner.complete(key, lease, record, ttl).await;
        if let Ok(true) = written {
            let mut writes = self.writes.lock().unwrap();
            writes
                .entry(key.to_owned())
                .or_default()
                .push(Instant::now());
        }
        written
    }

    async fn release(&self, key: &str, lease: LeaseToken) -> Result<bool, StoreError> {
        self.inner.release(key, lease).await
    }

    async fn completed_record(&self, key: &str) -> Result<Option<SharedRecord>, StoreError> {
        self.inner.completed_record(key).await
    }

    fn removal_counts(&self) -> RemovalCounts {
        self.inner.removal_counts()
    }

    async fn cleanup_expired(&self) -> Result<(), StoreError> {
        self.inner.cleanup_expired().await
    }

    fn local_record(&self, key: &str) -> Option<SharedRecord> {
        self.inner.local_record(key)
    }

    fn max_record_size(&self) -> Option<usize> {
        self.inner.max_record_size()
    }

    async fn until_changed(&self, key: &str, deadline: Instant) {
        self.inner.until_changed(key, deadline).await;
    }

    async fn renew_many(
        &self,
        leases: &[(&str, LeaseToken)],
        lease_ttl: Duration,
    ) -> Vec<Result<bool, StoreError>> {
        self.inner.renew_many(leases, lease_ttl).await
    }
}

impl<S: StoreAdmin> StoreAdmin for Witness<S> {
    async fn put(&self, key: &str, record: SharedRecord, ttl: Duration) -> Result<(), StoreError> {
        self.inner.put(key, record, ttl).await
    }

    async fn get(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        self.inner.get(key).await
    }

    async fn remove(&self, key: &str) -> Result<bool, StoreError> {
        self.inner.remove(key).await
    }

    async fn remove_unless_in_flight(&self, key: &str) -> Result<Removal, StoreError> {
        self.inner.remove_unless_in_flight(key).await
    }

    async fn page(
        &self,
        filter: &KeyFilter,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<KeyPage, StoreError> {
        self.inner.page(filter, cursor, limit).await
    }

    fn unacknowledged_writes(&self) -> u64 {
        self.inner.unacknowledged_writes()
    }

    async fn info_estimate(&self) -> Result<CacheInfo, StoreError> {
        self.inner.info_estimate().await
    }

    async fn clear(&self) -> Result<(), StoreError> {
        self.inner.clear().await
    }

    async fn scan(&self) -> Result<Vec<ScanEntry>, StoreError> {
        self.inner.scan().await
    }

    async fn len(&self) -> Result<u64, StoreError> {
        self.inner.len().await
    }

    async fn info(&self) -> Result<CacheInfo, StoreError> {
        self.inner.info().await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }
}
