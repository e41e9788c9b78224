//! The Postgres store on the real server: several instances on one table,
//! outages, and recovery.
#![cfg(feature = "postgres")]

use crate::support::common;
use crate::support::stores::postgres;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use http::StatusCode;
use postgres::{database_url, random_table, store, DropTables};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::ConnectOptions;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tower_idempotency::store::postgres::PostgresStore;
use tower_idempotency::store::{Store, StoreAdmin, StoreError};
use tower_idempotency::{Concurrent, ExecuteError, Idempotency, IdempotencyKey, IdempotencyLayer};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_run_two_hundred_concurrent_duplicates_once() {
    let table = random_table("instances");
    let _cleanup = DropTables::new(&table);
    let engines: Vec<_> = [store(&table).await, store(&table).await]
        .into_iter()
        .map(|store| {
            Idempotency::builder()
                .store(store)
                .concurrent(Concurrent::wait())
                .build()
                .unwrap()
        })
        .collect();
    let runs = Arc::new(AtomicU32::new(0));
    let start = Arc::new(tokio::sync::Barrier::new(200));
    let key = IdempotencyKey::new("signal-1", "create_invoice", "billing");
    let mut callers = JoinSet::new();
    for caller in 0..200 {
        let engine = engines[caller % 2].clone();
        let (runs, start, key) = (runs.clone(), start.clone(), key.clone());
        callers.spawn(async move {
            start.wait().await;
            engine
                .execute(&key, || async {
                    let run = runs.fetch_add(1, SeqCst) + 1;
                    Ok::<_, std::io::Error>(format!("invoice-{run}"))
                })
                .await
        });
    }
    let mut results = Vec::new();
    while let Some(result) = within(callers.join_next()).await {
        results.push(result.unwrap().unwrap());
    }
    assert_eq!(runs.load(SeqCst), 1, "the action ran more than once");
    assert_eq!(results.len(), 200);
    assert!(results.iter().all(|invoice| invoice == "invoice-1"));
    // Both instances see the one record.
    for engine in &engines {
        assert_eq!(
            within(engine.check_executed::<String>(&key)).await.unwrap(),
            Some("invoice-1".to_owned())
        );
    }
}

/// A free port on loopback that nobody listens on (bound, then let go).
async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

/// A store whose connections go to `addr`, with short limits so that an
/// outage answers fast.
fn store_at(addr: SocketAddr, table: &str) -> PostgresStore {
    let options: PgConnectOptions = database_url().parse().unwrap();
    let options = options.host(&addr.ip().to_string()).port(addr.port());
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_millis(500))
        .connect_lazy_with(options);
    PostgresStore::new(pool, table).unwrap()
}

#[tokio::test]
async fn a_closed_port_is_unavailable_and_a_503_under_fail_closed() {
    let table = random_table("closed");
    let store = store_at(closed_port().await, &table);
    let begun = within(store.begin(
        "k",
        tower_idempotency::Fingerprint::of_bytes(b"fp"),
        tower_idempotency::store::LeaseToken::random(),
        Duration::from_secs(60),
    ))
    .await;
    assert!(
        matches!(begun, Err(StoreError::Unavailable(_))),
        "{begun:?}"
    );
    let engine = Idempotency::builder().store(store.clone()).build().unwrap();
    let key = IdempotencyKey::new("s", "a", "t");
    let executed = within(engine.execute(&key, || async { Ok::<_, std::io::Error>(1) })).await;
    assert!(
        matches!(
            executed,
            Err(ExecuteError::Store(StoreError::Unavailable(_)))
        ),
        "{executed:?}"
    );

    let layer = IdempotencyLayer::builder().store(store).build().unwrap();
    let (server, handle, runs) = serve_orders(layer).await;
    let reply = server.post("/orders", Some("k"), "{}").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.headers["retry-after"], "1");
    assert_eq!(runs.get(), 0, "the handler ran unprotected");
    assert_eq!(handle.stats().store_errors, 1);
}

/// A TCP forwarder to the real Postgres on a fixed port: the database as
/// the store sees it, which can go down (port closed, connections cut) and
/// come back on the same port, as a restarted server does.
struct Forwarder {
    addr: SocketAddr,
    target: SocketAddr,
    tasks: JoinSet<()>,
}

impl Forwarder {
    async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut forwarder = Self {
            addr: listener.local_addr().unwrap(),
            target,
            tasks: JoinSet::new(),
        };
        forwarder.serve(listener);
        forwarder
    }

    fn serve(&mut self, listener: TcpListener) {
        let target = self.target;
        self.tasks.spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((mut client, _)) = listener.accept().await {
                connections.spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        });
    }

    /// Closes the port and cuts every connection through it.
    async fn stop(&mut self) {
        self.tasks.shutdown().await;
    }

    /// Listens on the same port again.
    async fn restart(&mut self) {
        let listener = TcpListener::bind(self.addr).await.unwrap();
        self.serve(listener);
    }
}

