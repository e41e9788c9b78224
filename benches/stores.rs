//! The engine on each store: a miss (begin, then complete, on a new key), a
//! replay (begin on a completed key) and, for reference, the fingerprint
//! alone. One request = one iteration; throughput is in requests.
//!
//! `cargo bench --bench stores --all-features` adds the Redis groups when
//! Redis answers on 127.0.0.1:6379 (or `$REDIS_URL`); otherwise it says so
//! and skips them; likewise the Postgres groups (first request, replay, and
//! the transactional form) on 127.0.0.1:5432 (or `$DATABASE_URL`).
//!
//! Postgres round trips per request are counted, not timed: a forwarder in
//! front of Postgres counts what Postgres answers (one `CommandComplete` per
//! statement it carried out, one `ReadyForQuery` per round trip) over a few
//! hundred first requests, replays, and bare `INSERT ... ON CONFLICT DO
//! NOTHING`s of the same row, and the bench prints the figures per request
//! before the timings (`postgres/bare_insert_on_conflict` times the bare
//! insert).
//!
//! `*/renew_10k/...`: one heartbeat round over 10,000 held leases, as
//! batches of 500 through `Store::renew_many` (what the heartbeat does) and,
//! for reference, one `renew` after another (what it did before). The
//! Redis Cluster group runs when a cluster answers on 127.0.0.1:7000-7002
//! (or `$REDIS_CLUSTER_URLS`, comma-separated).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};
use http::{header, HeaderMap, HeaderValue, StatusCode};
use tokio::runtime::Runtime;
use tower_idempotency::store::Store;
use tower_idempotency::{Begin, Concurrent, Fingerprint, Idempotency, Record, StoredResponse};

