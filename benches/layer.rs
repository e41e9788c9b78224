//! In-process `tower::Service` calls through the layer, against the bare
//! service and the floor (SHA-256 of the body plus one moka `get`), for
//! request bodies of 0 B, 1 KiB and 64 KiB. One request = one element.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use sha2::{Digest, Sha256};
use tokio::runtime::Runtime;
use tower::ServiceExt;

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
async fn answer(_request: Request<Full<Bytes>>) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(Response::builder()
        .status(StatusCode::CREATED)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from_static(ANSWER)))
        .expect("static response"))
}

fn request(body: &Bytes, key: Option<&str>) -> Request<Full<Bytes>> {
    let mut builder = Request::builder()
        .method(Method::POST)
        .uri("/orders")
        .header(header::CONTENT_TYPE, "application/json");
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
        let cache: moka::future::Cache<String, Arc<Bytes>> = moka::future::Cache::new(10_000);
        rt.block_on(cache.insert("floor-key".to_owned(), Arc::new(Bytes::from_static(ANSWER))));
        group.bench_function(BenchmarkId::from_parameter("floor"), |b| {
            b.to_async(&rt).iter(|| async {
                let digest = Sha256::digest(std::hint::black_box(&body));
                let hit = cache.get("floor-key").await;
                (digest, hit)
            });
        });

        let bare = tower::service_fn(answer);
        group.bench_function(BenchmarkId::from_parameter("bare"), |b| {
            b.to_async(&rt)
                .iter(|| async { send(&bare, request(&body, None)).await });
        });

        group.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30);
    targets = per_request
}
criterion_main!(benches);
