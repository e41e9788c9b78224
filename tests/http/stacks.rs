//! The layer on a plain hyper service and a `tower::ServiceBuilder` stack,
//! the store's fail modes, its bounds, and the stats after a known sequence.

use crate::support::common;
use crate::support::stores;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use common::*;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use stores::{per_store, TestStore};
use tokio::net::TcpListener;
use tower::{service_fn, ServiceBuilder};
use tower_idempotency::store::{
    BeginOutcome, Entry, LeaseToken, RemovalCounts, ScanEntry, SharedRecord, Store, StoreAdmin,
    StoreError,
};
use tower_idempotency::{problem, CacheInfo, FailMode, Fingerprint, IdempotencyLayer, RequestBody};

/// Serves a tower service with plain hyper (HTTP/1), no axum.
async fn serve_hyper<S>(service: S) -> Server
where
    S: tower::Service<
            Request<Incoming>,
            Response = Response<tower_idempotency::ResponseBody<Full<Bytes>>>,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let service = TowerToHyperService::new(service.clone());
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    Server {
        addr,
        client: client(),
    }
}

/// A hyper handler: the first run fails with an error, later runs answer 201.
async fn create(
    runs: Runs,
    request: Request<RequestBody<Incoming>>,
) -> Result<Response<Full<Bytes>>, BoxError> {
    let body = request.into_body().collect().await?.to_bytes();
    let run = runs.bump();
    if run == 1 {
        return Err("database unavailable".into());
    }
    let mut response = Response::new(Full::new(Bytes::from(format!(
        "run {run}, {} bytes",
        body.len()
    ))));
    *response.status_mut() = StatusCode::CREATED;
    Ok(response)
}

per_store!(on_a_plain_hyper_service_an_inner_error_releases_the_key);
async fn on_a_plain_hyper_service_an_inner_error_releases_the_key(store: TestStore) {
    let runs = Runs::default();
    let layer = IdempotencyLayer::builder().store(store).build().unwrap();
    let service = tower::Layer::layer(
        &layer,
        service_fn({
            let runs = runs.clone();
            move |request| create(runs.clone(), request)
        }),
    );
    let server = serve_hyper(service).await;

    let request = || {
        server
            .request(Method::POST, "/orders")
            .header("idempotency-key", "h")
            .body(full("{}"))
            .unwrap()
    };
    // hyper answers a service error by closing the connection.
    let failed = within(server.client.request(request())).await;
    assert!(failed.is_err());
    let retry = server.send(request()).await;
    assert_eq!(
        (retry.status, retry.text().as_str()),
        (StatusCode::CREATED, "run 2, 2 bytes")
    );
    let replay = server.send(request()).await;
    assert!(replay.replayed());
    assert_eq!(replay.text(), "run 2, 2 bytes");
    assert_eq!(runs.get(), 2);
}

per_store!(in_a_service_builder_stack);
async fn in_a_service_builder_stack(store: TestStore) {
    let runs = Runs::default();
    let layer = IdempotencyLayer::builder().store(store).build().unwrap();
    let handle = layer.handle();
    let service = ServiceBuilder::new()
        .concurrency_limit(64)
        .layer(layer)
        .timeout(Duration::from_secs(10))
        .service_fn({
            let runs = runs.clone();
            move |request: Request<RequestBody<Incoming>>| {
                let runs = runs.clone();
                async move {
                    let _ = runs.bump();
                    let body = request.into_body().collect().await?.to_bytes();
                    Ok::<_, BoxError>(Response::new(Full::new(body)))
                }
            }
        });
    let server = serve_hyper(service).await;
    let first = server.post("/echo", Some("s"), "hello").await;
    assert_eq!(first.text(), "hello");
    let again = server.post("/echo", Some("s"), "hello").await;
    assert!(again.replayed());
    assert_eq!(again.text(), "hello");
    assert_eq!(runs.get(), 1);
    assert_eq!(handle.stats().replayed, 1);
}

/// A store that can be switched off, answering every call with
/// `StoreError::Unavailable` meanwhile: how an unreachable Redis looks to
/// the layer. (`tests/redis/outage.rs` and `tests/redis/http_layer.rs` take a
/// real Redis down.)
#[derive(Clone)]
struct SwitchStore {
    inner: TestStore,
    down: Arc<AtomicBool>,
}

