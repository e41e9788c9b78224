//! Configuration and connection of a [`RedisStore`].

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::convert::map_error;
use super::{local::LocalTier, notify::Notices, RedisStore};
use crate::engine::check_duration;
use crate::store::StoreError;
use tokio::sync::oneshot;

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "idem:";
/// The default limit on connecting to Redis: 1 second.
pub const DEFAULT_CONNECTION_TIMEOUT: Duration = Duration::from_secs(1);
/// The default limit on waiting for one answer from Redis: 1 second.
pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(1);
/// The default lifetime of a record in the local tier: 60 seconds.
pub const DEFAULT_LOCAL_CACHE_TTL: Duration = Duration::from_secs(60);

/// Builds a [`RedisStore`]; made by [`RedisStore::builder`].
#[derive(Debug, Clone)]
#[must_use]
pub struct RedisStoreBuilder {
    url: String,
    prefix: String,
    local_cache: Option<u64>,
    local_cache_ttl: Duration,
    connection_timeout: Duration,
    response_timeout: Duration,
    reconnect_retries: usize,
    notifications: bool,
}

impl RedisStoreBuilder {
    pub(super) fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            prefix: DEFAULT_PREFIX.to_owned(),
            local_cache: None,
            local_cache_ttl: DEFAULT_LOCAL_CACHE_TTL,
            connection_timeout: DEFAULT_CONNECTION_TIMEOUT,
            response_timeout: DEFAULT_RESPONSE_TIMEOUT,
            reconnect_retries: 1,
            notifications: true,
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

    /// How many times one reconnection retries before the waiting
    /// operations fail (default 1). The next operation starts a new one.
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
    /// [`MAX_DURATION`](crate::engine::MAX_DURATION) among them: its source
    /// is a [`ConfigError`](crate::ConfigError) naming the maximum),
    /// [`StoreError::Unavailable`] when Redis cannot be reached.
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
        let client = redis::Client::open(self.url.as_str()).map_err(StoreError::backend)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.connection_timeout))
            .set_response_timeout(Some(self.response_timeout))
            .set_number_of_retries(self.reconnect_retries)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(500));
        let timeout = self.connection_timeout + self.response_timeout;
        let (notices, subscribed) = if self.notifications {
            let channel = super::channel(&self.prefix);
            let (notices, subscribed) = Notices::spawn(client.clone(), channel, timeout);
            (Some(notices), Some(subscribed))
        } else {
            (None, None)
        };
        let manager = ConnectionManager::new_lazy_with_config(client, config).map_err(map_error)?;
        let local = self
            .local_cache
            .map(|max_entries| LocalTier::new(max_entries, self.local_cache_ttl));
        let store = RedisStore::assemble(manager, self.prefix, notices, local, timeout);
        Ok((store, subscribed))
    }
}
