//! In-process `tower::Service` calls through the layer, against the bare
//! service and the floor (SHA-256 of the body plus one moka `get`), for
//! request bodies of 0 B, 1 KiB and 64 KiB. One request = one element.
//!
//! * `bare`: the trivial inner service alone;
//! * `passthrough`: the layer, a POST without a key;
//! * `miss`: the layer, a new key each call (the handler runs, the response
//!   is stored);
//! * `replay`: the layer, the same key each call (answered from the store);
//! * `floor`: SHA-256 of the body and one moka `get` that hits;
//! * `typical-1KiB/*`: bare, passthrough and replay at 1 KiB with the
//!   eleven fields of a typical client request instead of one;
//! * `coalesce/*`: 1,000 concurrent duplicates of one new key under
//!   `Concurrent::Wait` per iteration, until all are answered; the run checks
//!   that each group ran the handler once and touched the store once to begin
//!   and once to complete.
//!
//! Every call reads the whole response body, as a client would.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use sha2::{Digest, Sha256};
use tokio::runtime::Runtime;
use tower::{Layer, ServiceExt};
use tower_idempotency::store::{
    BeginOutcome, Entry, LeaseToken, MemoryStore, RemovalCounts, ScanEntry, SharedRecord, Store,
    StoreAdmin, StoreError,
};
use tower_idempotency::{CacheInfo, Concurrent, Fingerprint, IdempotencyLayer};

/// What the inner service answers: a small JSON body.
const ANSWER: &[u8] = br#"{"id":42,"status":"created"}"#;

const SIZES: [(&str, usize); 3] = [("0B", 0), ("1KiB", 1024), ("64KiB", 64 * 1024)];

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// The trivial inner service.
async fn answer<B>(_request: Request<B>) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(Response::builder()
        .status(StatusCode::CREATED)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from_static(ANSWER)))
        .expect("static response"))
}

/// The fields a client typically sends besides `Content-Type` (and the key):
/// what `typical/*` adds to every request, bare service included.
const TYPICAL: [(&str, &str); 10] = [
    ("host", "api.example.com"),
    ("user-agent", "curl/8.5.0"),
    ("accept", "*/*"),
    ("accept-encoding", "gzip, br"),
    ("authorization", "Bearer 4f0c9b8e2d7a41c6b35e9f1a"),
    ("content-length", "1024"),
    ("x-request-id", "7f1c0a2e-1111-2222-3333-444455556666"),
    (
        "traceparent",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    ),
    ("cookie", "session=abc; theme=dark"),
    ("origin", "https://example.com"),
];

fn request(body: &Bytes, key: Option<&str>) -> Request<Full<Bytes>> {
    request_with(body, key, &[])
}

fn request_with(body: &Bytes, key: Option<&str>, fields: &[(&str, &str)]) -> Request<Full<Bytes>> {
    let mut builder = Request::builder()
        .method(Method::POST)
        .uri("/orders")
        .header(header::CONTENT_TYPE, "application/json");
    for (name, value) in fields {
        builder = builder.header(*name, *value);
    }
    if let Some(key) = key {
        builder = builder.header("idempotency-key", key);
    }
    builder.body(Full::new(body.clone())).expect("request")
}

/// Sends one request and reads the whole response, as a client would.
async fn send<S, B>(service: &S, request: Request<Full<Bytes>>) -> Bytes
where
    S: tower::Service<Request<Full<Bytes>>, Response = Response<B>> + Clone,
    S::Error: std::fmt::Debug,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let response = service.clone().oneshot(request).await.expect("call");
    response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes()
}

