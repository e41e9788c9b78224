//! The store on Postgres (feature `postgres`), for services that keep their
//! data in Postgres: one table, shared by every instance, and a
//! [transactional form of `execute`](crate::Idempotency::execute_in_transaction)
//! that commits the record together with the caller's own writes.
//!
//! * One table (name configurable, [`PostgresStoreBuilder::table`]) with one
//!   row per key: its state (`in_flight` or `completed`), the lease token
//!   while in flight, the fingerprint, the encoded record once completed
//!   (the versioned [`Record::encode`] form), its creation time and its
//!   expiry. [`PostgresStore::migrate`] creates it; the SQL is in
//!   [`PostgresStore::MIGRATION`] for teams that run their own migrations.
//! * `begin` is one statement: it answers the live row under the key (a
//!   replay, a conflict or a mismatch, and it writes nothing then: no
//!   insert, no update, no row lock), or writes the marker with an
//!   `INSERT ... ON CONFLICT (key) DO UPDATE ... WHERE expired`, taking an
//!   expired row over. The primary key makes the insert atomic: of any
//!   number of concurrent callers on any number of instances exactly one
//!   acquires; a loser whose snapshot predates the winner's row reads it
//!   with a second statement. So a first request costs two round trips
//!   (`begin`, `complete`) and a replay one.
//! * `complete`, `renew` and `release` are single statements that act only
//!   on a live `in_flight` row holding the caller's lease token (fencing).
//! * A pooled connection is not checked before use (a ping would be one
//!   more round trip per statement). A statement whose connection the
//!   server closed meanwhile (a restart, `pg_terminate_backend`) runs once
//!   more on a live connection: the caller sees no error. `begin` then
//!   recognises its own lease token if the lost attempt wrote the marker,
//!   and `complete` its own record.
//! * Times are the database's clock, so instances agree on expiry. Expired
//!   rows are ignored by every read, taken over by `begin`, and deleted by
//!   [`cleanup_expired`](crate::store::Store::cleanup_expired) (the engine's auto-cleanup
//!   calls it), which the index on `expires_at` keeps cheap.
//! * Waiters on another instance (`Concurrent::Wait`) learn of a completion
//!   by bounded polling: the engine re-reads the key with a backoff from
//!   5 ms up to 250 ms, within the wait budget. Not `LISTEN`/`NOTIFY`: a
//!   notifying transaction takes a lock on the database-wide notification
//!   queue at commit, which would serialise every completion (the callers'
//!   own commits, with the transactional form) for the sake of waiters, a
//!   rare case; and no connection is held open for notices.
//! * Every operation runs on a pooled connection and fails within the
//!   store's timeout with [`StoreError::Unavailable`] when Postgres cannot be
//!   reached, refuses connections or was shut down; the pool reconnects by
//!   itself when it returns. A value this build cannot read (a foreign
//!   state, a truncated or newer record) is [`StoreError::Corrupt`].
//!
//! # Isolation
//!
//! The store's statements are written for READ COMMITTED, and the pool the
//! builder opens makes it every session's default (`SET SESSION
//! CHARACTERISTICS` when a connection opens), whatever the server's or the
//! database's `default_transaction_isolation`: a transaction that asks for
//! another level (`BEGIN ISOLATION LEVEL ...`, or `SET TRANSACTION ...` as
//! its first statement) still gets it. A pool of your own
//! ([`PostgresStore::new`]) should do the same. The heartbeat's renewals
//! are one statement per batch ([`Store::renew_many`](crate::store::Store::renew_many)).
//!
//! # Exactly once for work in the same database
//!
//! [`Idempotency::execute_in_transaction`](crate::Idempotency::execute_in_transaction)
//! hands its closure a transaction on the store's pool and writes the record
//! into that same transaction: the closure's writes and the record commit
//! together or not at all. An HTTP handler gets the same promise by calling
//! it with a key taken from the request (see `examples/postgres_orders.rs`).
//! The layer records responses in statements of its own, outside the
//! handler's transaction; behind it the promise still holds, because a
//! retry whose response record was lost (a crash after the handler's
//! commit) re-enters the handler, whose own record replays.
//!
//! The layer does not commit a handler's transaction together with the
//! response it stores. That would need the layer to hand the handler its
//! lease (the key and token, as a request extension where it calls the
//! inner service) and to keep the handler's transaction, and a pooled
//! connection, open after the handler returned, while the response body
//! streams to the client, until the record is written; the closure form
//! gives the same exactly-once effect on the database without either.
//!
//! [`Record::encode`]: crate::Record::encode

use std::future::Future;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgPool;

use self::connection::statement;
use self::convert::{map_error, ttl_ms};
use self::sql::{Statements, Table};
use super::{EntryState, Estimate, LeaseToken, StoreError};

mod admin;
mod builder;
mod connection;
mod convert;
mod migration;
mod protocol;
mod sql;
mod transactional;

pub use builder::{PostgresStoreBuilder, DEFAULT_MAX_CONNECTIONS, DEFAULT_TABLE, DEFAULT_TIMEOUT};

