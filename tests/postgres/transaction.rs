//! The transactional form of `execute` on the real Postgres: the action's
//! writes and its record commit together, or neither is kept.
#![cfg(feature = "postgres")]

use crate::support::common;
use crate::support::stores::postgres;

use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use common::within;
use futures_util::future::BoxFuture;
use postgres::{random_table, store, DropTables};
use sqlx::{Postgres, Transaction};
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tower_idempotency::store::postgres::PostgresStore;
use tower_idempotency::{Concurrent, ExecuteError, Idempotency, IdempotencyKey, KeyFilter};

/// A store table and an orders table, both dropped when the test ends.
struct Orders {
    engine: Idempotency<PostgresStore>,
    /// The engine's store (a clone): its table and pool.
    store: PostgresStore,
    orders: String,
    _cleanup: DropTables,
}

impl Orders {
    async fn new() -> Self {
        Self::with(|builder| builder).await
    }

    async fn with(
        configure: impl FnOnce(
            tower_idempotency::IdempotencyBuilder<PostgresStore>,
        ) -> tower_idempotency::IdempotencyBuilder<PostgresStore>,
    ) -> Self {
        let table = random_table("records");
        let orders = random_table("orders");
        let cleanup = DropTables::new(&table);
        cleanup.add(&orders);
        let store = store(&table).await;
        within(
            sqlx::query(&format!(
                "CREATE TABLE {orders} (id bigserial PRIMARY KEY, item text NOT NULL)"
            ))
            .execute(store.pool()),
        )
        .await
        .unwrap();
        let engine = configure(Idempotency::builder().store(store.clone()))
            .build()
            .unwrap();
        Self {
            engine,
            store,
            orders,
            _cleanup: cleanup,
        }
    }

    /// Another instance of the service: its own pool on the same tables.
    async fn another_instance(&self) -> Idempotency<PostgresStore> {
        let table = self.store.table().trim_matches('"').to_owned();
        Idempotency::builder()
            .store(store(&table).await)
            .concurrent(Concurrent::wait())
            .build()
            .unwrap()
    }

    /// Orders committed, as any other connection sees them.
    async fn count(&self) -> i64 {
        within(
            sqlx::query_scalar(&format!("SELECT count(*) FROM {}", self.orders))
                .fetch_one(self.store.pool()),
        )
        .await
        .unwrap()
    }
}

/// The business write: one order, its id back.
async fn insert_order(
    transaction: &mut Transaction<'static, Postgres>,
    orders: &str,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(&format!(
        "INSERT INTO {orders} (item) VALUES ('book') RETURNING id"
    ))
    .fetch_one(&mut **transaction)
    .await
}

/// The action of the tests: one order in the transaction, counted in `runs`.
fn place_order(
    orders: &str,
    runs: &Arc<AtomicU32>,
) -> impl for<'t> FnOnce(
    &'t mut Transaction<'static, Postgres>,
) -> BoxFuture<'t, Result<i64, sqlx::Error>>
       + Send
       + 'static {
    let (orders, runs) = (orders.to_owned(), runs.clone());
    move |transaction| {
        Box::pin(async move {
            runs.fetch_add(1, SeqCst);
            insert_order(transaction, &orders).await
        })
    }
}

fn key(name: &str) -> IdempotencyKey {
    IdempotencyKey::new(name, "create_order", "orders")
}

#[tokio::test]
async fn a_retry_after_the_commit_replays_and_writes_nothing() {
    let shop = Orders::new().await;
    let runs = Arc::new(AtomicU32::new(0));
    let mut ids = Vec::new();
    for _attempt in 0..3 {
        let order = place_order(&shop.orders, &runs);
        let id: i64 = within(shop.engine.execute_in_transaction(&key("k1"), order))
            .await
            .unwrap();
        ids.push(id);
    }
    assert_eq!(runs.load(SeqCst), 1);
    assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
    assert_eq!(shop.count().await, 1);
    // The record is the one `execute` and `check_executed` read.
    assert_eq!(
        within(shop.engine.check_executed::<i64>(&key("k1")))
            .await
            .unwrap(),
        Some(ids[0])
    );
}

