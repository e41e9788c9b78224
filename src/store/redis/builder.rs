//! Configuration and connection of a [`RedisStore`].

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClientBuilder, ClusterConfig};

use super::cluster::Shards;
use super::connection::{RedisConnection, DEFAULT_CONNECTION_TIMEOUT, DEFAULT_RESPONSE_TIMEOUT};
use super::convert::map_error;
use super::replicas::ReplicaAck;
use super::{local::LocalTier, notify::Notices, RedisStore};
use crate::config::check_duration;
use crate::store::StoreError;
use tokio::sync::oneshot;

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "idem:";
/// The default lifetime of a record in the local tier: 60 seconds.
pub const DEFAULT_LOCAL_CACHE_TTL: Duration = Duration::from_secs(60);

/// How often the cluster client tries one command (redirections, reconnects)
/// before it gives up, if the operation's time limit has not ended it first.
const CLUSTER_RETRIES: u32 = 16;

/// Builds a [`RedisStore`]; made by [`RedisStore::builder`].
#[derive(Debug, Clone)]
#[must_use]
pub struct RedisStoreBuilder {
    target: Target,
    prefix: String,
    local_cache: Option<u64>,
    local_cache_ttl: Duration,
    connection_timeout: Duration,
    response_timeout: Duration,
    reconnect_retries: usize,
    notifications: bool,
    replica_ack: Option<(u32, Duration)>,
}

/// What the store connects to.
#[derive(Debug, Clone)]
enum Target {
    /// One Redis node (or a proxy in front of several).
    Node(String),
    /// The seed nodes of a Redis Cluster.
    Cluster(Vec<String>),
}

impl RedisStoreBuilder {
    pub(super) fn new(url: impl Into<String>) -> Self {
        Self::with_target(Target::Node(url.into()))
    }

    pub(super) fn cluster(seeds: Vec<String>) -> Self {
        Self::with_target(Target::Cluster(seeds))
    }

    fn with_target(target: Target) -> Self {
        Self {
            target,
            prefix: DEFAULT_PREFIX.to_owned(),
            local_cache: None,
            local_cache_ttl: DEFAULT_LOCAL_CACHE_TTL,
            connection_timeout: DEFAULT_CONNECTION_TIMEOUT,
            response_timeout: DEFAULT_RESPONSE_TIMEOUT,
            reconnect_retries: 1,
            notifications: true,
            replica_ack: None,
        }
    }

    /// The prefix of every key this store writes (default `"idem:"`). Stores
    /// with different prefixes share one Redis without seeing each other.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Keeps up to `max_entries` completed records in process as well, so a
    /// hot replay costs no round trip (default: no local tier). When it is
    /// full, the least recently used record leaves it first; every new one
    /// is admitted.
    ///
    /// A record removed through another instance (`remove`, `clear`) stays in
    /// this instance's local tier for up to
    /// [`local_cache_ttl`](Self::local_cache_ttl).
    pub fn local_cache(mut self, max_entries: u64) -> Self {
        self.local_cache = Some(max_entries);
        self
    }

    /// How long the local tier keeps a record at most (default 60 s; never
    /// longer than the record lives in Redis).
    pub fn local_cache_ttl(mut self, ttl: Duration) -> Self {
        self.local_cache_ttl = ttl;
        self
    }

    /// The limit on one connection attempt (default 1 s).
    pub fn connection_timeout(mut self, timeout: Duration) -> Self {
        self.connection_timeout = timeout;
        self
    }

    /// The limit on waiting for one answer (default 1 s). An operation fails
    /// with [`StoreError::Unavailable`] after the connection and response
    /// timeouts together, however Redis fails.
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// Makes `begin` and `complete` wait until `replicas` replicas hold their
    /// write (`WAIT replicas timeout` after the script, on the same
    /// connection to the same primary), at most `timeout` (default: no
    /// waiting; Redis replicates asynchronously).
    ///
    /// When fewer replicas acknowledge in time, the operation still answers
    /// its result (the write holds on the primary), logs a warning and counts
    /// the write in [`RedisStore::unacknowledged_writes`]: a failover before
    /// replication catches up may lose it. Every operation may take up to
    /// `timeout` longer than the connection and response timeouts. See
    /// [Acknowledged by replicas](super#acknowledged-by-replicas).
    ///
    /// `build` fails for zero replicas or a timeout under 1 ms (`WAIT` would
    /// block forever).
    pub fn replica_ack(mut self, replicas: u32, timeout: Duration) -> Self {
        self.replica_ack = Some((replicas, timeout));
        self
    }

    /// How many times one reconnection retries before the waiting
    /// operations fail (default 1). The next operation starts a new one. (A
    /// cluster client retries each command, following redirections and
    /// reconnecting, until the operation's time limit.)
    pub fn reconnect_retries(mut self, retries: usize) -> Self {
        self.reconnect_retries = retries;
        self
    }

    /// Whether duplicates waiting on this instance are woken by Redis
    /// pub/sub when another instance completes or releases their key
    /// (default `true`; one more connection per store). Without it they learn
    /// of it at their next poll of the key (within 250 ms).
    pub fn notifications(mut self, enabled: bool) -> Self {
        self.notifications = enabled;
        self
    }

