//! Heap allocations per request through the layer, counted exactly by
//! `stats_alloc` (a counting wrapper around the system allocator), for a
//! 1 KiB request body:
//!
//! * `bare`: the trivial inner service alone;
//! * `passthrough`: the layer, a POST without a key;
//! * `first request`: the layer, a new key each call (the handler runs and
//!   its response is stored; the store is at its 10,000-entry bound, so it
//!   evicts as a busy service does);
//! * `replay`: the layer, the same key each call (answered from the store).
//!
//! The requests are built before counting starts, so the figures are what
//! the service call and reading the whole response body cost: for `bare`,
//! the handler's response; for the others, that plus the layer. Every
//! allocation on any thread counts (the spawned tasks of a first request
//! included). Takes a few seconds:
//!
//! ```sh
//! cargo bench --bench allocs
//! ```
//!
//! It prints a markdown table. The last four rows are the same paths
//! through axum (the handler and routers of the peer benches, the layer on
//! the `Router`), where the bare row also counts axum's routing.

use std::alloc::System;
use std::convert::Infallible;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};
use tower::{Layer, ServiceExt};
use tower_idempotency::IdempotencyLayer;

// The axum routers of the peer benches; this bench uses a few of them.
#[allow(dead_code)]
#[path = "support/routers.rs"]
mod routers;

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Requests counted per path.
const REQUESTS: usize = 20_000;
/// Requests sent before counting: past the store's default 10,000-entry
/// bound, so first requests are counted at the bound, where they evict.
const WARM_UP: usize = 12_000;

/// The trivial inner service.
async fn answer<B>(_request: Request<B>) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(Response::builder()
        .status(StatusCode::CREATED)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from_static(routers::ANSWER)))
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

/// Sends one request and reads the whole response, as a client would;
/// answers whether it was a replay.
async fn send<S, R, B>(service: &S, request: Request<R>) -> bool
where
    S: tower::Service<Request<R>, Response = Response<B>> + Clone,
    S::Error: std::fmt::Debug,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let response = service.clone().oneshot(request).await.expect("call");
    assert_eq!(response.status(), StatusCode::CREATED);
    let replayed = response.headers().contains_key("idempotent-replayed");
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    assert_eq!(&body[..], routers::ANSWER);
    replayed
}

/// Allocation counts per request.
struct PerRequest {
    allocations: f64,
    reallocations: f64,
    bytes: f64,
}

/// Sends `requests` (built beforehand, so building them is not counted)
/// and answers what they cost per request. `replays` says whether each
/// answer must be a replay.
async fn count<S, R, B>(service: &S, requests: Vec<Request<R>>, replays: bool) -> PerRequest
where
    S: tower::Service<Request<R>, Response = Response<B>> + Clone,
    S::Error: std::fmt::Debug,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let n = requests.len() as f64;
    let region = Region::new(GLOBAL);
    for request in requests {
        let replayed = send(service, request).await;
        assert_eq!(
            replayed, replays,
            "a replay if and only if the key was used"
        );
    }
    let change = region.change();
    PerRequest {
        allocations: change.allocations as f64 / n,
        reallocations: change.reallocations as f64 / n,
        bytes: change.bytes_allocated as f64 / n,
    }
}

async fn run() -> Vec<(&'static str, PerRequest)> {
    let body = Bytes::from(vec![b'x'; 1024]);
    let keyless = |n: usize| (0..n).map(|_| request(&body, None)).collect::<Vec<_>>();
    let mut next_key = 0usize;
    let mut keyed = |n: usize| {
        let first = next_key;
        next_key += n;
        (first..first + n)
            .map(|i| request(&body, Some(&format!("8e03978e-40d5-43e8-bc93-{i:012x}"))))
            .collect::<Vec<_>>()
    };
    let mut rows = Vec::new();

    let bare = tower::service_fn(answer::<Full<Bytes>>);
    count(&bare, keyless(WARM_UP), false).await;
    rows.push(("bare", count(&bare, keyless(REQUESTS), false).await));

    let layer = IdempotencyLayer::new();
    let layered = layer.layer(tower::service_fn(answer));
    count(&layered, keyless(WARM_UP), false).await;
    rows.push((
        "passthrough",
        count(&layered, keyless(REQUESTS), false).await,
    ));

    count(&layered, keyed(WARM_UP), false).await;
    rows.push((
        "first request",
        count(&layered, keyed(REQUESTS), false).await,
    ));

    let replay = |n: usize| (0..n).map(|_| request(&body, Some("replay"))).collect();
    count(&layered, replay(1), false).await;
    count(&layered, replay(WARM_UP), true).await;
    rows.push(("replay", count(&layered, replay(REQUESTS), true).await));
    rows
}

/// The same paths through axum: the handler of the peer benches on a
/// `Router`, bare and behind the layer (`Router::layer`).
async fn run_axum() -> Vec<(&'static str, PerRequest)> {
    let body = Bytes::from(vec![b'x'; 1024]);
    let cookie = http::HeaderValue::from_static("session=none");
    let keyless = |n: usize| {
        (0..n)
            .map(|_| {
                let mut request = routers::order(&body, "", &cookie);
                request.headers_mut().remove("idempotency-key");
                request
            })
            .collect::<Vec<_>>()
    };
    let mut next_key = 0usize;
    let mut keyed = |n: usize| {
        let first = next_key;
        next_key += n;
        (first..first + n)
            .map(|i| routers::order(&body, &format!("axum-{i:012x}"), &cookie))
            .collect::<Vec<_>>()
    };
    let mut rows = Vec::new();
    let bare = routers::bare_router();
    count(&bare, keyless(WARM_UP), false).await;
    rows.push(("axum: bare", count(&bare, keyless(REQUESTS), false).await));
    let identity = routers::noop_layer_router();
    count(&identity, keyless(WARM_UP), false).await;
    rows.push((
        "axum: a no-op layer",
        count(&identity, keyless(REQUESTS), false).await,
    ));
    let ours = routers::ours_router();
    count(&ours, keyless(WARM_UP), false).await;
    rows.push((
        "axum: passthrough",
        count(&ours, keyless(REQUESTS), false).await,
    ));
    count(&ours, keyed(WARM_UP), false).await;
    rows.push((
        "axum: first request",
        count(&ours, keyed(REQUESTS), false).await,
    ));
    let replay = |n: usize| {
        (0..n)
            .map(|_| routers::order(&body, "replay", &cookie))
            .collect::<Vec<_>>()
    };
    count(&ours, replay(1), false).await;
    count(&ours, replay(WARM_UP), true).await;
    rows.push(("axum: replay", count(&ours, replay(REQUESTS), true).await));
    rows
}

fn print_rows(rows: &[(&str, PerRequest)]) {
    let bare = rows[0].1.allocations;
    for (path, per) in rows {
        println!(
            "| {path} | {:.1} | {:.1} | {:.1} | {:.0} |",
            per.allocations,
            per.allocations - bare,
            per.reallocations,
            per.bytes
        );
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let rows = rt.block_on(run());
    let axum_rows = rt.block_on(run_axum());
    println!("Heap allocations per request, 1 KiB request body, {REQUESTS} requests per path");
    println!();
    println!("| path | allocations | above bare | reallocations | bytes allocated |");
    println!("|---|---:|---:|---:|---:|");
    print_rows(&rows);
    print_rows(&axum_rows);
}
