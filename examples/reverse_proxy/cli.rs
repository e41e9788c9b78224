//! Command-line flags.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use http::{HeaderName, Uri};

use crate::limits::EdgeArgs;

/// Puts idempotency (the `Idempotency-Key` header) in front of an HTTP
/// upstream that does not have it: a retried POST or PATCH with the same key
/// runs upstream once, and every retry gets the first response back.
///
/// Without --upstream the proxy starts a built-in demo upstream (POST /orders
/// answers 201 with the number of times it really ran).
#[derive(Debug, Parser)]
#[command(name = "reverse_proxy", version)]
pub(crate) struct Args {
    /// Address the proxy listens on.
    #[arg(long, default_value = "127.0.0.1:3000")]
    pub(crate) listen: SocketAddr,

    /// Base URL of the upstream (http://host:port, optionally with a path
    /// prefix). When absent, the built-in demo upstream is used.
    #[arg(long, value_parser = parse_upstream)]
    pub(crate) upstream: Option<Uri>,

    /// Speak HTTP/2 to the upstream, with prior knowledge over cleartext
    /// (h2c): for a gRPC upstream. `TE: trailers` and trailers are passed on
    /// both ways whichever protocol is spoken.
    #[arg(long, requires = "upstream")]
    pub(crate) upstream_http2: bool,

    /// Start the built-in counting upstream on an ephemeral loopback port
    /// (the default when --upstream is absent).
    #[arg(long, conflicts_with = "upstream")]
    pub(crate) demo: bool,

    /// Address of the admin server (/stats, /metrics, /healthz, /keys).
    #[arg(long, default_value = "127.0.0.1:3002")]
    pub(crate) admin: SocketAddr,

    /// Keep records in Redis (redis://host:port/db) instead of the embedded
    /// in-memory store, so several proxies share them.
    #[arg(long)]
    pub(crate) redis: Option<String>,

    /// Prefix of every Redis key; instances with the same prefix share keys.
    #[arg(long, default_value = "idem:")]
    pub(crate) redis_prefix: String,

    /// Keep records in Postgres (postgres://user@host:port/database) instead
    /// of the embedded in-memory store, so several proxies share them.
    #[arg(long, conflicts_with_all = ["redis", "redis_cluster"])]
    pub(crate) postgres: Option<String>,

    /// The Postgres table of records (created at start if missing);
    /// instances on the same table share keys.
    #[arg(long, default_value = "idempotency")]
    pub(crate) postgres_table: String,

    /// Keep records in a Redis Cluster instead: its seed nodes, comma
    /// separated (redis://10.0.0.1:6379,redis://10.0.0.2:6379).
    #[arg(long, value_delimiter = ',', num_args = 1.., conflicts_with = "redis")]
    pub(crate) redis_cluster: Vec<String>,

    /// With --redis or --redis-cluster: a request's marker and its stored
    /// response count as written once this many replicas hold them (Redis
    /// WAIT), so they survive a failover. Without it replication is
    /// asynchronous.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) redis_replicas: Option<u32>,

    /// How long a write waits for --redis-replicas, in seconds; when they do
    /// not answer in time the request goes on (the write holds on the
    /// primary only; a warning is logged).
    #[arg(long, default_value = "0.1", value_parser = parse_seconds)]
    pub(crate) redis_replicas_timeout: Duration,

    /// How long a stored response is replayed, in seconds.
    #[arg(long, default_value = "86400", value_parser = parse_seconds)]
    pub(crate) ttl: Duration,

    /// How long an in-flight marker lives without renewal, in seconds (a
    /// proxy that dies mid-request blocks its key this long).
    #[arg(long, default_value = "60", value_parser = parse_seconds)]
    pub(crate) lease_ttl: Duration,

    /// Most entries the in-memory store holds [default: 10000] (the
    /// embedded store only: refused with --redis, --redis-cluster or
    /// --postgres).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) max_entries: Option<u64>,

    /// Largest request body accepted on a protected request, in bytes (413 above).
    #[arg(long, default_value_t = 1 << 20)]
    pub(crate) max_body: usize,

