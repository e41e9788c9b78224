//! The Postgres store's side of the transactional form of `execute`.

use std::time::Duration;

use sqlx::{Postgres, Transaction};

use super::PostgresStore;
use crate::record::Record;
use crate::store::{LeaseToken, StoreError, TransactionalStore};

/// The transaction is one on the store's pool, at READ COMMITTED unless the
/// action asks for another level with `SET TRANSACTION ISOLATION LEVEL ...`
/// as its first statement; see
/// [`execute_in_transaction`](crate::Idempotency::execute_in_transaction)
/// for what the record's write and the commit then do.
impl TransactionalStore for PostgresStore {
    type Transaction = Transaction<'static, Postgres>;

    async fn open_transaction(&self) -> Result<Self::Transaction, StoreError> {
        self.transaction().await
    }

    async fn complete_in(
        &self,
        transaction: &mut Self::Transaction,
        key: &str,
        lease: LeaseToken,
        record: &Record,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        self.complete_in_transaction(transaction, key, lease, record, ttl)
            .await
    }

    async fn commit(&self, transaction: Self::Transaction) -> Result<(), StoreError> {
        self.run(transaction.commit()).await
    }
}
