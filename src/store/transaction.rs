//! The store side of the transactional form of `execute`.

use std::future::Future;
use std::time::Duration;

use super::{LeaseToken, Store, StoreError};
use crate::record::Record;

/// A store that writes a record inside a transaction which the action's own
/// writes share, so that both commit together or not at all: what
/// [`Idempotency::execute_in_transaction`](crate::Idempotency::execute_in_transaction)
/// runs on. The Postgres store implements it.
///
/// The engine opens the transaction once the key's marker is held, hands it
/// to the action, then calls [`complete_in`](Self::complete_in) and, if the
/// lease was still held, [`commit`](Self::commit). Dropping a transaction
/// rolls it back.
pub trait TransactionalStore: Store {
    /// An open transaction; dropping it rolls it back.
    type Transaction: Send;

    /// Opens a transaction.
    fn open_transaction(
        &self,
    ) -> impl Future<Output = Result<Self::Transaction, StoreError>> + Send;

    /// Replaces the marker that `lease` holds under `key` with `record`, kept
    /// for `ttl`, inside `transaction`: fenced as
    /// [`Store::complete`] is. Answers whether the marker was still the
    /// lease's; nothing is written when it was not.
    fn complete_in(
        &self,
        transaction: &mut Self::Transaction,
        key: &str,
        lease: LeaseToken,
        record: &Record,
        ttl: Duration,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Commits `transaction`.
    fn commit(
        &self,
        transaction: Self::Transaction,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
}
