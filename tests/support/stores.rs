//! Runs one behaviour test once per store, so the embedded store and Redis
//! are held to the same contract.
//!
//! `per_store!(name, flavor = ...)` above `async fn name(store: TestStore)`
//! makes the tests `name::memory`, `name::redis` and `name::redis_local_tier`
//! (Redis with its in-process cache of completed records in front; both
//! with the `redis` feature), each under `#[tokio::test(flavor = ...)]`,
//! and `name::postgres` (feature `postgres`: a real `PostgresStore` on
//! `DATABASE_URL` in a fresh random table, dropped when the test ends).
//! [`TestStore`] delegates every [`Store`] call to a real `MemoryStore` or a
//! real `RedisStore` on `REDIS_URL` (default 127.0.0.1:6379), under a fresh
//! random prefix whose keys are deleted when the test ends, pass or fail.
//! `name::redis_cluster` (feature `cluster-tests`) runs it on the shared
//! Redis Cluster (see [`cluster`]), three primaries that the store's keys
//! spread over.
#![allow(dead_code, unreachable_pub)]

#[cfg(feature = "cluster-tests")]
pub mod cluster;

use std::time::Duration;

use tower_idempotency::store::{
    BeginOutcome, Entry, LeaseToken, MemoryStore, RemovalCounts, ScanEntry, SharedRecord, Store,
    StoreAdmin, StoreError,
};
use tower_idempotency::{CacheInfo, Fingerprint};

#[cfg(feature = "redis")]
use tower_idempotency::store::redis::RedisStore;

#[cfg(feature = "postgres")]
pub mod pg_wire;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "postgres")]
use tower_idempotency::store::postgres::PostgresStore;

/// `per_store!(name, tokio-test-args)` runs `async fn name(store: TestStore)`
/// as the tests `name::memory`, `name::redis` and `name::redis_local_tier`,
/// each under `#[tokio::test(tokio-test-args)]` (the runtime flavor the test
/// needs).
macro_rules! per_store {
    ($name:ident $(, $($arg:tt)*)?) => {
        mod $name {
            #[tokio::test$(($($arg)*))?]
            async fn memory() {
                super::$name($crate::support::stores::TestStore::memory()).await
            }

            #[cfg(feature = "redis")]
            #[tokio::test$(($($arg)*))?]
            async fn redis() {
                let (store, _cleanup) = $crate::support::stores::TestStore::redis(false).await;
                super::$name(store).await
            }

            #[cfg(feature = "redis")]
            #[tokio::test$(($($arg)*))?]
            async fn redis_local_tier() {
                let (store, _cleanup) = $crate::support::stores::TestStore::redis(true).await;
                super::$name(store).await
            }

            #[cfg(feature = "postgres")]
            #[tokio::test$(($($arg)*))?]
            async fn postgres() {
                let (store, _cleanup) = $crate::support::stores::TestStore::postgres().await;
                super::$name(store).await
            }

            #[cfg(feature = "cluster-tests")]
            #[tokio::test$(($($arg)*))?]
            async fn redis_cluster() {
                let (store, _cleanup) = $crate::support::stores::TestStore::redis_cluster().await;
                super::$name(store).await
            }
        }
    };
}
pub(crate) use per_store;

/// The store under a test: the embedded one, or Redis.
#[derive(Clone, Debug)]
pub enum TestStore {
    Memory(MemoryStore),
    #[cfg(feature = "redis")]
    Redis(RedisStore),
    #[cfg(feature = "postgres")]
    Postgres(PostgresStore),
    /// A store on the shared Redis Cluster.
    #[cfg(feature = "cluster-tests")]
    RedisCluster(RedisStore),
}

impl TestStore {
    /// A fresh embedded store with the defaults.
    pub fn memory() -> Self {
        Self::Memory(MemoryStore::new())
    }

    /// A store on the shared Redis under a fresh random prefix, with or
    /// without the local tier, and the guard that deletes the prefix's keys
    /// when dropped.
    #[cfg(feature = "redis")]
    pub async fn redis(local_tier: bool) -> (Self, Cleanup) {
        let prefix = format!("test:suite:{:016x}:", rand::random::<u64>());
        let store = Self::Redis(connect(&prefix, local_tier).await);
        let cleanup = Cleanup {
            url: redis_url(),
            prefix,
        };
        (store, cleanup)
    }

