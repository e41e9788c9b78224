//! Memory per stored entry: stores 100,000 completed records in the memory
//! store and reports the heap bytes they take beyond the stored responses'
//! own size (body, header names and values).
//!
//! Heap bytes are counted exactly by `stats_alloc` (a counting wrapper around
//! the system allocator; sizes as requested, without malloc's own per-block
//! overhead); the resident set size from `/proc/self/statm` is printed beside
//! them as a cross-check that includes the allocator's overhead.
//!
//! `cargo bench --bench memory`

use std::alloc::System;
use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, StatusCode};
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};
use tower_idempotency::{
    Begin, Concurrent, Fingerprint, Idempotency, IdempotencyKey, Record, StoredResponse,
};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const ENTRIES: usize = 100_000;
const BODY: usize = 256;

/// Resident set size in bytes, when /proc tells it.
fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// A distinct response for entry `i`, as the layer would store it.
fn response(i: usize) -> StoredResponse {
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let mut body = format!("{{\"id\":{i},\"padding\":\"").into_bytes();
    body.resize(BODY - 2, b'x');
    body.extend_from_slice(b"\"}");
    StoredResponse {
        status: StatusCode::CREATED,
        headers,
        // Exactly BODY bytes, without the Vec's spare capacity.
        body: Bytes::copy_from_slice(&body),
    }
}

/// A storage key of the layer's shape: a client's UUID, the method and path,
/// and the 16-hex-character scope.
fn key(i: usize) -> String {
    IdempotencyKey::new(
        format!("8e03978e-40d5-43e8-bc93-6894a57f{i:04x}"),
        "POST /orders",
        "3f8a1c9e0b7d2e64",
    )
    .to_string()
}

/// Runs `fill` (which stores `ENTRIES` entries and answers the sum of their
/// stored sizes and key lengths) and prints what it cost per entry.
async fn measure<F, Fut>(label: &str, fill: F)
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = (u64, u64)>,
{
    let rss_before = rss_bytes();
    let region = Region::new(GLOBAL);
    let (stored, keys) = fill().await;
    let change = region.change();
    let rss_after = rss_bytes();
    let heap = change.bytes_allocated as i64 - change.bytes_deallocated as i64;
    let n = ENTRIES as f64;
    let per_entry = heap as f64 / n;
    let stored_per_entry = stored as f64 / n;
    println!("{label}: {ENTRIES} entries");
    println!("  stored response size      {stored_per_entry:>8.1} B/entry (body, header names and values)");
    println!(
        "  key length                {:>8.1} B/entry",
        keys as f64 / n
    );
    println!("  heap held                 {per_entry:>8.1} B/entry");
    println!(
        "  heap above the response   {:>8.1} B/entry   (target <= 256)",
        per_entry - stored_per_entry
    );
    if let (Some(before), Some(after)) = (rss_before, rss_after) {
        let rss = (after as f64 - before as f64) / n;
        println!(
            "  RSS growth                {rss:>8.1} B/entry   ({:.1} above the response)",
            rss - stored_per_entry
        );
    }
}

async fn engine_level() {
    // Room for every entry, so nothing is evicted while measuring.
    let engine = Idempotency::builder()
        .max_entries(2 * ENTRIES as u64)
        .ttl(Duration::from_secs(3600))
        .build()
        .expect("engine");
    // Let the engine set up what it sets up once (heartbeat task, maps).
    let warm = Fingerprint::of_bytes(b"warm");
    if let Ok(Begin::Execute(lease)) = engine.begin("warm", warm, Concurrent::Reject).await {
        let _ = lease.complete(Record::value(warm, Bytes::new())).await;
    }
    let _ = engine.cleanup_expired().await;

    measure("engine + MemoryStore", || async {
        let mut stored = 0u64;
        let mut keys = 0u64;
        for i in 0..ENTRIES {
            let key = key(i);
            keys += key.len() as u64;
            let fingerprint = Fingerprint::of_bytes(&i.to_be_bytes());
            let Ok(Begin::Execute(lease)) =
                engine.begin(key, fingerprint, Concurrent::Reject).await
            else {
                panic!("entry {i} is new");
            };
            let record = Record::response(fingerprint, response(i));
            stored += record.stored_size() as u64;
            assert!(lease.complete(record).await.expect("complete"));
        }
        // Apply moka's pending writes so the cache holds what it will hold.
        engine.cleanup_expired().await.expect("cleanup");
        let info = engine.cache_info().await.expect("cache info");
        assert_eq!(info.entries, ENTRIES as u64 + 1, "every entry is held");
        (stored, keys)
    })
    .await;
    drop(engine);
}

/// Where the bytes go: the same records and keys held in a plain `Vec`, and
/// a bare moka cache of the same keys with per-entry expiry and tiny values.
async fn breakdown() {
    let mut held = Vec::with_capacity(ENTRIES);
    measure("breakdown: keys and Arc<Record>s in a Vec", || async {
        let mut stored = 0u64;
        let mut keys = 0u64;
        for i in 0..ENTRIES {
            let key = key(i);
            keys += key.len() as u64;
            let record = Record::response(Fingerprint::of_bytes(&i.to_be_bytes()), response(i));
            stored += record.stored_size() as u64;
            held.push((key, std::sync::Arc::new(record)));
        }
        (stored, keys)
    })
    .await;
    drop(held);

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
    let cache: moka::future::Cache<String, u64> = moka::future::Cache::builder()
        .max_capacity(2 * ENTRIES as u64)
        .expire_after(PerEntry)
        .eviction_listener(|_, _, _| {})
        .build();
    measure(
        "breakdown: bare moka cache, same keys, u64 values",
        || async {
            let mut keys = 0u64;
            for i in 0..ENTRIES {
                let key = key(i);
                keys += key.len() as u64;
                cache.insert(key, i as u64).await;
            }
            cache.run_pending_tasks().await;
            (0, keys)
        },
    )
    .await;
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(engine_level());
    rt.block_on(breakdown());
}
