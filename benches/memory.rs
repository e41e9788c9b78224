//! Memory per stored entry: stores 100,000 completed responses in the memory
//! store and reports the heap bytes each takes beyond the stored response's
//! own size (body, header names and values).
//!
//! Heap bytes are counted exactly by `stats_alloc` (a counting wrapper around
//! the system allocator: sizes as requested, without malloc's own per-block
//! overhead). The resident set size from `/proc/self/statm` is printed beside
//! them as a cross-check that includes the allocator's overhead (meaningful
//! for the first measurement only: later ones reuse memory freed before).
//!
//! `cargo bench --bench memory`

use std::alloc::System;
use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, StatusCode};
use http_body_util::{BodyExt, Full};
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};
use tower::{Layer, ServiceExt};
use tower_idempotency::store::{Entry, EntryState};
use tower_idempotency::{
    Begin, Concurrent, Fingerprint, Idempotency, IdempotencyKey, IdempotencyLayer, KeyFilter,
    Record, RequestBody, StoredResponse,
};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const ENTRIES: usize = 100_000;
/// Size of each response body.
const BODY: usize = 256;

/// Resident set size in bytes, when /proc tells it.
fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// A distinct `BODY`-byte JSON body, allocated to size.
fn json_body(id: &str) -> Bytes {
    let mut body = format!("{{\"id\":\"{id}\",\"padding\":\"").into_bytes();
    body.resize(BODY - 2, b'x');
    body.extend_from_slice(b"\"}");
    Bytes::copy_from_slice(&body)
}

/// A client's key: a UUID, distinct per entry.
fn client_key(i: usize) -> String {
    format!("8e03978e-40d5-43e8-bc93-{i:012x}")
}

/// Runs `fill` (which stores `ENTRIES` entries), then `sizes` (which answers
/// the sum of their stored sizes and of their key lengths, read after the
/// count so that reading them is not counted), and prints the cost per entry.
async fn measure<F, Fut, G, Gut>(label: &str, fill: F, sizes: G) -> f64
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = ()>,
    G: FnOnce() -> Gut,
    Gut: Future<Output = (u64, u64)>,
{
    let rss_before = rss_bytes();
    let region = Region::new(GLOBAL);
    fill().await;
    let change = region.change();
    let rss_after = rss_bytes();
    let (stored, keys) = sizes().await;
    let n = ENTRIES as f64;
    let heap = (change.bytes_allocated as f64 - change.bytes_deallocated as f64) / n;
    let response = stored as f64 / n;
    println!("{label}: {ENTRIES} entries");
    println!("  stored response (body, header names and values) {response:>8.1} B/entry");
    println!(
        "  storage key                                      {:>8.1} B/entry",
        keys as f64 / n
    );
    println!("  heap held                                        {heap:>8.1} B/entry");
    println!(
        "  heap above the stored response                   {:>8.1} B/entry  (target <= 256)",
        heap - response
    );
    if let (Some(before), Some(after)) = (rss_before, rss_after) {
        let rss = (after as f64 - before as f64) / n;
        println!("  RSS growth                                       {rss:>8.1} B/entry");
    }
    heap - response
}

/// Sums stored sizes and key lengths of every completed record of `engine`.
async fn sizes_of<S: tower_idempotency::store::StoreAdmin>(engine: &Idempotency<S>) -> (u64, u64) {
    let (mut stored, mut keys) = (0, 0);
    for entry in engine.keys(&KeyFilter::new()).await.expect("keys") {
        if let Some(Entry {
            state: EntryState::Completed(record),
            ..
        }) = engine.record(&entry.key).await.expect("record")
        {
            stored += record.stored_size() as u64;
            keys += entry.key.len() as u64;
        }
    }
    (stored, keys)
}

/// The handler behind the layer: a fresh JSON answer per call, as a
/// serialising handler makes.
async fn handler(
    request: http::Request<RequestBody<Full<Bytes>>>,
) -> Result<http::Response<Full<Bytes>>, Infallible> {
    let id = request
        .headers()
        .get("idempotency-key")
        .and_then(|key| key.to_str().ok())
        .unwrap_or("")
        .to_owned();
    Ok(http::Response::builder()
        .status(StatusCode::CREATED)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(json_body(&id)))
        .expect("response"))
}

