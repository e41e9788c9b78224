//! The transactional form in an HTTP handler behind the layer: the
//! handler's writes happen once per key even when the layer's own record of
//! the response is lost (a crash between the handler's commit and the
//! layer's write), because the retry re-enters the handler, whose record
//! committed with its writes and replays.
#![cfg(feature = "postgres")]

use crate::support::common;
use crate::support::stores::postgres;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use common::*;
use postgres::{random_table, store, DropTables};
use tower_idempotency::store::postgres::PostgresStore;
use tower_idempotency::{Idempotency, IdempotencyKey, IdempotencyLayer};

#[derive(Clone)]
struct App {
    work: Idempotency<PostgresStore>,
    orders: String,
}

/// Creates one order per `Idempotency-Key`, in a transaction with its record.
async fn create_order(
    State(app): State<App>,
    headers: HeaderMap,
) -> Result<(StatusCode, Json<i64>), StatusCode> {
    let key = headers
        .get("idempotency-key")
        .and_then(|key| key.to_str().ok())
        .ok_or(StatusCode::BAD_REQUEST)?;
    let key = IdempotencyKey::new(key, "create_order", "orders");
    let orders = app.orders.clone();
    let id = app
        .work
        .execute_in_transaction(&key, move |transaction| {
            Box::pin(async move {
                sqlx::query_scalar::<_, i64>(&format!(
                    "INSERT INTO {orders} (item) VALUES ('book') RETURNING id"
                ))
                .fetch_one(&mut **transaction)
                .await
            })
        })
        .await
        .map_err(|_| StatusCode::SERVICE_UNAVAILABLE)?;
    Ok((StatusCode::CREATED, Json(id)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_response_record_replays_the_handlers_committed_work() {
    let (responses, work, orders) = (
        random_table("responses"),
        random_table("work"),
        random_table("orders"),
    );
    let cleanup = DropTables::new(&responses);
    cleanup.add(&work);
    cleanup.add(&orders);
    let work_store = store(&work).await;
    let pool = work_store.pool().clone();
    let work = Idempotency::builder().store(work_store).build().unwrap();
    within(
        sqlx::query(&format!(
            "CREATE TABLE {orders} (id bigserial PRIMARY KEY, item text NOT NULL)"
        ))
        .execute(&pool),
    )
    .await
    .unwrap();
    let layer = IdempotencyLayer::builder()
        .store(store(&responses).await)
        .build()
        .unwrap();
    let router = Router::new()
        .route("/orders", post(create_order))
        .with_state(App {
            work: work.clone(),
            orders: orders.clone(),
        });
    let (server, layer) = serve_layered(layer, router).await;

    let first = server.post("/orders", Some("order-1"), "{}").await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert!(server
        .post("/orders", Some("order-1"), "{}")
        .await
        .replayed());

    // The layer's record is gone, as if the process died after the
    // handler's commit and before the layer stored the response.
    within(layer.clear()).await.unwrap();
    let retry = server.post("/orders", Some("order-1"), "{}").await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(!retry.replayed(), "the layer ran the handler again");
    assert_eq!(retry.body, first.body, "the handler replayed its order");
    let count: i64 =
        within(sqlx::query_scalar(&format!("SELECT count(*) FROM {orders}")).fetch_one(&pool))
            .await
            .unwrap();
    assert_eq!(count, 1, "one order for one key");
}
