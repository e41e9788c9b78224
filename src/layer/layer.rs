//! [`IdempotencyLayer`] and the settings it shares with its services.

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use http::{HeaderName, Method, StatusCode};
use std::time::Duration;

use super::grpc::{self, GrpcStatusPolicy};

use crate::engine::Idempotency;
use crate::key::{FingerprintMode, HeaderKey};
use crate::store::MemoryStore;

/// The default limit of a buffered request body, and of a stored response body: 1 MiB.
pub const DEFAULT_MAX_BODY: usize = 1 << 20;

/// What a protected request gets when the store cannot be reached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum FailMode {
    /// 503 problem+json with `Retry-After: 1`: nothing runs unprotected (the default).
    #[default]
    Closed,
    /// The request is passed to the service unprotected: availability over
    /// at-most-once. Only while the store cannot be reached or does not
    /// answer in time ([`StoreError::is_unavailable`]); a store that answers
    /// with a value it cannot read gets the request a 500, never an
    /// unprotected run.
    ///
    /// [`StoreError::is_unavailable`]: crate::store::StoreError::is_unavailable
    Open,
}

/// What happens to a running action when its client goes away.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Disconnect {
    /// The action and its response body run on to the end, handed to a task
    /// of their own (in the request's tracing span), and the result is stored, so the client's retry replays it instead of
    /// running it again (the default).
    #[default]
    Complete,
    /// The action is dropped (its future and body are cancelled) and the
    /// lease released, so the retry runs it again.
    Cancel,
}

/// What is recorded of a first response whose body is larger than
/// [`max_response_body`](crate::IdempotencyLayerBuilder::max_response_body)
/// (or than the store's largest record).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OversizedResponse {
    /// The response streams to the client in full; its status, headers
    /// (less `Content-Length`) and trailers are recorded with the body
    /// marked omitted. A retry gets them with an empty body,
    /// `Content-Length: 0`, the replay marker and `Idempotency-Replay:
    /// omitted`: the action never runs twice (the default). Counted in
    /// `omitted`.
    #[default]
    RecordHead,
    /// Nothing is recorded and the key is released, so a retry runs the
    /// action again (the behaviour before `RecordHead`; opt in only for
    /// actions that are safe to repeat). Counted in `not_stored`.
    Release,
}

/// What happens to the key when the action may have run but no definite
/// answer came: the response body failed after its head, or the service
/// marked its response [`OutcomeUnknown`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum UnclearOutcome {
    /// The lease is abandoned: not released, no longer renewed, its marker
    /// left to its TTL, after which [`LeaseExpiry`](crate::LeaseExpiry)
    /// decides (the default). Counted in `ambiguous`.
    #[default]
    LeaveToExpire,
    /// The key is released at once, so a retry runs the action again, maybe
    /// while the first run still goes on (the behaviour before
    /// `LeaveToExpire`; opt in only for actions that are safe to repeat).
    Release,
}

/// A response extension a service sets when it cannot tell whether the
/// action ran: an upstream that timed out or broke the connection after
/// the request was sent, say. The layer hands the response to the client as
/// it is, stores nothing, and under [`UnclearOutcome::LeaveToExpire`]
/// leaves the key to its marker instead of releasing it, so a retry does
/// not run the action a second time.
///
/// ```
/// use http::{Response, StatusCode};
/// use tower_idempotency::OutcomeUnknown;
///
/// let mut response = Response::new(());
/// *response.status_mut() = StatusCode::GATEWAY_TIMEOUT;
/// response.extensions_mut().insert(OutcomeUnknown);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutcomeUnknown;

/// How long a gRPC call's request stream may take to end before the layer
/// answers it `UNIMPLEMENTED` (see
/// [`grpc_request_timeout`](crate::IdempotencyLayerBuilder::grpc_request_timeout)).
pub const DEFAULT_GRPC_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The header that marks a replayed response, unless
/// [`replay_header`](crate::IdempotencyLayerBuilder::replay_header) names
/// another.
pub(crate) const REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

pub(super) type StatusPolicy = dyn Fn(StatusCode) -> bool + Send + Sync;

/// The default storage policy: everything but 5xx, 408 and 429, which a
/// retry should run again.
fn default_store_status(status: StatusCode) -> bool {
    !(status.is_server_error()
        || status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS)
}

