//! What a request costs on Postgres, counted on the wire (Postgres's own
//! answers: one `CommandComplete` per statement it carried out, one
//! `ReadyForQuery` per round trip), and why the pool can skip its ping per
//! checkout: a dead pooled connection, or an answer lost after the
//! statement was carried out, fails no request.
#![cfg(feature = "postgres")]

use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
use std::time::Duration;

use sqlx::postgres::PgConnectOptions;
use sqlx::ConnectOptions;
use tower_idempotency::store::postgres::PostgresStore;
use tower_idempotency::{Idempotency, IdempotencyKey};

use crate::support::common::within;
use crate::support::stores::pg_wire::Wire;
use crate::support::stores::postgres::{database_url, random_table, store, DropTables};

/// A store built the way a user builds it (the builder's pool), on `url`.
async fn store_on(url: String, table: &str, connections: u32) -> PostgresStore {
    within(
        PostgresStore::builder(url)
            .table(table)
            .max_connections(connections)
            .timeout(Duration::from_secs(10))
            .build(),
    )
    .await
    .unwrap()
}

/// A fresh table, and an engine on a store whose every byte to Postgres
/// passes through a [`Wire`] that counts it (and can cut an answer).
struct OnWire {
    wire: Wire,
    store: PostgresStore,
    engine: Idempotency<PostgresStore>,
    _cleanup: DropTables,
}

async fn on_wire(name: &str, connections: u32) -> OnWire {
    let table = random_table(name);
    let cleanup = DropTables::new(&table);
    store(&table).await;
    let wire = Wire::start(&database_url()).await;
    let store = store_on(wire.url(""), &table, connections).await;
    let engine = Idempotency::builder().store(store.clone()).build().unwrap();
    OnWire {
        wire,
        store,
        engine,
        _cleanup: cleanup,
    }
}