    /// Connects to Redis and builds the store.
    ///
    /// # Errors
    ///
    /// [`StoreError::Backend`] for an invalid URL or setting (a duration over
    /// [`MAX_DURATION`](crate::MAX_DURATION) among them: its source
    /// is a [`ConfigError`](crate::ConfigError) naming the maximum),
    /// [`StoreError::Unavailable`] when Redis cannot be reached (for a
    /// cluster: while some slot has no primary that answers).
    pub async fn build(self) -> Result<RedisStore, StoreError> {
        let (store, subscribed) = self.assemble()?;
        store.connect().await?;
        store.warn_if_redis_can_evict().await;
        if let Some(subscribed) = subscribed {
            // Notices flow from here on; if the subscription is slow, they
            // start later and waiters poll meanwhile.
            let _ = tokio::time::timeout(store.inner.timeout, subscribed).await;
        }
        Ok(store)
    }

    /// Builds the store without connecting: the first operation connects. A
    /// service can so start while Redis is down. Call it inside a Tokio
    /// runtime.
    ///
    /// # Errors
    ///
    /// [`StoreError::Backend`] for an invalid URL or setting (as for
    /// [`build`](Self::build)), or outside a Tokio runtime.
    pub fn build_lazy(self) -> Result<RedisStore, StoreError> {
        self.assemble().map(|(store, _subscribed)| store)
    }

    fn assemble(self) -> Result<(RedisStore, Option<oneshot::Receiver<()>>), StoreError> {
        if self.local_cache == Some(0) {
            return Err(StoreError::backend("local_cache must be at least 1 entry"));
        }
        if self.connection_timeout.is_zero() || self.response_timeout.is_zero() {
            return Err(StoreError::backend(
                "redis timeouts must be greater than zero",
            ));
        }
        for (name, value) in [
            ("connection_timeout", self.connection_timeout),
            ("response_timeout", self.response_timeout),
            ("local_cache_ttl", self.local_cache_ttl),
        ] {
            check_duration(name, value).map_err(StoreError::backend)?;
        }
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(StoreError::backend("RedisStore needs a Tokio runtime"));
        }
        let replica_ack = self
            .replica_ack
            .map(|(replicas, timeout)| ReplicaAck::new(replicas, timeout))
            .transpose()?;
        // A WAIT answers within its own timeout: the response may take that
        // much longer.
        let waiting = replica_ack
            .as_ref()
            .map_or(Duration::ZERO, |ack| ack.timeout);
        let response_timeout = self.response_timeout + waiting;
        let timeout = self.connection_timeout + response_timeout;
        let (connection, subscriber_nodes) = self.connection(response_timeout, timeout)?;
        let (notices, subscribed) = if self.notifications {
            let channel = super::channel(&self.prefix);
            let (notices, subscribed) = Notices::spawn(subscriber_nodes, channel, timeout);
            (Some(notices), Some(subscribed))
        } else {
            (None, None)
        };
        let local = self
            .local_cache
            .map(|max_entries| LocalTier::new(max_entries, self.local_cache_ttl));
        let store = RedisStore::assemble(
            connection,
            self.prefix,
            notices,
            local,
            timeout,
            replica_ack,
        );
        Ok((store, subscribed))
    }

    /// The connection (not yet connected), and the nodes a subscriber for
    /// change notices may use.
    fn connection(
        &self,
        response_timeout: Duration,
        timeout: Duration,
    ) -> Result<(RedisConnection, Vec<redis::Client>), StoreError> {
        match &self.target {
            Target::Node(url) => {
                let client = redis::Client::open(url.as_str()).map_err(StoreError::backend)?;
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(self.connection_timeout))
                    .set_response_timeout(Some(response_timeout))
                    .set_number_of_retries(self.reconnect_retries)
                    .set_min_delay(Duration::from_millis(50))
                    .set_max_delay(Duration::from_millis(500));
                let manager = ConnectionManager::new_lazy_with_config(client.clone(), config)
                    .map_err(map_error)?;
                Ok((manager.into(), vec![client]))
            }
            Target::Cluster(seeds) => {
                if seeds.is_empty() {
                    return Err(StoreError::backend(
                        "a Redis Cluster needs at least one seed node",
                    ));
                }
                let clients = seeds
                    .iter()
                    .map(|url| redis::Client::open(url.as_str()).map_err(StoreError::backend))
                    .collect::<Result<Vec<_>, _>>()?;
                let client = ClusterClientBuilder::new(seeds.iter().map(String::as_str))
                    .connection_timeout(self.connection_timeout)
                    .response_timeout(response_timeout)
                    // The store bounds each operation itself.
                    .overall_response_timeout(Some(timeout))
                    // Redirections and a failover take several tries; the
                    // operation's time limit bounds them all.
                    .retries(CLUSTER_RETRIES)
                    .min_retry_wait(50)
                    .max_retry_wait(500)
                    .build()
                    .map_err(StoreError::backend)?;
                let config = ClusterConfig::new()
                    .set_connection_timeout(self.connection_timeout)
                    .set_response_timeout(response_timeout);
                let shards = Shards::new(client, config, timeout);
                Ok((RedisConnection::sharded(shards), clients))
            }
        }
    }
}