    /// Largest response body stored, in bytes (a larger one streams through
    /// whole; see --oversized-response for what is recorded).
    #[arg(long, default_value_t = 1 << 20)]
    pub(crate) max_response_body: usize,

    /// What is recorded for a response over --max-response-body: `head`
    /// records its status and headers without the body (a retry gets them,
    /// an empty body and `Idempotency-Replay: omitted`; the upstream runs
    /// once); `release` records nothing and frees the key (a retry runs the
    /// upstream again).
    #[arg(long, value_enum, default_value_t = OversizedFlag::Head)]
    pub(crate) oversized_response: OversizedFlag,

    /// Refuse protected requests (POST, PATCH) without an Idempotency-Key (400).
    #[arg(long)]
    pub(crate) require_key: bool,

    /// What a duplicate gets while the first request is still in flight.
    #[arg(long, value_enum, default_value_t = ConcurrentFlag::Reject)]
    pub(crate) concurrent: ConcurrentFlag,

    /// With --concurrent wait: longest wait for the first request, in seconds
    /// (409 after it).
    #[arg(long, default_value = "30", value_parser = parse_seconds)]
    pub(crate) wait_timeout: Duration,

    /// A gRPC method that streams (`/package.Service/Method`, repeatable):
    /// its calls pass through unprotected. Every other gRPC call is read to
    /// its end as a unary call before it is forwarded; an unlisted streaming
    /// call is answered UNIMPLEMENTED instead of hanging.
    #[arg(long = "grpc-streaming-path", value_name = "PATH")]
    pub(crate) grpc_streaming_paths: Vec<String>,

    /// The header (gRPC: metadata entry) that marks a replayed answer, set
    /// to `true`; `idempotency-replayed` is the other common name.
    #[arg(long, value_name = "NAME", default_value = "idempotent-replayed", value_parser = parse_header_name)]
    pub(crate) replay_header: HeaderName,

    /// When the store is unreachable, forward requests unprotected instead of
    /// answering 503.
    #[arg(long)]
    pub(crate) fail_open: bool,

    /// Longest a client waits for the upstream's response head, in seconds,
    /// counted from when the request is sent upstream; it then gets 504 (also
    /// the connect timeout). A request with an Idempotency-Key is not given
    /// up: the proxy awaits the upstream in the background (up to
    /// --upstream-abandon) with the key held, records its answer, and a
    /// retry gets 409 until then and the upstream's answer after. Once the
    /// upstream request may have been sent, only a definite answer or the
    /// key's marker running out (--lease-ttl) frees the key; an upstream
    /// that cannot be reached (nothing sent) frees it at once.
    #[arg(long, default_value = "30", value_parser = parse_seconds)]
    pub(crate) upstream_timeout: Duration,

    /// Longest the proxy keeps an upstream exchange it started, head and
    /// body, in seconds. After it (or when the upstream breaks the
    /// connection after the request was sent) the outcome is unknown: the
    /// key is neither stored nor freed, but left to its marker (--lease-ttl).
    #[arg(long, default_value = "300", value_parser = parse_seconds)]
    pub(crate) upstream_abandon: Duration,

    /// On SIGINT/SIGTERM, longest wait for in-flight requests and upstream
    /// exchanges still running in the background, in seconds. Exchanges
    /// still running after it are abandoned: their keys are left to their
    /// markers, never freed.
    #[arg(long, default_value = "30", value_parser = parse_seconds)]
    pub(crate) drain_timeout: Duration,

    /// Threads serving requests. 0 (the default): one per CPU the process
    /// may run on (its affinity, as `taskset` sets it), on tokio's
    /// work-stealing runtime. 1: everything on one thread, a current-thread
    /// runtime: on one CPU it forwards requests without a key a little
    /// faster, and first requests a little slower (BENCHMARKS.md).
    #[arg(long, default_value_t = 0)]
    pub(crate) worker_threads: usize,

