//! The orders API of `axum_server`, on a plain hyper 1 server.
//!
//! ```text
//! cargo run --example hyper_server -- [--listen 127.0.0.1:3001] [--concurrent reject|wait]
//! ```
//!
//! No framework: the layer goes on a `tower::ServiceBuilder` stack around a
//! `service_fn`, and `TowerToHyperService` hands the stack to hyper-util's
//! auto (HTTP/1 and HTTP/2) connection builder. `POST /orders` creates an
//! order with an incrementing id (`?slow_ms=N` makes it take N milliseconds,
//! to see a 409); `GET /stats` shows how many times the handler ran and the
//! layer's counters. On start it prints the curl lines that show a replay, a
//! 422 and a 409.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clap::{Parser, ValueEnum};
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tower::ServiceBuilder;
use tower_idempotency::{Concurrent, Idempotency, IdempotencyLayer};

#[derive(Debug, Parser)]
#[command(about = "An orders API behind tower-idempotency, on plain hyper")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:3001")]
    listen: SocketAddr,
    /// What a duplicate gets while the first request is in flight.
    #[arg(long, value_enum, default_value_t = Mode::Reject)]
    concurrent: Mode,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Mode {
    /// 409 with Retry-After.
    Reject,
    /// Wait for the first and replay its response.
    Wait,
}

/// What the handler shares: the orders, and the engine for `/stats`.
#[derive(Clone)]
struct App {
    next_id: Arc<AtomicU64>,
    executions: Arc<AtomicU64>,
    engine: Idempotency,
}

/// The whole API in one function: hyper has no router.
async fn handle<B>(app: App, request: Request<B>) -> Result<Response<Full<Bytes>>, Infallible>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    match (request.method(), request.uri().path()) {
        (&Method::POST, "/orders") => Ok(create_order(app, request).await),
        (&Method::GET, "/stats") => Ok(json_response(
            StatusCode::OK,
            json!({
                "executions": app.executions.load(Relaxed),
                "idempotency": app.engine.stats(),
            }),
        )),
        _ => Ok(json_response(
            StatusCode::NOT_FOUND,
            json!({ "error": "try POST /orders or GET /stats" }),
        )),
    }
}

async fn create_order<B>(app: App, request: Request<B>) -> Response<Full<Bytes>>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    app.executions.fetch_add(1, Relaxed);
    let slow_ms = request.uri().query().and_then(|query| {
        query
            .split('&')
            .find_map(|pair| pair.strip_prefix("slow_ms="))
            .and_then(|ms| ms.parse::<u64>().ok())
    });
    let body = match request.into_body().collect().await {
        Ok(body) => body.to_bytes(),
        Err(e) => return json_response(StatusCode::BAD_REQUEST, json!({ "error": e.to_string() })),
    };
    if let Some(ms) = slow_ms {
        tokio::time::sleep(Duration::from_millis(ms.min(60_000))).await;
    }
    let id = app.next_id.fetch_add(1, Relaxed) + 1;
    let item = serde_json::from_slice::<Value>(&body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
    json_response(StatusCode::CREATED, json!({ "id": id, "order": item }))
}

fn json_response(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let args = Args::parse();
    let concurrent = match args.concurrent {
        Mode::Reject => Concurrent::Reject,
        Mode::Wait => Concurrent::wait(),
    };
    let layer = IdempotencyLayer::builder().concurrent(concurrent).build()?;
    let app = App {
        next_id: Arc::default(),
        executions: Arc::default(),
        engine: layer.handle(),
    };
    let service = ServiceBuilder::new()
        .layer(layer)
        .service_fn(move |request| handle(app.clone(), request));

    let listener = TcpListener::bind(args.listen).await?;
    print_demo(listener.local_addr()?, args.concurrent);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    eprintln!("accept failed: {e}");
                    continue;
                }
            },
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        // A head and a body written apart must not wait 40 ms for a
        // delayed ACK (Nagle's algorithm) on a kept-alive connection.
        let _ = stream.set_nodelay(true);
        // hyper calls services by `&self`; the adapter clones the tower
        // stack for each request, so each gets a ready service of its own.
        let service = TowerToHyperService::new(service.clone());
        tokio::spawn(async move {
            let builder = auto::Builder::new(TokioExecutor::new());
            if let Err(e) = builder
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                eprintln!("connection error: {e}");
            }
        });
    }
}

fn print_demo(addr: SocketAddr, mode: Mode) {
    let url = format!("http://{addr}");
    println!("orders API behind tower-idempotency on {url} (plain hyper, concurrent: {mode:?})\n");
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
