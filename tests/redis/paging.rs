//! Listing and counting at scale: one page of `/keys` and one `/stats`
//! estimate cost about the same at 100 and at 100,000 keys, counted in
//! the commands a Redis of this test's own ran (no other client on it).

use std::time::Duration;

use tokio::time::timeout;
use tower_idempotency::store::redis::RedisStore;
use tower_idempotency::store::{KeyPage, StoreAdmin};
use tower_idempotency::{Fingerprint, KeyFilter};

use crate::support::redis::{free_port, value, OwnRedis, LIMIT};

/// Commands the server has run so far (the `INFO` that asks counts itself
/// only afterwards).
async fn commands(store: &RedisStore) -> u64 {
    let mut connection = store.connection();
    let info: String = timeout(
        LIMIT,
        redis::cmd("INFO").arg("stats").query_async(&mut connection),
    )
    .await
    .unwrap()
    .unwrap();
    info.lines()
        .find_map(|line| line.strip_prefix("total_commands_processed:"))
        .and_then(|n| n.trim().parse().ok())
        .expect("INFO stats counts commands")
}

/// `n` records under the store's prefix, copied from one the store wrote,
/// pipelined 10,000 a round trip.
async fn fill(store: &RedisStore, n: usize) {
    let seed = value(Fingerprint::of_bytes(b"seed"), "r");
    store
        .put(
            "seed:a:t",
            std::sync::Arc::new(seed),
            Duration::from_secs(600),
        )
        .await
        .unwrap();
    let mut connection = store.connection();
    let raw: Vec<u8> = redis::cmd("GET")
        .arg(store.redis_key("seed:a:t"))
        .query_async(&mut connection)
        .await
        .unwrap();
    for chunk in (0..n).collect::<Vec<_>>().chunks(10_000) {
        let mut pipe = redis::pipe();
        for i in chunk {
            pipe.cmd("SET")
                .arg(store.redis_key(&format!("s:a:t{i}")))
                .arg(raw.as_slice())
                .arg("PX")
                .arg(600_000)
                .ignore();
        }
        timeout(LIMIT, pipe.query_async::<()>(&mut connection))
            .await
            .unwrap()
            .unwrap();
    }
    store.remove("seed:a:t").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_and_an_estimate_cost_the_same_at_100_and_100_000_keys() {
    let redis = OwnRedis::start(free_port()).await;
    let mut page_costs = Vec::new();
    for n in [100, 100_000] {
        let store = RedisStore::builder(redis.url())
            .prefix(format!("n{n}:"))
            .build()
            .await
            .unwrap();
        fill(&store, n).await;
        // What asking for the count costs: one INFO.
        let idle = commands(&store).await;
        let asked = commands(&store).await - idle;

        let before = commands(&store).await;
        let page: KeyPage = timeout(LIMIT, store.page(&KeyFilter::new(), None, 100))
            .await
            .unwrap()
            .unwrap();
        let cost = commands(&store).await - before - asked;
        assert_eq!(page.keys.len(), 100, "{n} keys");
        // At 100 keys SCAN may still answer a cursor (its next call finds
        // nothing); past them, a next page must follow.
        assert!(n == 100 || page.next_cursor.is_some());
        page_costs.push(cost);

        // The first estimate counts; the next ones answer it and run nothing.
        let first = timeout(LIMIT, store.info_estimate())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(first.entries, n as u64);
        let before = commands(&store).await;
        for _ in 0..10 {
            let info = timeout(LIMIT, store.info_estimate())
                .await
                .unwrap()
                .unwrap();
            assert_eq!(info.entries, n as u64);
        }
        assert_eq!(commands(&store).await - before - asked, 0, "{n} keys");
    }
    // A page: a SCAN or a few, and two commands per key listed.
    let [at_100, at_100_000] = page_costs[..] else {
        unreachable!()
    };
    assert!(
        (200..=220).contains(&at_100) && at_100_000 <= at_100 + 16,
        "commands for one page: {at_100} at 100 keys, {at_100_000} at 100,000"
    );
}
