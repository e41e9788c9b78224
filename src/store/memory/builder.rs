//! [`MemoryStoreBuilder`]: the bounds, and the cache made for them.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use moka::notification::RemovalCause;
use moka::policy::EvictionPolicy;
use moka::sync::Cache;

use super::markers::{RemovalCounters, Stripes};
use super::records::{RecordKey, Slot, SlotExpiry};
use super::{KeyHasher, MemoryStore, DEFAULT_MAX_ENTRIES};
use crate::config::ConfigError;

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
    pub(super) fn assemble(self) -> MemoryStore {
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