fn per_request(c: &mut Criterion) {
    let rt = runtime();
    for (label, size) in SIZES {
        let body = Bytes::from(vec![b'x'; size]);
        let mut group = c.benchmark_group(format!("layer/{label}"));
        group.throughput(Throughput::Elements(1));

        // The floor: what any idempotency check must do at least, hash the
        // body and look the key up once (a hit, as on the replay path).
        let cache: moka::sync::Cache<String, Arc<Bytes>> = moka::sync::Cache::new(10_000);
        cache.insert("floor-key".to_owned(), Arc::new(Bytes::from_static(ANSWER)));
        group.bench_function(BenchmarkId::from_parameter("floor"), |b| {
            b.to_async(&rt).iter(|| async {
                let digest = Sha256::digest(std::hint::black_box(&body));
                let hit = cache.get("floor-key");
                (digest, hit)
            });
        });

        let bare = tower::service_fn(answer::<Full<Bytes>>);
        group.bench_function(BenchmarkId::from_parameter("bare"), |b| {
            b.to_async(&rt)
                .iter(|| async { send(&bare, request(&body, None)).await });
        });

        let layer = IdempotencyLayer::new();
        let layered = layer.layer(tower::service_fn(answer));
        group.bench_function(BenchmarkId::from_parameter("passthrough"), |b| {
            b.to_async(&rt)
                .iter(|| async { send(&layered, request(&body, None)).await });
        });

        let next = AtomicU64::new(0);
        group.bench_function(BenchmarkId::from_parameter("miss"), |b| {
            b.to_async(&rt).iter(|| async {
                let key = format!("miss-{}", next.fetch_add(1, Relaxed));
                send(&layered, request(&body, Some(&key))).await
            });
        });

        let replay_key = format!("replay-{label}");
        rt.block_on(send(&layered, request(&body, Some(&replay_key))));
        let before = layer.handle().stats();
        group.bench_function(BenchmarkId::from_parameter("replay"), |b| {
            b.to_async(&rt)
                .iter(|| async { send(&layered, request(&body, Some(&replay_key))).await });
        });
        let after = layer.handle().stats();
        assert_eq!(
            after.executed, before.executed,
            "replays never run the handler"
        );

        group.finish();
    }
}

/// Bare, passthrough and replay at 1 KiB with the eleven fields of a typical
/// client request (`TYPICAL` plus `Content-Type`) instead of one: what the
/// layer costs next to the work any request brings.
fn typical_request(c: &mut Criterion) {
    let rt = runtime();
    let body = Bytes::from(vec![b'x'; 1024]);
    let mut group = c.benchmark_group("layer/typical-1KiB");
    group.throughput(Throughput::Elements(1));
    let bare = tower::service_fn(answer::<Full<Bytes>>);
    group.bench_function(BenchmarkId::from_parameter("bare"), |b| {
        b.to_async(&rt)
            .iter(|| async { send(&bare, request_with(&body, None, &TYPICAL)).await });
    });
    let layer = IdempotencyLayer::new();
    let layered = layer.layer(tower::service_fn(answer));
    group.bench_function(BenchmarkId::from_parameter("passthrough"), |b| {
        b.to_async(&rt)
            .iter(|| async { send(&layered, request_with(&body, None, &TYPICAL)).await });
    });
    let key = Some("typical-replay");
    rt.block_on(send(&layered, request_with(&body, key, &TYPICAL)));
    group.bench_function(BenchmarkId::from_parameter("replay"), |b| {
        b.to_async(&rt)
            .iter(|| async { send(&layered, request_with(&body, key, &TYPICAL)).await });
    });
    assert_eq!(
        layer.handle().stats().executed,
        1,
        "replays never run the handler"
    );
    group.finish();
}

/// The memory store, counting the operations the engine asks of it (a
/// wrapper that forwards every call to the real store).
#[derive(Clone, Default)]
struct Counting {
    store: MemoryStore,
    begins: Arc<AtomicU64>,
    completes: Arc<AtomicU64>,
    /// In-process reads of completed records (`local_record`): no lock, no
    /// round trip, but counted apart so the report shows them.
    local_reads: Arc<AtomicU64>,
    others: Arc<AtomicU64>,
}

impl Counting {
    fn other(&self) {
        self.others.fetch_add(1, Relaxed);
    }
}

impl Store for Counting {
    async fn begin(
        &self,
        key: &str,
        fingerprint: Fingerprint,
        lease: LeaseToken,
        lease_ttl: Duration,
    ) -> Result<BeginOutcome, StoreError> {
        self.begins.fetch_add(1, Relaxed);
        self.store.begin(key, fingerprint, lease, lease_ttl).await
    }

    fn local_record(&self, key: &str) -> Option<SharedRecord> {
        self.local_reads.fetch_add(1, Relaxed);
        self.store.local_record(key)
    }

    async fn renew(
        &self,
        key: &str,
        lease: LeaseToken,
        lease_ttl: Duration,
    ) -> Result<bool, StoreError> {
        self.other();
        self.store.renew(key, lease, lease_ttl).await
    }

    async fn complete(
        &self,
        key: &str,
        lease: LeaseToken,
        record: SharedRecord,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        self.completes.fetch_add(1, Relaxed);
        self.store.complete(key, lease, record, ttl).await
    }

