//! The Postgres store under any isolation: its own statements run at READ
//! COMMITTED whatever the database's default, and the transactional form
//! under a caller's REPEATABLE READ or SERIALIZABLE transaction that a
//! heartbeat renewal races either commits once or fails retryably with
//! nothing committed.
#![cfg(feature = "postgres")]

use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use sqlx::Connection;
use tokio::time::timeout;
use tower_idempotency::store::conformance::Suite;
use tower_idempotency::store::postgres::PostgresStore;
use tower_idempotency::{ExecuteError, Idempotency, IdempotencyKey};

use crate::support::stores::postgres::{database_url, random_table, store, DropTables};

const LIMIT: Duration = Duration::from_secs(30);

/// A database of the test's own whose default isolation is SERIALIZABLE,
/// dropped (its sessions ended) when the test ends.
struct SerializableDatabase {
    name: String,
}

impl SerializableDatabase {
    async fn create() -> Self {
        let name = format!("test_serializable_{:016x}", rand::random::<u64>());
        let mut admin = timeout(LIMIT, sqlx::PgConnection::connect(&database_url()))
            .await
            .unwrap()
            .unwrap();
        for statement in [
            format!("CREATE DATABASE \"{name}\""),
            format!("ALTER DATABASE \"{name}\" SET default_transaction_isolation = 'serializable'"),
        ] {
            timeout(LIMIT, sqlx::query(&statement).execute(&mut admin))
                .await
                .unwrap()
                .unwrap();
        }
        Self { name }
    }

    fn url(&self) -> String {
        let base = database_url();
        let (server, _) = base
            .rsplit_once('/')
            .expect("a database URL names a database");
        format!("{server}/{}", self.name)
    }
}

impl Drop for SerializableDatabase {
    fn drop(&mut self) {
        let name = self.name.clone();
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            runtime.block_on(async {
                let drop = async {
                    let mut admin = sqlx::PgConnection::connect(&database_url()).await?;
                    sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                        .execute(&mut admin)
                        .await?;
                    admin.close().await
                };
                match timeout(Duration::from_secs(10), drop).await {
                    Ok(result) => result.map_err(|e| e.to_string()),
                    Err(_) => Err("no answer within 10 s".to_owned()),
                }
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!(
                "could not drop the test database {}: {dropped:?}",
                self.name
            );
        }
    }
}

async fn isolation(connection: impl sqlx::PgExecutor<'_>) -> String {
    timeout(
        LIMIT,
        sqlx::query_scalar("SHOW transaction_isolation").fetch_one(connection),
    )
    .await
    .unwrap()
    .unwrap()
}

async fn store_on(url: &str, table: &str) -> PostgresStore {
    let store = PostgresStore::builder(url)
        .table(table)
        .max_connections(8)
        .timeout(Duration::from_secs(10))
        .build();
    let store = timeout(LIMIT, store).await.unwrap().unwrap();
    timeout(LIMIT, store.migrate()).await.unwrap().unwrap();
    store
}

/// Under a database default of SERIALIZABLE the store's sessions run at
/// READ COMMITTED, an explicit `BEGIN ISOLATION LEVEL` still overrides it,
/// and the whole store contract holds (its 200 racing `begin`s would fail
/// with 40001 at SERIALIZABLE).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_store_runs_at_read_committed_whatever_the_database_default() {
    let database = SerializableDatabase::create().await;
    let url = database.url();
    let mut raw = timeout(LIMIT, sqlx::PgConnection::connect(&url))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        isolation(&mut raw).await,
        "serializable",
        "the database default"
    );
    drop(raw);

    let store = store_on(&url, "isolation").await;
    assert_eq!(isolation(store.pool()).await, "read committed");
    let mut transaction = timeout(LIMIT, store.pool().begin()).await.unwrap().unwrap();
    assert_eq!(isolation(&mut *transaction).await, "read committed");
    drop(transaction);
    let mut connection = timeout(LIMIT, store.pool().acquire())
        .await
        .unwrap()
        .unwrap();
    sqlx::query("BEGIN ISOLATION LEVEL SERIALIZABLE")
        .execute(&mut *connection)
        .await
        .unwrap();
    assert_eq!(isolation(&mut *connection).await, "serializable");
    sqlx::query("ROLLBACK")
        .execute(&mut *connection)
        .await
        .unwrap();
    drop(connection);

    let suite = Suite::new(move || {
        let url = url.clone();
        async move { store_on(&url, &random_table("conformance")).await }
    });
    timeout(Duration::from_secs(120), suite.run())
        .await
        .expect("the conformance suite hung");
    drop(store);
}

