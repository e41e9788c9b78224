//! The optional local tier: completed records kept in process, so a hot
//! replay costs no round trip to Redis.
//!
//! Like the memory store, the tier admits every record and evicts the least
//! recently used first (moka's LRU policy, not TinyLFU, which may turn the
//! newest record away): the records most likely to be replayed, the recent
//! ones, are the ones it keeps.

use std::time::{Duration, Instant};

use moka::policy::EvictionPolicy;
use moka::sync::Cache;
use moka::Expiry;

use crate::record::SharedRecord;

/// Completed records by storage key (without the prefix).
#[derive(Clone)]
pub(super) struct LocalTier {
    cache: Cache<String, Cached>,
    max_ttl: Duration,
}

#[derive(Clone)]
pub(super) struct Cached {
    pub(super) record: SharedRecord,
    /// When the record expires in Redis.
    pub(super) expires_at: Instant,
    /// How long this copy lives here: the record's TTL, capped by the tier's.
    keep_for: Duration,
}

struct KeepFor;

impl Expiry<String, Cached> for KeepFor {
    fn expire_after_create(&self, _key: &String, value: &Cached, _at: Instant) -> Option<Duration> {
        Some(value.keep_for)
    }

    fn expire_after_update(
        &self,
        _key: &String,
        value: &Cached,
        _at: Instant,
        _remaining: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.keep_for)
    }
}

impl LocalTier {
    pub(super) fn new(max_entries: u64, max_ttl: Duration) -> Self {
        Self {
            cache: Cache::builder()
                .eviction_policy(EvictionPolicy::lru())
                .max_capacity(max_entries)
                .expire_after(KeepFor)
                .build(),
            max_ttl,
        }
    }

    /// The record under `key`, while it lives in Redis.
    pub(super) fn get(&self, key: &str) -> Option<Cached> {
        let cached = self.cache.get(key)?;
        (cached.expires_at > Instant::now()).then_some(cached)
    }

    /// Keeps `record`, which expires in Redis after `expires_in`.
    pub(super) fn insert(&self, key: &str, record: SharedRecord, expires_in: Duration) {
        let now = Instant::now();
        let Some(expires_at) = now.checked_add(expires_in) else {
            return;
        };
        let keep_for = expires_in.min(self.max_ttl);
        if keep_for.is_zero() {
            return;
        }
        let cached = Cached {
            record,
            expires_at,
            keep_for,
        };
        self.cache.insert(key.to_owned(), cached);
    }

    pub(super) fn invalidate(&self, key: &str) {
        self.cache.invalidate(key);
    }

    pub(super) fn clear(&self) {
        self.cache.invalidate_all();
        self.cache.run_pending_tasks();
    }
}
