//! [`IdempotencyLayerBuilder`]: engine, store, key extractor and HTTP settings.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, Method, StatusCode};

use super::grpc::GrpcCode;

use super::layer::{Disconnect, FailMode, OversizedResponse, Settings, UnclearOutcome};
use super::IdempotencyLayer;
use crate::config::ConfigError;
use crate::engine::{Concurrent, Idempotency, IdempotencyBuilder, IntoStore, LeaseExpiry};
use crate::key::{FingerprintMode, HeaderKey, KeyExtractor};
use crate::store::{MemoryStoreBuilder, Store};

/// Builds an [`IdempotencyLayer`]: engine settings (forwarded to
/// [`IdempotencyBuilder`]), the store, the key extractor, and the HTTP
/// settings. Setters take `self`; `store` and `key_extractor` change the type.
///
/// `E` is where the engine comes from: an [`IdempotencyBuilder`] (from
/// [`IdempotencyLayer::builder`]), which the engine settings and `store`
/// configure, or an engine built elsewhere (from
/// [`IdempotencyLayer::with_engine`]), whose builder has neither: its
/// settings belong to that engine, and a call that would replace or
/// reconfigure it does not compile.
///
/// ```compile_fail
/// use tower_idempotency::{Idempotency, IdempotencyLayer};
/// use tower_idempotency::store::MemoryStore;
///
/// let engine = Idempotency::new();
/// // The shared engine would be thrown away: no `store` here.
/// let layer = IdempotencyLayer::with_engine(engine).store(MemoryStore::new());
/// ```
///
/// ```
/// use std::time::Duration;
/// use http::{Method, StatusCode};
/// use tower_idempotency::{Disconnect, FailMode, FingerprintMode, IdempotencyLayer};
/// use tower_idempotency::extract::HeaderKey;
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
pub struct IdempotencyLayerBuilder<E = IdempotencyBuilder<MemoryStoreBuilder>, K = HeaderKey> {
    engine: E,
    settings: Settings,
    extractor: K,
}

impl<E, K: fmt::Debug> fmt::Debug for IdempotencyLayerBuilder<E, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyLayerBuilder")
            .field("settings", &self.settings)
            .field("extractor", &self.extractor)
            .finish_non_exhaustive()
    }
}

impl IdempotencyLayer {
    /// A builder, starting from the defaults of [`new`](Self::new).
    pub fn builder() -> IdempotencyLayerBuilder {
        IdempotencyLayerBuilder::new(Idempotency::builder())
    }
}

impl<S: Store> IdempotencyLayer<S> {
    /// A builder around an engine built elsewhere (shared with the closure
    /// API or an admin server). The engine's settings (`ttl`, `lease_ttl`,
    /// `lease_expiry`, `concurrent`) and its store are that engine's: the
    /// builder has no setter for them, and the layer follows the engine's
    /// configuration, changes made with
    /// [`Idempotency::configure`] included.
    pub fn with_engine(engine: Idempotency<S>) -> IdempotencyLayerBuilder<Idempotency<S>> {
        IdempotencyLayerBuilder::new(engine)
    }
}

impl<E> IdempotencyLayerBuilder<E> {
    fn new(engine: E) -> Self {
        Self {
            engine,
            settings: Settings::default(),
            extractor: HeaderKey::new(),
        }
    }
}

impl<K> IdempotencyLayerBuilder<IdempotencyBuilder<MemoryStoreBuilder>, K> {
    /// The memory store's entry bound: the most completed records it holds
    /// (default 10,000). In-flight markers are kept beside them, uncounted.
    pub fn max_entries(mut self, max_entries: u64) -> Self {
        self.engine = self.engine.max_entries(max_entries);
        self
    }

    /// The memory store's byte bound (default: none).
    pub fn max_bytes(mut self, max_bytes: u64) -> Self {
        self.engine = self.engine.max_bytes(max_bytes);
        self
    }
}