/// Through the HTTP layer: 100,000 POSTs with distinct keys, each stored;
/// answers the heap per entry above the stored response.
async fn layer_level() -> f64 {
    let layer = IdempotencyLayer::builder()
        .max_entries(2 * ENTRIES as u64)
        .build()
        .expect("layer");
    let engine = layer.handle();
    let service = layer.layer(tower::service_fn(handler));
    let post = |key: String| {
        http::Request::post("/orders")
            .header(header::CONTENT_TYPE, "application/json")
            .header("idempotency-key", key)
            .body(Full::new(Bytes::from_static(
                br#"{"item":"book","quantity":1}"#,
            )))
            .expect("request")
    };
    let call = |key: String| {
        let service = service.clone();
        async move {
            let response = service.oneshot(post(key)).await.expect("call");
            assert_eq!(response.status(), StatusCode::CREATED);
            drop(response.into_body().collect().await.expect("body"));
        }
    };
    // The engine's one-off allocations (heartbeat task, maps) are not per entry.
    call("warm-up".into()).await;
    engine.cleanup_expired().await.expect("cleanup");

    measure(
        "HTTP layer (defaults, max_entries 200,000) + MemoryStore",
        || async {
            for i in 0..ENTRIES {
                call(client_key(i)).await;
            }
            engine.cleanup_expired().await.expect("cleanup");
        },
        || async {
            let (stored, keys) = sizes_of(&engine).await;
            let (warm, warm_key) = (stored / (ENTRIES as u64 + 1), keys / (ENTRIES as u64 + 1));
            (stored - warm, keys - warm_key)
        },
    )
    .await
}

/// The engine alone, with a response of one header as the layer stores it;
/// answers the heap per entry above the stored response.
async fn engine_level() -> f64 {
    let engine = Idempotency::builder()
        .max_entries(2 * ENTRIES as u64)
        .ttl(Duration::from_secs(3600))
        .build()
        .expect("engine");
    let warm = Fingerprint::of_bytes(b"warm");
    if let Ok(Begin::Execute(lease)) = engine.begin_with("warm", warm, Concurrent::Reject).await {
        let _ = lease.complete(Record::value(warm, Bytes::new())).await;
    }
    engine.cleanup_expired().await.expect("cleanup");

    measure(
        "engine + MemoryStore",
        || async {
            for i in 0..ENTRIES {
                let key = IdempotencyKey::new(client_key(i), "POST /orders", "").to_string();
                let fingerprint = Fingerprint::of_bytes(&i.to_be_bytes());
                let Ok(Begin::Execute(lease)) = engine
                    .begin_with(key, fingerprint, Concurrent::Reject)
                    .await
                else {
                    panic!("entry {i} is new");
                };
                let mut headers = HeaderMap::with_capacity(1);
                headers.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                let body = json_body(&i.to_string());
                let response = StoredResponse::new(StatusCode::CREATED, &headers, &body);
                let stored = lease.complete(Record::response(fingerprint, response));
                assert!(stored.await.expect("complete"));
            }
            engine.cleanup_expired().await.expect("cleanup");
        },
        || sizes_of(&engine),
    )
    .await
}

/// The reference: a bare moka cache of the same size with the same keys, a
/// per-entry expiry and 8-byte values, i.e. what any store on moka pays per
/// entry before it holds anything; answers its heap per entry.
async fn moka_reference() -> f64 {
    struct PerEntry;
    impl moka::Expiry<String, u64> for PerEntry {
        fn expire_after_create(
            &self,
            _key: &String,
            _value: &u64,
            _at: std::time::Instant,
        ) -> Option<Duration> {
            Some(Duration::from_secs(3600))
        }
    }
    let cache: moka::sync::Cache<String, u64> = moka::sync::Cache::builder()
        .max_capacity(2 * ENTRIES as u64)
        .expire_after(PerEntry)
        .build();
    let key = |i: usize| IdempotencyKey::new(client_key(i), "POST /orders", "").to_string();
    measure(
        "reference: bare moka cache, same keys, u64 values, per-entry expiry",
        || async {
            for i in 0..ENTRIES {
                cache.insert(key(i), i as u64);
            }
            cache.run_pending_tasks();
        },
        || async { (0, (0..ENTRIES).map(|i| key(i).len() as u64).sum()) },
    )
    .await
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let layer = rt.block_on(layer_level());
    let engine = rt.block_on(engine_level());
    let moka = rt.block_on(moka_reference());
    println!(
        "heap above the stored response against the bare moka cache: layer {:.3}x, engine {:.3}x (target <= 1.25x)",
        layer / moka,
        engine / moka
    );
}
