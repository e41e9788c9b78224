//! An orders API on Postgres whose orders are created exactly once per
//! `Idempotency-Key`, even when the handler dies half-way: the order and the
//! idempotency record commit in one transaction
//! ([`Idempotency::execute_in_transaction`]).
//!
//! ```text
//! cargo run --example postgres_orders --features postgres -- \
//!     [--listen 127.0.0.1:3004] [--database postgres://postgres@127.0.0.1:5432/test]
//! ```
//!
//! `POST /orders` with an `Idempotency-Key` header and `{"item": "..."}`
//! creates an order; `?crash=true` makes the handler panic after it wrote the
//! order and before the commit (the connection is cut, as if the handler
//! were killed); `?slow_ms=N` makes it wait N ms there (kill the process
//! meanwhile). `GET /orders` lists the orders. On start it prints the curl
//! lines that show a retry replayed and an order created once after a kill.

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use bytes::Bytes;
use clap::Parser;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tower_idempotency::store::postgres::PostgresStore;
use tower_idempotency::{Concurrent, ExecuteError, Idempotency, IdempotencyKey};

#[derive(Debug, Parser)]
#[command(about = "An orders API on Postgres, created exactly once per Idempotency-Key")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:3004")]
    listen: SocketAddr,
    /// The database.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/test"
    )]
    database: String,
    /// The table of orders (created if missing).
    #[arg(long, default_value = "orders")]
    orders_table: String,
    /// The table of idempotency records (created if missing).
    #[arg(long, default_value = "idempotency")]
    records_table: String,
}

#[derive(Clone)]
struct App {
    engine: Idempotency<PostgresStore>,
    /// The database's pool, shared with the store (a clone of it).
    pool: sqlx::PgPool,
    /// The orders table, quoted.
    orders: String,
}

#[derive(Debug, Deserialize)]
struct NewOrder {
    item: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Order {
    id: i64,
    item: String,
}

#[derive(Debug, Default, Deserialize)]
struct Faults {
    /// Panic after the write, before the commit.
    #[serde(default)]
    crash: bool,
    /// Wait this long after the write, before the commit.
    slow_ms: Option<u64>,
}

type Problem = (StatusCode, Json<Value>);

fn problem(status: StatusCode, detail: impl Into<String>) -> Problem {
    (
        status,
        Json(json!({ "status": status.as_u16(), "detail": detail.into() })),
    )
}

async fn create_order(
    State(app): State<App>,
    Query(faults): Query<Faults>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<Order>), Problem> {
    let key = headers
        .get("idempotency-key")
        .and_then(|key| key.to_str().ok())
        .filter(|key| !key.is_empty())
        .ok_or_else(|| {
            problem(
                StatusCode::BAD_REQUEST,
                "an Idempotency-Key header is required",
            )
        })?;
    let new: NewOrder = serde_json::from_slice(&body)
        .map_err(|error| problem(StatusCode::BAD_REQUEST, error.to_string()))?;
    let key = IdempotencyKey::new(key, "create_order", "orders");

    let (orders, item) = (app.orders.clone(), new.item.clone());
    let order = app
        .engine
        .execute_in_transaction(&key, move |transaction| {
            Box::pin(async move {
                let id: i64 = sqlx::query_scalar(&format!(
                    "INSERT INTO {orders} (item) VALUES ($1) RETURNING id"
                ))
                .bind(&item)
                .fetch_one(&mut **transaction)
                .await?;
                if let Some(ms) = faults.slow_ms {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
                if faults.crash {
                    panic!("the handler died after writing order {id}, before the commit");
                }
                Ok::<_, sqlx::Error>(Order { id, item })
            })
        })
        .await
        .map_err(|error| match error {
            ExecuteError::Store(_) => problem(StatusCode::SERVICE_UNAVAILABLE, error.to_string()),
            ExecuteError::Timeout => problem(StatusCode::CONFLICT, error.to_string()),
            _ => problem(StatusCode::INTERNAL_SERVER_ERROR, error.to_string()),
        })?;
    // The key names one order: reusing it for another item is refused.
    if order.item != new.item {
        return Err(problem(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("this key created order {} for another item", order.id),
        ));
    }
    Ok((StatusCode::CREATED, Json(order)))
}

async fn list_orders(State(app): State<App>) -> Result<Json<Vec<Order>>, Problem> {
    let rows: Vec<(i64, String)> =
        sqlx::query_as(&format!("SELECT id, item FROM {} ORDER BY id", app.orders))
            .fetch_all(&app.pool)
            .await
            .map_err(|error| problem(StatusCode::SERVICE_UNAVAILABLE, error.to_string()))?;
    Ok(Json(
        rows.into_iter()
            .map(|(id, item)| Order { id, item })
            .collect(),
    ))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let store = PostgresStore::builder(&args.database)
        .table(&args.records_table)
        .build()
        .await?;
    store.migrate().await?;
    let orders = format!("\"{}\"", args.orders_table.replace('"', "\"\""));
    sqlx::query(&format!(
        "CREATE TABLE IF NOT EXISTS {orders} (id bigserial PRIMARY KEY, item text NOT NULL)"
    ))
    .execute(store.pool())
    .await?;
    let pool = store.pool().clone();
    let engine = Idempotency::builder()
        .store(store)
        .concurrent(Concurrent::wait())
        .build()?;

    let app = Router::new()
        .route("/orders", post(create_order).get(list_orders))
        .with_state(App {
            engine,
            pool,
            orders,
        });
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let addr = listener.local_addr()?;
    println!("postgres_orders listening on http://{addr}");
    print_curl_lines(addr);
    axum::serve(listener, app).await?;
    Ok(())
}

fn print_curl_lines(addr: SocketAddr) {
    let post = |key: &str, query: &str| {
        format!(
            "curl -s -X POST 'http://{addr}/orders{query}' -H 'Idempotency-Key: {key}' \
             -H 'content-type: application/json' -d '{{\"item\":\"book\"}}'"
        )
    };
    println!();
    println!("# create an order, then retry: the retry answers the same order, no new row");
    println!("{}", post("order-1", ""));
    println!("{}", post("order-1", ""));
    println!("# the handler dies after writing the order, before the commit: nothing is kept");
    println!("{}", post("order-2", "?crash=true"));
    println!("# the retry creates the order, once");
    println!("{}", post("order-2", ""));
    println!("{}", post("order-2", ""));
    println!("# one order per key");
    println!("curl -s http://{addr}/orders");
    println!("# or kill the process (Ctrl-C) during ?slow_ms=10000, start it again and retry");
}
