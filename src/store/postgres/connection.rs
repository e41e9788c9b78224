//! Statements on pooled connections that are not checked before use, and
//! the one retry that makes that safe.
//!
//! The pool the builder opens hands out an idle connection as it is
//! (`test_before_acquire(false)`): a check would be a round trip to
//! Postgres before every statement, doubling the cost of a request. A
//! connection the server closed meanwhile (a restart, a failover,
//! `pg_terminate_backend`) then fails the statement it is given, with a
//! lost connection; [`statement!`] runs that statement once
//! more, on a connection that answered a ping. Every statement given to it
//! must be safe to run twice, since a lost answer may hide a statement that
//! was carried out: the store's are (`begin` recognises its own lease
//! token, the rest are fenced by the lease token, or are reads, or writes
//! that a second run leaves as the first did).

use sqlx::pool::PoolConnection;
use sqlx::{Connection, Postgres, Transaction};

use crate::store::StoreError;

use super::PostgresStore;

/// Whether a statement ran a second time, after its first connection was
/// found dead: the first run may have been carried out, its answer lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Attempt {
    First,
    Retry,
}

/// `statement!(store, |connection| future)` runs `future` (one statement on
/// `connection`, a `&mut PgConnection`) on a pooled connection within the
/// store's timeout (one budget for both attempts), and once more on a live
/// connection when the first one turns out dead. Evaluates to
/// `Result<(answer, Attempt), StoreError>`.
///
/// A macro, not a function taking an async closure: the store's futures
/// must be `Send`, and rustc cannot yet prove that of a future holding a
/// generic async closure's future.
macro_rules! statement {
    ($store:expr, |$connection:ident| $statement:expr) => {{
        let store: &$crate::store::postgres::PostgresStore = $store;
        store.run(async {
            let mut first = store.pool().acquire().await?;
            let answer = {
                let $connection: &mut sqlx::PgConnection = &mut first;
                $statement.await
            };
            match answer {
                Err(error) if $crate::store::postgres::connection::lost_connection(&error) => {
                    // Dropped, it is closed: its release ping fails.
                    drop(first);
                    tracing::debug!(%error, "a pooled postgres connection was dead; retrying");
                    let mut live = store.live_connection().await?;
                    let $connection: &mut sqlx::PgConnection = &mut live;
                    Ok(($statement.await?, $crate::store::postgres::connection::Attempt::Retry))
                }
                answer => Ok((answer?, $crate::store::postgres::connection::Attempt::First)),
            }
        })
    }};
}
pub(super) use statement;

impl PostgresStore {
    /// A transaction on a pooled connection, for the transactional form:
    /// its `BEGIN` runs once more on a live connection when the first one
    /// turns out dead (nothing ran on it yet, so that is always safe).
    pub(super) async fn transaction(&self) -> Result<Transaction<'static, Postgres>, StoreError> {
        self.run(async {
            match self.inner.pool.begin().await {
                Err(error) if lost_connection(&error) => {
                    tracing::debug!(%error, "a pooled postgres connection was dead; retrying");
                    Transaction::begin(self.live_connection().await?, None).await
                }
                begun => begun,
            }
        })
        .await
    }

    /// A pooled connection that answers a ping: after one was found dead,
    /// the other idle ones may be too (a restart closed them all). Each dead
    /// one is closed as it is dropped, so the pool opens new ones; the
    /// store's timeout bounds the search.
    pub(super) async fn live_connection(&self) -> Result<PoolConnection<Postgres>, sqlx::Error> {
        loop {
            let mut connection = self.inner.pool.acquire().await?;
            if connection.ping().await.is_ok() {
                return Ok(connection);
            }
        }
    }
}

/// Whether `error` says that the connection is gone (its socket closed, or
/// the server ended its backend), so that a new connection may succeed.
pub(super) fn lost_connection(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_) => true,
        // admin_shutdown (`pg_terminate_backend`, a fast shutdown) and
        // crash_shutdown: the backend ended before it answered.
        sqlx::Error::Database(error) => error
            .code()
            .is_some_and(|code| matches!(&*code, "57P01" | "57P02")),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::lost_connection;

    #[test]
    fn only_a_lost_connection_is_retried() {
        let reset = sqlx::Error::Io(std::io::ErrorKind::ConnectionReset.into());
        assert!(lost_connection(&reset));
        assert!(!lost_connection(&sqlx::Error::PoolTimedOut));
        assert!(!lost_connection(&sqlx::Error::RowNotFound));
    }
}
