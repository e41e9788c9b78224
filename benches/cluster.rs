//! The Redis store on one Redis and on a Redis Cluster (three primaries, one
//! replica each), with and without replica acknowledgement: a first request
//! (begin then complete on a new key: two scripts) and a replay (begin on a
//! completed key: one script), each by 64 concurrent callers on distinct
//! keys. One iteration = 64 requests; throughput is in requests.
//!
//! ```text
//! .ci/redis-cluster.sh start        # the cluster on 127.0.0.1:7000-7005
//! cargo bench --bench cluster --all-features -- --warm-up-time 1 --measurement-time 2
//! ```
//!
//! A store that does not answer (Redis on `$REDIS_URL` or 127.0.0.1:6379,
//! the cluster on `$REDIS_CLUSTER_URLS` or 127.0.0.1:7000-7005) is reported
//! and its groups skipped.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tokio::runtime::Runtime;

/// Concurrent callers per iteration.
const CALLERS: usize = 64;

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

#[cfg(feature = "redis")]
fn cluster(c: &mut Criterion) {
    use tower_idempotency::store::redis::RedisStore;
    use tower_idempotency::store::{BeginOutcome, LeaseToken, Store, StoreAdmin};
    use tower_idempotency::{Fingerprint, Record};

    let rt = runtime();
    let prefix = format!("bench:cluster:{}:", std::process::id());
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let seeds: Vec<String> = std::env::var("REDIS_CLUSTER_URLS")
        .map(|urls| urls.split(',').map(str::to_owned).collect())
        .unwrap_or_else(|_| {
            (7000..7006)
                .map(|port| format!("redis://127.0.0.1:{port}"))
                .collect()
        });
    let ack = Duration::from_millis(100);
    let setups = [
        ("redis", RedisStore::builder(url.clone()).prefix(&prefix)),
        (
            "cluster",
            RedisStore::cluster_builder(seeds.clone()).prefix(&prefix),
        ),
        (
            "cluster_replica_ack",
            RedisStore::cluster_builder(seeds.clone())
                .prefix(format!("{prefix}ack:"))
                .replica_ack(1, ack),
        ),
    ];
    let fingerprint = Fingerprint::of_bytes(b"order");
    let record = Arc::new(Record::value(fingerprint, Bytes::from(vec![b'x'; 1024])));
    let mut group = c.benchmark_group("cluster");
    group.throughput(Throughput::Elements(CALLERS as u64));
    for (name, builder) in setups {
        let built = rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(5), builder.build()).await
        });
        let store = match built {
            Ok(Ok(store)) => store,
            Ok(Err(error)) => {
                eprintln!("note: {name} does not answer ({error}): its groups skipped");
                continue;
            }
            Err(_) => {
                eprintln!("note: {name} did not answer within 5 s: its groups skipped");
                continue;
            }
        };

        // First request: 64 callers, each on a new key, begin then complete.
        let next = Arc::new(AtomicU64::new(0));
        group.bench_function(format!("{name}/first_request_x64"), |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let (store, record, next) = (store.clone(), record.clone(), next.clone());
                async move {
                    let start = Instant::now();
                    for _ in 0..iters {
                        let callers = (0..CALLERS).map(|_| {
                            let (store, record) = (store.clone(), record.clone());
                            let key = format!("first:{}:a:t", next.fetch_add(1, Relaxed));
                            tokio::spawn(async move {
                                let lease = LeaseToken::random();
                                let ttl = Duration::from_secs(60);
                                let begun = store.begin(&key, fingerprint, lease, ttl).await;
                                assert!(matches!(begun, Ok(BeginOutcome::Acquired)));
                                assert!(store.complete(&key, lease, record, ttl).await.unwrap());
                            })
                        });
                        for caller in callers.collect::<Vec<_>>() {
                            caller.await.expect("a caller panicked");
                        }
                    }
                    start.elapsed()
                }
            });
        });

        // Replay: 64 callers, each on its own completed key.
        let replay_keys: Vec<String> = (0..CALLERS).map(|i| format!("replay:{i}:a:t")).collect();
        rt.block_on(async {
            for key in &replay_keys {
                store
                    .put(key, record.clone(), Duration::from_secs(600))
                    .await
                    .expect("put");
            }
        });
        group.bench_function(format!("{name}/replay_x64"), |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let (store, keys) = (store.clone(), replay_keys.clone());
                async move {
                    let start = Instant::now();
                    for _ in 0..iters {
                        let callers = keys.iter().map(|key| {
                            let (store, key) = (store.clone(), key.clone());
                            tokio::spawn(async move {
                                let lease = LeaseToken::random();
                                let ttl = Duration::from_secs(60);
                                let begun = store.begin(&key, fingerprint, lease, ttl).await;
                                assert!(matches!(begun, Ok(BeginOutcome::Completed(_))));
                            })
                        });
                        for caller in callers.collect::<Vec<_>>() {
                            caller.await.expect("a caller panicked");
                        }
                    }
                    start.elapsed()
                }
            });
        });
        if store.unacknowledged_writes() > 0 {
            eprintln!(
                "note: {name}: {} writes not acknowledged by a replica within {ack:?}",
                store.unacknowledged_writes()
            );
        }
        // Leave nothing behind in the shared servers.
        if let Err(error) = rt.block_on(store.clear()) {
            eprintln!("note: could not clear the bench keys of {name}: {error}");
        }
    }
    group.finish();
}

#[cfg(not(feature = "redis"))]
fn cluster(_: &mut Criterion) {
    eprintln!("note: built without feature `redis`: the cluster groups skipped");
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20);
    targets = cluster
}
criterion_main!(benches);
