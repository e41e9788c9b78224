//! Completing a lease with a write of the caller's own: the hook of the
//! transactional forms, where the record commits together with other writes.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use super::flight::FlightOutcome;
use super::lease::LeaseState;
use super::Lease;
use crate::record::{Record, SharedRecord};
use crate::store::{Store, StoreError};

impl<S: Store> Lease<S> {
    /// Like [`complete`](Self::complete), but `write(record, ttl)` stores
    /// the record instead of the store's `complete`: in a database
    /// transaction together with the action's own writes, say. `write` must
    /// replace the marker only while it still holds [`token`](Self::token),
    /// and answer whether it did.
    ///
    /// * `Ok(true)`: the record is stored; duplicates waiting in this
    ///   process replay it.
    /// * `Ok(false)`: the lease had been lost and nothing was written;
    ///   duplicates start over.
    /// * `Err`: the marker is released (so the next retry runs the action,
    ///   unless the write did land, in which case it replays) and the error
    ///   is returned.
    ///
    /// If this future is dropped while `write` runs, the lease is released
    /// as on any drop.
    ///
    /// # Errors
    ///
    /// The [`StoreError`] that `write` answered.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) async fn complete_with<F, Fut>(
        mut self,
        record: Record,
        write: F,
    ) -> Result<bool, StoreError>
    where
        F: FnOnce(SharedRecord, Duration) -> Fut,
        Fut: Future<Output = Result<bool, StoreError>>,
    {
        let record = Arc::new(record);
        let inner = &self.engine.inner;
        let written = write(record.clone(), inner.config().ttl).await;
        if written.is_err() {
            // The release is fenced by the lease: if the write did land, the
            // marker is gone and this deletes nothing.
            if let Err(error) = inner.store.release(&self.flight.key, self.token).await {
                tracing::warn!(%error, key = self.flight.key, "idempotency lease release failed");
                self.release_later();
            }
        }
        self.state = LeaseState::Finished;
        let outcome = match written {
            Ok(true) => FlightOutcome::Completed(record),
            Ok(false) | Err(_) => FlightOutcome::Released,
        };
        self.engine.end_flight(&self.flight, outcome);
        self.engine.counted(written)
    }
}
