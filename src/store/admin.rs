//! Listing and maintenance: the second store trait, beside the protocol.

use std::future::Future;
use std::time::Duration;

use super::page::page_of;
use super::{Entry, EntryState, KeyFilter, KeyPage, Removal, ScanEntry, Store, StoreError};
use crate::record::SharedRecord;
use crate::stats::CacheInfo;

/// Listing and maintenance: what the handle's queries
/// ([`Idempotency::keys`](crate::Idempotency::keys),
/// [`cache_info`](crate::Idempotency::cache_info),
/// [`remove`](crate::Idempotency::remove), ...) and
/// [`mark_executed`](crate::Idempotency::mark_executed) need of a store,
/// beyond the [`Store`] protocol. The stores of this crate implement both; a
/// store of your own may implement only [`Store`].
// `len` counts a remote backend's entries; an `is_empty` would be the same round trip.
#[allow(clippy::len_without_is_empty)]
pub trait StoreAdmin: Store {
    /// Writes `record` under `key`, expiring after `ttl`, whatever the key held.
    fn put(
        &self,
        key: &str,
        record: SharedRecord,
        ttl: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// What `key` holds, if anything.
    fn get(&self, key: &str) -> impl Future<Output = Result<Option<Entry>, StoreError>> + Send;

    /// Deletes whatever `key` holds, an in-flight marker too. Answers
    /// whether there was anything.
    fn remove(&self, key: &str) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Deletes what `key` holds unless it is a live in-flight marker, in one
    /// atomic step (a single script, statement or locked section, never a
    /// read then a delete: a marker written in between must not be deleted).
    fn remove_unless_in_flight(
        &self,
        key: &str,
    ) -> impl Future<Output = Result<Removal, StoreError>> + Send;

    /// One page of the live entries that `filter` matches: at most `limit`
    /// of them, from `cursor` (`None`: the first page; otherwise a
    /// [`KeyPage::next_cursor`] this store answered). A page costs about the
    /// same however many entries the store holds, where the store can
    /// (the crate's remote stores; the memory store walks its entries, at
    /// most its entry bound).
    ///
    /// The default lists every entry ([`scan`](Self::scan)) and answers a
    /// page of them in key order: right for any store, and O(n) per page.
    ///
    /// # Errors
    ///
    /// [`StoreError::InvalidCursor`] for a cursor this store did not answer.
    fn page(
        &self,
        filter: &KeyFilter,
        cursor: Option<&str>,
        limit: usize,
    ) -> impl Future<Output = Result<KeyPage, StoreError>> + Send {
        async move { page_of(self.scan().await?, filter, cursor, limit) }
    }

    /// Deletes every entry of this store (and only this store's, for a shared
    /// backend such as Redis under a prefix).
    fn clear(&self) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Every live entry, without its payload.
    fn scan(&self) -> impl Future<Output = Result<Vec<ScanEntry>, StoreError>> + Send;

    /// How many entries the store holds.
    fn len(&self) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Size and bounds of the store.
    fn info(&self) -> impl Future<Output = Result<CacheInfo, StoreError>> + Send;

    /// Writes the store answered as done although fewer replicas than it
    /// was asked to wait for acknowledged them in time, since it was made
    /// (the Redis store with
    /// [`replica_ack`](crate::store::redis::RedisStoreBuilder::replica_ack)):
    /// each holds on its primary, but a failover before replication catches
    /// up may lose it. Read from a counter in the process, no round trip. A
    /// store without replicas answers 0, the default.
    ///
    /// ```
    /// use tower_idempotency::store::{MemoryStore, StoreAdmin};
    ///
    /// assert_eq!(MemoryStore::new().unacknowledged_writes(), 0);
    /// ```
    fn unacknowledged_writes(&self) -> u64 {
        0
    }

    /// Size and bounds of the store from counters, or an estimate at most
    /// [`ESTIMATE_MAX_AGE`](super::ESTIMATE_MAX_AGE) old, never a walk of its entries per call: what a
    /// dashboard that polls may ask for. The default is [`info`](Self::info).
    fn info_estimate(&self) -> impl Future<Output = Result<CacheInfo, StoreError>> + Send {
        self.info()
    }

    /// Checks that the store answers (`/healthz`). The default asks for
    /// [`len`](Self::len).
    fn ping(&self) -> impl Future<Output = Result<(), StoreError>> + Send {
        async {
            self.len().await?;
            Ok(())
        }
    }
}

/// The record of an entry that holds one: the crate's stores answer
/// [`Store::completed_record`] from [`StoreAdmin::get`].
pub(crate) fn completed(entry: Option<Entry>) -> Option<SharedRecord> {
    match entry {
        Some(Entry {
            state: EntryState::Completed(record),
            ..
        }) => Some(record),
        _ => None,
    }
}