#[tokio::test]
async fn a_failed_action_keeps_nothing_and_the_retry_runs_once() {
    let shop = Orders::new().await;
    let orders = shop.orders.clone();
    let failed = within(
        shop.engine
            .execute_in_transaction(&key("k2"), move |transaction| {
                Box::pin(async move {
                    insert_order(transaction, &orders).await?;
                    Err::<i64, _>(sqlx::Error::Protocol("payment declined".to_owned()))
                })
            }),
    )
    .await;
    assert!(matches!(failed, Err(ExecuteError::Action(_))), "{failed:?}");
    assert_eq!(shop.count().await, 0, "the failed action's order was kept");
    assert!(within(shop.engine.keys(&KeyFilter::default()))
        .await
        .unwrap()
        .is_empty());

    let runs = Arc::new(AtomicU32::new(0));
    let order = place_order(&shop.orders, &runs);
    within(shop.engine.execute_in_transaction(&key("k2"), order))
        .await
        .unwrap();
    assert_eq!(runs.load(SeqCst), 1);
    assert_eq!(shop.count().await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_action_keeps_nothing_and_the_retry_runs_once() {
    let shop = Orders::new().await;
    let (engine, orders) = (shop.engine.clone(), shop.orders.clone());
    let panicked = tokio::spawn(async move {
        engine
            .execute_in_transaction(&key("k3"), move |transaction| {
                Box::pin(async move {
                    insert_order(transaction, &orders).await?;
                    panic!("the handler crashed after its write");
                    #[allow(unreachable_code)]
                    Ok::<i64, sqlx::Error>(0)
                })
            })
            .await
    });
    assert!(within(panicked).await.unwrap_err().is_panic());
    assert_eq!(shop.count().await, 0);

    let runs = Arc::new(AtomicU32::new(0));
    let order = place_order(&shop.orders, &runs);
    within(shop.engine.execute_in_transaction(&key("k3"), order))
        .await
        .unwrap();
    assert_eq!(runs.load(SeqCst), 1);
    assert_eq!(shop.count().await, 1);
}

/// The future is dropped after the business write and before the commit
/// (the client went away, a timeout fired): neither the order nor the
/// record is kept, and the retry runs the action once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_dropped_before_the_commit_keeps_neither_row() {
    let shop = Orders::with(|builder| builder.concurrent(Concurrent::wait())).await;
    let (engine, orders) = (shop.engine.clone(), shop.orders.clone());
    let (written, wrote) = oneshot::channel();
    let call = tokio::spawn(async move {
        engine
            .execute_in_transaction(&key("k4"), move |transaction| {
                Box::pin(async move {
                    let id = insert_order(transaction, &orders).await?;
                    let _ = written.send(());
                    std::future::pending::<()>().await;
                    Ok::<i64, sqlx::Error>(id)
                })
            })
            .await
    });
    within(wrote).await.unwrap();
    call.abort();
    assert!(within(call).await.unwrap_err().is_cancelled());
    assert_eq!(shop.count().await, 0, "an uncommitted order is visible");
    assert_eq!(
        within(shop.engine.check_executed::<i64>(&key("k4")))
            .await
            .unwrap(),
        None
    );

    let runs = Arc::new(AtomicU32::new(0));
    let order = place_order(&shop.orders, &runs);
    within(shop.engine.execute_in_transaction(&key("k4"), order))
        .await
        .unwrap();
    assert_eq!(runs.load(SeqCst), 1);
    assert_eq!(shop.count().await, 1);
}

/// The process dies between the business write and the commit: its
/// runtime and connections vanish with no release. The server rolls the
/// transaction back; the marker expires with its lease TTL and the retry on
/// another instance runs the action once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_that_dies_before_the_commit_keeps_neither_row() {
    const LEASE_TTL: Duration = Duration::from_millis(600);
    let shop = Orders::new().await;
    let table = shop.store.table().trim_matches('"').to_owned();
    let orders = shop.orders.clone();
    let (written, wrote) = oneshot::channel();
    // The "process": a runtime of its own, with its own engine and pool.
    let process = std::thread::spawn(move || {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let (die, dead) = std::sync::mpsc::channel::<()>();
        runtime.spawn(async move {
            let engine = Idempotency::builder()
                .store(store(&table).await)
                .lease_ttl(LEASE_TTL)
                .build()
                .unwrap();
            let _ = engine
                .execute_in_transaction(&key("k5"), move |transaction| {
                    Box::pin(async move {
                        let id = insert_order(transaction, &orders).await?;
                        let _ = written.send(die);
                        std::future::pending::<()>().await;
                        Ok::<i64, sqlx::Error>(id)
                    })
                })
                .await;
        });
        let _ = dead.recv_timeout(Duration::from_secs(20));
        // Gone at once: no task runs again, every socket closes.
        runtime.shutdown_background();
    });
    let die = within(wrote).await.unwrap();
    drop(die);
    within(tokio::task::spawn_blocking(move || process.join().unwrap()))
        .await
        .unwrap();
    assert_eq!(shop.count().await, 0);

    // Another instance, waiting out the dead one's lease.
    let survivor = shop.another_instance().await;
    let runs = Arc::new(AtomicU32::new(0));
    let order = place_order(&shop.orders, &runs);
    within(survivor.execute_in_transaction(&key("k5"), order))
        .await
        .unwrap();
    assert_eq!(runs.load(SeqCst), 1);
    assert_eq!(shop.count().await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_duplicates_on_two_instances_write_one_order() {
    let shop = Orders::new().await;
    let engines = [shop.another_instance().await, shop.another_instance().await];
    let runs = Arc::new(AtomicU32::new(0));
    let start = Arc::new(tokio::sync::Barrier::new(100));
    let mut callers = JoinSet::new();
    for caller in 0..100 {
        let engine = engines[caller % 2].clone();
        let order = place_order(&shop.orders, &runs);
        let start = start.clone();
        callers.spawn(async move {
            start.wait().await;
            engine.execute_in_transaction(&key("k6"), order).await
        });
    }
    let mut ids = Vec::new();
    while let Some(id) = within(callers.join_next()).await {
        ids.push(id.unwrap().unwrap());
    }
    assert_eq!(ids.len(), 100);
    assert!(ids.iter().all(|id| *id == ids[0]));
    assert_eq!(runs.load(SeqCst), 1);
    assert_eq!(shop.count().await, 1);
}

/// A lease taken over while the action runs (here: another holder's token
/// written over the marker) cannot commit: the action's writes roll back
/// and the call fails, so only the new holder's work is ever kept.
#[tokio::test]
async fn a_lease_taken_over_before_the_commit_rolls_the_work_back() {
    let shop = Orders::new().await;
    let (orders, pool) = (shop.orders.clone(), shop.store.pool().clone());
    let take_over = format!(
        "UPDATE {} SET lease_token = 'ffffffffffffffffffffffffffffffff'",
        shop.store.table()
    );
    let lost = within(
        shop.engine
            .execute_in_transaction(&key("k7"), move |transaction| {
                Box::pin(async move {
                    let id = insert_order(transaction, &orders).await?;
                    sqlx::query(&take_over).execute(&pool).await?;
                    Ok::<i64, sqlx::Error>(id)
                })
            }),
    )
    .await;
    assert!(matches!(lost, Err(ExecuteError::Store(_))), "{lost:?}");
    assert_eq!(shop.count().await, 0, "work under a lost lease was kept");
    assert_eq!(
        within(shop.engine.check_executed::<i64>(&key("k7")))
            .await
            .unwrap(),
        None
    );
}