impl<B, K> IdempotencyLayerBuilder<IdempotencyBuilder<B>, K> {
    /// How long a stored response is replayed (default 24 h).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.engine = self.engine.ttl(ttl);
        self
    }

    /// How long an in-flight marker lives without renewal (default 60 s).
    pub fn lease_ttl(mut self, lease_ttl: Duration) -> Self {
        self.engine = self.engine.lease_ttl(lease_ttl);
        self
    }

    /// What happens to an abandoned lease (default `Takeover`).
    pub fn lease_expiry(mut self, lease_expiry: LeaseExpiry) -> Self {
        self.engine = self.engine.lease_expiry(lease_expiry);
        self
    }

    /// What a duplicate gets while the first is in flight (default `Reject`:
    /// 409; `Wait { timeout }`: the first's response). An engine setting:
    /// the layer reads it from its engine at each request.
    pub fn concurrent(mut self, concurrent: Concurrent) -> Self {
        self.engine = self.engine.concurrent(concurrent);
        self
    }

    /// Keeps markers and records in `store` instead of the memory store.
    pub fn store<S2: Store>(self, store: S2) -> IdempotencyLayerBuilder<IdempotencyBuilder<S2>, K> {
        IdempotencyLayerBuilder {
            engine: self.engine.store(store),
            settings: self.settings,
            extractor: self.extractor,
        }
    }
}

impl<B: IntoStore, K> IdempotencyLayerBuilder<IdempotencyBuilder<B>, K> {
    /// Builds the engine, then the layer.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] for a zero TTL or lease TTL, a duration over
    /// [`MAX_DURATION`](crate::MAX_DURATION) or a zero store bound.
    pub fn build(self) -> Result<IdempotencyLayer<B::Store, K>, ConfigError> {
        let engine = self.engine.build()?;
        Ok(IdempotencyLayer::from_parts(
            engine,
            self.settings,
            self.extractor,
        ))
    }
}

impl<S: Store, K> IdempotencyLayerBuilder<Idempotency<S>, K> {
    /// Builds the layer around the engine given to
    /// [`with_engine`](IdempotencyLayer::with_engine).
    ///
    /// # Errors
    ///
    /// None today (the engine was validated when it was built); a `Result`
    /// like the other `build`, so both read the same.
    pub fn build(self) -> Result<IdempotencyLayer<S, K>, ConfigError> {
        Ok(IdempotencyLayer::from_parts(
            self.engine,
            self.settings,
            self.extractor,
        ))
    }
}

impl<E, K> IdempotencyLayerBuilder<E, K> {
    /// The protected methods (default POST and PATCH). Others pass through.
    pub fn methods(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.settings.methods = methods.into_iter().collect();
        self
    }

    /// Whether a protected request without a key is refused with 400
    /// (default `false`: it passes through unprotected).
    pub fn require_key(mut self, require_key: bool) -> Self {
        self.settings.require_key = require_key;
        self
    }

    /// The largest request body buffered for a protected request (default
    /// 1 MiB); a larger one gets 413 and the service is not called.
    pub fn max_request_body(mut self, limit: usize) -> Self {
        self.settings.max_request_body = limit;
        self
    }

    /// The largest response body stored (default 1 MiB); a larger one is
    /// streamed through in full, and recorded as [`oversized_response`]
    /// says (by default its head only).
    ///
    /// [`oversized_response`]: Self::oversized_response
    pub fn max_response_body(mut self, limit: usize) -> Self {
        self.settings.max_response_body = limit;
        self
    }

    /// What is recorded of a response whose body is over
    /// [`max_response_body`](Self::max_response_body) (default
    /// [`OversizedResponse::RecordHead`]: its status and headers, so a
    /// retry never runs the action again).
    pub fn oversized_response(mut self, policy: OversizedResponse) -> Self {
        self.settings.oversized = policy;
        self
    }

    /// What happens to the key when the action may have run but no definite
    /// answer came (default [`UnclearOutcome::LeaveToExpire`]).
    pub fn unclear_outcome(mut self, policy: UnclearOutcome) -> Self {
        self.settings.unclear = policy;
        self
    }