impl SwitchStore {
    fn new(inner: TestStore) -> Self {
        Self {
            inner,
            down: Arc::default(),
        }
    }

    fn check(&self) -> Result<(), StoreError> {
        if self.down.load(SeqCst) {
            Err(StoreError::unavailable("connection refused"))
        } else {
            Ok(())
        }
    }
}

impl Store for SwitchStore {
    async fn begin(
        &self,
        key: &str,
        fp: Fingerprint,
        lease: LeaseToken,
        ttl: Duration,
    ) -> Result<BeginOutcome, StoreError> {
        self.check()?;
        self.inner.begin(key, fp, lease, ttl).await
    }
    async fn renew(&self, key: &str, lease: LeaseToken, ttl: Duration) -> Result<bool, StoreError> {
        self.check()?;
        self.inner.renew(key, lease, ttl).await
    }
    async fn complete(
        &self,
        key: &str,
        lease: LeaseToken,
        record: SharedRecord,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        self.check()?;
        self.inner.complete(key, lease, record, ttl).await
    }
    async fn release(&self, key: &str, lease: LeaseToken) -> Result<bool, StoreError> {
        self.check()?;
        self.inner.release(key, lease).await
    }
    fn removal_counts(&self) -> RemovalCounts {
        self.inner.removal_counts()
    }
    async fn completed_record(
        &self,
        key: &str,
    ) -> Result<Option<tower_idempotency::store::SharedRecord>, StoreError> {
        self.check()?;
        self.inner.completed_record(key).await
    }
}

impl StoreAdmin for SwitchStore {
    async fn put(&self, key: &str, record: SharedRecord, ttl: Duration) -> Result<(), StoreError> {
        self.check()?;
        self.inner.put(key, record, ttl).await
    }
    async fn get(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        self.check()?;
        self.inner.get(key).await
    }
    async fn remove(&self, key: &str) -> Result<bool, StoreError> {
        self.check()?;
        self.inner.remove(key).await
    }
    async fn remove_unless_in_flight(
        &self,
        key: &str,
    ) -> Result<tower_idempotency::store::Removal, StoreError> {
        self.check()?;
        self.inner.remove_unless_in_flight(key).await
    }
    async fn clear(&self) -> Result<(), StoreError> {
        self.check()?;
        self.inner.clear().await
    }
    async fn scan(&self) -> Result<Vec<ScanEntry>, StoreError> {
        self.check()?;
        self.inner.scan().await
    }
    async fn len(&self) -> Result<u64, StoreError> {
        self.check()?;
        self.inner.len().await
    }
    async fn info(&self) -> Result<CacheInfo, StoreError> {
        self.check()?;
        self.inner.info().await
    }
}

per_store!(store_down_fail_closed_is_503_with_retry_after);
async fn store_down_fail_closed_is_503_with_retry_after(store: TestStore) {
    let store = SwitchStore::new(store);
    let layer = IdempotencyLayer::builder()
        .store(store.clone())
        .build()
        .unwrap();
    let (server, handle, runs) = serve_orders(layer).await;

    store.down.store(true, SeqCst);
    let reply = server.post("/orders", Some("k"), "{}").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.headers["retry-after"], "1");
    assert_eq!(reply.problem().kind, problem::STORE_UNAVAILABLE);
    assert_eq!(runs.get(), 0);
    // Requests without a key do not touch the store.
    assert_eq!(
        server.post("/orders", None, "{}").await.status,
        StatusCode::CREATED
    );
    store.down.store(false, SeqCst);
    assert_eq!(
        server.post("/orders", Some("k"), "{}").await.status,
        StatusCode::CREATED
    );
    assert!(server.post("/orders", Some("k"), "{}").await.replayed());
    assert_eq!(handle.stats().store_errors, 1);
}