    /// Where the access log goes: one line per request (time, method, URI,
    /// status, latency, replayed, request id). `off`, `stderr` or a file
    /// PATH (appended to). Lines are written by a separate thread, buffered;
    /// when it falls behind, lines are dropped, never waited for, and
    /// counted in `access_log_dropped` (/stats, /metrics). RUST_LOG governs
    /// every other log line.
    #[arg(long, default_value = "stderr", value_name = "off|stderr|PATH")]
    pub(crate) access_log: crate::access_log::Target,

    #[command(flatten)]
    pub(crate) edge: EdgeArgs,

    #[command(flatten)]
    pub(crate) admin_access: AdminAccessArgs,
}

/// Who may use the admin server (admin_access.rs).
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct AdminAccessArgs {
    /// A file holding the admin token (only its owner may read it: a group-
    /// or world-readable file is refused). Admin writes (PUT /config,
    /// DELETE /keys/*) need `Authorization: Bearer <token>`; without a token
    /// (this flag or IDEMPOTENCY_ADMIN_TOKEN) the admin server is read-only.
    #[arg(long, value_name = "PATH")]
    pub(crate) admin_token_file: Option<PathBuf>,

    /// Reads (/stats, /metrics, /healthz, /keys, /rate, GET /config) need the
    /// admin token too; the page (/) then asks for it once.
    #[arg(long)]
    pub(crate) admin_token_reads: bool,

    /// A name the admin server answers to besides IP addresses and
    /// localhost (repeatable). Requests for any other `Host` get 421, so a
    /// web page cannot reach the admin server through DNS rebinding.
    #[arg(long = "admin-host", value_name = "NAME")]
    pub(crate) admin_hosts: Vec<String>,
}

/// A mistake in the flags, found before anything starts: exit code 2.
#[derive(Debug)]
pub(crate) struct UsageError(String);

impl UsageError {
    pub(crate) fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }
}

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

impl Args {
    /// Refuses combinations of flags that cannot all be honoured.
    pub(crate) fn check(&self) -> Result<(), UsageError> {
        let redis = self.redis.is_some() || !self.redis_cluster.is_empty();
        let remote = redis || self.postgres.is_some();
        if self.redis_replicas.is_some() && self.postgres.is_some() {
            return Err(UsageError::new(
                "--redis-replicas applies to a Redis store, not to --postgres",
            ));
        }
        if self.redis_replicas.is_some() && !redis {
            return Err(UsageError::new(
                "--redis-replicas needs --redis or --redis-cluster",
            ));
        }
        if self.max_entries.is_some() && remote {
            return Err(UsageError::new(
                "--max-entries bounds the embedded store; it does not apply with \
                 --redis, --redis-cluster or --postgres",
            ));
        }
        Ok(())
    }
}

/// `--concurrent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum ConcurrentFlag {
    /// 409 Conflict with Retry-After (the IETF draft's answer).
    Reject,
    /// Wait for the first request and replay its response.
    Wait,
}

/// `--oversized-response`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum OversizedFlag {
    /// Record the status and headers, the body omitted.
    Head,
    /// Record nothing; free the key.
    Release,
}

/// A positive number of seconds; fractions allowed (`0.5`).
pub(crate) fn parse_seconds(text: &str) -> Result<Duration, String> {
    let seconds: f64 = text
        .parse()
        .map_err(|_| format!("`{text}` is not a number of seconds"))?;
    if seconds.is_nan() || seconds <= 0.0 {
        return Err("must be greater than zero".into());
    }
    Duration::try_from_secs_f64(seconds).map_err(|e| e.to_string())
}

fn parse_header_name(text: &str) -> Result<HeaderName, String> {
    HeaderName::from_bytes(text.as_bytes()).map_err(|_| format!("`{text}` is not a header name"))
}

fn parse_upstream(text: &str) -> Result<Uri, String> {
    let uri: Uri = text
        .parse()
        .map_err(|e| format!("`{text}` is not a URL: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err("the upstream must be an http:// URL".into());
    }
    if uri.authority().is_none() {
        return Err("the upstream URL needs a host".into());
    }
    if uri.query().is_some() {
        return Err("the upstream URL cannot carry a query".into());
    }
    Ok(uri)
}
