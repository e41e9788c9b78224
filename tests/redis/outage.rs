//! The Redis store when Redis is unreachable, restarted or unresponsive:
//! operations fail promptly with `StoreError::Unavailable` (the layer's fail
//! mode applies), and the same store works again once Redis is back.
#![cfg(feature = "redis")]

use std::sync::Arc;
use std::time::Duration;

use tokio::time::timeout;
use tower_idempotency::store::redis::RedisStore;
use tower_idempotency::store::{LeaseToken, Store, StoreError};
use tower_idempotency::{Begin, Concurrent, Fingerprint};

use crate::support::redis as support;

use support::{engine, free_port, prefix, until_ok, value, OwnRedis, LIMIT};

#[tokio::test]
async fn an_unreachable_redis_is_a_prompt_unavailable_error() {
    let url = format!("redis://127.0.0.1:{}", free_port());
    let built = timeout(LIMIT, RedisStore::builder(&url).build())
        .await
        .unwrap();
    assert!(
        matches!(built, Err(StoreError::Unavailable(_))),
        "{built:?}"
    );

    let store = RedisStore::builder(&url).build_lazy().unwrap();
    let engine = engine(store, Concurrent::wait());
    let fp = Fingerprint::of_bytes(b"x");
    let begun = timeout(LIMIT, engine.begin_with("s:a:t", fp, Concurrent::wait()))
        .await
        .unwrap();
    assert!(
        matches!(begun, Err(StoreError::Unavailable(_))),
        "{begun:?}"
    );
    let info = timeout(LIMIT, engine.cache_info()).await.unwrap();
    assert!(matches!(info, Err(StoreError::Unavailable(_))), "{info:?}");
    let pinged = timeout(LIMIT, engine.ping()).await.unwrap();
    assert!(
        matches!(pinged, Err(StoreError::Unavailable(_))),
        "{pinged:?}"
    );
    // The request path counts (begin); admin queries (cache_info) and ping
    // return their error without counting.
    assert_eq!(engine.stats().store_errors, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_store_recovers_when_redis_restarts() {
    let mut redis = OwnRedis::start(free_port()).await;
    let store = RedisStore::builder(redis.url())
        .prefix(prefix())
        .build()
        .await
        .unwrap();
    let engine = engine(store.clone(), Concurrent::Reject);
    let fp = Fingerprint::of_bytes(b"order");
    let Begin::Execute(lease) = engine
        .begin_with("s:a:before", fp, Concurrent::Reject)
        .await
        .unwrap()
    else {
        panic!("the first call runs");
    };
    assert!(lease.complete(value(fp, "before")).await.unwrap());

    redis.kill().await;
    for key in ["s:a:during", "s:a:during2"] {
        let begun = timeout(LIMIT, engine.begin_with(key, fp, Concurrent::Reject))
            .await
            .unwrap();
        assert!(
            matches!(begun, Err(StoreError::Unavailable(_))),
            "{begun:?}"
        );
    }
    let record = timeout(LIMIT, engine.record("s:a:before")).await.unwrap();
    assert!(
        matches!(record, Err(StoreError::Unavailable(_))),
        "{record:?}"
    );

    redis.restart().await;
    until_ok(|| engine.ping()).await;
    let Begin::Execute(lease) = engine
        .begin_with("s:a:after", fp, Concurrent::Reject)
        .await
        .unwrap()
    else {
        panic!("the first call after the restart runs");
    };
    assert!(lease.complete(value(fp, "after")).await.unwrap());
    match engine
        .begin_with("s:a:after", fp, Concurrent::Reject)
        .await
        .unwrap()
    {
        Begin::Replay { record, .. } => assert_eq!(record.as_value().unwrap(), "after"),
        other => panic!("got {other:?}"),
    }

    // Change notices flow again once the subscriber has reconnected.
    let store = &store;
    let mut attempt = 0;
    until_ok(|| {
        attempt += 1;
        let key = format!("s:a:notice{attempt}");
        async move {
            let lease = LeaseToken::random();
            store
                .begin(&key, fp, lease, Duration::from_secs(60))
                .await?;
            let far = tokio::time::Instant::now() + Duration::from_secs(3600);
            let record = Arc::new(value(fp, "n"));
            let (woken, _) = tokio::join!(
                timeout(Duration::from_secs(1), store.until_changed(&key, far)),
                store.complete(&key, lease, record, Duration::from_secs(60)),
            );
            woken.map_err(|_| StoreError::backend("no notice yet"))
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unresponsive_redis_fails_within_the_timeouts_instead_of_hanging() {
    let redis = OwnRedis::start(free_port()).await;
    let store = RedisStore::builder(redis.url())
        .prefix(prefix())
        .response_timeout(Duration::from_millis(300))
        .build()
        .await
        .unwrap();
    let engine = engine(store, Concurrent::Reject);
    let fp = Fingerprint::of_bytes(b"order");

    // The server accepts bytes but answers nothing while stopped.
    redis.signal("-STOP");
    let begun = timeout(
        LIMIT,
        engine.begin_with("s:a:frozen", fp, Concurrent::Reject),
    )
    .await
    .unwrap();
    assert!(
        matches!(begun, Err(StoreError::Unavailable(_))),
        "{begun:?}"
    );

    redis.signal("-CONT");
    until_ok(|| engine.ping()).await;
    let Begin::Execute(lease) = engine
        .begin_with("s:a:thawed", fp, Concurrent::Reject)
        .await
        .unwrap()
    else {
        panic!("the first call after the pause runs");
    };
    assert!(lease.complete(value(fp, "thawed")).await.unwrap());
    match engine
        .begin_with("s:a:thawed", fp, Concurrent::Reject)
        .await
        .unwrap()
    {
        Begin::Replay { record, .. } => assert_eq!(record.as_value().unwrap(), "thawed"),
        other => panic!("got {other:?}"),
    }
}