/// The stored response: 1 KiB of body and a content type.
fn response() -> StoredResponse {
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    StoredResponse::new(StatusCode::CREATED, &headers, &[b'x'; 1024])
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// The three engine paths on one store, in `group`, under the name `store`.
fn engine_paths<S: Store>(
    group: &mut BenchmarkGroup<'_, criterion::measurement::WallTime>,
    rt: &Runtime,
    store: &str,
    engine: &Idempotency<S>,
) {
    let request_body = vec![b'r'; 1024];
    let fingerprint = Fingerprint::of_bytes(&request_body);
    let stored = response();

    // Miss: a new key each call; the action "runs" and its record is stored.
    let next = AtomicU64::new(0);
    group.bench_function(format!("{store}/miss"), |b| {
        b.to_async(rt).iter(|| async {
            let key = format!("bench:miss:{}", next.fetch_add(1, Relaxed));
            let Begin::Execute(lease) = engine
                .begin_with(key, fingerprint, Concurrent::Reject)
                .await
                .expect("begin")
            else {
                panic!("a new key executes");
            };
            let stored = lease
                .complete(Record::response(fingerprint, stored.clone()))
                .await
                .expect("complete");
            assert!(stored);
        });
    });

    // Replay: the same completed key every call.
    rt.block_on(async {
        let Begin::Execute(lease) = engine
            .begin_with("bench:replay", fingerprint, Concurrent::Reject)
            .await
            .expect("begin")
        else {
            panic!("the replay key is new");
        };
        lease
            .complete(Record::response(fingerprint, stored.clone()))
            .await
            .expect("complete");
    });
    group.bench_function(format!("{store}/replay"), |b| {
        b.to_async(rt).iter(|| async {
            match engine
                .begin_with("bench:replay", fingerprint, Concurrent::Reject)
                .await
                .expect("begin")
            {
                Begin::Replay { record, .. } => record,
                other => panic!("expected a replay, got {other:?}"),
            }
        });
    });
}

fn memory(c: &mut Criterion) {
    let rt = runtime();
    let engine = Idempotency::new();
    let mut group = c.benchmark_group("stores");
    group.throughput(Throughput::Elements(1));
    let body = vec![b'r'; 1024];
    group.bench_function("fingerprint_1KiB", |b| {
        b.iter(|| Fingerprint::of_bytes(std::hint::black_box(&body)));
    });
    engine_paths(&mut group, &rt, "memory", &engine);

    // The store alone, without the engine: begin then complete a new key.
    let store = tower_idempotency::store::MemoryStore::new();
    let record = std::sync::Arc::new(Record::response(Fingerprint::of_bytes(&body), response()));
    let next = AtomicU64::new(0);
    group.bench_function("memory_store/begin_complete", |b| {
        b.to_async(&rt).iter(|| async {
            let key = format!("bench:store:{}", next.fetch_add(1, Relaxed));
            let token = tower_idempotency::store::LeaseToken::random();
            let fp = record.fingerprint;
            store
                .begin(&key, fp, token, Duration::from_secs(60))
                .await
                .expect("begin");
            store
                .complete(&key, token, record.clone(), Duration::from_secs(3600))
                .await
                .expect("complete")
        });
    });
    // Begin and release: a marker begun and never ended would stay for its
    // lease TTL, and millions of them are not what a store holds.
    group.bench_function("memory_store/begin_release_new_key", |b| {
        b.to_async(&rt).iter(|| async {
            let key = format!("bench:store:{}", next.fetch_add(1, Relaxed));
            let token = tower_idempotency::store::LeaseToken::random();
            store
                .begin(&key, record.fingerprint, token, Duration::from_secs(60))
                .await
                .expect("begin");
            store.release(&key, token).await.expect("release")
        });
    });

    // What moka itself costs for the same traffic: a cache of the same bound
    // and a new key per call (so it churns at its bound, as the miss path
    // does), by plain insert and by the atomic compute the store used before
    // its striped locks (BENCHMARKS.md, optimisation 1).
    let cache: moka::sync::Cache<String, u64> = moka::sync::Cache::new(10_000);
    let next = AtomicU64::new(0);
    group.bench_function("moka/insert_new_key", |b| {
        b.iter(|| {
            let n = next.fetch_add(1, Relaxed);
            cache.insert(format!("bench:moka:{n}"), n);
        });
    });
    group.bench_function("moka/compute_new_key", |b| {
        b.iter(|| {
            let n = next.fetch_add(1, Relaxed);
            cache
                .entry(format!("bench:moka:{n}"))
                .and_compute_with(|_| moka::ops::compute::Op::Put(n))
        });
    });
    group.bench_function("moka/get_hit", |b| {
        b.iter(|| cache.get("bench:moka:1"));
    });
    group.finish();
    renewal_round(
        c,
        &rt,
        "memory_store",
        &tower_idempotency::store::MemoryStore::new(),
    );
}

/// Leases one heartbeat round renews in the `renew_10k` benches.
const ROUND: usize = 10_000;

/// One heartbeat round over `ROUND` leases held on `store`, batched and one
/// by one, in a group of its own (an iteration lasts a round).
fn renewal_round<S: Store>(c: &mut Criterion, rt: &Runtime, name: &str, store: &S) {
    use tower_idempotency::store::LeaseToken;

    let lease_ttl = Duration::from_secs(300);
    let token = LeaseToken::random();
    let keys: Vec<String> = (0..ROUND).map(|n| format!("bench:renew:{n}")).collect();
    let fingerprint = Fingerprint::of_bytes(b"renew");
    rt.block_on(async {
        for key in &keys {
            store
                .begin(key, fingerprint, token, lease_ttl)
                .await
                .expect("begin");
        }
    });
    let leases: Vec<(&str, LeaseToken)> = keys.iter().map(|key| (key.as_str(), token)).collect();
    let mut group = c.benchmark_group("stores");
    group.sample_size(10);
    group.throughput(Throughput::Elements(ROUND as u64));
    group.bench_function(format!("{name}/renew_10k/batches_of_500"), |b| {
        b.to_async(rt).iter(|| async {
            for batch in leases.chunks(500) {
                let renewed = store.renew_many(batch, lease_ttl).await;
                assert!(renewed.iter().all(|answer| matches!(answer, Ok(true))));
            }
        });
    });
    group.bench_function(format!("{name}/renew_10k/one_by_one"), |b| {
        b.to_async(rt).iter(|| async {
            for (key, token) in &leases {
                assert!(store.renew(key, *token, lease_ttl).await.expect("renew"));
            }
        });
    });
    group.finish();
    rt.block_on(async {
        for (key, token) in &leases {
            let _ = store.release(key, *token).await;
        }
    });
}

#[cfg(feature = "redis")]
fn redis(c: &mut Criterion) {
    use tower_idempotency::store::redis::RedisStore;

    let rt = runtime();
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let prefix = format!("bench:{}:", std::process::id());
    let store = rt.block_on(async {
        tokio::time::timeout(
            Duration::from_secs(2),
            RedisStore::builder(url.clone())
                .prefix(prefix)
                .connection_timeout(Duration::from_secs(1))
                .build(),
        )
        .await
    });
    let store = match store {
        Ok(Ok(store)) => store,
        Ok(Err(error)) => {
            eprintln!("note: Redis at {url} does not answer ({error}): Redis groups skipped");
            return;
        }
        Err(_) => {
            eprintln!("note: Redis at {url} did not answer within 2 s: Redis groups skipped");
            return;
        }
    };
    let engine = Idempotency::builder()
        .store(store.clone())
        .build()
        .expect("engine on Redis");
    let mut group = c.benchmark_group("stores");
    group.throughput(Throughput::Elements(1));
    engine_paths(&mut group, &rt, "redis", &engine);
    group.finish();
    renewal_round(c, &rt, "redis_store", &store);
    // Leave nothing behind in a Redis that others use.
    if let Err(error) = rt.block_on(engine.clear()) {
        eprintln!("note: could not clear the bench keys: {error}");
    }
}

#[cfg(feature = "redis")]
fn redis_cluster(c: &mut Criterion) {
    use tower_idempotency::store::redis::RedisStore;

    let rt = runtime();
    let urls: Vec<String> = std::env::var("REDIS_CLUSTER_URLS")
        .unwrap_or_else(|_| {
            "redis://127.0.0.1:7000,redis://127.0.0.1:7001,redis://127.0.0.1:7002".into()
        })
        .split(',')
        .map(str::to_owned)
        .collect();
    let prefix = format!("bench:{}:", std::process::id());
    let store = rt.block_on(async {
        tokio::time::timeout(
            Duration::from_secs(5),
            RedisStore::cluster_builder(urls.clone())
                .prefix(prefix)
                .build(),
        )
        .await
    });
    let store = match store {
        Ok(Ok(store)) => store,
        Ok(Err(error)) => {
            eprintln!("note: no Redis Cluster at {urls:?} ({error}): cluster groups skipped");
            return;
        }
        Err(_) => {
            eprintln!("note: no Redis Cluster at {urls:?} within 5 s: cluster groups skipped");
            return;
        }
    };
    renewal_round(c, &rt, "redis_cluster_store", &store);
}

#[cfg(not(feature = "redis"))]
fn redis_cluster(_: &mut Criterion) {}

#[cfg(not(feature = "redis"))]
fn redis(_: &mut Criterion) {
    eprintln!("note: built without feature `redis`: Redis groups skipped");
}

#[cfg(feature = "postgres")]
#[path = "../tests/support/stores/pg_wire.rs"]
mod pg_wire;

/// Requests per counted path.
#[cfg(feature = "postgres")]
const COUNTED: u64 = 500;

/// Counts statements and round trips per request on Postgres through a
/// forwarder, as the store's own pool (the builder's) makes them, and prints
/// them: a first request, a replay, and a bare `INSERT ... ON CONFLICT DO
/// NOTHING` of the same row for reference.
#[cfg(feature = "postgres")]
fn postgres_round_trips(rt: &Runtime, url: &str, table: &str) {
    use tower_idempotency::store::postgres::PostgresStore;

    rt.block_on(async {
        let wire = pg_wire::Wire::start(url).await;
        let store = PostgresStore::builder(wire.url(""))
            .table(table)
            .build()
            .await
            .expect("store through the forwarder");
        let pool = store.pool().clone();
        let engine = Idempotency::builder()
            .store(store.clone())
            .build()
            .expect("engine on Postgres");
        let fingerprint = Fingerprint::of_bytes(&[b'r'; 1024]);
        let record = Record::response(fingerprint, response());
        // Waits until every connection is back in the pool (sqlx pings each
        // as it returns, after the answer reached the caller).
        let settled = async || {
            while pool.num_idle() < pool.size() as usize {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        };
        let first = async |key: String| {
            let Begin::Execute(lease) = engine
                .begin_with(key, fingerprint, Concurrent::Reject)
                .await
                .expect("begin")
            else {
                panic!("a new key executes");
            };
            assert!(lease.complete(record.clone()).await.expect("complete"));
        };
        let replay = async || {
            let begun = engine
                .begin_with("bench:count:replay", fingerprint, Concurrent::Reject)
                .await
                .expect("begin");
            assert!(matches!(begun, Begin::Replay { .. }), "{begun:?}");
        };
        let insert = format!(
            "INSERT INTO \"{table}\" \
             (key, state, lease_token, fingerprint, record, created_at_ms, expires_at) \
             VALUES ($1, 'in_flight', $2, $3, NULL, $4, clock_timestamp() + interval '1 minute') \
             ON CONFLICT DO NOTHING"
        );
        let bare = async |n: u64| {
            sqlx::query(&insert)
                .bind(format!("bench:count:bare:{n}"))
                .bind("0123456789abcdef0123456789abcdef")
                .bind(fingerprint.as_bytes().as_slice())
                .bind(0_i64)
                .execute(&pool)
                .await
                .expect("bare insert");
        };
        // Every connection the pool opens prepares each statement once:
        // warm them all (and the replay key) before counting.
        first("bench:count:replay".to_owned()).await;
        for n in 0..50 {
            first(format!("bench:count:warm:{n}")).await;
            replay().await;
            bare(u64::MAX - n).await;
        }
        settled().await;

        let mut figures = Vec::new();
        let mut report = |name: &str, (statements, round_trips): (u64, u64)| {
            let per = |total: u64| total as f64 / COUNTED as f64;
            figures.push(format!(
                "  {name:<40} {:>5.2} statements, {:>5.2} round trips",
                per(wire.statements() - statements),
                per(wire.round_trips() - round_trips),
            ));
        };
        let mark = || (wire.statements(), wire.round_trips());

        let before = mark();
        for n in 0..COUNTED {
            first(format!("bench:count:first:{n}")).await;
        }
        settled().await;
        report("first request (begin, complete)", before);
        let before = mark();
        for _ in 0..COUNTED {
            replay().await;
        }
        settled().await;
        report("replay (begin)", before);
        let before = mark();
        for n in 0..COUNTED {
            bare(n).await;
        }
        settled().await;
        report("bare INSERT ... ON CONFLICT DO NOTHING", before);
        eprintln!(
            "postgres, per request (counted on the wire over {COUNTED} requests each; \
             round trips include sqlx's ping as a connection returns to the pool, \
             one per statement, after its answer reached the caller):\n{}",
            figures.join("\n")
        );
    });
}

#[cfg(feature = "postgres")]
fn postgres(c: &mut Criterion) {
    use tower_idempotency::store::postgres::PostgresStore;
    use tower_idempotency::IdempotencyKey;

    let rt = runtime();
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let table = format!("bench_{}", std::process::id());
    let store = rt.block_on(async {
        let store = PostgresStore::builder(url.clone())
            .table(table.clone())
            .build()
            .await?;
        store.migrate().await?;
        Ok::<_, tower_idempotency::store::StoreError>(store)
    });
    let store = match store {
        Ok(store) => store,
        Err(error) => {
            eprintln!("note: Postgres at {url} is not usable ({error}): Postgres groups skipped");
            return;
        }
    };
    let pool = store.pool().clone();
    postgres_round_trips(&rt, &url, &table);
    let engine = Idempotency::builder()
        .store(store.clone())
        .build()
        .expect("engine on Postgres");
    let mut group = c.benchmark_group("stores");
    group.throughput(Throughput::Elements(1));
    engine_paths(&mut group, &rt, "postgres", &engine);
    // The same row as a first request's marker, written by one bare insert
    // that does nothing on a conflict: the floor of a write per request.
    let insert = format!(
        "INSERT INTO \"{table}\" \
         (key, state, lease_token, fingerprint, record, created_at_ms, expires_at) \
         VALUES ($1, 'in_flight', $2, $3, NULL, $4, clock_timestamp() + interval '1 minute') \
         ON CONFLICT DO NOTHING"
    );
    let fingerprint = Fingerprint::of_bytes(&[b'r'; 1024]);
    let next = AtomicU64::new(0);
    group.bench_function("postgres/bare_insert_on_conflict", |b| {
        b.to_async(&rt).iter(|| async {
            sqlx::query(&insert)
                .bind(format!("bench:bare:{}", next.fetch_add(1, Relaxed)))
                .bind("0123456789abcdef0123456789abcdef")
                .bind(fingerprint.as_bytes().as_slice())
                .bind(0_i64)
                .execute(&pool)
                .await
                .expect("bare insert")
        });
    });
    group.finish();
    renewal_round(c, &rt, "postgres_store", &store);
    let mut group = c.benchmark_group("stores");
    group.throughput(Throughput::Elements(1));

    // The transactional form on a new key: begin, a transaction with no
    // writes of its own, the record written into it, one commit.
    let next = AtomicU64::new(0);
    group.bench_function("postgres/transactional_miss", |b| {
        b.to_async(&rt).iter(|| async {
            let key = IdempotencyKey::new(
                format!("bench-{}", next.fetch_add(1, Relaxed)),
                "act",
                "tgt",
            );
            engine
                .execute_in_transaction(&key, |_transaction| {
                    Box::pin(async { Ok::<_, std::convert::Infallible>(1_u32) })
                })
                .await
                .expect("execute_in_transaction")
        });
    });
    group.finish();
    // Leave nothing behind in a database that others use.
    let dropped =
        rt.block_on(sqlx::query(&format!("DROP TABLE IF EXISTS \"{table}\"")).execute(&pool));
    if let Err(error) = dropped {
        eprintln!("note: could not drop the bench table {table}: {error}");
    }
}

#[cfg(not(feature = "postgres"))]
fn postgres(_: &mut Criterion) {
    eprintln!("note: built without feature `postgres`: Postgres groups skipped");
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30);
    targets = memory, redis, redis_cluster, postgres
}
criterion_main!(benches);
