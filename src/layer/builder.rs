//! [`IdempotencyLayerBuilder`]: engine, store, key extractor and HTTP settings.

use std::fmt;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, StatusCode};

use super::layer::{Disconnect, FailMode, Settings, StatusPolicy, DEFAULT_MAX_BODY};
use super::IdempotencyLayer;
use crate::engine::{
    Concurrent, ConfigError, Idempotency, IdempotencyBuilder, IntoStore, LeaseExpiry,
};
use crate::key::{FingerprintMode, HeaderKey, KeyExtractor};
use crate::store::{MemoryStoreBuilder, Store};

/// The default storage policy: everything but 5xx, 408 and 429, which a
/// retry should run again.
pub(super) fn default_store_status(status: StatusCode) -> bool {
    !(status.is_server_error()
        || status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS)
}

#[derive(Clone)]
pub(super) struct HttpOptions {
    methods: Vec<Method>,
    require_key: bool,
    max_request_body: usize,
    max_response_body: usize,
    store_status: Arc<StatusPolicy>,
    fail_mode: FailMode,
    disconnect: Disconnect,
    replay_set_cookie: bool,
    fingerprint: FingerprintMode,
    concurrent: Option<Concurrent>,
}

impl Default for HttpOptions {
    fn default() -> Self {
        Self {
            methods: vec![Method::POST, Method::PATCH],
            require_key: false,
            max_request_body: DEFAULT_MAX_BODY,
            max_response_body: DEFAULT_MAX_BODY,
            store_status: Arc::new(default_store_status),
            fail_mode: FailMode::Closed,
            disconnect: Disconnect::Complete,
            replay_set_cookie: false,
            fingerprint: FingerprintMode::Exact,
            concurrent: None,
        }
    }
}

impl HttpOptions {
    pub(super) fn into_settings(self, engine_concurrent: Concurrent) -> Settings {
        Settings {
            methods: self.methods,
            require_key: self.require_key,
            max_request_body: self.max_request_body,
            max_response_body: self.max_response_body,
            store_status: self.store_status,
            fail_mode: self.fail_mode,
            disconnect: self.disconnect,
            replay_set_cookie: self.replay_set_cookie,
            fingerprint: self.fingerprint,
            concurrent: self.concurrent.unwrap_or(engine_concurrent),
            waiting: AtomicUsize::new(0),
        }
    }
}

pub(super) enum EngineSpec<B: IntoStore> {
    Build(IdempotencyBuilder<B>),
    Ready(Idempotency<B::Store>),
}

/// Builds an [`IdempotencyLayer`]: engine settings (forwarded to
/// [`IdempotencyBuilder`]), the store, the key extractor, and the HTTP
/// settings. Setters take `self`; `store` and `key_extractor` change the type.
///
/// ```
/// use std::time::Duration;
/// use http::{Method, StatusCode};
/// use tower_idempotency::{Disconnect, FailMode, FingerprintMode, HeaderKey, IdempotencyLayer};
///
/// let layer = IdempotencyLayer::builder()
///     .lease_ttl(Duration::from_secs(30))
///     .max_entries(50_000)
///     .methods([Method::POST, Method::PUT])
///     .max_request_body(64 * 1024)
///     .store_status(|status: StatusCode| status.is_success())
///     .fail_mode(FailMode::Open)
///     .disconnect(Disconnect::Cancel)
///     .fingerprint(FingerprintMode::JsonCanonical)
///     .key_extractor(HeaderKey::new().scope(|_: &http::request::Parts| "tenant-1".to_owned()))
///     .build()
///     .unwrap();
/// # drop(layer);
///
/// assert!(IdempotencyLayer::builder().ttl(Duration::ZERO).build().is_err());
/// ```
#[must_use]
pub struct IdempotencyLayerBuilder<B: IntoStore = MemoryStoreBuilder, K = HeaderKey> {
    engine: EngineSpec<B>,
    http: HttpOptions,
    extractor: K,
    error: Option<ConfigError>,
}

impl<B: IntoStore, K: fmt::Debug> fmt::Debug for IdempotencyLayerBuilder<B, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyLayerBuilder")
            .field("extractor", &self.extractor)
            .finish_non_exhaustive()
    }
}

impl<B: IntoStore> IdempotencyLayerBuilder<B> {
    pub(super) fn new(engine: EngineSpec<B>) -> Self {
        Self {
            engine,
            http: HttpOptions::default(),
            extractor: HeaderKey::new(),
            error: None,
        }
    }
}

impl<K> IdempotencyLayerBuilder<MemoryStoreBuilder, K> {
    /// The memory store's entry bound: the most completed records it holds
    /// (default 10,000). In-flight markers are kept beside them, uncounted.
    pub fn max_entries(self, max_entries: u64) -> Self {
        self.engine_setting("max_entries", |b| b.max_entries(max_entries))
    }

    /// The memory store's byte bound (default: none).
    pub fn max_bytes(self, max_bytes: u64) -> Self {
        self.engine_setting("max_bytes", |b| b.max_bytes(max_bytes))
    }
}

impl<B: IntoStore, K> IdempotencyLayerBuilder<B, K> {
    fn engine_setting(
        mut self,
        name: &str,
        set: impl FnOnce(IdempotencyBuilder<B>) -> IdempotencyBuilder<B>,
    ) -> Self {
        self.engine = match self.engine {
            EngineSpec::Build(builder) => EngineSpec::Build(set(builder)),
            ready @ EngineSpec::Ready(_) => {
                self.error.get_or_insert_with(|| {
                    ConfigError::new(format!(
                        "{name} belongs to the engine passed to with_engine; set it on that engine's builder"
                    ))
                });
                ready
            }
        };
        self
    }

