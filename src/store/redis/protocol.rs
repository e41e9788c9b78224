//! The protocol on Redis: [`Store`] for [`RedisStore`], each operation one script on one key.

use super::codec::{Marker, Stored};
use super::convert::px;
use super::{codec, scripts, RedisStore};
use crate::key::Fingerprint;
use crate::record::{now_ms, SharedRecord};
use crate::store::{BeginOutcome, LeaseToken, Store, StoreAdmin, StoreError};
use redis::Value;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

impl Store for RedisStore {
    async fn begin(
        &self,
        key: &str,
        fingerprint: Fingerprint,
        lease: LeaseToken,
        lease_ttl: Duration,
    ) -> Result<BeginOutcome, StoreError> {
        let marker = Marker {
            lease,
            fingerprint,
            created_at_ms: now_ms(),
        }
        .encode();
        let written = self
            .write_script(&scripts::BEGIN, key, &[&marker, &px(lease_ttl)])
            .await?;
        let wrote = written.wrote();
        if let Some(error) = written.wait_failed {
            if wrote {
                // The marker is ours and nothing ran under it: left behind
                // it would refuse the key for the lease TTL.
                self.release_failed_begin(key, lease).await;
                return Err(error);
            }
        }
        if wrote {
            return Ok(BeginOutcome::Acquired);
        }
        match Self::held(key, written.answer)? {
            (Stored::Marker(marker), expires_in) => Ok(BeginOutcome::InFlight {
                fingerprint: marker.fingerprint,
                expires_in,
            }),
            (Stored::Record(record), expires_in) => {
                let record = Arc::new(record);
                self.remember(key, &record, expires_in);
                Ok(BeginOutcome::Completed(record))
            }
        }
    }

    async fn renew(
        &self,
        key: &str,
        lease: LeaseToken,
        lease_ttl: Duration,
    ) -> Result<bool, StoreError> {
        let prefix = codec::lease_prefix(lease);
        let answer = self
            .script(&scripts::RENEW, key, &[&prefix, &px(lease_ttl)])
            .await?;
        Ok(answer == Value::Int(1))
    }

    async fn renew_many(
        &self,
        leases: &[(&str, LeaseToken)],
        lease_ttl: Duration,
    ) -> Vec<Result<bool, StoreError>> {
        self.renew_batch(leases, lease_ttl).await
    }

    async fn complete(
        &self,
        key: &str,
        lease: LeaseToken,
        record: SharedRecord,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let prefix = codec::lease_prefix(lease);
        let encoded = record.encode();
        let written = self
            .write_script(
                &scripts::COMPLETE,
                key,
                &[&prefix, &encoded, &px(ttl), self.inner.channel.as_bytes()],
            )
            .await?;
        if let Some(error) = written.wait_failed {
            // The record may be written; the engine asks `completed_record`
            // when its retry finds the marker gone.
            return Err(error);
        }
        let completed = written.wrote();
        if completed {
            self.remember(key, &record, ttl);
        }
        Ok(completed)
    }

    async fn release(&self, key: &str, lease: LeaseToken) -> Result<bool, StoreError> {
        let prefix = codec::lease_prefix(lease);
        let channel = self.inner.channel.as_bytes();
        let answer = self
            .script(&scripts::RELEASE, key, &[&prefix, channel])
            .await?;
        Ok(answer == Value::Int(1))
    }

    async fn completed_record(&self, key: &str) -> Result<Option<SharedRecord>, StoreError> {
        Ok(crate::store::completed(self.get(key).await?))
    }

    fn local_record(&self, key: &str) -> Option<SharedRecord> {
        let local = self.inner.local.as_ref()?;
        Some(local.get(key)?.record)
    }

    fn until_changed(
        &self,
        key: &str,
        deadline: tokio::time::Instant,
    ) -> impl Future<Output = ()> + Send {
        // Registered now, so that a notice that comes before the first poll
        // still counts.
        let notice =
            (self.inner.notices.as_ref()).map(|n| n.changed(self.redis_key(key), deadline));
        async move {
            match notice {
                Some(notice) => notice.await,
                None => tokio::time::sleep_until(deadline).await,
            }
        }
    }
}
