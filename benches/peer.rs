//! This crate's layer against the `axum-idempotent` crate (0.6) on the same
//! axum handler, with the same bodies (0 B, 1 KiB, 64 KiB), in the same run.
//! Both routers are driven in process with `tower::ServiceExt::oneshot`.
//!
//! `axum-idempotent` is set up as its README says: header mode on
//! `Idempotency-Key`, inside a `ruts` `SessionLayer` (moka session store)
//! inside a `CookieManagerLayer`. It caches nothing for a request without a
//! session, so each simulated client logs in once (untimed, on a route outside
//! the idempotency layer) and sends its cookie; on the miss path a client
//! takes a fresh session every 100 keys, since the session store rewrites a
//! session's whole field map on every write. Only the requests to `/orders`
//! are timed. This crate's router gets the same requests, cookie included.
//!
//! `axum-idempotent-hashing` is the peer in its default mode (the key is a
//! hash of method, path, headers and body), the closer match to this crate,
//! which fingerprints the body.

// The axum routers the benches share; this bench uses most of them.
#[allow(dead_code)]
#[path = "support/routers.rs"]
mod routers;

use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::HeaderValue;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

use routers::{bare_router, order, ours_router, peer_router, send, Client, SIZES};

fn compare(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let bare = bare_router();
    let ours = ours_router();
    let peer = peer_router(false);
    let peer_hashing = peer_router(true);
    let mut next_key = 0u64;

    for (label, size) in SIZES {
        let body = Bytes::from(vec![b'x'; size]);
        let mut group = c.benchmark_group(format!("peer/{label}"));
        group.throughput(Throughput::Elements(1));

        let anyone = HeaderValue::from_static("session=none");
        group.bench_function(BenchmarkId::from_parameter("bare"), |b| {
            b.to_async(&rt).iter(|| async {
                let key = "unused";
                send(&bare, order(&body, key, &anyone)).await
            });
        });

        for (name, router, logs_in) in [
            ("ours", &ours, false),
            ("axum-idempotent", &peer, true),
            ("axum-idempotent-hashing", &peer_hashing, true),
        ] {
            // Replay: one client, one key, answered from the store after the
            // first call (checked before timing).
            let key = format!("replay-{label}");
            let cookie = rt.block_on(async {
                let client = Client::new(router, logs_in).await;
                assert!(!send(router, order(&body, &key, &client.cookie)).await);
                assert!(
                    send(router, order(&body, &key, &client.cookie)).await,
                    "{name} replays the second call"
                );
                client.cookie
            });
            group.bench_function(BenchmarkId::new("replay", name), |b| {
                b.to_async(&rt)
                    .iter(|| async { send(router, order(&body, &key, &cookie)).await });
            });

            // Miss: a new key each call; logins are not timed.
            group.bench_function(BenchmarkId::new("miss", name), |b| {
                b.to_async(&rt).iter_custom(|iters| {
                    let router = router.clone();
                    let body = body.clone();
                    let first = next_key;
                    next_key += iters;
                    async move {
                        let mut client = Client::new(&router, logs_in).await;
                        let mut timed = Duration::ZERO;
                        for n in first..first + iters {
                            let key = format!("miss-{n}");
                            let request = order(&body, &key, &client.cookie);
                            let start = Instant::now();
                            let replayed = send(&router, request).await;
                            timed += start.elapsed();
                            assert!(!replayed, "a new key is not a replay");
                            client.next_key().await;
                        }
                        timed
                    }
                });
            });
        }
        group.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(20);
    targets = compare
}
criterion_main!(benches);