/// The HTTP settings, shared by the layer and every service it makes: the
/// one options struct the builder fills. The concurrency policy is not here:
/// it is the engine's ([`Config::concurrent`](crate::Config::concurrent)),
/// read at each request, so a change made on the handle applies to the layer.
#[derive(Clone)]
pub(crate) struct Settings {
    pub(crate) methods: Vec<Method>,
    pub(crate) require_key: bool,
    pub(crate) max_request_body: usize,
    pub(crate) max_response_body: usize,
    pub(crate) store_status: Arc<StatusPolicy>,
    pub(crate) fail_mode: FailMode,
    pub(crate) disconnect: Disconnect,
    pub(crate) replay_set_cookie: bool,
    pub(crate) fingerprint: FingerprintMode,
    pub(crate) oversized: OversizedResponse,
    pub(crate) unclear: UnclearOutcome,
    pub(crate) grpc_store_status: Arc<GrpcStatusPolicy>,
    /// Paths of streaming gRPC methods, which pass through unprotected.
    pub(crate) grpc_streaming_paths: Arc<[String]>,
    /// How long a gRPC call's request stream may take to end.
    pub(crate) grpc_request_timeout: Duration,
    /// The header that marks a replay.
    pub(crate) replay_header: HeaderName,
}

impl Settings {
    /// Whether `path` is a streaming gRPC method's, passed through.
    pub(crate) fn is_grpc_streaming(&self, path: &str) -> bool {
        self.grpc_streaming_paths
            .iter()
            .any(|listed| listed == path)
    }
}

impl Default for Settings {
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
            oversized: OversizedResponse::RecordHead,
            unclear: UnclearOutcome::LeaveToExpire,
            grpc_store_status: grpc::default_policy(),
            grpc_streaming_paths: Arc::new([]),
            grpc_request_timeout: DEFAULT_GRPC_REQUEST_TIMEOUT,
            replay_header: REPLAYED,
        }
    }
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("methods", &self.methods)
            .field("require_key", &self.require_key)
            .field("max_request_body", &self.max_request_body)
            .field("max_response_body", &self.max_response_body)
            .field("fail_mode", &self.fail_mode)
            .field("disconnect", &self.disconnect)
            .field("replay_set_cookie", &self.replay_set_cookie)
            .field("fingerprint", &self.fingerprint)
            .field("oversized", &self.oversized)
            .field("unclear", &self.unclear)
            .field("grpc_streaming_paths", &self.grpc_streaming_paths)
            .field("grpc_request_timeout", &self.grpc_request_timeout)
            .field("replay_header", &self.replay_header)
            .finish_non_exhaustive()
    }
}

/// What a layer and every service it makes share, behind one `Arc`: tower
/// clones a service for each request, and one reference count is the
/// cheapest clone there is.
pub(crate) struct Shared<S, K> {
    pub(crate) engine: Idempotency<S>,
    pub(crate) settings: Settings,
    pub(crate) extractor: K,
    /// Runtime state beside the settings: requests inside `begin` that did
    /// not get an answer at once.
    pub(crate) waiting: AtomicUsize,
}

impl<S, K: fmt::Debug> fmt::Debug for Shared<S, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("engine", &self.engine)
            .field("settings", &self.settings)
            .field("extractor", &self.extractor)
            .finish()
    }
}

/// Makes POST and PATCH requests that carry an `Idempotency-Key` run at
/// most once per key, and replays the first response to every retry.
///
/// [`IdempotencyLayer::new()`] is the layer with every default;
/// [`builder()`](IdempotencyLayer::builder) configures it.
///
#[doc = include_str!("docs.md")]
pub struct IdempotencyLayer<S = MemoryStore, K = HeaderKey> {
    pub(super) shared: Arc<Shared<S, K>>,
}

impl<S, K> Clone for IdempotencyLayer<S, K> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<S, K: fmt::Debug> fmt::Debug for IdempotencyLayer<S, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyLayer")
            .field("engine", &self.shared.engine)
            .field("settings", &self.shared.settings)
            .field("extractor", &self.shared.extractor)
            .finish()
    }
}

impl IdempotencyLayer {
    /// A layer with the defaults: moka store (10,000 entries), 24 h TTL,
    /// 60 s lease, POST and PATCH protected, key optional, 1 MiB limits,
    /// `Concurrent::Reject`, `LeaseExpiry::Takeover`, `FailMode::Closed`,
    /// `Disconnect::Complete`, `Set-Cookie` not replayed, exact fingerprint.
    pub fn new() -> Self {
        Self::from_parts(Idempotency::new(), Settings::default(), HeaderKey::new())
    }
}

impl Default for IdempotencyLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl<S, K> IdempotencyLayer<S, K> {
    pub(super) fn from_parts(engine: Idempotency<S>, settings: Settings, extractor: K) -> Self {
        Self {
            shared: Arc::new(Shared {
                engine,
                settings,
                extractor,
                waiting: AtomicUsize::new(0),
            }),
        }
    }

    /// The engine: stats, cache info, queries and maintenance.
    pub fn handle(&self) -> Idempotency<S> {
        self.shared.engine.clone()
    }

    /// Requests of this layer waiting for a decision right now: duplicates
    /// coalescing on a run in flight (`Concurrent::Wait`), or requests whose
    /// store operation is slow.
    pub fn waiting(&self) -> usize {
        self.shared.waiting.load(Relaxed)
    }
}
