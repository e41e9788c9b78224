//! The store's table: the migration, as SQL for teams that run their own
//! migrations and as [`PostgresStore::migrate`] for the others.

use super::sql::Table;
use super::PostgresStore;
use crate::store::StoreError;

/// The migration, with `{table}` and `{index}` for the quoted names of the
/// table and of its expiry index. Its statements contain no `;` of their own.
const MIGRATION: &str = include_str!("migration.sql");

/// The statements of [`MIGRATION`] for `table`.
fn migration(table: &Table) -> Vec<String> {
    MIGRATION
        .replace("{index}", &table.index)
        .replace("{table}", &table.name)
        .split(';')
        .map(str::trim)
        .filter(|statement| !statement.is_empty())
        .map(str::to_owned)
        .collect()
}

impl PostgresStore {
    /// The migration, with `{table}` and `{index}` standing for the quoted
    /// table name and the quoted name of its expiry index
    /// (`<table>_expires_at`), for teams that run their own migrations:
    ///
    /// ```sql
    #[doc = include_str!("migration.sql")]
    /// ```
    pub const MIGRATION: &'static str = MIGRATION;

    /// Creates the table and its expiry index unless they exist
    /// ([`MIGRATION`](Self::MIGRATION)). Safe to call from every instance at
    /// start-up: concurrent calls are serialised by an advisory lock.
    ///
    /// # Errors
    ///
    /// The [`StoreError`] of a failed statement (a missing schema, or no
    /// right to create tables, is [`StoreError::Backend`]).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let statements = migration(&self.inner.table);
        self.run(async {
            let mut transaction = self.inner.pool.begin().await?;
            sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
                .bind(&self.inner.table.name)
                .execute(&mut *transaction)
                .await?;
            for statement in &statements {
                sqlx::query(statement).execute(&mut *transaction).await?;
            }
            transaction.commit().await
        })
        .await
    }
}
