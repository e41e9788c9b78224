//! The harness of the HTTP tests: a real server on 127.0.0.1:0, a real
//! hyper client, a counting handler and a gate to hold a handler in flight.
#![allow(dead_code, unreachable_pub)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tower_idempotency::problem::Problem;
use tower_idempotency::store::Store;
use tower_idempotency::{Idempotency, IdempotencyLayer};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type ClientBody = BoxBody<Bytes, BoxError>;

/// The budget of any single await on the network or on another task.
pub const T: Duration = Duration::from_secs(20);

/// Awaits `future`, failing the test if it takes longer than [`T`].
pub async fn within<F: Future>(future: F) -> F::Output {
    tokio::time::timeout(T, future)
        .await
        .expect("timed out: the test would have hung")
}

/// Waits until `condition` holds, checking every few milliseconds, for at most [`T`].
pub async fn until(mut condition: impl FnMut() -> bool) {
    within(async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
}

pub fn full(body: impl Into<Bytes>) -> ClientBody {
    Full::new(body.into()).map_err(|e| match e {}).boxed()
}

/// A server on 127.0.0.1:0 and a client for it.
pub struct Server {
    pub addr: SocketAddr,
    pub client: Client<HttpConnector, ClientBody>,
}

/// Serves `router` with axum on an ephemeral port.
pub async fn serve(router: Router) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    Server {
        addr,
        client: client(),
    }
}

/// Serves `router` behind `layer`; answers the server and the layer's handle.
pub async fn serve_layered<S: Store>(
    layer: IdempotencyLayer<S>,
    router: Router,
) -> (Server, Idempotency<S>) {
    let handle = layer.handle();
    (serve(router.layer(layer)).await, handle)
}

/// The [`orders`] handler at `/orders` behind `layer`: the server, the
/// layer's handle and the handler's run count.
pub async fn serve_orders<S: Store>(layer: IdempotencyLayer<S>) -> (Server, Idempotency<S>, Runs) {
    let runs = Runs::default();
    let router = Router::new().route("/orders", orders(runs.clone()));
    let (server, handle) = serve_layered(layer, router).await;
    (server, handle, runs)
}

pub fn client() -> Client<HttpConnector, ClientBody> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A response read to its end.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn replayed(&self) -> bool {
        match self.headers.get("idempotent-replayed") {
            Some(v) => {
                assert_eq!(v, "true");
                true
            }
            None => false,
        }
    }

    pub fn text(&self) -> String {
        String::from_utf8(self.body.to_vec()).unwrap()
    }

    /// The problem+json body, checking the content type and the status field.
    pub fn problem(&self) -> Problem {
        assert_eq!(
            self.headers["content-type"], "application/problem+json",
            "{self:?}"
        );
        let problem: Problem = serde_json::from_slice(&self.body).unwrap();
        assert_eq!(problem.status, self.status.as_u16());
        assert!(!problem.title.is_empty() && !problem.detail.is_empty());
        problem
    }
}

impl Server {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn request(&self, method: Method, path: &str) -> http::request::Builder {
        Request::builder().method(method).uri(self.url(path))
    }

    /// Sends `request` and answers the response head, body unread.
    pub async fn raw(&self, request: Request<ClientBody>) -> Response<Incoming> {
        within(self.client.request(request)).await.unwrap()
    }

    /// Sends `request` and reads the whole response.
    pub async fn send(&self, request: Request<ClientBody>) -> Reply {
        let response = self.raw(request).await;
        let (parts, body) = response.into_parts();
        let body = within(body.collect()).await.unwrap().to_bytes();
        Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }

    /// POST `body` to `path`, with `key` as the `Idempotency-Key` if any.
    pub async fn post(&self, path: &str, key: Option<&str>, body: &str) -> Reply {
        self.call(Method::POST, path, key, body).await
    }

    /// [`post`](Self::post) on a task of its own, so the test can go on while
    /// the request is in flight.
    pub fn spawn_post(self: &Arc<Self>, path: &str, key: &str, body: &str) -> JoinHandle<Reply> {
        let (server, path, key, body) = (
            self.clone(),
            path.to_owned(),
            key.to_owned(),
            body.to_owned(),
        );
        tokio::spawn(async move { server.post(&path, Some(&key), &body).await })
    }

    pub async fn call(&self, method: Method, path: &str, key: Option<&str>, body: &str) -> Reply {
        let mut request = self.request(method, path);
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        self.send(request.body(full(body.to_owned())).unwrap())
            .await
    }
}

/// Counts handler runs.
#[derive(Clone, Default)]
pub struct Runs(Arc<AtomicUsize>);

impl Runs {
    pub fn bump(&self) -> usize {
        self.0.fetch_add(1, SeqCst) + 1
    }

    pub fn get(&self) -> usize {
        self.0.load(SeqCst)
    }
}

/// Holds handlers in flight until the test lets them go.
#[derive(Clone)]
pub struct Gate {
    entered: Arc<Semaphore>,
    permits: Arc<Semaphore>,
}

impl Default for Gate {
    fn default() -> Self {
        Self {
            entered: Arc::new(Semaphore::new(0)),
            permits: Arc::new(Semaphore::new(0)),
        }
    }
}

impl Gate {
    /// Called by a handler: says it is in, then waits for a permit.
    pub async fn pass(&self) {
        self.entered.add_permits(1);
        self.permits.acquire().await.unwrap().forget();
    }

    /// Waits until `n` more handlers are in.
    pub async fn entered(&self, n: u32) {
        within(self.entered.acquire_many(n)).await.unwrap().forget();
    }

    /// Lets `n` handlers go.
    pub fn open(&self, n: usize) {
        self.permits.add_permits(n);
    }
}

/// The orders handler of most tests: counts runs and answers
/// `201 {"id":N,"body":...}` with the request body echoed.
pub fn orders(runs: Runs) -> axum::routing::MethodRouter {
    use axum::routing::post;
    post(move |body: Bytes| {
        let runs = runs.clone();
        async move {
            let id = runs.bump();
            let text = String::from_utf8_lossy(&body).into_owned();
            (
                StatusCode::CREATED,
                [("content-type", "application/json")],
                serde_json::json!({ "id": id, "body": text }).to_string(),
            )
        }
    })
}

/// Like [`orders`], but each run passes `gate` first.
pub fn gated_orders(runs: Runs, gate: Gate) -> axum::routing::MethodRouter {
    use axum::routing::post;
    post(move |body: Bytes| {
        let runs = runs.clone();
        let gate = gate.clone();
        async move {
            let id = runs.bump();
            gate.pass().await;
            (
                StatusCode::CREATED,
                serde_json::json!({ "id": id, "len": body.len() }).to_string(),
            )
        }
    })
}

pub fn infallible<T>(value: T) -> Result<T, Infallible> {
    Ok(value)
}

/// Adds a permit to its semaphore when dropped before `defuse`: tells a test
/// that a future or a body was dropped before it finished.
pub(crate) struct DropSignal(pub(crate) Option<Arc<Semaphore>>);

impl DropSignal {
    pub(crate) fn defuse(mut self) {
        self.0 = None;
    }
}

impl Drop for DropSignal {
    fn drop(&mut self) {
        if let Some(sem) = self.0.take() {
            sem.add_permits(1);
        }
    }
}
