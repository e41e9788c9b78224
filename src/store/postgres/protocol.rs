//! The protocol on Postgres: [`Store`] for [`PostgresStore`], each operation a statement fenced by the lease token.

use super::connection::{statement, Attempt};
use super::convert::{map_error, ttl_ms};
use super::{convert, created_at, Completion, PostgresStore};
use crate::key::Fingerprint;
use crate::record::{now_ms, SharedRecord};
use crate::store::{
    BeginOutcome, EntryState, LeaseToken, RemovalCounts, Store, StoreAdmin, StoreError,
};
use sqlx::Row;
use std::collections::HashSet;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

/// How many statements `begin` runs when the key changes under it (another
/// caller's row wins the key after the statement's snapshot, or expires or
/// is deleted before it is read). Each is a fresh look at a key that is
/// changing under it, so more than a couple means something keeps deleting
/// the key.
const BEGIN_ROUNDS: usize = 8;

impl Store for PostgresStore {
    async fn begin(
        &self,
        key: &str,
        fingerprint: Fingerprint,
        lease: LeaseToken,
        lease_ttl: Duration,
    ) -> Result<BeginOutcome, StoreError> {
        let token = lease.to_string();
        for _ in 0..BEGIN_ROUNDS {
            let (row, _) = statement!(self, |connection| sqlx::query(&self.inner.sql.begin)
                .bind(key)
                .bind(&token)
                .bind(fingerprint.as_bytes().as_slice())
                .bind(created_at(now_ms()))
                .bind(ttl_ms(lease_ttl))
                .fetch_optional(connection))
            .await?;
            // No row: another caller's row won the key after this
            // statement's snapshot; the next one sees it.
            let Some(row) = row else { continue };
            if row.try_get::<bool, _>("acquired").map_err(map_error)? {
                return Ok(BeginOutcome::Acquired);
            }
            return Ok(match convert::held(key, &row)? {
                // Our own marker: an attempt whose connection died wrote it
                // before its answer was lost.
                (EntryState::InFlight { lease: held, .. }, _) if held == lease => {
                    BeginOutcome::Acquired
                }
                (EntryState::InFlight { fingerprint, .. }, expires_in) => BeginOutcome::InFlight {
                    fingerprint,
                    expires_in,
                },
                (EntryState::Completed(record), _) => BeginOutcome::Completed(record),
            });
        }
        Err(StoreError::backend(format!(
            "the row of key {key:?} kept changing during begin"
        )))
    }

    async fn renew(
        &self,
        key: &str,
        lease: LeaseToken,
        lease_ttl: Duration,
    ) -> Result<bool, StoreError> {
        let token = lease.to_string();
        let (renewed, _) = statement!(self, |connection| sqlx::query(&self.inner.sql.renew)
            .bind(key)
            .bind(&token)
            .bind(ttl_ms(lease_ttl))
            .execute(connection))
        .await?;
        Ok(renewed.rows_affected() == 1)
    }

    async fn renew_many(
        &self,
        leases: &[(&str, LeaseToken)],
        lease_ttl: Duration,
    ) -> Vec<Result<bool, StoreError>> {
        let keys: Vec<&str> = leases.iter().map(|(key, _)| *key).collect();
        let tokens: Vec<String> = leases.iter().map(|(_, lease)| lease.to_string()).collect();
        let renewed: Result<(Vec<(String, String)>, _), StoreError> = statement!(
            self,
            |connection| sqlx::query_as(&self.inner.sql.renew_many)
                .bind(&keys)
                .bind(&tokens)
                .bind(ttl_ms(lease_ttl))
                .fetch_all(connection)
        )
        .await;
        match renewed {
            Ok((renewed, _)) => {
                let renewed: HashSet<(String, String)> = renewed.into_iter().collect();
                (keys.into_iter().zip(tokens))
                    .map(|(key, token)| Ok(renewed.contains(&(key.to_owned(), token))))
                    .collect()
            }
            Err(error) => crate::store::each_failed(error, leases.len()),
        }
    }

    async fn complete(
        &self,
        key: &str,
        lease: LeaseToken,
        record: SharedRecord,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let (token, completion) = (lease.to_string(), Completion::of(&record));
        let (completed, attempt) = statement!(self, |connection| self
            .complete_statement(key, &token, &completion, ttl)
            .execute(connection))
        .await?;
        if completed.rows_affected() == 1 {
            return Ok(true);
        }
        if attempt == Attempt::First {
            return Ok(false);
        }
        // The lost attempt may have stored the record: then the row holds it.
        Ok(matches!(
            self.held(key).await?,
            Some((EntryState::Completed(stored), _)) if *stored == *record
        ))
    }

    async fn release(&self, key: &str, lease: LeaseToken) -> Result<bool, StoreError> {
        let token = lease.to_string();
        let (released, _) = statement!(self, |connection| sqlx::query(&self.inner.sql.release)
            .bind(key)
            .bind(&token)
            .execute(connection))
        .await?;
        Ok(released.rows_affected() == 1)
    }

    async fn completed_record(&self, key: &str) -> Result<Option<SharedRecord>, StoreError> {
        Ok(crate::store::completed(self.get(key).await?))
    }

    fn removal_counts(&self) -> RemovalCounts {
        RemovalCounts {
            expired: self.inner.expired.load(Relaxed),
            evicted: 0,
        }
    }

    async fn cleanup_expired(&self) -> Result<(), StoreError> {
        let (deleted, _) = statement!(self, |connection| sqlx::query(&self.inner.sql.cleanup)
            .execute(connection))
        .await?;
        self.inner
            .expired
            .fetch_add(deleted.rows_affected(), Relaxed);
        Ok(())
    }
}
