//! The shared store on Redis (and Valkey), for services that run as several
//! instances.
//!
//! * `begin`, `renew`, `complete` and `release` are each one Lua script, so
//!   each is atomic; the last three act only while the marker holds the
//!   caller's lease token (fencing).
//! * Every operation touches one key, so the scripts work on Redis Cluster.
//!   The heartbeat's renewals ([`Store::renew_many`](crate::store::Store::renew_many)) go as one pipeline of
//!   `renew` scripts per primary (one round trip per primary per batch).
//! * Values are versioned binary encodings: records as [`Record::encode`]
//!   writes them, markers in their own small encoding; Redis expires both
//!   (`PX`). A value this build cannot read is a [`StoreError::Corrupt`].
//! * A reconnecting connection manager carries the commands to one Redis
//!   node; with [`RedisStore::cluster_builder`] the cluster client carries them
//!   to a Redis Cluster (see below). While Redis cannot be reached every
//!   operation fails within the connection and response timeouts with
//!   [`StoreError::Unavailable`], and the store reconnects by itself when
//!   Redis returns.
//! * `scan`, `len`, `info` and `clear` walk the keyspace with `SCAN MATCH
//!   prefix*` (never `KEYS`, so Redis is never blocked) on every primary,
//!   which costs time in proportion to the whole database: they are for
//!   administration, not for the request path. Values under the prefix that are not this crate's are
//!   left out of `scan` (with a warning), and `info` has no entry bound.
//! * A duplicate waiting (`Concurrent::Wait`) on another instance is woken
//!   when the lease holder completes or releases the key: the scripts
//!   `PUBLISH` the key on `<prefix>changes`, and each store keeps a subscriber
//!   (see [`RedisStoreBuilder::notifications`]). A notice that is lost (during
//!   an outage, say) costs only latency: the engine also polls the key with
//!   backoff, within the wait budget.
//!
//! * Run Redis with `maxmemory-policy noeviction` (its default). A policy
//!   that evicts keys with a TTL (`allkeys-*`, `volatile-*`) can drop an
//!   in-flight marker under memory pressure, which lets a retry run an action
//!   twice; [`RedisStoreBuilder::build`] reads the policy (`CONFIG GET`, where
//!   allowed) and warns through `tracing` when it can.
//!
//! # Redis Cluster
//!
//! [`RedisStore::cluster_builder`] connects to a Redis Cluster from one or
//! more seed nodes. Each operation is still one script on one key, which the
//! cluster client sends to the primary of the key's slot; it follows `MOVED`
//! and `ASK` redirections and refreshes its slot table when slots move or a
//! replica is promoted, so the store recovers from a failover by itself.
//!
//! * While a primary is down and not yet replaced, operations on the keys of
//!   its slots fail with [`StoreError::Unavailable`] (the layer's
//!   [`FailMode`](crate::FailMode) applies: 503, or passed through); keys of
//!   the other primaries keep working, provided the cluster runs with
//!   `cluster-require-full-coverage no` (with `yes`, the default, Redis
//!   itself refuses every key while any slot is down).
//! * Listing and maintenance (`scan`, `len`, `info`, `clear`: the handle's
//!   `keys`, `find_by_*`, `expiring_within`, `clear`, `cache_info`) run `SCAN`
//!   on every primary of the cluster's slot table, and fail with
//!   [`StoreError::Unavailable`] while some slot has no primary that answers,
//!   rather than list part of the keys. `ping` (the proxy's `/healthz`) does
//!   the same check.
//! * Change notices use classic pub/sub, which a cluster forwards to every
//!   node: the store subscribes on one seed node (the next seed when that one
//!   fails) and hears completions on every primary. Not sharded pub/sub: a
//!   script may only publish on shard channels of its own key's slot, which
//!   would take one subscription per waited key. A notice lost during a
//!   failover costs only latency (the engine polls).
//!
//! # Acknowledged by replicas
//!
//! Redis replicates asynchronously: without
//! [`replica_ack`](RedisStoreBuilder::replica_ack), a primary that fails
//! right after `complete` answered may lose the record, and a retry after the
//! failover runs the action again; a lost `begin` marker lets a concurrent
//! duplicate run. With `replica_ack(n, timeout)`, `begin` and `complete` send
//! `WAIT n timeout` after their script, on the same connection to the same
//! primary, and answer once `n` replicas hold the write:
//!
//! * `n` replicas acknowledged: the write survives the failure of its primary
//!   (Redis promotes a replica that holds it, if one of those `n` is
//!   promoted; with one replica per primary, `n = 1` makes that certain).
//! * Fewer within `timeout`: the result is still returned to the caller (the
//!   write holds on the primary), logged as a warning, and counted in
//!   [`RedisStore::unacknowledged_writes`]; a failover before replication
//!   catches up may lose it, and a retry may run the action again.
//! * A `WAIT` that fails with an error of its own (not an outage: refused
//!   by an ACL, say): `begin` deletes the marker it wrote (fenced by its
//!   token) before answering the error, so the key is not refused for the
//!   lease TTL; `complete` answers the error (its record may be written).
//! * The count of such writes is [`StoreAdmin::unacknowledged_writes`](crate::store::StoreAdmin::unacknowledged_writes), so
//!   the handle ([`Idempotency::unacknowledged_writes`]) and the reverse
//!   proxy's `/stats` and `/metrics` show it.
//! * Each such write waits for a replica round trip, and while replicas are
//!   missing, for the whole `timeout`; commands queued behind it on the same
//!   connection wait too.
//!
//! [`Record::encode`]: crate::Record::encode
//! [`Idempotency::unacknowledged_writes`]: crate::Idempotency::unacknowledged_writes

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use redis::{RedisResult, Value};

