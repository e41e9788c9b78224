//! A real upstream server, not idempotent by itself, that counts how many
//! times its actions ran.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::routing::{any, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::{mpsc, Mutex, Semaphore};
use tokio::time::timeout;

use super::harness::QUICK;

struct Shared {
    executions: AtomicU64,
    entered: mpsc::UnboundedSender<()>,
    gate: Semaphore,
}

/// The upstream's routes:
/// * `POST /orders`: 201 `{"order_id", "executions", "body"}`;
/// * `POST /slow`: like `/orders`, but reports that it entered and waits for
///   [`Upstream::release`] before answering;
/// * `POST /fail`: 500;
/// * `POST /hang`: answers after a minute (past any upstream timeout);
/// * `POST /big?bytes=N`: 201 with a body of N bytes;
/// * `POST /drip`: 201 whose body sends `first` at once, then reports that
///   it entered and waits for [`Upstream::release`] before sending `rest`;
/// * anything on `/echo...`: 200 with the method, URI, headers and body it
///   received (not counted).
pub(crate) struct Upstream {
    pub(crate) url: String,
    shared: Arc<Shared>,
    entered: Mutex<mpsc::UnboundedReceiver<()>>,
}

impl Upstream {
    pub(crate) async fn start() -> Upstream {
        Self::start_at("http://127.0.0.1:0").await
    }

    /// [`Upstream::start`] on the address of `url` (one that was
    /// [`dead_url`] until now, say).
    pub(crate) async fn start_at(url: &str) -> Upstream {
        let (entered_tx, entered) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            executions: AtomicU64::new(0),
            entered: entered_tx,
            gate: Semaphore::new(0),
        });
        let app = Router::new()
            .route("/orders", post(orders))
            .route("/slow", post(slow))
            .route("/fail", post(fail))
            .route("/hang", post(hang))
            .route("/big", post(big))
            .route("/drip", post(drip))
            .route("/echo", any(echo))
            .route("/echo/{*rest}", any(echo))
            .with_state(shared.clone());
        let addr = url.trim_start_matches("http://");
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Upstream {
            url,
            shared,
            entered: Mutex::new(entered),
        }
    }

    /// How many times an action ran.
    pub(crate) fn executions(&self) -> u64 {
        self.shared.executions.load(Ordering::SeqCst)
    }

    /// Waits until a `/slow` request has entered the handler.
    pub(crate) async fn entered(&self) {
        let mut entered = self.entered.lock().await;
        timeout(QUICK, entered.recv())
            .await
            .expect("a slow request reaches the upstream in time")
            .expect("the upstream is alive");
    }

    /// Lets `n` waiting `/slow` requests answer.
    pub(crate) fn release(&self, n: usize) {
        self.shared.gate.add_permits(n);
    }
}

/// An address nothing listens on.
pub(crate) async fn dead_url() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}")
}

fn execute(shared: &Shared, body: &Bytes) -> Value {
    let n = shared.executions.fetch_add(1, Ordering::SeqCst) + 1;
    json!({ "order_id": n, "executions": n, "body": String::from_utf8_lossy(body) })
}

async fn orders(State(shared): State<Arc<Shared>>, body: Bytes) -> (StatusCode, Json<Value>) {
    (StatusCode::CREATED, Json(execute(&shared, &body)))
}

async fn slow(State(shared): State<Arc<Shared>>, body: Bytes) -> (StatusCode, Json<Value>) {
    let answer = execute(&shared, &body);
    let _ = shared.entered.send(());
    if let Ok(permit) = shared.gate.acquire().await {
        permit.forget();
    }
    (StatusCode::CREATED, Json(answer))
}

async fn fail(State(shared): State<Arc<Shared>>, body: Bytes) -> (StatusCode, Json<Value>) {
    let answer = execute(&shared, &body);
    (StatusCode::INTERNAL_SERVER_ERROR, Json(answer))
}

async fn hang(State(shared): State<Arc<Shared>>, body: Bytes) -> (StatusCode, Json<Value>) {
    let answer = execute(&shared, &body);
    tokio::time::sleep(Duration::from_secs(60)).await;
    (StatusCode::CREATED, Json(answer))
}

async fn big(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<BTreeMap<String, usize>>,
    body: Bytes,
) -> (StatusCode, String) {
    execute(&shared, &body);
    let bytes = query.get("bytes").copied().unwrap_or(0);
    (StatusCode::CREATED, "x".repeat(bytes))
}

async fn drip(State(shared): State<Arc<Shared>>, body: Bytes) -> (StatusCode, axum::body::Body) {
    execute(&shared, &body);
    let first = futures_util::stream::once(async { Ok::<_, std::io::Error>("first\n") });
    let rest = futures_util::stream::once(async move {
        let _ = shared.entered.send(());
        if let Ok(permit) = shared.gate.acquire().await {
            permit.forget();
        }
        Ok("rest\n")
    });
    let chunks = futures_util::StreamExt::chain(first, rest);
    (StatusCode::CREATED, axum::body::Body::from_stream(chunks))
}

async fn echo(method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Json<Value> {
    let headers: BTreeMap<String, String> = headers
        .iter()
        .map(|(name, value)| {
            (
                name.to_string(),
                String::from_utf8_lossy(value.as_bytes()).into_owned(),
            )
        })
        .collect();
    Json(json!({
        "method": method.as_str(),
        "uri": uri.to_string(),
        "headers": headers,
        "body": String::from_utf8_lossy(&body),
    }))
}
