//! The shared Postgres for tests: `DATABASE_URL`, or the one on
//! 127.0.0.1:5432 (user `postgres`, database `test`). Every test works in a
//! table of its own, under a random name, dropped when the test ends.

#![allow(dead_code, unreachable_pub)]
use std::time::Duration;

use sqlx::Connection;
use tower_idempotency::store::postgres::PostgresStore;

/// `DATABASE_URL`, or the Postgres on 127.0.0.1:5432.
pub fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A fresh random table name, `<what>_<16 hex digits>`.
pub fn random_table(what: &str) -> String {
    format!("test_{what}_{:016x}", rand::random::<u64>())
}

/// A migrated store on `table` in the shared database, with a small pool.
pub async fn store(table: &str) -> PostgresStore {
    let url = database_url();
    let build = async {
        // Beyond the store's default of 2 s: a moment's stall of a busy
        // machine (a new connection, a `CREATE TABLE` while other tests make
        // theirs) must not fail a behaviour test. No test on this shared
        // Postgres relies on the store timing out.
        let store = PostgresStore::builder(url.clone())
            .table(table)
            .max_connections(8)
            .timeout(Duration::from_secs(10))
            .build()
            .await?;
        store.migrate().await?;
        Ok::<_, tower_idempotency::store::StoreError>(store)
    };
    match tokio::time::timeout(Duration::from_secs(20), build).await {
        Ok(Ok(store)) => store,
        Ok(Err(error)) => panic!("Postgres not usable on {url}: {error}"),
        Err(_) => panic!("Postgres not reachable on {url}: no answer within 20 s"),
    }
}

/// Drops the tables it names when dropped, also when the test panicked.
/// Synchronous on purpose: `Drop` cannot await, and the test's runtime may
/// be on its way out, so it drops them from a thread of its own.
#[derive(Debug, Default)]
pub struct DropTables {
    tables: std::sync::Mutex<Vec<String>>,
}

impl DropTables {
    /// A guard for `table`.
    pub fn new(table: &str) -> Self {
        let guard = Self::default();
        guard.add(table);
        guard
    }

    /// Adds `table` (its bare name, or any SQL name) to the tables dropped.
    pub fn add(&self, table: &str) {
        self.tables
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(table.to_owned());
    }

    fn run(tables: Vec<String>) -> Result<(), String> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        runtime.block_on(async {
            let drop_all = async {
                let mut connection = sqlx::PgConnection::connect(&database_url()).await?;
                for table in tables {
                    let name = format!("\"{}\"", table.replace('"', "\"\""));
                    sqlx::query(&format!("DROP TABLE IF EXISTS {name}"))
                        .execute(&mut connection)
                        .await?;
                }
                connection.close().await
            };
            match tokio::time::timeout(Duration::from_secs(10), drop_all).await {
                Ok(result) => result.map_err(|e| e.to_string()),
                Err(_) => Err("no answer within 10 s".to_owned()),
            }
        })
    }
}

impl Drop for DropTables {
    fn drop(&mut self) {
        let tables = std::mem::take(
            &mut *self
                .tables
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        );
        if tables.is_empty() {
            return;
        }
        let names = tables.join(", ");
        // Never panic here: during a failing test's unwinding that would abort.
        match std::thread::spawn(move || Self::run(tables)).join() {
            Ok(Ok(())) => {}
            Ok(Err(error)) => eprintln!("could not drop the test tables {names}: {error}"),
            Err(_) => eprintln!("dropping the test tables {names} panicked"),
        }
    }
}