/// Waits until every connection of the store's pool is back in it: sqlx
/// pings a connection as it returns, in a task of its own, after the
/// statement's answer reached the caller.
async fn settled(store: &PostgresStore) {
    within(async {
        while store.pool().num_idle() < store.pool().size() as usize {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await;
}

fn key(target: &str) -> IdempotencyKey {
    IdempotencyKey::new("s", "create", target)
}

/// The row's `xmin` and `xmax`: a write (an update, or a row lock) changes
/// one of them.
async fn versions(store: &PostgresStore, key: &str) -> (String, String) {
    within(
        sqlx::query_as(&format!(
            "SELECT xmin::text, xmax::text FROM {} WHERE key = $1",
            store.table()
        ))
        .bind(key)
        .fetch_one(store.pool()),
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_request_costs_two_statements_and_a_replay_one() {
    // One connection, so that its statements are prepared once, below.
    // The table is dropped last, after the store and its pool.
    let OnWire {
        _cleanup,
        wire,
        store,
        engine,
    } = on_wire("round_trips", 1).await;
    let run = || async { Ok::<_, std::io::Error>(7_u32) };
    within(engine.execute(&key("warm"), run)).await.unwrap();
    within(engine.execute(&key("warm"), run)).await.unwrap();
    settled(&store).await;

    let (statements, round_trips) = (wire.statements(), wire.round_trips());
    within(engine.execute(&key("first"), run)).await.unwrap();
    settled(&store).await;
    let first = (
        wire.statements() - statements,
        wire.round_trips() - round_trips,
    );

    let stored_key = key("first").to_string();
    let before = versions(&store, &stored_key).await;
    settled(&store).await;
    let (statements, round_trips) = (wire.statements(), wire.round_trips());
    assert_eq!(within(engine.execute(&key("first"), run)).await.unwrap(), 7);
    settled(&store).await;
    let replay = (
        wire.statements() - statements,
        wire.round_trips() - round_trips,
    );
    eprintln!("first request: {first:?}, replay: {replay:?} (statements, round trips)");

    assert_eq!(first.0, 2, "a first request is begin and complete");
    assert_eq!(replay.0, 1, "a replay is begin alone");
    // No ping before a statement: besides the statements, only the ping
    // sqlx sends as a connection goes back to the pool (one per statement,
    // after its answer reached the caller). A ping per checkout would make
    // it three per statement.
    assert!(first.1 <= 2 * first.0, "{first:?}");
    assert!(replay.1 <= 2 * replay.0, "{replay:?}");

    let after = versions(&store, &stored_key).await;
    assert_eq!(before, after, "the replay wrote to the row");
    assert_eq!(after.1, "0", "the row is locked by no one");
    assert_eq!(engine.stats().store_errors, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_pooled_connections_fail_no_request() {
    let table = random_table("terminated_builder");
    let _cleanup = DropTables::new(&table);
    store(&table).await;
    let application = format!("tower_idempotency_{table}");
    let url = format!("{}?application_name={application}", database_url());
    let store = store_on(url, &table, 4).await;
    let engine = Idempotency::builder().store(store.clone()).build().unwrap();
    let runs = AtomicU32::new(0);
    let run = || async {
        runs.fetch_add(1, SeqCst);
        Ok::<_, std::io::Error>("done".to_owned())
    };
    within(engine.execute::<String, _, _, _>(&key("first"), run))
        .await
        .unwrap();
    // Several idle connections, all of them about to die.
    let held: Vec<_> = within(futures_util::future::join_all(
        (0..3).map(|_| store.pool().acquire()),
    ))
    .await
    .into_iter()
    .map(Result::unwrap)
    .collect();
    drop(held);
    settled(&store).await;
    assert!(store.pool().num_idle() >= 3);

    let terminate = async || {
        let options: PgConnectOptions = database_url().parse().unwrap();
        let mut admin = within(options.connect()).await.unwrap();
        let terminated: Vec<bool> = within(
            sqlx::query_scalar(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE application_name = $1",
            )
            .bind(&application)
            .fetch_all(&mut admin),
        )
        .await
        .unwrap();
        assert!(!terminated.is_empty() && terminated.iter().all(|done| *done));
        // The backends are gone once they leave pg_stat_activity.
        within(async {
            loop {
                let left: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
                )
                .bind(&application)
                .fetch_one(&mut admin)
                .await
                .unwrap();
                if left == 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
    };

    terminate().await;
    // A replay, then a first request: no error, and one run each time.
    assert_eq!(
        within(engine.execute::<String, _, _, _>(&key("first"), run))
            .await
            .unwrap(),
        "done"
    );
    assert_eq!(runs.load(SeqCst), 1);
    within(engine.execute::<String, _, _, _>(&key("second"), run))
        .await
        .unwrap();
    assert_eq!(runs.load(SeqCst), 2);

    // The transactional form opens its transaction on a live connection too.
    settled(&store).await;
    terminate().await;
    let value = within(
        engine.execute_in_transaction(&key("third"), |_transaction| {
            Box::pin(async { Ok::<_, std::io::Error>(3_u32) })
        }),
    )
    .await
    .unwrap();
    assert_eq!(value, 3);
    assert_eq!(engine.stats().store_errors, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_begin_whose_answer_is_lost_finds_its_own_marker() {
    // The table is dropped last, after the store and its pool.
    let OnWire {
        _cleanup,
        wire,
        store,
        engine,
    } = on_wire("lost_begin", 2).await;
    let runs = AtomicU32::new(0);
    let run = || async {
        runs.fetch_add(1, SeqCst);
        Ok::<_, std::io::Error>(1_u32)
    };
    settled(&store).await;

    // The marker is written and committed; its answer never arrives.
    wire.cut_next_answer();
    within(engine.execute(&key("lost"), run)).await.unwrap();
    assert_eq!(wire.cut(), ["SELECT 1"], "the begin that acquired was cut");
    assert_eq!(
        runs.load(SeqCst),
        1,
        "our own marker was taken for another's"
    );
    assert_eq!(within(engine.execute(&key("lost"), run)).await.unwrap(), 1);
    assert_eq!(runs.load(SeqCst), 1);
    assert_eq!(engine.stats().store_errors, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_complete_whose_answer_is_lost_is_reported_stored() {
    // The table is dropped last, after the store and its pool.
    let OnWire {
        _cleanup,
        wire,
        store,
        engine,
    } = on_wire("lost_complete", 2).await;
    let runs = AtomicU32::new(0);
    let run = || async {
        runs.fetch_add(1, SeqCst);
        // The next answer is the record's: it is stored, and the answer
        // never arrives.
        settled(&store).await;
        wire.cut_next_answer();
        Ok::<_, std::io::Error>(2_u32)
    };
    within(engine.execute(&key("lost"), run)).await.unwrap();
    assert_eq!(wire.cut(), ["UPDATE 1"], "the complete was cut");
    assert_eq!(engine.stats().store_errors, 0);
    assert_eq!(within(engine.execute(&key("lost"), run)).await.unwrap(), 2);
    assert_eq!(runs.load(SeqCst), 1);
}