    /// A store on the shared Postgres in a fresh random table, and the
    /// guard that drops the table when dropped.
    #[cfg(feature = "postgres")]
    pub async fn postgres() -> (Self, postgres::DropTables) {
        let table = postgres::random_table("suite");
        let cleanup = postgres::DropTables::new(&table);
        (Self::Postgres(postgres::store(&table).await), cleanup)
    }

    /// A store on the shared Redis Cluster under a fresh random prefix, and
    /// the guard that deletes the prefix's keys on every primary when
    /// dropped.
    #[cfg(feature = "cluster-tests")]
    pub async fn redis_cluster() -> (Self, cluster::ClusterCleanup) {
        let prefix = format!("test:suite:{:016x}:", rand::random::<u64>());
        let urls = cluster::shared_cluster_urls();
        let store = Self::RedisCluster(cluster::cluster_store(&urls, &prefix, false).await);
        (store, cluster::ClusterCleanup { urls, prefix })
    }

    /// The same backend as another process would open it: the embedded
    /// store is shared as is; Redis gets a new connection (owned by the
    /// calling runtime) under the same prefix.
    pub async fn another_instance(&self) -> Self {
        match self {
            Self::Memory(store) => Self::Memory(store.clone()),
            #[cfg(feature = "redis")]
            Self::Redis(store) => Self::Redis(connect(store.prefix(), false).await),
            #[cfg(feature = "postgres")]
            Self::Postgres(store) => {
                let table = store.table().trim_matches('"').to_owned();
                Self::Postgres(postgres::store(&table).await)
            }
            #[cfg(feature = "cluster-tests")]
            Self::RedisCluster(store) => {
                let urls = cluster::shared_cluster_urls();
                Self::RedisCluster(cluster::cluster_store(&urls, store.prefix(), false).await)
            }
        }
    }
}

/// `REDIS_URL`, or the Redis on 127.0.0.1:6379.
#[cfg(feature = "redis")]
pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

#[cfg(feature = "redis")]
async fn connect(prefix: &str, local_tier: bool) -> RedisStore {
    let url = redis_url();
    let mut builder = RedisStore::builder(url.clone()).prefix(prefix);
    if local_tier {
        builder = builder.local_cache(1_000);
    }
    let build = builder.build();
    match tokio::time::timeout(Duration::from_secs(10), build).await {
        Ok(Ok(store)) => store,
        Ok(Err(error)) => panic!("Redis not reachable on {url}: {error}"),
        Err(_) => panic!("Redis not reachable on {url}: no answer within 10 s"),
    }
}

/// Deletes every key under a test's prefix when dropped, also when the test
/// panicked. Synchronous on purpose: `Drop` cannot await, and the test's
/// runtime may be on its way out.
#[cfg(feature = "redis")]
pub struct Cleanup {
    url: String,
    prefix: String,
}

#[cfg(feature = "redis")]
impl Cleanup {
    /// The guard that deletes the keys under `prefix` on the Redis at `url`.
    pub fn new(url: String, prefix: String) -> Self {
        Self { url, prefix }
    }