per_store!(store_down_fail_open_passes_through_unprotected);
async fn store_down_fail_open_passes_through_unprotected(store: TestStore) {
    let store = SwitchStore::new(store);
    let layer = IdempotencyLayer::builder()
        .store(store.clone())
        .fail_mode(FailMode::Open)
        .build()
        .unwrap();
    let (server, handle, runs) = serve_orders(layer).await;

    store.down.store(true, SeqCst);
    for _ in 0..2 {
        let reply = server.post("/orders", Some("k"), "{}").await;
        assert_eq!(reply.status, StatusCode::CREATED);
        assert!(!reply.replayed());
    }
    assert_eq!(runs.get(), 2, "unprotected while the store is down");
    assert_eq!(handle.stats().store_errors, 2);
}

#[tokio::test]
async fn the_entry_bound_evicts_and_counts() {
    let layer = IdempotencyLayer::builder().max_entries(5).build().unwrap();
    let (server, handle, _) = serve_orders(layer).await;
    for i in 0..40 {
        server.post("/orders", Some(&format!("k{i}")), "{}").await;
    }
    handle.cleanup_expired().await.unwrap();
    let info = handle.cache_info().await.unwrap();
    assert!(info.entries <= 5, "{info:?}");
    assert!(handle.stats().evicted >= 35, "{:?}", handle.stats());
}

#[tokio::test]
async fn the_byte_bound_evicts_and_counts() {
    let layer = IdempotencyLayer::builder()
        .max_entries(1000)
        .max_bytes(8 * 1024)
        .build()
        .unwrap();
    let app = Router::new().route("/blob", post(|| async { "x".repeat(1024) }));
    let (server, handle) = serve_layered(layer, app).await;
    for i in 0..40 {
        assert_eq!(
            server
                .post("/blob", Some(&format!("b{i}")), "")
                .await
                .body
                .len(),
            1024
        );
    }
    handle.cleanup_expired().await.unwrap();
    let info = handle.cache_info().await.unwrap();
    assert!(info.weighted_bytes <= 8 * 1024, "{info:?}");
    assert!(info.entries < 40, "{info:?}");
    assert!(
        handle.stats().evicted >= 40 - info.entries,
        "{:?}",
        handle.stats()
    );
}

per_store!(stats_after_a_known_sequence);
async fn stats_after_a_known_sequence(store: TestStore) {
    let layer = IdempotencyLayer::builder()
        .store(store)
        .max_request_body(64)
        .build()
        .unwrap();
    let (runs, gate) = (Runs::default(), Gate::default());
    let app = Router::new()
        .route("/orders", orders(runs.clone()).get(|| async { "list" }))
        .route("/slow", gated_orders(runs.clone(), gate.clone()))
        .route(
            "/fail",
            post(|| async { StatusCode::INTERNAL_SERVER_ERROR }),
        );
    let (server, handle) = serve_layered(layer, app).await;
    let server = Arc::new(server);

    server.call(Method::GET, "/orders", Some("x"), "").await; // requests only
    server.post("/orders", None, "{}").await; // requests only
    server.post("/orders", Some("a"), "{}").await; // executed
    server.post("/orders", Some("a"), "{}").await; // replayed
    server.post("/orders", Some("a"), "{}").await; // replayed
    server.post("/orders", Some("a"), "{\"n\":2}").await; // mismatches
    server.post("/orders", Some("a,b"), "{}").await; // rejected_keys
    server.post("/orders", Some("big"), &"x".repeat(65)).await; // too_large
    server.post("/fail", Some("f"), "").await; // executed, not_stored
    let slow = server.spawn_post("/slow", "s", ""); // executed
    gate.entered(1).await;
    server.post("/slow", Some("s"), "").await; // conflicts
    gate.open(1);
    within(slow).await.unwrap();

    let stats = handle.stats();
    assert_eq!(
        (
            stats.requests,
            stats.executed,
            stats.replayed,
            stats.conflicts
        ),
        (11, 3, 2, 1)
    );
    assert_eq!(
        (
            stats.mismatches,
            stats.rejected_keys,
            stats.too_large,
            stats.not_stored
        ),
        (1, 1, 1, 1)
    );
    assert_eq!((stats.coalesced, stats.store_errors), (0, 0));
    assert_eq!(stats.duplicates_prevented(), 3);
    assert_eq!(stats.hit_rate(), 40.0);
    handle.reset_stats();
    assert_eq!(handle.stats().requests, 0);
}
