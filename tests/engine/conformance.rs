//! Every store of the crate held to the same store contract.
#![cfg(feature = "test-util")]

use std::time::Duration;

use tower_idempotency::store::{conformance::Suite, MemoryStore};

#[cfg(feature = "cluster-tests")]
use crate::support::stores::cluster as cluster_support;

/// The whole suite must finish well within this; a hang is a failure.
const BUDGET: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_store_keeps_the_store_contract() {
    tokio::time::timeout(BUDGET, Suite::new(|| async { MemoryStore::new() }).run())
        .await
        .expect("the conformance suite hung");
}

#[cfg(feature = "redis")]
mod redis_store {
    use std::future::Future;

    use bytes::Bytes;
    use tower_idempotency::store::conformance::Suite;
    use tower_idempotency::store::redis::RedisStore;

    use super::BUDGET;

    fn redis_url() -> String {
        std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn redis_store_keeps_the_store_contract() {
        let suite = Suite::new(|| async {
            RedisStore::builder(redis_url())
                .prefix(format!("test:conformance:{:x}:", rand::random::<u64>()))
                .build()
                .await
                .expect("Redis answers on REDIS_URL or 127.0.0.1:6379")
        })
        .corrupt_with(write_raw);
        tokio::time::timeout(BUDGET, suite.run())
            .await
            .expect("the conformance suite hung");
    }

    /// Writes `bytes` under `key` as they are, past the store's encoding
    /// (for a minute): the suite's unreadable values.
    fn write_raw(store: &RedisStore, key: &str, bytes: Bytes) -> impl Future<Output = ()> {
        let (mut connection, key) = (store.connection(), store.redis_key(key));
        async move {
            redis::cmd("SET")
                .arg(key)
                .arg(bytes.as_ref())
                .arg("PX")
                .arg(60_000)
                .query_async::<()>(&mut connection)
                .await
                .unwrap();
        }
    }

    /// The local tier answers from memory but must keep the same contract.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn redis_store_with_local_tier_keeps_the_store_contract() {
        let suite = Suite::new(|| async {
            RedisStore::builder(redis_url())
                .prefix(format!("test:conformance:{:x}:", rand::random::<u64>()))
                .local_cache(1_000)
                .build()
                .await
                .expect("Redis answers on REDIS_URL or 127.0.0.1:6379")
        });
        tokio::time::timeout(BUDGET, suite.run())
            .await
            .expect("the conformance suite hung");
    }

    /// The same contract on a Redis Cluster: every operation on one key's
    /// primary, listing and clearing over every primary.
    #[cfg(feature = "cluster-tests")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn redis_cluster_store_keeps_the_store_contract() {
        let urls = super::cluster_support::shared_cluster_urls();
        let prefix = format!("test:conformance:{:x}:", rand::random::<u64>());
        let _cleanup = super::cluster_support::ClusterCleanup {
            urls: urls.clone(),
            prefix: prefix.clone(),
        };
        let suite = Suite::new(move || {
            let (urls, prefix) = (
                urls.clone(),
                format!("{prefix}{:x}:", rand::random::<u32>()),
            );
            async move { super::cluster_support::cluster_store(&urls, &prefix, false).await }
        })
        .corrupt_with(write_raw);
        tokio::time::timeout(BUDGET, suite.run())
            .await
            .expect("the conformance suite hung");
    }
}

#[cfg(feature = "postgres")]
use crate::support::stores::postgres;

#[cfg(feature = "postgres")]
mod postgres_store {
    use std::sync::Arc;

    use bytes::Bytes;
    use tower_idempotency::store::conformance::Suite;
    use tower_idempotency::store::postgres::PostgresStore;

    use super::{postgres, BUDGET};

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn postgres_store_keeps_the_store_contract() {
        // Every store the suite makes gets a table of its own.
        let tables = Arc::new(postgres::DropTables::default());
        let made = tables.clone();
        let suite = Suite::new(move || {
            let table = postgres::random_table("conformance");
            made.add(&table);
            async move { postgres::store(&table).await }
        })
        .corrupt_with(|store: &PostgresStore, key: &str, bytes: Bytes| {
            let insert = format!(
                "INSERT INTO {} (key, state, fingerprint, record, created_at_ms, expires_at) \
                 VALUES ($1, 'completed', $2, $3, 0, clock_timestamp() + interval '60 seconds') \
                 ON CONFLICT (key) DO UPDATE SET state = 'completed', record = EXCLUDED.record, \
                 expires_at = EXCLUDED.expires_at",
                store.table()
            );
            let (pool, key) = (store.pool().clone(), key.to_owned());
            async move {
                sqlx::query(&insert)
                    .bind(key)
                    .bind(vec![0_u8; 32])
                    .bind(bytes.to_vec())
                    .execute(&pool)
                    .await
                    .unwrap();
            }
        });
        tokio::time::timeout(BUDGET, suite.run())
            .await
            .expect("the conformance suite hung");
    }
}