async fn database_addr() -> SocketAddr {
    let options: PgConnectOptions = database_url().parse().unwrap();
    let target = format!("{}:{}", options.get_host(), options.get_port());
    tokio::net::lookup_host(target)
        .await
        .unwrap()
        .next()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_goes_away_and_returns_is_recovered_by_itself() {
    let table = random_table("outage");
    let _cleanup = DropTables::new(&table);
    store(&table).await; // migrated through a direct connection
    let mut database = Forwarder::start(database_addr().await).await;
    let layer = IdempotencyLayer::builder()
        .store(store_at(database.addr, &table))
        .build()
        .unwrap();
    let (server, handle, runs) = serve_orders(layer).await;
    assert_eq!(
        server.post("/orders", Some("before"), "{}").await.status,
        StatusCode::CREATED
    );

    database.stop().await;
    let reply = server.post("/orders", Some("during"), "{}").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(runs.get(), 1, "a request ran while the store was down");

    database.restart().await;
    // No restart of the service: the pool reconnects on its own.
    assert!(server
        .post("/orders", Some("before"), "{}")
        .await
        .replayed());
    assert_eq!(
        server.post("/orders", Some("during"), "{}").await.status,
        StatusCode::CREATED
    );
    assert_eq!(runs.get(), 2);
    assert_eq!(handle.stats().store_errors, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_terminated_by_the_server_are_replaced_without_an_error() {
    let table = random_table("terminated");
    let _cleanup = DropTables::new(&table);
    store(&table).await;
    let application = format!("tower_idempotency_{}", table);
    let options: PgConnectOptions = database_url().parse().unwrap();
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect_lazy_with(options.clone().application_name(&application));
    let engine = Idempotency::builder()
        .store(PostgresStore::new(pool, &table).unwrap())
        .build()
        .unwrap();
    let runs = AtomicU32::new(0);
    let run = || async {
        runs.fetch_add(1, SeqCst);
        Ok::<_, std::io::Error>("done".to_owned())
    };
    let first = IdempotencyKey::new("s", "a", "first");
    within(engine.execute::<String, _, _, _>(&first, run))
        .await
        .unwrap();

    // What an administrator or a failover does to the store's connections.
    let mut admin = within(options.connect()).await.unwrap();
    let terminated: Vec<bool> = within(
        sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
        )
        .bind(&application)
        .fetch_all(&mut admin),
    )
    .await
    .unwrap();
    assert!(!terminated.is_empty() && terminated.iter().all(|done| *done));

    // The pool checks a connection before use and replaces a dead one.
    within(engine.execute::<String, _, _, _>(&first, run))
        .await
        .unwrap();
    let second = IdempotencyKey::new("s", "a", "second");
    within(engine.execute::<String, _, _, _>(&second, run))
        .await
        .unwrap();
    assert_eq!(runs.load(SeqCst), 2);
    assert_eq!(engine.stats().store_errors, 0);
}

/// Writes rows whose expiry is already past, as a store would find them
/// once their TTL ran out.
async fn write_expired_rows(store: &PostgresStore, keys: &[&str]) {
    for key in keys {
        let insert = format!(
            "INSERT INTO {} (key, state, fingerprint, record, created_at_ms, expires_at) \
             VALUES ($1, 'completed', $2, NULL, 0, clock_timestamp() - interval '1 second')",
            store.table()
        );
        within(
            sqlx::query(&insert)
                .bind(*key)
                .bind(vec![0_u8; 32])
                .execute(store.pool()),
        )
        .await
        .unwrap();
    }
}

async fn rows(store: &PostgresStore) -> i64 {
    within(
        sqlx::query_scalar(&format!("SELECT count(*) FROM {}", store.table()))
            .fetch_one(store.pool()),
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_rows_are_ignored_and_cleaned_up_through_the_index() {
    let table = random_table("expiry");
    let _cleanup = DropTables::new(&table);
    let store = store(&table).await;
    let index: Option<String> = within(
        sqlx::query_scalar("SELECT indexdef FROM pg_indexes WHERE indexname = $1")
            .bind(format!("{table}_expires_at"))
            .fetch_optional(store.pool()),
    )
    .await
    .unwrap();
    assert!(
        index.is_some_and(|definition| definition.contains("(expires_at)")),
        "the migration indexes the expiry"
    );

    let engine = Idempotency::builder().store(store.clone()).build().unwrap();
    write_expired_rows(&store, &["s:a:one", "s:a:two"]).await;
    assert!(within(store.get("s:a:one")).await.unwrap().is_none());
    assert!(within(store.scan()).await.unwrap().is_empty());
    assert_eq!(within(store.len()).await.unwrap(), 0);
    assert_eq!(rows(&store).await, 2, "expired rows stay until a cleanup");

    within(engine.cleanup_expired()).await.unwrap();
    assert_eq!(rows(&store).await, 0);
    assert_eq!(engine.stats().expired, 2);

    // The auto-cleanup task does the same on its own.
    write_expired_rows(&store, &["s:a:three"]).await;
    engine
        .start_auto_cleanup(Duration::from_millis(20))
        .unwrap();
    within(async {
        while rows(&store).await > 0 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert_eq!(engine.stats().expired, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn instances_that_migrate_at_once_all_succeed() {
    let table = random_table("migrate");
    let _cleanup = DropTables::new(&table);
    let url = database_url();
    let mut instances = JoinSet::new();
    for _ in 0..8 {
        let (url, table) = (url.clone(), table.clone());
        instances.spawn(async move {
            let store = PostgresStore::builder(url)
                .table(table)
                .max_connections(1)
                .build()
                .await?;
            store.migrate().await
        });
    }
    while let Some(migrated) = within(instances.join_next()).await {
        migrated.unwrap().unwrap();
    }
    assert_eq!(rows(&store(&table).await).await, 0);
}