/// The transactional form under a caller's `level`, with the lease renewed
/// by the heartbeat between the transaction's snapshot and its final write:
/// the call fails with a retryable error, nothing is committed, the key is
/// free, and the retry runs the action once and commits once.
async fn racing_a_heartbeat(level: &str) {
    let table = random_table("iso_records");
    let side = random_table("iso_side");
    let cleanup = DropTables::new(&table);
    cleanup.add(&side);
    let store = store(&table).await;
    timeout(
        LIMIT,
        sqlx::query(&format!("CREATE TABLE \"{side}\" (run int NOT NULL)")).execute(store.pool()),
    )
    .await
    .unwrap()
    .unwrap();
    // The heartbeat renews every 100 ms.
    let engine = Idempotency::builder()
        .store(store.clone())
        .lease_ttl(Duration::from_millis(300))
        .build()
        .unwrap();
    let key = IdempotencyKey::new(format!("iso-{level}"), "create", "orders");
    let storage_key = key.to_string();
    let runs = Arc::new(AtomicU32::new(0));
    let expiry = format!("SELECT expires_at::text FROM \"{table}\" WHERE key = $1");
    let insert = format!("INSERT INTO \"{side}\" (run) VALUES ($1)");
    let set_level = format!("SET TRANSACTION ISOLATION LEVEL {level}");

    let first = {
        let (runs, pool) = (runs.clone(), store.pool().clone());
        let (expiry, insert) = (expiry.clone(), insert.clone());
        let (set_level, storage_key) = (set_level.clone(), storage_key.clone());
        engine.execute_in_transaction(&key, move |transaction| {
            Box::pin(async move {
                let run = runs.fetch_add(1, SeqCst) + 1;
                sqlx::query(&set_level).execute(&mut **transaction).await?;
                // The transaction's snapshot is taken here.
                sqlx::query(&insert)
                    .bind(run as i32)
                    .execute(&mut **transaction)
                    .await?;
                // Wait, on another connection, until the heartbeat has
                // renewed the marker after the snapshot.
                let before: String = sqlx::query_scalar(&expiry)
                    .bind(&storage_key)
                    .fetch_one(&pool)
                    .await?;
                loop {
                    let now: String = sqlx::query_scalar(&expiry)
                        .bind(&storage_key)
                        .fetch_one(&pool)
                        .await?;
                    if now != before {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Ok::<_, sqlx::Error>(run)
            })
        })
    };
    let failed = timeout(LIMIT, first).await.expect("the first call answers");
    match failed {
        Err(ExecuteError::Store(error)) => {
            assert!(error.is_retryable(), "not retryable: {error}")
        }
        other => panic!("expected a retryable store error under {level}, got {other:?}"),
    }
    let count = format!("SELECT count(*) FROM \"{side}\"");
    let committed: i64 = timeout(LIMIT, sqlx::query_scalar(&count).fetch_one(store.pool()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(committed, 0, "the failed call committed its writes");

    // The retry (at the store's READ COMMITTED) runs once and commits once;
    // the next call replays it.
    for _ in 0..2 {
        let (runs, insert) = (runs.clone(), insert.clone());
        let value = engine.execute_in_transaction(&key, move |transaction| {
            Box::pin(async move {
                let run = runs.fetch_add(1, SeqCst) + 1;
                sqlx::query(&insert)
                    .bind(run as i32)
                    .execute(&mut **transaction)
                    .await?;
                Ok::<_, sqlx::Error>(run)
            })
        });
        let value = timeout(LIMIT, value).await.unwrap().unwrap();
        assert_eq!(value, 2, "the retry ran, then replayed");
    }
    let committed: i64 = timeout(LIMIT, sqlx::query_scalar(&count).fetch_one(store.pool()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(committed, 1, "exactly one committed run");
    assert_eq!(runs.load(SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeatable_read_transaction_racing_a_heartbeat_fails_retryably() {
    racing_a_heartbeat("REPEATABLE READ").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_serializable_transaction_racing_a_heartbeat_fails_retryably() {
    racing_a_heartbeat("SERIALIZABLE").await;
}
