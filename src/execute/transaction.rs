//! The transactional form of `execute`: the action's writes and its record
//! commit in one transaction of the store's.

use bytes::Bytes;
use futures_util::future::BoxFuture;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{release, ExecuteError, Started};
use crate::engine::Idempotency;
use crate::key::IdempotencyKey;
use crate::record::Record;
use crate::store::{StoreError, TransactionalStore};

impl<S: TransactionalStore> Idempotency<S> {
    /// Runs `action` in a transaction of the store's (for the Postgres
    /// store, on its pool) unless a call with
    /// the same `key` already committed, and commits the action's writes
    /// together with its result: the work done in this database happens
    /// exactly once, even across a crash.
    ///
    /// `action` gets the open transaction, does its writes in it and returns
    /// its value as a boxed future (`|transaction| Box::pin(async move {
    /// ... })`, the form of sqlx's own `Connection::transaction`, which keeps
    /// the call `Send` for `tokio::spawn` and axum handlers). It must not
    /// commit (it cannot: it only borrows the transaction). The engine then
    /// writes the record into the same transaction and commits once.
    ///
    /// What follows is the Postgres store's behaviour; a
    /// [`TransactionalStore`] of your own keeps the first three points.
    ///
    /// * If `action` fails, panics, or this future is dropped (or the process
    ///   dies) before the commit, the transaction rolls back: neither the
    ///   action's writes nor the record are kept, and the next call runs the
    ///   action once.
    /// * Once the commit happened, every later call replays the value.
    /// * Concurrent duplicates, on this instance or another, run it once:
    ///   the in-flight marker is committed (on its own) before the
    ///   transaction opens, so they wait for the record as with
    ///   [`execute`](Self::execute) (for the engine's `Wait` budget, or 30 s
    ///   under `Reject`). The record replaces the marker inside the
    ///   transaction, fenced by the lease: if the lease was lost meanwhile
    ///   (it expired and another caller took the key over), the transaction
    ///   rolls back and the call fails with [`ExecuteError::Store`].
    /// * The transaction runs at READ COMMITTED (the store's session
    ///   default) unless `action` asks for another level with `SET
    ///   TRANSACTION ISOLATION LEVEL ...` as its first statement. Under
    ///   REPEATABLE READ or SERIALIZABLE, the final write conflicts with any
    ///   change to the marker's row after the transaction's snapshot, among
    ///   them the heartbeat's renewal (every third of the lease TTL): the
    ///   write or the commit then fails with SQLSTATE 40001, the transaction
    ///   rolls back, the marker is released and the call fails with
    ///   [`ExecuteError::Store`] holding
    ///   [`StoreError::SerializationFailure`]
    ///   ([`is_retryable`](StoreError::is_retryable)): nothing was
    ///   committed, and calling again runs the action once.
    /// * If the commit's answer is lost (the connection dies as it commits),
    ///   the call fails with [`ExecuteError::Store`] and the marker is
    ///   released: the retry replays if the commit landed and runs the action
    ///   once if it did not.
    ///
    /// The promise covers writes to this database through the transaction.
    /// It cannot cover anything else the action does: an email sent or
    /// another API called inside `action` happens again if the transaction
    /// rolls back and the action is retried.
    ///
    /// # Errors
    ///
    /// See [`ExecuteError`]; a failed begin or commit is
    /// [`ExecuteError::Store`].
    ///
    /// # Example
    ///
    /// ```no_run
    /// # #[cfg(feature = "postgres")]
    /// # async fn doc(engine: tower_idempotency::Idempotency<tower_idempotency::store::postgres::PostgresStore>)
    /// # -> Result<(), Box<dyn std::error::Error>> {
    /// use tower_idempotency::IdempotencyKey;
    ///
    /// let key = IdempotencyKey::new("checkout-81", "create_order", "orders");
    /// let order_id: i64 = engine
    ///     .execute_in_transaction(&key, |transaction| {
    ///         Box::pin(async move {
    ///             sqlx::query_scalar("INSERT INTO orders (item) VALUES ($1) RETURNING id")
    ///                 .bind("book")
    ///                 .fetch_one(&mut **transaction)
    ///                 .await
    ///         })
    ///     })
    ///     .await?;
    /// # let _ = order_id;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn execute_in_transaction<T, E, F>(
        &self,
        key: &IdempotencyKey,
        action: F,
    ) -> Result<T, ExecuteError<E>>
    where
        T: Serialize + DeserializeOwned,
        F: for<'t> FnOnce(&'t mut S::Transaction) -> BoxFuture<'t, Result<T, E>>,
    {
        let (mut lease, fingerprint) = match self.begin_execute(key).await? {
            Started::Run(lease, fingerprint) => (lease, fingerprint),
            Started::Replayed(value) => return Ok(value),
        };
        let mut transaction = match self.store().open_transaction().await {
            Ok(transaction) => transaction,
            Err(error) => return Err(release(lease, ExecuteError::Store(error)).await),
        };
        // On failure the transaction is dropped (rolled back, its connection
        // returned) before the release, which may need that connection.
        let value = match action(&mut transaction).await {
            Ok(value) => value,
            Err(error) => {
                drop(transaction);
                return Err(release(lease, ExecuteError::Action(error)).await);
            }
        };
        let encoded = match serde_json::to_vec(&value) {
            Ok(encoded) => encoded,
            Err(error) => {
                drop(transaction);
                return Err(release(lease, ExecuteError::Encode(error)).await);
            }
        };
        let record = Record::value(fingerprint, Bytes::from(encoded));
        match lease.commit_in(transaction, record).await {
            Ok(true) => Ok(value),
            Ok(false) => Err(ExecuteError::Store(StoreError::backend(format!(
                "the lease on {:?} was lost before the commit (it expired and another \
                 caller took the key over): the transaction was rolled back",
                lease.key()
            )))),
            Err(error) => Err(release(lease, ExecuteError::Store(error)).await),
        }
    }
}
