//! A reverse proxy that puts idempotency in front of an upstream that does
//! not have it.
//!
//! ```text
//! cargo run --example reverse_proxy                      # built-in demo upstream
//! cargo run --example reverse_proxy -- --upstream http://127.0.0.1:8080
//! ```
//!
//! A POST or PATCH carrying `Idempotency-Key` runs upstream once; retries get
//! the first response back with `idempotent-replayed: true` (the name is
//! `--replay-header`). gRPC calls (`--upstream-http2` to a gRPC upstream)
//! are protected by the layer's gRPC rules, their key in the
//! `idempotency-key` metadata, and the proxy's own answers to them are gRPC
//! statuses. The admin server
//! (`--admin`, default 127.0.0.1:3002) answers `/` (the operator's page),
//! `/stats`, `/metrics`, `/healthz`, `/keys` (a page at a time), `/config`
//! and `DELETE /keys/{key}`; writes need the admin token
//! (`--admin-token-file`), and only its own names are answered
//! (`admin_access.rs`).
//! Clients are held to the edge limits of `limits.rs` (header, body and idle
//! timeouts, a connection cap, an HTTP/2 stream cap). One access-log line per
//! request goes to `--access-log` (stderr by default; written off the request
//! path, `access_log.rs`); `RUST_LOG` sets the level of every other log line.

use std::future::IntoFuture;
use std::io::Write as _;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use http::Uri;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower::{BoxError, ServiceBuilder};
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_idempotency::store::{StoreAdmin, DEFAULT_MAX_ENTRIES};
use tower_idempotency::{
    Concurrent, Disconnect, FailMode, Idempotency, IdempotencyLayer, OversizedResponse,
};
use tracing_subscriber::EnvFilter;

mod access_log;
mod admin;
mod admin_access;
mod body_timeout;
mod cli;
mod connection;
mod deadline;
mod demo;
mod exchange;
mod forward;
mod limits;
mod page;
#[cfg(feature = "postgres")]
mod postgres;
mod problem;
mod runtime_config;
mod shutdown;
mod stream_stall;
mod upstream_link;

use access_log::{AccessLog, AccessLogLayer};
use body_timeout::BodyTimeoutLayer;
use cli::{Args, ConcurrentFlag, OversizedFlag};
use deadline::{UpstreamDeadlineLayer, PROTECTED_METHODS};
use exchange::Exchanges;
use forward::Forwarder;
use limits::EdgeStats;

