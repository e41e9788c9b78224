//! `RedisStore` checks on connect that Redis will not evict its markers: a
//! `maxmemory-policy` that can evict keys with a TTL gets a warning through
//! `tracing`; `noeviction`, or a Redis that refuses `CONFIG`, does not.
#![cfg(feature = "redis")]

use tokio::time::timeout;
use tower_idempotency::store::redis::RedisStore;

use crate::support::redis as support;

use support::{free_port, prefix, Logs, OwnRedis, LIMIT};

/// Everything logged at debug level and above while the store connects to a
/// Redis started with `args`.
async fn logs_of_connecting_with(args: &[&str]) -> String {
    let redis = OwnRedis::start_with(free_port(), args).await;
    let logs = Logs::default();
    // The test's runtime is single-threaded: the store connects on this
    // thread, under this subscriber.
    let _default = logs.capture_on_this_thread();
    let store = timeout(
        LIMIT,
        RedisStore::builder(redis.url()).prefix(prefix()).build(),
    )
    .await
    .unwrap();
    store.expect("the store connects whatever the policy");
    logs.text()
}

fn warnings(logs: &str) -> Vec<&str> {
    logs.lines().filter(|line| line.contains("WARN")).collect()
}

#[tokio::test]
async fn a_redis_that_can_evict_keys_with_a_ttl_is_warned_about() {
    for policy in ["allkeys-lru", "volatile-ttl"] {
        let logs = logs_of_connecting_with(&["--maxmemory-policy", policy]).await;
        let warnings = warnings(&logs);
        assert_eq!(warnings.len(), 1, "{policy}: {logs}");
        assert!(warnings[0].contains(policy), "{}", warnings[0]);
        assert!(warnings[0].contains("noeviction"), "{}", warnings[0]);
    }
}

#[tokio::test]
async fn a_redis_under_noeviction_is_not_warned_about() {
    let logs = logs_of_connecting_with(&["--maxmemory-policy", "noeviction"]).await;
    assert_eq!(warnings(&logs), Vec::<&str>::new(), "{logs}");
}

#[tokio::test]
async fn a_redis_that_refuses_config_is_noted_at_debug_level_only() {
    let logs = logs_of_connecting_with(&["--rename-command", "CONFIG", ""]).await;
    assert_eq!(warnings(&logs), Vec::<&str>::new(), "{logs}");
    assert!(
        logs.lines()
            .any(|line| line.contains("DEBUG") && line.contains("maxmemory-policy")),
        "{logs}"
    );
}
