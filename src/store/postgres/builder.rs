//! Configuration and connection of a [`PostgresStore`].

use std::time::Duration;

use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::Executor;

use super::convert::map_error;
use super::PostgresStore;
use crate::config::check_duration;
use crate::store::StoreError;

/// The default table name.
pub const DEFAULT_TABLE: &str = "idempotency";
/// The default limit on one store operation, waiting for a pooled
/// connection included: 2 seconds.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
/// The default size of the connection pool: 10.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 10;

/// Makes READ COMMITTED the isolation of every transaction of a session
/// that does not ask for another.
const READ_COMMITTED: &str =
    "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL READ COMMITTED";

/// Builds a [`PostgresStore`]; made by [`PostgresStore::builder`].
#[derive(Debug, Clone)]
#[must_use]
pub struct PostgresStoreBuilder {
    url: String,
    table: String,
    max_connections: u32,
    timeout: Duration,
}

impl PostgresStoreBuilder {
    pub(super) fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            table: DEFAULT_TABLE.to_owned(),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// The table that holds the markers and records (default
    /// `"idempotency"`), optionally schema-qualified (`"app.idempotency"`).
    /// Stores on different tables share a database without seeing each
    /// other.
    pub fn table(mut self, table: impl Into<String>) -> Self {
        self.table = table.into();
        self
    }

    /// The most connections the store's pool opens (default 10). The
    /// transactional form of `execute` holds one for the length of its
    /// closure.
    pub fn max_connections(mut self, max: u32) -> Self {
        self.max_connections = max;
        self
    }

    /// The limit on one operation, waiting for a connection included
    /// (default 2 s). Past it the operation fails with
    /// [`StoreError::Unavailable`]. One over
    /// [`MAX_DURATION`](crate::MAX_DURATION) is refused at build.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Connects to Postgres and builds the store. It does not create the
    /// table: call [`PostgresStore::migrate`], or apply the SQL it documents.
    ///
    /// # Errors
    ///
    /// [`StoreError::Backend`] for an invalid URL or setting (a timeout
    /// over [`MAX_DURATION`](crate::MAX_DURATION) among them: its source is
    /// a [`ConfigError`](crate::ConfigError) naming the maximum),
    /// [`StoreError::Unavailable`] when Postgres cannot be reached.
    pub async fn build(self) -> Result<PostgresStore, StoreError> {
        let store = self.build_lazy()?;
        crate::store::StoreAdmin::ping(&store).await?;
        Ok(store)
    }

    /// Builds the store without connecting: the first operation connects. A
    /// service can so start while Postgres is down. Call it inside a Tokio
    /// runtime.
    ///
    /// # Errors
    ///
    /// [`StoreError::Backend`] for an invalid URL or setting, or outside a
    /// Tokio runtime.
    pub fn build_lazy(self) -> Result<PostgresStore, StoreError> {
        if self.timeout.is_zero() {
            return Err(StoreError::backend(
                "the postgres timeout must be greater than zero",
            ));
        }
        check_duration("the postgres timeout", self.timeout).map_err(StoreError::backend)?;
        if self.max_connections == 0 {
            return Err(StoreError::backend(
                "the postgres pool needs at least one connection",
            ));
        }
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(StoreError::backend("PostgresStore needs a Tokio runtime"));
        }
        let pool: PgPool = PgPoolOptions::new()
            .max_connections(self.max_connections)
            .acquire_timeout(self.timeout)
            // No ping before each statement (the pool's default): it would
            // be one more round trip per statement. A statement whose
            // connection the server closed runs once more on a live one
            // instead (see `connection.rs`).
            .test_before_acquire(false)
            // The store's statements are written for READ COMMITTED: each
            // sees rows committed before it began, and an update that meets
            // a row changed meanwhile re-reads it instead of failing with
            // 40001 as under REPEATABLE READ or SERIALIZABLE. Set as the
            // session default, whatever the server's or the database's, so
            // that a caller's `SET TRANSACTION ISOLATION LEVEL ...` (or an
            // explicit `BEGIN ISOLATION LEVEL ...`) still overrides it for
            // a transaction of its own.
            .after_connect(|connection, _| {
                Box::pin(async move {
                    connection.execute(READ_COMMITTED).await?;
                    Ok(())
                })
            })
            .connect_lazy(&self.url)
            .map_err(map_error)?;
        PostgresStore::assemble(pool, &self.table, self.timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timeout_over_the_maximum_is_refused_before_it_reaches_the_pool() {
        let error = PostgresStore::builder("postgres://localhost/unused")
            .timeout(Duration::MAX)
            .build_lazy()
            .unwrap_err();
        assert!(matches!(error, StoreError::Backend(_)), "{error:?}");
        let source = std::error::Error::source(&error).expect("a ConfigError");
        assert!(source.is::<crate::ConfigError>(), "{source:?}");
        assert!(
            error.to_string().contains("at most 3153600000 s"),
            "{error}"
        );
    }
}
