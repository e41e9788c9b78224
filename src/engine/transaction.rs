//! Completing a lease inside a store's transaction: the record commits
//! together with the action's own writes.

use std::sync::Arc;

use super::flight::FlightOutcome;
use super::lease::{Lease, LeaseState};
use crate::record::Record;
use crate::store::{StoreError, TransactionalStore};

impl<S: TransactionalStore> Lease<S> {
    /// Like [`complete`](Self::complete), but `record` replaces the marker
    /// inside `transaction`, which then commits.
    ///
    /// * `Ok(true)`: committed; duplicates waiting in this process replay
    ///   the record.
    /// * `Ok(false)`: the lease had been lost (it expired and another caller
    ///   took the key over): the transaction is rolled back, nothing was
    ///   written, and duplicates start over.
    /// * `Err`: the write or the commit failed. The lease is still held:
    ///   the caller releases it (fenced by the lease, so if the commit did
    ///   land, the release deletes nothing and the next call replays).
    ///
    /// If this future is dropped while the store works, the transaction
    /// rolls back and the lease is released as on any drop.
    pub(crate) async fn commit_in(
        &mut self,
        mut transaction: S::Transaction,
        record: Record,
    ) -> Result<bool, StoreError> {
        let inner = &self.engine.inner;
        let (store, ttl) = (&inner.store, inner.config().ttl);
        let key = self.flight.key.as_str();
        let written = match store
            .complete_in(&mut transaction, key, self.token, &record, ttl)
            .await
        {
            // Dropping the transaction rolls it back.
            Ok(false) => Ok(false),
            Ok(true) => store.commit(transaction).await.map(|()| true),
            Err(error) => Err(error),
        };
        // On an error the lease stays held, for the caller to release.
        let committed = self.engine.counted(written)?;
        let outcome = if committed {
            FlightOutcome::Completed(Arc::new(record))
        } else {
            FlightOutcome::Released
        };
        self.state = LeaseState::Finished;
        self.engine.end_flight(&self.flight, outcome);
        Ok(committed)
    }
}
