//! The built-in demo upstream: an orders API that is not idempotent by itself
//! and counts how many times it really ran.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::net::TcpListener;

/// Starts the demo upstream on an ephemeral loopback port and answers its address.
pub(crate) async fn start() -> std::io::Result<SocketAddr> {
    let executions = Arc::new(AtomicU64::new(0));
    let app = Router::new()
        .route("/orders", post(create_order))
        .route("/executions", get(count))
        .with_state(executions);
    let listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "demo upstream stopped");
        }
    });
    Ok(addr)
}

/// Creates an order: every call that reaches it is one more execution.
async fn create_order(State(executions): State<Arc<AtomicU64>>) -> (StatusCode, Json<Value>) {
    let n = executions.fetch_add(1, Ordering::SeqCst) + 1;
    tracing::info!(order_id = n, "demo upstream created an order");
    (
        StatusCode::CREATED,
        Json(json!({ "order_id": n, "executions": n })),
    )
}

async fn count(State(executions): State<Arc<AtomicU64>>) -> Json<Value> {
    Json(json!({ "executions": executions.load(Ordering::SeqCst) }))
}