/// The store on Postgres: markers and records as rows of one table.
///
/// Cheap to clone: clones share one connection pool.
///
/// # Example
///
/// ```no_run
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use tower_idempotency::{Concurrent, Idempotency};
/// use tower_idempotency::store::postgres::PostgresStore;
///
/// let store = PostgresStore::builder("postgres://postgres@127.0.0.1/app")
///     .table("idempotency")
///     .build()
///     .await?;
/// store.migrate().await?;
/// let engine = Idempotency::builder()
///     .store(store)
///     .concurrent(Concurrent::wait())
///     .build()?;
/// # drop(engine);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct PostgresStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    table: Table,
    sql: Statements,
    /// The limit on one operation, whatever Postgres does meanwhile.
    timeout: Duration,
    /// Rows deleted by `cleanup_expired`.
    expired: AtomicU64,
    /// The last count of the rows, for `info_estimate`.
    estimate: Arc<Estimate>,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("table", &self.inner.table.name)
            .field("timeout", &self.inner.timeout)
            .finish_non_exhaustive()
    }
}

impl PostgresStore {
    /// A builder for a store on the Postgres at `url`
    /// (`postgres://user:password@host:port/database`).
    pub fn builder(url: impl Into<String>) -> PostgresStoreBuilder {
        PostgresStoreBuilder::new(url)
    }

    /// A store on a pool you configured yourself, in `table` (optionally
    /// `schema.table`), with the default timeout. Use the pool your service
    /// already has, and the transactional form of `execute` runs on it.
    /// Its sessions should default to READ COMMITTED (see
    /// [Isolation](self#isolation)): under REPEATABLE READ or SERIALIZABLE
    /// the store's own statements may fail with
    /// [`StoreError::SerializationFailure`] when they race each other.
    /// sqlx pings a pooled connection before every use unless told not to
    /// (`PgPoolOptions::test_before_acquire(false)`, as the builder's pool
    /// does): a round trip per statement that the store does not need, since
    /// it runs a statement whose connection turns out dead once more.
    ///
    /// # Errors
    ///
    /// [`StoreError::Backend`] for an empty table name.
    pub fn new(pool: PgPool, table: &str) -> Result<Self, StoreError> {
        Self::assemble(pool, table, DEFAULT_TIMEOUT)
    }

    fn assemble(pool: PgPool, table: &str, timeout: Duration) -> Result<Self, StoreError> {
        let table = Table::parse(table)
            .ok_or_else(|| StoreError::backend(format!("invalid table name {table:?}")))?;
        Ok(Self {
            inner: Arc::new(Inner {
                pool,
                sql: Statements::new(&table),
                table,
                timeout,
                expired: AtomicU64::new(0),
                estimate: Arc::default(),
            }),
        })
    }

    /// The connection pool the store uses (for queries and transactions of
    /// your own).
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// The table's name as the store's statements write it: quoted, and
    /// schema-qualified when it was given so.
    pub fn table(&self) -> &str {
        &self.inner.table.name
    }

    /// Runs one operation within the store's timeout.
    async fn run<T>(
        &self,
        operation: impl Future<Output = Result<T, sqlx::Error>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.inner.timeout, operation).await {
            Ok(result) => result.map_err(map_error),
            Err(_elapsed) => Err(StoreError::unavailable(format!(
                "postgres did not answer within {:?}",
                self.inner.timeout
            ))),
        }
    }

    /// The live row under `key`: what it holds and its time left.
    async fn held(&self, key: &str) -> Result<Option<(EntryState, Duration)>, StoreError> {
        let (row, _) = statement!(self, |connection| sqlx::query(&self.inner.sql.get)
            .bind(key)
            .fetch_optional(connection))
        .await?;
        row.map(|row| convert::held(key, &row)).transpose()
    }

    /// The statement that replaces the marker held by `token` with
    /// `record`, fenced: it affects one row if the marker was still the
    /// lease's, none otherwise.
    fn complete_statement<'q>(
        &'q self,
        key: &'q str,
        token: &'q str,
        record: &'q Completion,
        ttl: Duration,
    ) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
        sqlx::query(&self.inner.sql.complete)
            .bind(key)
            .bind(token)
            .bind(record.fingerprint.as_slice())
            .bind(record.encoded.as_ref())
            .bind(record.created_at)
            .bind(ttl_ms(ttl))
    }

    /// Replaces the marker held by `lease` with `record` inside the
    /// caller's transaction, for the transactional form (no retry: a lost
    /// connection has rolled the transaction back). Answers whether the
    /// marker was still the lease's.
    async fn complete_in_transaction(
        &self,
        transaction: &mut sqlx::PgConnection,
        key: &str,
        lease: LeaseToken,
        record: &crate::Record,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let (token, record) = (lease.to_string(), Completion::of(record));
        let completed = self
            .run(
                self.complete_statement(key, &token, &record, ttl)
                    .execute(transaction),
            )
            .await?;
        Ok(completed.rows_affected() == 1)
    }
}

/// A record as `complete` writes it, encoded once however many times the
/// statement runs.
struct Completion {
    fingerprint: [u8; 32],
    encoded: bytes::Bytes,
    created_at: i64,
}

impl Completion {
    fn of(record: &crate::Record) -> Self {
        Self {
            fingerprint: *record.fingerprint.as_bytes(),
            encoded: record.encode(),
            created_at: created_at(record.created_at_ms),
        }
    }
}

/// A creation time as the `bigint` column takes it.
fn created_at(ms: u64) -> i64 {
    i64::try_from(ms).unwrap_or(i64::MAX)
}