use self::codec::Stored;
use self::convert::{expires_in, map_error};
use self::local::LocalTier;
use self::notify::Notices;
use self::replicas::ReplicaAck;
use super::{Estimate, StoreError};
use crate::record::SharedRecord;

mod admin;
mod batch;
mod builder;
mod cluster;
mod codec;
mod connection;
mod convert;
mod eviction;
mod local;
mod notify;
mod protocol;
mod replicas;
mod scan;
mod scripts;

pub use builder::{RedisStoreBuilder, DEFAULT_LOCAL_CACHE_TTL, DEFAULT_PREFIX};
pub use connection::{RedisConnection, DEFAULT_CONNECTION_TIMEOUT, DEFAULT_RESPONSE_TIMEOUT};

/// The shared store: markers and records in Redis under a key prefix.
///
/// Cheap to clone: clones share one connection.
///
/// # Example
///
/// ```no_run
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use tower_idempotency::{Concurrent, Idempotency};
/// use tower_idempotency::store::redis::RedisStore;
///
/// let store = RedisStore::builder("redis://127.0.0.1:6379")
///     .prefix("orders:idem:")
///     .local_cache(10_000)
///     .build()
///     .await?;
/// let engine = Idempotency::builder()
///     .store(store)
///     .concurrent(Concurrent::wait())
///     .build()?;
/// # drop(engine);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    connection: RedisConnection,
    prefix: String,
    /// Where `complete` and `release` announce the keys they changed.
    channel: String,
    notices: Option<Arc<Notices>>,
    local: Option<LocalTier>,
    /// The limit on one operation, whatever Redis does meanwhile.
    timeout: Duration,
    replica_ack: Option<ReplicaAck>,
    /// The last count of the keys, for `info_estimate`.
    estimate: Arc<Estimate>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.inner.prefix)
            .field("notifications", &self.inner.notices.is_some())
            .field("local_cache", &self.inner.local.is_some())
            .field("timeout", &self.inner.timeout)
            .field("cluster", &self.inner.connection.is_cluster())
            .field("replica_ack", &self.inner.replica_ack)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// A builder for a store on the Redis at `url` (`redis://host:port/db`).
    pub fn builder(url: impl Into<String>) -> RedisStoreBuilder {
        RedisStoreBuilder::new(url)
    }

    /// A builder for a store on the Redis Cluster that `seeds` belong to
    /// (`redis://host:port` each; one that answers is enough, more let the
    /// store start while some are down). See [Redis Cluster](self#redis-cluster).
    ///
    /// ```no_run
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use std::time::Duration;
    /// use tower_idempotency::store::redis::RedisStore;
    ///
    /// let store = RedisStore::cluster_builder([
    ///     "redis://10.0.0.1:6379",
    ///     "redis://10.0.0.2:6379",
    ///     "redis://10.0.0.3:6379",
    /// ])
    /// .replica_ack(1, Duration::from_millis(100))
    /// .build()
    /// .await?;
    /// # drop(store);
    /// # Ok(())
    /// # }
    /// ```
    pub fn cluster_builder<I>(seeds: I) -> RedisStoreBuilder
    where
        I: IntoIterator,
        I::Item: Into<String>,
    {
        RedisStoreBuilder::cluster(seeds.into_iter().map(Into::into).collect())
    }

    /// A store on a connection you configured yourself (a
    /// [`ConnectionManager`](redis::aio::ConnectionManager), or a
    /// [`ClusterConnection`](redis::cluster_async::ClusterConnection)), under
    /// `prefix`, without a local tier, change notices (waiters on other
    /// instances poll) or replica acknowledgement. Operations give up after
    /// the default connection and response timeouts together (2 s).
    pub fn new(connection: impl Into<RedisConnection>, prefix: impl Into<String>) -> Self {
        Self::assemble(
            connection.into(),
            prefix.into(),
            None,
            None,
            DEFAULT_CONNECTION_TIMEOUT + DEFAULT_RESPONSE_TIMEOUT,
            None,
        )
    }

    fn assemble(
        connection: RedisConnection,
        prefix: String,
        notices: Option<Arc<Notices>>,
        local: Option<LocalTier>,
        timeout: Duration,
        replica_ack: Option<ReplicaAck>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                connection,
                channel: channel(&prefix),
                prefix,
                notices,
                local,
                timeout,
                replica_ack,
                estimate: Arc::default(),
            }),
        }
    }

    /// The prefix of every key this store writes.
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// The Redis key that holds `key`: the prefix, then the key.
    pub fn redis_key(&self, key: &str) -> String {
        format!("{}{key}", self.inner.prefix)
    }

    /// The connection the store uses (for commands of your own).
    pub fn connection(&self) -> RedisConnection {
        self.inner.connection.clone()
    }

    async fn connect(&self) -> Result<(), StoreError> {
        self.ping_redis().await
    }

    /// Every primary answers (one node, or each primary of every slot).
    async fn ping_redis(&self) -> Result<(), StoreError> {
        for mut primary in self.primaries().await? {
            self.run(redis::cmd("PING").query_async::<()>(&mut primary))
                .await?;
        }
        Ok(())
    }

    /// Runs one command within the operation timeout.
    async fn run<T>(&self, command: impl Future<Output = RedisResult<T>>) -> Result<T, StoreError> {
        match tokio::time::timeout(self.inner.timeout, command).await {
            Ok(result) => result.map_err(map_error),
            Err(_elapsed) => Err(StoreError::unavailable(format!(
                "redis did not answer within {:?}",
                self.inner.timeout
            ))),
        }
    }

    /// Runs one of the scripts on `key` with `args`.
    async fn script(
        &self,
        script: &redis::Script,
        key: &str,
        args: &[&[u8]],
    ) -> Result<Value, StoreError> {
        let redis_key = self.redis_key(key);
        let mut connection = self.connection().for_key(&redis_key).await;
        let mut invocation = script.prepare_invoke();
        invocation.key(redis_key);
        for arg in args {
            invocation.arg(*arg);
        }
        self.run(invocation.invoke_async(&mut connection)).await
    }

    /// Decodes the `{value, pttl}` answer of the `begin` and `get` scripts.
    fn held(key: &str, answer: Value) -> Result<(Stored, Duration), StoreError> {
        let corrupt = |source| StoreError::Corrupt {
            key: key.to_owned(),
            source,
        };
        let Value::Array(parts) = answer else {
            return Err(StoreError::backend(format!(
                "unexpected script answer {answer:?}"
            )));
        };
        let (value, pttl) = match parts.as_slice() {
            [Value::BulkString(value), Value::Int(pttl)] => (value.as_slice(), *pttl),
            _ => return Err(StoreError::backend("unexpected script answer")),
        };
        let stored = codec::decode(value).map_err(corrupt)?;
        Ok((stored, expires_in(pttl)))
    }

    fn remember(&self, key: &str, record: &SharedRecord, expires_in: Duration) {
        if let Some(local) = &self.inner.local {
            local.insert(key, record.clone(), expires_in);
        }
    }
}

/// The pub/sub channel on which stores under `prefix` announce changed keys.
fn channel(prefix: &str) -> String {
    format!("{prefix}changes")
}