    /// Which statuses are stored (default: all but 5xx, 408 and 429). A
    /// response whose status is not stored is returned, and the key released.
    pub fn store_status<F>(mut self, policy: F) -> Self
    where
        F: Fn(StatusCode) -> bool + Send + Sync + 'static,
    {
        self.settings.store_status = Arc::new(policy);
        self
    }

    /// What to do when the store cannot be reached (default `Closed`: 503).
    pub fn fail_mode(mut self, fail_mode: FailMode) -> Self {
        self.settings.fail_mode = fail_mode;
        self
    }

    /// What happens to a running action whose client went away (default
    /// `Complete`).
    pub fn disconnect(mut self, disconnect: Disconnect) -> Self {
        self.settings.disconnect = disconnect;
        self
    }

    /// Whether replays carry the stored `Set-Cookie` headers (default `false`:
    /// a session cookie is for the client that got the first response).
    pub fn replay_set_cookie(mut self, replay: bool) -> Self {
        self.settings.replay_set_cookie = replay;
        self
    }

    /// How request bodies are fingerprinted (default `Exact`).
    pub fn fingerprint(mut self, mode: FingerprintMode) -> Self {
        self.settings.fingerprint = mode;
        self
    }

    /// Which gRPC statuses are stored, read from a call's `grpc-status`
    /// (default [`GrpcCode::is_stored_by_default`]: `OK` and the errors a
    /// retry would meet again). A call whose status is not stored is
    /// returned, and its key released.
    pub fn grpc_store_status<F>(mut self, policy: F) -> Self
    where
        F: Fn(GrpcCode) -> bool + Send + Sync + 'static,
    {
        self.settings.grpc_store_status = Arc::new(policy);
        self
    }

    /// The gRPC methods that stream (their paths, `/package.Service/Method`):
    /// they pass through the layer untouched and unprotected. Every other
    /// gRPC call is treated as unary: its request is read to its end before
    /// the service is called, which a bidirectional call whose client waits
    /// for a reply first never reaches (it is answered `UNIMPLEMENTED` after
    /// [`grpc_request_timeout`](Self::grpc_request_timeout)). Replaces the
    /// list given before.
    ///
    /// ```
    /// let layer = tower_idempotency::IdempotencyLayer::builder()
    ///     .grpc_streaming_paths(["/orders.Orders/Watch", "/orders.Orders/Chat"])
    ///     .build()
    ///     .unwrap();
    /// ```
    pub fn grpc_streaming_paths<I, P>(mut self, paths: I) -> Self
    where
        I: IntoIterator<Item = P>,
        P: Into<String>,
    {
        self.settings.grpc_streaming_paths = paths.into_iter().map(Into::into).collect();
        self
    }

    /// How long a gRPC call's request stream may take to end (default
    /// [`DEFAULT_GRPC_REQUEST_TIMEOUT`](crate::DEFAULT_GRPC_REQUEST_TIMEOUT),
    /// 10 s): past it the call is answered `UNIMPLEMENTED`, saying that a
    /// streaming method must be listed in
    /// [`grpc_streaming_paths`](Self::grpc_streaming_paths), and the service
    /// is not called.
    pub fn grpc_request_timeout(mut self, timeout: Duration) -> Self {
        self.settings.grpc_request_timeout = timeout;
        self
    }

    /// The header that marks a replay (default `Idempotent-Replayed: true`,
    /// Stripe's; `Idempotency-Replayed` is the other common name). gRPC
    /// replays carry it as metadata.
    ///
    /// ```
    /// use http::HeaderName;
    ///
    /// let layer = tower_idempotency::IdempotencyLayer::builder()
    ///     .replay_header(HeaderName::from_static("idempotency-replayed"))
    ///     .build()
    ///     .unwrap();
    /// ```
    pub fn replay_header(mut self, name: HeaderName) -> Self {
        self.settings.replay_header = name;
        self
    }

    /// Finds keys with `extractor` instead of [`HeaderKey`].
    pub fn key_extractor<K2: KeyExtractor>(self, extractor: K2) -> IdempotencyLayerBuilder<E, K2> {
        IdempotencyLayerBuilder {
            engine: self.engine,
            settings: self.settings,
            extractor,
        }
    }
}
