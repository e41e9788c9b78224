//! Listing and maintenance on Postgres: [`StoreAdmin`] for [`PostgresStore`].

use super::connection::statement;
use super::convert::ttl_ms;
use super::{convert, created_at, PostgresStore};
use crate::record::SharedRecord;
use crate::stats::CacheInfo;
use crate::store::{
    decode_cursor, encode_cursor, Entry, KeyFilter, KeyPage, Removal, ScanEntry, StoreAdmin,
    StoreError,
};
use std::sync::Arc;
use std::time::Duration;

impl StoreAdmin for PostgresStore {
    async fn put(&self, key: &str, record: SharedRecord, ttl: Duration) -> Result<(), StoreError> {
        let encoded = record.encode();
        statement!(self, |connection| sqlx::query(&self.inner.sql.put)
            .bind(key)
            .bind(record.fingerprint.as_bytes().as_slice())
            .bind(encoded.as_ref())
            .bind(created_at(record.created_at_ms))
            .bind(ttl_ms(ttl))
            .execute(connection))
        .await?;
        Ok(())
    }

    async fn get(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        Ok(self
            .held(key)
            .await?
            .map(|(state, expires_in)| Entry { state, expires_in }))
    }

    async fn remove(&self, key: &str) -> Result<bool, StoreError> {
        let (live, _): (Option<bool>, _) = statement!(self, |connection| sqlx::query_scalar(
            &self.inner.sql.remove
        )
        .bind(key)
        .fetch_optional(connection))
        .await?;
        Ok(live == Some(true))
    }

    async fn remove_unless_in_flight(&self, key: &str) -> Result<Removal, StoreError> {
        let (removed, in_flight): (bool, bool) = self
            .run(
                sqlx::query_as(&self.inner.sql.remove_unless_in_flight)
                    .bind(key)
                    .fetch_one(&self.inner.pool),
            )
            .await?;
        Ok(if removed {
            Removal::Removed
        } else if in_flight {
            Removal::InFlight
        } else {
            Removal::Absent
        })
    }

    /// Keyset paging in key order on the primary key's index, the filter's
    /// components as a `LIKE` pattern: a page reads about `limit` rows
    /// however many the table holds. The cursor is the page's last key.
    async fn page(
        &self,
        filter: &KeyFilter,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<KeyPage, StoreError> {
        let pattern = filter.pattern("%", like_escape);
        // One row more than the page: whether a next page follows.
        let limit_sql = i64::try_from(limit.saturating_add(1)).unwrap_or(i64::MAX);
        let query = match cursor {
            None => sqlx::query(&self.inner.sql.page_first)
                .bind(pattern)
                .bind(limit_sql),
            Some(cursor) => {
                let after = String::from_utf8(decode_cursor(cursor)?)
                    .map_err(|_| StoreError::InvalidCursor)?;
                sqlx::query(&self.inner.sql.page_after)
                    .bind(pattern)
                    .bind(limit_sql)
                    .bind(after)
            }
        };
        let rows = self.run(query.fetch_all(&self.inner.pool)).await?;
        let mut keys = rows
            .iter()
            .map(convert::scan_entry)
            .collect::<Result<Vec<_>, _>>()?;
        let more = keys.len() > limit;
        keys.truncate(limit);
        let next_cursor = more
            .then(|| keys.last().map(|last| encode_cursor(last.key.as_bytes())))
            .flatten();
        keys.retain(|entry| filter.matches(entry));
        Ok(KeyPage { keys, next_cursor })
    }

    async fn clear(&self) -> Result<(), StoreError> {
        statement!(self, |connection| sqlx::query(&self.inner.sql.clear)
            .execute(connection))
        .await?;
        Ok(())
    }

    async fn scan(&self) -> Result<Vec<ScanEntry>, StoreError> {
        let (rows, _) = statement!(self, |connection| sqlx::query(&self.inner.sql.scan)
            .fetch_all(connection))
        .await?;
        rows.iter().map(convert::scan_entry).collect()
    }

    async fn len(&self) -> Result<u64, StoreError> {
        let (count, _): (i64, _) =
            statement!(self, |connection| sqlx::query_scalar(&self.inner.sql.len)
                .fetch_one(connection))
            .await?;
        Ok(u64::try_from(count).unwrap_or(0))
    }

    async fn info(&self) -> Result<CacheInfo, StoreError> {
        let (bytes, _): (i64, _) = statement!(self, |connection| sqlx::query_scalar(
            &self.inner.sql.stored_bytes
        )
        .fetch_one(connection))
        .await?;
        Ok(CacheInfo {
            entries: self.len().await?,
            max_entries: None,
            weighted_bytes: u64::try_from(bytes).unwrap_or(0),
        })
    }

    /// The last count (`count(*)` of the live rows), made again in the
    /// background once it is [`ESTIMATE_MAX_AGE`](crate::store::ESTIMATE_MAX_AGE) old.
    async fn info_estimate(&self) -> Result<CacheInfo, StoreError> {
        let estimate = Arc::clone(&self.inner.estimate);
        estimate.get(self).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        statement!(self, |connection| sqlx::query("SELECT 1")
            .execute(connection))
        .await?;
        Ok(())
    }
}

/// `text` as a `LIKE` pattern that matches it literally (backslash escapes).
fn like_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}