    fn run(&self) -> redis::RedisResult<()> {
        let client = redis::Client::open(self.url.as_str())?;
        let mut connection = client.get_connection_with_timeout(Duration::from_secs(5))?;
        connection.set_read_timeout(Some(Duration::from_secs(5)))?;
        let pattern = format!("{}*", self.prefix);
        let mut cursor = 0_u64;
        loop {
            let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query(&mut connection)?;
            if !keys.is_empty() {
                redis::cmd("DEL").arg(keys).query::<()>(&mut connection)?;
            }
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }
}

#[cfg(feature = "redis")]
impl Drop for Cleanup {
    fn drop(&mut self) {
        // Never panic here: during a failing test's unwinding that would abort.
        if let Err(error) = self.run() {
            eprintln!("could not delete the keys under {}: {error}", self.prefix);
        }
    }
}

/// Calls `$method` on whichever store `$self` holds.
macro_rules! delegate {
    ($self:ident, $store:ident => $call:expr) => {
        match $self {
            TestStore::Memory($store) => $call,
            #[cfg(feature = "redis")]
            TestStore::Redis($store) => $call,
            #[cfg(feature = "postgres")]
            TestStore::Postgres($store) => $call,
            #[cfg(feature = "cluster-tests")]
            TestStore::RedisCluster($store) => $call,
        }
    };
}

impl Store for TestStore {
    async fn begin(
        &self,
        key: &str,
        fingerprint: Fingerprint,
        lease: LeaseToken,
        lease_ttl: Duration,
    ) -> Result<BeginOutcome, StoreError> {
        delegate!(self, s => s.begin(key, fingerprint, lease, lease_ttl).await)
    }
    async fn renew(&self, key: &str, lease: LeaseToken, ttl: Duration) -> Result<bool, StoreError> {
        delegate!(self, s => s.renew(key, lease, ttl).await)
    }
    async fn renew_many(
        &self,
        leases: &[(&str, LeaseToken)],
        ttl: Duration,
    ) -> Vec<Result<bool, StoreError>> {
        delegate!(self, s => s.renew_many(leases, ttl).await)
    }
    async fn complete(
        &self,
        key: &str,
        lease: LeaseToken,
        record: SharedRecord,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        delegate!(self, s => s.complete(key, lease, record, ttl).await)
    }
    async fn release(&self, key: &str, lease: LeaseToken) -> Result<bool, StoreError> {
        delegate!(self, s => s.release(key, lease).await)
    }
    fn removal_counts(&self) -> RemovalCounts {
        delegate!(self, s => s.removal_counts())
    }
    async fn cleanup_expired(&self) -> Result<(), StoreError> {
        delegate!(self, s => s.cleanup_expired().await)
    }
    fn local_record(&self, key: &str) -> Option<SharedRecord> {
        delegate!(self, s => s.local_record(key))
    }
    async fn until_changed(&self, key: &str, deadline: tokio::time::Instant) {
        delegate!(self, s => s.until_changed(key, deadline).await)
    }
    async fn completed_record(
        &self,
        key: &str,
    ) -> Result<Option<tower_idempotency::store::SharedRecord>, StoreError> {
        delegate!(self, s => s.completed_record(key).await)
    }
}

impl StoreAdmin for TestStore {
    async fn put(&self, key: &str, record: SharedRecord, ttl: Duration) -> Result<(), StoreError> {
        delegate!(self, s => s.put(key, record, ttl).await)
    }
    async fn get(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        delegate!(self, s => s.get(key).await)
    }
    async fn remove(&self, key: &str) -> Result<bool, StoreError> {
        delegate!(self, s => s.remove(key).await)
    }
    async fn remove_unless_in_flight(
        &self,
        key: &str,
    ) -> Result<tower_idempotency::store::Removal, StoreError> {
        delegate!(self, s => s.remove_unless_in_flight(key).await)
    }
    async fn page(
        &self,
        filter: &tower_idempotency::KeyFilter,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<tower_idempotency::store::KeyPage, StoreError> {
        delegate!(self, s => s.page(filter, cursor, limit).await)
    }
    async fn info_estimate(&self) -> Result<CacheInfo, StoreError> {
        delegate!(self, s => s.info_estimate().await)
    }
    async fn clear(&self) -> Result<(), StoreError> {
        delegate!(self, s => s.clear().await)
    }
    async fn scan(&self) -> Result<Vec<ScanEntry>, StoreError> {
        delegate!(self, s => s.scan().await)
    }
    async fn len(&self) -> Result<u64, StoreError> {
        delegate!(self, s => s.len().await)
    }
    async fn info(&self) -> Result<CacheInfo, StoreError> {
        delegate!(self, s => s.info().await)
    }
    async fn ping(&self) -> Result<(), StoreError> {
        delegate!(self, s => s.ping().await)
    }
}
