//! A small orders API behind the idempotency layer.
//!
//! ```text
//! cargo run --example axum_server -- [--listen 127.0.0.1:3001] [--concurrent reject|wait] [--no-idempotency]
//! ```
//!
//! `POST /orders` creates an order with an incrementing id (`?slow_ms=N`
//! makes it take N milliseconds, to see a 409); `GET /stats` shows how many
//! times the handler ran and the layer's counters. On start it prints the
//! curl lines that show a replay, a 422 and a 409. `--no-idempotency` serves
//! the same API without the layer (the benchmark's baseline).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use clap::{Parser, ValueEnum};
use serde::Deserialize;
use serde_json::{json, Value};
use tower_idempotency::{Concurrent, IdempotencyLayer};

#[derive(Debug, Parser)]
#[command(about = "An orders API behind tower-idempotency")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:3001")]
    listen: SocketAddr,
    /// What a duplicate gets while the first request is in flight.
    #[arg(long, value_enum, default_value_t = Mode::Reject)]
    concurrent: Mode,
    /// Serve without the idempotency layer (benchmark baseline).
    #[arg(long)]
    no_idempotency: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Mode {
    /// 409 with Retry-After.
    Reject,
    /// Wait for the first and replay its response.
    Wait,
}

#[derive(Clone, Default)]
struct Orders {
    next_id: Arc<AtomicU64>,
    executions: Arc<AtomicU64>,
}

#[derive(Debug, Deserialize)]
struct Slow {
    slow_ms: Option<u64>,
}

async fn create_order(
    State(orders): State<Orders>,
    Query(slow): Query<Slow>,
    body: Bytes,
) -> (StatusCode, Json<Value>) {
    orders.executions.fetch_add(1, Relaxed);
    if let Some(ms) = slow.slow_ms {
        tokio::time::sleep(Duration::from_millis(ms.min(60_000))).await;
    }
    let id = orders.next_id.fetch_add(1, Relaxed) + 1;
    let item = serde_json::from_slice::<Value>(&body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
    (
        StatusCode::CREATED,
        Json(json!({ "id": id, "order": item })),
    )
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let orders = Orders::default();
    let app = Router::new().route("/orders", post(create_order));

    let app = if args.no_idempotency {
        let stats = {
            let orders = orders.clone();
            move || async move { Json(json!({ "executions": orders.executions.load(Relaxed) })) }
        };
        app.route("/stats", get(stats)).with_state(orders)
    } else {
        let concurrent = match args.concurrent {
            Mode::Reject => Concurrent::Reject,
            Mode::Wait => Concurrent::wait(),
        };
        let layer = IdempotencyLayer::builder().concurrent(concurrent).build()?;
        let handle = layer.handle();
        let stats = {
            let orders = orders.clone();
            move || async move {
                Json(json!({
                    "executions": orders.executions.load(Relaxed),
                    "idempotency": handle.stats(),
                }))
            }
        };
        // `/stats` is a GET: not protected, but counted in `requests`.
        app.route("/stats", get(stats))
            .layer(layer)
            .with_state(orders)
    };

    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let addr = listener.local_addr()?;
    if args.no_idempotency {
        println!("orders API WITHOUT idempotency on http://{addr}");
    } else {
        print_demo(addr, args.concurrent);
    }
    // TCP_NODELAY: a head and a body written apart must not wait 40 ms
    // for a delayed ACK (Nagle's algorithm) on a kept-alive connection.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| drop(tcp.set_nodelay(true)));
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}

fn print_demo(addr: SocketAddr, mode: Mode) {
    let url = format!("http://{addr}");
    println!("orders API behind tower-idempotency on {url} (concurrent: {mode:?})\n");
    println!(
        "# Replay: run it twice; the second answer has the same id and `idempotent-replayed: true`"
    );
    println!(
        "curl -i -X POST {url}/orders -H 'Idempotency-Key: demo-1' -H 'Content-Type: application/json' -d '{{\"item\":\"book\"}}'\n"
    );
    println!("# 422: the same key with another body");
    println!(
        "curl -i -X POST {url}/orders -H 'Idempotency-Key: demo-1' -H 'Content-Type: application/json' -d '{{\"item\":\"pen\"}}'\n"
    );
    let second = match mode {
        Mode::Reject => "409 with Retry-After",
        Mode::Wait => "waits, then the first's response, replayed",
    };
    println!("# In flight: a 3 s order, and the same request again while it runs ({second})");
    println!(
        "curl -s -X POST '{url}/orders?slow_ms=3000' -H 'Idempotency-Key: demo-2' -d '{{}}' & \
         sleep 0.5; curl -i -X POST '{url}/orders?slow_ms=3000' -H 'Idempotency-Key: demo-2' -d '{{}}'; wait\n"
    );
    println!("# Counters: handler runs and the layer's stats");
    println!("curl -s {url}/stats\n");
}
