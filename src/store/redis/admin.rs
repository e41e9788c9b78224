//! Listing and maintenance on Redis: [`StoreAdmin`] for [`RedisStore`].

use super::codec::Stored;
use super::convert::px;
use super::{codec, scripts, RedisStore};
use crate::record::SharedRecord;
use crate::stats::CacheInfo;
use crate::store::{
    Entry, EntryState, KeyFilter, KeyPage, Removal, ScanEntry, StoreAdmin, StoreError,
};
use redis::Value;
use std::sync::Arc;
use std::time::Duration;

impl StoreAdmin for RedisStore {
    async fn put(&self, key: &str, record: SharedRecord, ttl: Duration) -> Result<(), StoreError> {
        let redis_key = self.redis_key(key);
        let mut connection = self.connection().for_key(&redis_key).await;
        let mut command = redis::cmd("SET");
        command
            .arg(redis_key)
            .arg(record.encode().as_ref())
            .arg("PX")
            .arg(px(ttl));
        self.run(command.query_async::<()>(&mut connection)).await?;
        self.remember(key, &record, ttl);
        Ok(())
    }

    async fn get(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        if let Some(local) = &self.inner.local {
            if let Some(cached) = local.get(key) {
                return Ok(Some(Entry {
                    expires_in: cached
                        .expires_at
                        .saturating_duration_since(std::time::Instant::now()),
                    state: EntryState::Completed(cached.record),
                }));
            }
        }
        let answer = self.script(&scripts::GET, key, &[]).await?;
        if answer == Value::Int(0) {
            return Ok(None);
        }
        Ok(Some(match Self::held(key, answer)? {
            (Stored::Marker(marker), expires_in) => Entry {
                state: EntryState::InFlight {
                    fingerprint: marker.fingerprint,
                    lease: marker.lease,
                },
                expires_in,
            },
            (Stored::Record(record), expires_in) => {
                let record = Arc::new(record);
                self.remember(key, &record, expires_in);
                Entry {
                    state: EntryState::Completed(record),
                    expires_in,
                }
            }
        }))
    }

    async fn remove(&self, key: &str) -> Result<bool, StoreError> {
        if let Some(local) = &self.inner.local {
            local.invalidate(key);
        }
        let redis_key = self.redis_key(key);
        let mut connection = self.connection().for_key(&redis_key).await;
        let mut command = redis::cmd("DEL");
        command.arg(redis_key);
        let removed: u64 = self.run(command.query_async(&mut connection)).await?;
        Ok(removed > 0)
    }

    async fn remove_unless_in_flight(&self, key: &str) -> Result<Removal, StoreError> {
        if let Some(local) = &self.inner.local {
            local.invalidate(key);
        }
        let answer = self
            .script(
                &scripts::REMOVE_UNLESS_IN_FLIGHT,
                key,
                &[codec::MARKER_MAGIC],
            )
            .await?;
        Ok(match answer {
            Value::Int(1) => Removal::Removed,
            Value::Int(2) => Removal::InFlight,
            _ => Removal::Absent,
        })
    }

    /// `SCAN` on each primary in turn (in the order of their addresses), a
    /// bounded number of calls per page, with the filter's components as the
    /// `MATCH` pattern; the cursor is the primary, its `SCAN` cursor, and how
    /// many keys of that batch were answered already. As with `SCAN`, a key
    /// may show up on two pages, and a page may hold fewer keys than the
    /// limit (none, even) while more follow.
    async fn page(
        &self,
        filter: &KeyFilter,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<KeyPage, StoreError> {
        self.page_keys(filter, cursor, limit).await
    }

    async fn clear(&self) -> Result<(), StoreError> {
        if let Some(local) = &self.inner.local {
            local.clear();
        }
        let listed = self.scan_keys().await?;
        self.delete_keys(listed).await
    }

    async fn scan(&self) -> Result<Vec<ScanEntry>, StoreError> {
        let keys = self.scan_keys().await?;
        self.peek_keys(keys).await
    }

    async fn len(&self) -> Result<u64, StoreError> {
        let listed = self.scan_keys().await?;
        Ok(listed.iter().map(|primary| primary.keys.len() as u64).sum())
    }

    async fn info(&self) -> Result<CacheInfo, StoreError> {
        Ok(CacheInfo {
            entries: self.len().await?,
            max_entries: None,
            weighted_bytes: 0,
        })
    }

    /// The last count (a `SCAN` of every primary), made again in the
    /// background once it is [`ESTIMATE_MAX_AGE`](crate::store::ESTIMATE_MAX_AGE) old.
    async fn info_estimate(&self) -> Result<CacheInfo, StoreError> {
        let estimate = Arc::clone(&self.inner.estimate);
        estimate.get(self).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.ping_redis().await
    }

    fn unacknowledged_writes(&self) -> u64 {
        RedisStore::unacknowledged_writes(self)
    }
}
