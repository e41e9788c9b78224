//! The check that Redis will not evict this crate's keys.
//!
//! An in-flight marker is a key with a TTL. A Redis whose `maxmemory-policy`
//! may evict such keys (`allkeys-*`, `volatile-*`) can drop a marker while
//! its action runs, under memory pressure, and a retry then runs the action
//! a second time. Only `noeviction` (Redis's default) keeps the promise: a
//! full Redis refuses writes instead, which the engine answers with its fail
//! mode.

use std::collections::HashMap;

use super::RedisStore;

impl RedisStore {
    /// Reads Redis's `maxmemory-policy` and warns when it can evict keys
    /// with a TTL. A Redis that refuses `CONFIG` (managed services often
    /// do) is noted at debug level only.
    pub(super) async fn warn_if_redis_can_evict(&self) {
        let mut connection = self.connection();
        let mut command = redis::cmd("CONFIG");
        command.arg("GET").arg("maxmemory-policy");
        let reply = command.query_async::<HashMap<String, String>>(&mut connection);
        match self.run(reply).await {
            Ok(config) => match config.get("maxmemory-policy") {
                Some(policy) if evicts_keys_with_ttl(policy) => tracing::warn!(
                    policy,
                    "redis maxmemory-policy can evict in-flight idempotency markers, \
                     which lets a retry run an action twice; run it with `noeviction`"
                ),
                Some(_) => {}
                None => tracing::debug!("redis did not report its maxmemory-policy"),
            },
            Err(error) => tracing::debug!(
                %error,
                "could not read redis maxmemory-policy (CONFIG GET refused?); \
                 it must be `noeviction`"
            ),
        }
    }
}

/// Whether a `maxmemory-policy` may drop a key that has a TTL.
fn evicts_keys_with_ttl(policy: &str) -> bool {
    policy.starts_with("allkeys-") || policy.starts_with("volatile-")
}

#[cfg(test)]
mod tests {
    use super::evicts_keys_with_ttl;

    #[test]
    fn only_noeviction_keeps_markers() {
        for policy in [
            "allkeys-lru",
            "allkeys-lfu",
            "allkeys-random",
            "volatile-lru",
            "volatile-lfu",
            "volatile-random",
            "volatile-ttl",
        ] {
            assert!(evicts_keys_with_ttl(policy), "{policy}");
        }
        assert!(!evicts_keys_with_ttl("noeviction"));
    }
}