    async fn release(&self, key: &str, lease: LeaseToken) -> Result<bool, StoreError> {
        self.other();
        self.store.release(key, lease).await
    }

    fn removal_counts(&self) -> RemovalCounts {
        self.store.removal_counts()
    }

    async fn completed_record(
        &self,
        key: &str,
    ) -> Result<Option<tower_idempotency::store::SharedRecord>, StoreError> {
        self.other();
        self.store.completed_record(key).await
    }
}

impl StoreAdmin for Counting {
    async fn put(&self, key: &str, record: SharedRecord, ttl: Duration) -> Result<(), StoreError> {
        self.other();
        self.store.put(key, record, ttl).await
    }

    async fn get(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        self.other();
        self.store.get(key).await
    }

    async fn remove(&self, key: &str) -> Result<bool, StoreError> {
        self.other();
        self.store.remove(key).await
    }

    async fn remove_unless_in_flight(
        &self,
        key: &str,
    ) -> Result<tower_idempotency::store::Removal, StoreError> {
        self.other();
        self.store.remove_unless_in_flight(key).await
    }

    async fn clear(&self) -> Result<(), StoreError> {
        self.store.clear().await
    }

    async fn scan(&self) -> Result<Vec<ScanEntry>, StoreError> {
        self.store.scan().await
    }

    async fn len(&self) -> Result<u64, StoreError> {
        self.store.len().await
    }

    async fn info(&self) -> Result<CacheInfo, StoreError> {
        self.store.info().await
    }
}

const DUPLICATES: usize = 1_000;

/// 1,000 concurrent duplicates of one new key per iteration, under
/// `Concurrent::Wait`: the handler holds the first until the other 999 are
/// waiting on it, so every iteration really coalesces.
fn coalesced(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("layer/coalesce");
    group.throughput(Throughput::Elements(DUPLICATES as u64));
    group.sample_size(10);
    for (label, size) in SIZES {
        let body = Bytes::from(vec![b'x'; size]);
        let store = Counting::default();
        let layer = IdempotencyLayer::builder()
            .store(store.clone())
            .concurrent(Concurrent::Wait {
                timeout: Duration::from_secs(60),
            })
            .build()
            .expect("layer");
        let executions = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let service = layer.layer(tower::service_fn({
            let executions = executions.clone();
            let gate = gate.clone();
            move |request: Request<_>| {
                let executions = executions.clone();
                let gate = gate.clone();
                async move {
                    executions.fetch_add(1, Relaxed);
                    gate.acquire().await.expect("gate").forget();
                    answer(request).await
                }
            }
        }));
        let groups = AtomicU64::new(0);
        group.bench_function(BenchmarkId::from_parameter(label), |b| {
            b.to_async(&rt).iter(|| async {
                let key = format!("coalesce-{}", groups.fetch_add(1, Relaxed));
                let ran_before = executions.load(Relaxed);
                let calls: Vec<_> = (0..DUPLICATES)
                    .map(|_| {
                        let service = service.clone();
                        let request = request(&body, Some(&key));
                        tokio::spawn(async move { send(&service, request).await })
                    })
                    .collect();
                // Open the gate once the first runs and the rest wait on it.
                while executions.load(Relaxed) == ran_before || layer.waiting() < DUPLICATES - 1 {
                    tokio::task::yield_now().await;
                }
                gate.add_permits(1);
                for call in calls {
                    call.await.expect("task");
                }
            });
        });
        let groups = groups.into_inner();
        let stats = layer.handle().stats();
        println!(
            "coalesce/{label}: {groups} groups of {DUPLICATES}: handler ran {} times, \
             store begins {}, completes {}, other store operations {}, \
             in-process record reads {}; coalesced {}",
            executions.load(Relaxed),
            store.begins.load(Relaxed),
            store.completes.load(Relaxed),
            store.others.load(Relaxed),
            store.local_reads.load(Relaxed),
            stats.coalesced,
        );
        assert_eq!(
            executions.load(Relaxed) as u64,
            groups,
            "one execution per group"
        );
        assert_eq!(
            store.begins.load(Relaxed),
            groups,
            "one store begin per group"
        );
        assert_eq!(
            store.completes.load(Relaxed),
            groups,
            "one store complete per group"
        );
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30);
    targets = per_request, typical_request, coalesced
}
criterion_main!(benches);