    /// How long a stored response is replayed (default 24 h).
    pub fn ttl(self, ttl: Duration) -> Self {
        self.engine_setting("ttl", |b| b.ttl(ttl))
    }

    /// How long an in-flight marker lives without renewal (default 60 s).
    pub fn lease_ttl(self, lease_ttl: Duration) -> Self {
        self.engine_setting("lease_ttl", |b| b.lease_ttl(lease_ttl))
    }

    /// What happens to an abandoned lease (default `Takeover`).
    pub fn lease_expiry(self, lease_expiry: LeaseExpiry) -> Self {
        self.engine_setting("lease_expiry", |b| b.lease_expiry(lease_expiry))
    }

    /// What a duplicate gets while the first is in flight (default `Reject`:
    /// 409; `Wait { timeout }`: the first's response).
    pub fn concurrent(mut self, concurrent: Concurrent) -> Self {
        self.http.concurrent = Some(concurrent);
        if let EngineSpec::Build(builder) = self.engine {
            self.engine = EngineSpec::Build(builder.concurrent(concurrent));
        }
        self
    }

    /// The protected methods (default POST and PATCH). Others pass through.
    pub fn methods(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.http.methods = methods.into_iter().collect();
        self
    }

    /// Whether a protected request without a key is refused with 400
    /// (default `false`: it passes through unprotected).
    pub fn require_key(mut self, require_key: bool) -> Self {
        self.http.require_key = require_key;
        self
    }

    /// The largest request body buffered for a protected request (default
    /// 1 MiB); a larger one gets 413 and the service is not called.
    pub fn max_request_body(mut self, limit: usize) -> Self {
        self.http.max_request_body = limit;
        self
    }

    /// The largest response body stored (default 1 MiB); a larger one is
    /// streamed through and not stored.
    pub fn max_response_body(mut self, limit: usize) -> Self {
        self.http.max_response_body = limit;
        self
    }

    /// Which statuses are stored (default: all but 5xx, 408 and 429). A
    /// response whose status is not stored is returned, and the key released.
    pub fn store_status<F>(mut self, policy: F) -> Self
    where
        F: Fn(StatusCode) -> bool + Send + Sync + 'static,
    {
        self.http.store_status = Arc::new(policy);
        self
    }

    /// What to do when the store cannot be reached (default `Closed`: 503).
    pub fn fail_mode(mut self, fail_mode: FailMode) -> Self {
        self.http.fail_mode = fail_mode;
        self
    }

    /// What happens to a running action whose client went away (default
    /// `Complete`).
    pub fn disconnect(mut self, disconnect: Disconnect) -> Self {
        self.http.disconnect = disconnect;
        self
    }

    /// Whether replays carry the stored `Set-Cookie` headers (default `false`:
    /// a session cookie is for the client that got the first response).
    pub fn replay_set_cookie(mut self, replay: bool) -> Self {
        self.http.replay_set_cookie = replay;
        self
    }

    /// How request bodies are fingerprinted (default `Exact`).
    pub fn fingerprint(mut self, mode: FingerprintMode) -> Self {
        self.http.fingerprint = mode;
        self
    }

    /// Finds keys with `extractor` instead of [`HeaderKey`].
    pub fn key_extractor<K2: KeyExtractor>(self, extractor: K2) -> IdempotencyLayerBuilder<B, K2> {
        IdempotencyLayerBuilder {
            engine: self.engine,
            http: self.http,
            extractor,
            error: self.error,
        }
    }

    /// Keeps markers and records in `store` instead of the memory store.
    pub fn store<S2: Store>(self, store: S2) -> IdempotencyLayerBuilder<S2, K> {
        let engine = match self.engine {
            EngineSpec::Build(builder) => builder.store(store),
            EngineSpec::Ready(engine) => {
                let config = engine.config();
                Idempotency::builder()
                    .ttl(config.ttl)
                    .lease_ttl(config.lease_ttl)
                    .concurrent(config.concurrent)
                    .lease_expiry(config.lease_expiry)
                    .store(store)
            }
        };
        IdempotencyLayerBuilder {
            engine: EngineSpec::Build(engine),
            http: self.http,
            extractor: self.extractor,
            error: self.error,
        }
    }

    /// Builds the layer.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] for a zero TTL or lease TTL, a duration over
    /// [`MAX_DURATION`](crate::engine::MAX_DURATION), a zero store bound, or
    /// an engine setting given next to [`IdempotencyLayer::with_engine`].
    pub fn build(self) -> Result<IdempotencyLayer<B::Store, K>, ConfigError> {
        if let Some(error) = self.error {
            return Err(error);
        }
        if let Some(concurrent) = &self.http.concurrent {
            // Checked here too: next to `with_engine`, it is the layer's own.
            concurrent.validate()?;
        }
        let engine = match self.engine {
            EngineSpec::Build(builder) => builder.build()?,
            EngineSpec::Ready(engine) => engine,
        };
        let settings = self.http.into_settings(engine.config().concurrent);
        Ok(IdempotencyLayer::from_parts(
            engine,
            settings,
            self.extractor,
        ))
    }
}