// glibc's malloc and free showed in the forwarding path's profile; mimalloc
// keeps per-thread free lists (BENCHMARKS.md, "Reverse proxy against nginx").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        // stdout carries the one `ready:` line; logs go to stderr.
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    let runtime = match runtime(args.worker_threads) {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("reverse_proxy: could not start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("reverse_proxy: {e}");
            // A mistake in the flags exits as clap's own do.
            if e.is::<cli::UsageError>() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// Locks `mutex` whether or not a holder panicked: every lock in the proxy
/// guards a plain value (a phase, a timestamp, a buffer of lines, an idle
/// connection) set whole under it, which a panic cannot leave half-made.
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The runtime for `--worker-threads`: 1 is a current-thread runtime, any
/// other count a work-stealing runtime with that many workers (0: one per
/// CPU the process may run on). On one CPU the current-thread runtime
/// forwarded requests without a key about 5 % faster and first requests
/// about 8 % slower than a work-stealing runtime with one worker, whose
/// LIFO slot runs a task woken by the running one next (BENCHMARKS.md,
/// "Reverse proxy against nginx"); the default stays tokio's.
fn runtime(worker_threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    match worker_threads {
        1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        0 => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build(),
    }
}

async fn run(args: Args) -> Result<(), BoxError> {
    args.check()?;
    let concurrent = match args.concurrent {
        ConcurrentFlag::Reject => Concurrent::Reject,
        ConcurrentFlag::Wait => Concurrent::Wait {
            timeout: args.wait_timeout,
        },
    };
    if let Some(url) = args.postgres.clone() {
        #[cfg(feature = "postgres")]
        {
            let engine = postgres::engine(&url, &args, concurrent).await?;
            return serve(args, engine).await;
        }
        #[cfg(not(feature = "postgres"))]
        {
            let _ = url;
            return Err(
                "--postgres: this build has no Postgres store; run the example \
                        with `--features postgres`, or drop --postgres"
                    .into(),
            );
        }
    }
    if args.redis.is_some() || !args.redis_cluster.is_empty() {
        #[cfg(feature = "redis")]
        {
            let engine = redis_engine(&args, concurrent).await?;
            return serve(args, engine).await;
        }
        #[cfg(not(feature = "redis"))]
        {
            return Err(
                "--redis: this build has no Redis store; run the example with \
                        `--features redis`, or drop --redis for the embedded store"
                    .into(),
            );
        }
    }
    let engine = Idempotency::builder()
        .ttl(args.ttl)
        .lease_ttl(args.lease_ttl)
        .concurrent(concurrent)
        .max_entries(args.max_entries.unwrap_or(DEFAULT_MAX_ENTRIES))
        .build()?;
    serve(args, engine).await
}

/// An engine on Redis (one server, or a Cluster). It starts even when Redis
/// is down (requests then get 503, or pass unprotected with --fail-open, and
/// /healthz answers 503 until Redis answers; on a cluster, while some slot has
/// no primary that answers), so a proxy does not crash-loop through a Redis
/// restart.
#[cfg(feature = "redis")]
async fn redis_engine(
    args: &Args,
    concurrent: Concurrent,
) -> Result<Idempotency<tower_idempotency::store::redis::RedisStore>, BoxError> {
    use tower_idempotency::store::redis::RedisStore;
    let (flag, builder) = match &args.redis {
        Some(url) => ("--redis", RedisStore::builder(url)),
        None => (
            "--redis-cluster",
            RedisStore::cluster_builder(args.redis_cluster.clone()),
        ),
    };
    let mut builder = builder.prefix(args.redis_prefix.clone());
    if let Some(replicas) = args.redis_replicas {
        builder = builder.replica_ack(replicas, args.redis_replicas_timeout);
    }
    let store = builder.build_lazy().map_err(|e| format!("{flag}: {e}"))?;
    let engine = Idempotency::builder()
        .ttl(args.ttl)
        .lease_ttl(args.lease_ttl)
        .concurrent(concurrent)
        .store(store)
        .build()?;
    // The URL may hold a password: it is never logged.
    match tokio::time::timeout(Duration::from_secs(3), engine.ping()).await {
        Ok(Ok(())) => tracing::info!(prefix = %args.redis_prefix, "Redis answers"),
        Ok(Err(e)) => tracing::warn!(error = %e, "Redis does not answer yet"),
        Err(_) => tracing::warn!("Redis does not answer yet (timed out)"),
    }
    Ok(engine)
}

/// Binds both listeners, reports ready, serves until a signal, then drains.
async fn serve<S: StoreAdmin>(args: Args, engine: Idempotency<S>) -> Result<(), BoxError> {
    let mut signals = shutdown::Signals::new()?;
    let access = admin_access::Access::from_flags(
        args.admin_access.admin_token_file.as_deref(),
        std::env::var(admin_access::TOKEN_ENV).ok(),
        args.admin_access.admin_token_reads,
        &args.admin_access.admin_hosts,
    )?;
    let upstream = match &args.upstream {
        Some(upstream) => upstream.clone(),
        None => {
            let addr = demo::start()
                .await
                .map_err(|e| format!("cannot start the demo upstream: {e}"))?;
            format!("http://{addr}").parse::<Uri>()?
        }
    };
    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let admin_listener = TcpListener::bind(args.admin)
        .await
        .map_err(|e| format!("cannot listen on {} (admin): {e}", args.admin))?;
    let proxy_addr = listener.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;

    let shutting_down = Arc::new(AtomicBool::new(false));
    let edge_stats = Arc::new(EdgeStats::default());
    let access_log = AccessLog::start(&args.access_log, edge_stats.access_log_dropped.clone())?;
    let exchanges = Exchanges::new();
    let forwarder = Forwarder::new(
        upstream.clone(),
        args.upstream_http2,
        args.upstream_timeout,
        args.upstream_abandon,
        exchanges.clone(),
    );
    let (app, waiting) = proxy_app(&args, &engine, forwarder, &edge_stats, &access_log)?;
    let admin_app = admin::router(
        engine.clone(),
        waiting,
        shutting_down.clone(),
        edge_stats.clone(),
        access,
    );

    let (stop_proxy, proxy_stopped) = watch::channel(false);
    let (stop_admin, admin_stopped) = watch::channel(false);
    let edge = args.edge.clone();
    let proxy = tokio::spawn(async move {
        limits::serve(listener, app, &edge, edge_stats, proxy_stopped).await;
    });
    let admin = tokio::spawn(
        axum::serve(admin_listener, admin_app)
            .with_graceful_shutdown(shutdown::changed(admin_stopped))
            .into_future(),
    );

    let upstream = upstream.to_string();
    let upstream = upstream.trim_end_matches('/');
    tracing::info!(%proxy_addr, %admin_addr, %upstream, "ready");
    let mut stdout = std::io::stdout().lock();
    writeln!(
        stdout,
        "ready: proxy on http://{proxy_addr}, admin on http://{admin_addr}, upstream {upstream}"
    )?;
    if args.upstream.is_none() {
        writeln!(stdout, "{}", demo_hint(proxy_addr, admin_addr))?;
    }
    stdout.flush()?;
    drop(stdout);

    signals.recv().await?;
    tracing::info!("shutting down: no new connections, draining in-flight requests");
    // /healthz answers 503 from now on; the admin server stays up while the
    // proxy drains so a load balancer can see it.
    shutting_down.store(true, Ordering::SeqCst);
    let _ = stop_proxy.send(true);
    // Connections first, then the exchanges whose clients got their 504 and
    // went: each holds a key until the upstream answers.
    let drain = async {
        let served = proxy.await;
        exchanges.idle().await;
        served
    };
    match tokio::time::timeout(args.drain_timeout, drain).await {
        Ok(Ok(())) => tracing::info!("drained"),
        Ok(Err(e)) => tracing::error!(error = %e, "proxy server task failed"),
        Err(_) => tracing::warn!(
            drain_timeout = ?args.drain_timeout,
            running = exchanges.running(),
            "requests or upstream exchanges still running after the drain timeout; \
             their keys are left to their markers; exiting anyway"
        ),
    }
    // Whatever still runs may have reached the upstream: its key must not be
    // freed as the process goes, only left to expire.
    engine.abandon_leases();
    let _ = stop_admin.send(true);
    if tokio::time::timeout(Duration::from_secs(1), admin)
        .await
        .is_err()
    {
        tracing::warn!("admin server did not stop in time");
    }
    access_log.flush(Duration::from_secs(1));
    Ok(())
}

/// The proxy's service stack: request id and access log outside, the client-facing
/// upstream deadline above the idempotency layer (so a request that outlives
/// it is finished in the background, see `deadline.rs`), the layer in front
/// of the forwarder. Answers the app and the layer's gauge of waiting
/// requests (for the admin server).
fn proxy_app<S: StoreAdmin>(
    args: &Args,
    engine: &Idempotency<S>,
    forwarder: Forwarder,
    edge_stats: &Arc<EdgeStats>,
    access_log: &AccessLog,
) -> Result<(impl limits::App, admin::Waiting), BoxError> {
    let layer = IdempotencyLayer::with_engine(engine.clone())
        .require_key(args.require_key)
        .max_request_body(args.max_body)
        .max_response_body(args.max_response_body)
        .oversized_response(match args.oversized_response {
            OversizedFlag::Head => OversizedResponse::RecordHead,
            OversizedFlag::Release => OversizedResponse::Release,
        })
        .methods(PROTECTED_METHODS)
        .grpc_streaming_paths(args.grpc_streaming_paths.iter().cloned())
        .replay_header(args.replay_header.clone())
        // The upstream deadline drops the layer's response future: the
        // exchange must then run on, not be cancelled with its key released.
        .disconnect(Disconnect::Complete)
        .fail_mode(if args.fail_open {
            FailMode::Open
        } else {
            FailMode::Closed
        })
        .build()?;
    let gauge = layer.clone();
    let waiting: admin::Waiting = Arc::new(move || gauge.waiting());
    let service = ServiceBuilder::new()
        .layer(SetRequestIdLayer::x_request_id(RandomUuid))
        // One line per request, queued for the writer thread; no span: a
        // span per request at info level cost more than the line itself.
        .layer(AccessLogLayer::new(
            access_log.clone(),
            args.replay_header.clone(),
        ))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(BodyTimeoutLayer::new(
            args.edge.body_read_timeout,
            edge_stats.clone(),
        ))
        .layer(UpstreamDeadlineLayer::new(args.upstream_timeout))
        .layer(layer)
        .service(forwarder);
    // Served as it is: behind an axum Router it was cloned into a box per
    // request for a match with one outcome.
    Ok((service, waiting))
}

/// A random (version 4) UUID per request, like tower-http's
/// `MakeRequestUuid`, but drawn from the thread's generator: that one asked
/// the kernel (`getrandom`) on every request.
#[derive(Clone, Copy)]
struct RandomUuid;

impl MakeRequestId for RandomUuid {
    fn make_request_id<B>(&mut self, _: &http::Request<B>) -> Option<RequestId> {
        let bits = rand::random::<u128>() & !(0xF000 << 64) & !(0xC << 60);
        let bits = bits | (0x4000 << 64) | (0x8 << 60);
        let hex = format!("{bits:032x}");
        let id = format!(
            "{}-{}-{}-{}-{}",
            &hex[..8],
            &hex[8..12],
            &hex[12..16],
            &hex[16..20],
            &hex[20..]
        );
        http::HeaderValue::from_str(&id).ok().map(RequestId::new)
    }
}

fn demo_hint(proxy: SocketAddr, admin: SocketAddr) -> String {
    format!(
        "demo upstream: POST /orders answers 201 with how many times it ran. Try:\n\
         \x20 curl -i -X POST http://{proxy}/orders -H 'Idempotency-Key: order-1' -d '{{\"item\":\"book\"}}'\n\
         \x20 curl -i -X POST http://{proxy}/orders -H 'Idempotency-Key: order-1' -d '{{\"item\":\"book\"}}'   # replayed\n\
         \x20 curl -s http://{admin}/stats"
    )
}
