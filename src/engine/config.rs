//! The engine's configuration, its builder and the policies it names.

use std::time::Duration;

use super::Idempotency;
use crate::config::{check_duration, ConfigError};
use crate::store::{MemoryStore, MemoryStoreBuilder, Store};

/// The default record TTL: 24 hours.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// The default lease TTL: 60 seconds.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(60);
/// The default wait budget of [`Concurrent::Wait`]: 30 seconds.
pub const DEFAULT_WAIT_TIMEOUT: Duration = Duration::from_secs(30);
/// Refuses a zero auto-cleanup interval, or one over [`MAX_DURATION`](crate::MAX_DURATION).
pub(super) fn check_cleanup_interval(interval: Duration) -> Result<(), ConfigError> {
    if interval.is_zero() {
        return Err(ConfigError::new(
            "auto-cleanup interval must be greater than zero",
        ));
    }
    check_duration("the auto-cleanup interval", interval)
}

/// What a duplicate gets while the first request for its key is in flight.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Concurrent {
    /// Refuse it at once (HTTP 409 with `Retry-After`), as the IETF draft says.
    #[default]
    Reject,
    /// Wait for the first to finish and replay its result. `timeout` is one
    /// budget for the whole wait, start-overs included; past it, a conflict.
    Wait {
        /// The wait budget.
        timeout: Duration,
    },
}

impl Concurrent {
    /// `Wait` with the default 30 s budget.
    pub const fn wait() -> Self {
        Self::Wait {
            timeout: DEFAULT_WAIT_TIMEOUT,
        }
    }

    /// Refuses a wait budget over [`MAX_DURATION`](crate::MAX_DURATION).
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        match *self {
            Self::Wait { timeout } => check_duration("the wait timeout", timeout),
            Self::Reject => Ok(()),
        }
    }
}

/// What happens to a lease whose holder died (its process stopped renewing it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LeaseExpiry {
    /// After the lease TTL the marker expires and a retry runs the action.
    #[default]
    Takeover,
    /// The marker lives for the record TTL: retries are refused meanwhile, so
    /// nothing ever runs twice.
    Block,
}

/// The engine's effective configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Config {
    /// How long a record is kept.
    pub ttl: Duration,
    /// How long an in-flight marker lives without renewal.
    pub lease_ttl: Duration,
    /// The policy for duplicates of an in-flight key: the one place it is
    /// decided. [`Idempotency::begin`] and the HTTP layer read it at each
    /// call; [`Idempotency::execute`] waits under either policy (see there).
    pub concurrent: Concurrent,
    /// What happens to an abandoned lease.
    pub lease_expiry: LeaseExpiry,
    /// How often the store's maintenance runs in the background (`None`: it
    /// does not; see [`Idempotency::start_auto_cleanup`]).
    pub cleanup_interval: Option<Duration>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            ttl: DEFAULT_TTL,
            lease_ttl: DEFAULT_LEASE_TTL,
            concurrent: Concurrent::Reject,
            lease_expiry: LeaseExpiry::Takeover,
            cleanup_interval: None,
        }
    }
}

impl Config {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.ttl.is_zero() {
            return Err(ConfigError::new("ttl must be greater than zero"));
        }
        if self.lease_ttl.is_zero() {
            return Err(ConfigError::new("lease_ttl must be greater than zero"));
        }
        check_duration("ttl", self.ttl)?;
        check_duration("lease_ttl", self.lease_ttl)?;
        if let Some(interval) = self.cleanup_interval {
            check_cleanup_interval(interval)?;
        }
        self.concurrent.validate()
    }

    /// The TTL in-flight markers are written and renewed with.
    pub(super) fn marker_ttl(&self) -> Duration {
        match self.lease_expiry {
            LeaseExpiry::Takeover => self.lease_ttl,
            LeaseExpiry::Block => self.ttl,
        }
    }
}

/// Something that becomes a [`Store`] when the engine is built: a store, or
/// the [`MemoryStoreBuilder`] the engine builder starts with.
pub trait IntoStore {
    /// The store it becomes.
    type Store: Store;

    /// Builds the store.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] when the store's own configuration is invalid.
    fn into_store(self) -> Result<Self::Store, ConfigError>;
}

impl<S: Store> IntoStore for S {
    type Store = S;

    fn into_store(self) -> Result<S, ConfigError> {
        Ok(self)
    }
}

impl IntoStore for MemoryStoreBuilder {
    type Store = MemoryStore;

    fn into_store(self) -> Result<MemoryStore, ConfigError> {
        self.build()
    }
}

/// Builds an [`Idempotency`] engine. Starts with the embedded moka store.
///
/// ```
/// use std::time::Duration;
/// use tower_idempotency::{Concurrent, Idempotency};
///
/// let engine = Idempotency::builder()
///     .ttl(Duration::from_secs(3600))
///     .max_entries(50_000)
///     .concurrent(Concurrent::wait())
///     .build()
///     .unwrap();
/// assert_eq!(engine.config().ttl, Duration::from_secs(3600));
///
/// assert!(Idempotency::builder().ttl(Duration::ZERO).build().is_err());
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct IdempotencyBuilder<B = MemoryStoreBuilder> {
    store: B,
    config: Config,
}

impl Default for IdempotencyBuilder {
    fn default() -> Self {
        Self {
            store: MemoryStoreBuilder::default(),
            config: Config::default(),
        }
    }
}

impl IdempotencyBuilder<MemoryStoreBuilder> {
    /// The memory store's entry bound: the most completed records it holds
    /// (default 10,000). In-flight markers are kept beside them, uncounted.
    pub fn max_entries(mut self, max_entries: u64) -> Self {
        self.store = self.store.max_entries(max_entries);
        self
    }

    /// The memory store's byte bound (default: none).
    pub fn max_bytes(mut self, max_bytes: u64) -> Self {
        self.store = self.store.max_bytes(max_bytes);
        self
    }
}

impl<B> IdempotencyBuilder<B> {
    /// How long a record is kept (default 24 h).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.config.ttl = ttl;
        self
    }

    /// How long an in-flight marker lives without renewal (default 60 s).
    pub fn lease_ttl(mut self, lease_ttl: Duration) -> Self {
        self.config.lease_ttl = lease_ttl;
        self
    }

    /// The policy for duplicates of an in-flight key (default `Reject`).
    pub fn concurrent(mut self, concurrent: Concurrent) -> Self {
        self.config.concurrent = concurrent;
        self
    }

    /// What happens to an abandoned lease (default `Takeover`).
    pub fn lease_expiry(mut self, lease_expiry: LeaseExpiry) -> Self {
        self.config.lease_expiry = lease_expiry;
        self
    }

    /// Uses `store` instead of the embedded memory store.
    pub fn store<S: Store>(self, store: S) -> IdempotencyBuilder<S> {
        IdempotencyBuilder {
            store,
            config: self.config,
        }
    }

    /// The configuration as set so far.
    pub fn config(&self) -> Config {
        self.config
    }
}

impl<B: IntoStore> IdempotencyBuilder<B> {
    /// Builds the engine.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] for a zero TTL, a zero lease TTL, a duration over
    /// [`MAX_DURATION`](crate::MAX_DURATION) or an invalid store configuration (such as a zero
    /// entry bound).
    pub fn build(self) -> Result<Idempotency<B::Store>, ConfigError> {
        self.config.validate()?;
        Ok(Idempotency::from_parts(
            self.store.into_store()?,
            self.config,
        ))
    }
}
