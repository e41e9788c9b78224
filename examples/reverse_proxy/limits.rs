//! The limits an edge server puts on its clients, and the accept loop that
//! applies them: how many connections it holds, how long a request head, a
//! request body and an idle connection may take, and how many HTTP/2
//! streams one connection may open at once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use clap::Args as ClapArgs;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use std::convert::Infallible;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use http::{Request, Response};
use tower::{Service, ServiceExt};

use crate::cli::parse_seconds;
use crate::connection::{Clock, Guarded, Watched};
use crate::shutdown;
use crate::stream_stall::StreamExecutor;
use crate::upstream_link::UpstreamLink;

/// The edge limits' flags.
#[derive(Debug, Clone, ClapArgs)]
pub(crate) struct EdgeArgs {
    /// Longest time a client may take to send a request head, in seconds,
    /// counted from the connection's opening or the head's first byte. Past
    /// it the connection is closed (with a 408 on HTTP/1); on HTTP/2 a new
    /// connection must open its first stream within it.
    #[arg(long, default_value = "10", value_parser = parse_seconds)]
    pub(crate) header_read_timeout: Duration,

    /// Longest time a request body may take to arrive, in seconds, counted
    /// from the end of its head (408 problem+json after it; no key is held).
    #[arg(long, default_value = "30", value_parser = parse_seconds)]
    pub(crate) body_read_timeout: Duration,

    /// How long a keep-alive connection may stay idle between requests, in
    /// seconds, before it is closed (HTTP/1 and HTTP/2).
    #[arg(long, default_value = "60", value_parser = parse_seconds)]
    pub(crate) idle_timeout: Duration,

    /// Most client connections held at once; connections past it are closed
    /// as soon as they are accepted (and counted in `connections_refused`).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) max_connections: u32,

    /// Most concurrent HTTP/2 streams (requests) on one connection; a client
    /// that opens more gets REFUSED_STREAM for them.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) http2_max_streams: u32,

    /// Longest time a client may take none of a response's bytes, in
    /// seconds, while the proxy has some to send: past it an HTTP/1
    /// connection is closed and its slot freed, an HTTP/2 stream is reset
    /// (the connection's other streams go on). The action's result is
    /// recorded all the same, as when a client disconnects.
    #[arg(long, default_value = "30", value_parser = parse_seconds)]
    pub(crate) response_write_timeout: Duration,
}

/// The time limits a connection's clock applies.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) header_read_timeout: Duration,
    pub(crate) idle_timeout: Duration,
    pub(crate) response_write_timeout: Duration,
}

/// What the limits did, for `/stats` and `/metrics`.
#[derive(Debug, Default)]
pub(crate) struct EdgeStats {
    /// Client connections open right now.
    pub(crate) connections: AtomicU64,
    /// Connections closed on accept because `--max-connections` were open.
    pub(crate) connections_refused: AtomicU64,
    /// Connections closed because a request head did not arrive in time.
    pub(crate) header_timeouts: AtomicU64,
    /// Requests refused (408) because their body did not arrive in time.
    pub(crate) body_timeouts: AtomicU64,
    /// Keep-alive connections closed for idling past `--idle-timeout`.
    pub(crate) idle_closed: AtomicU64,
    /// HTTP/1 connections closed, and HTTP/2 streams reset, because the
    /// client took no response bytes for `--response-write-timeout`.
    pub(crate) write_timeouts: AtomicU64,
    /// Access-log lines dropped because the writer was behind (the
    /// access log's counter, kept here with the other edge counters).
    pub(crate) access_log_dropped: Arc<AtomicU64>,
}

impl EdgeStats {
    pub(crate) fn incr(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// The service the edge serves (the proxy's stack), cloned per request.
pub(crate) trait App:
    Service<Request<Body>, Response = Response<Body>, Error = Infallible, Future: Send>
    + Clone
    + Send
    + Sync
    + 'static
{
}

impl<S> App for S where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible, Future: Send>
        + Clone
        + Send
        + Sync
        + 'static
{
}

/// Accepts connections on `listener` and serves `app` on each (HTTP/1, or
/// HTTP/2 with prior knowledge) under the edge limits, until `stop` turns
/// true; then stops accepting and lets the open connections finish.
pub(crate) async fn serve(
    listener: TcpListener,
    app: impl App,
    edge: &EdgeArgs,
    stats: Arc<EdgeStats>,
    stop: watch::Receiver<bool>,
) {
    let limits = Limits {
        header_read_timeout: edge.header_read_timeout,
        idle_timeout: edge.idle_timeout,
        response_write_timeout: edge.response_write_timeout,
    };
    let builder = http_builder(edge, Arc::clone(&stats));
    let slots = Arc::new(Semaphore::new(edge.max_connections as usize));
    let graceful = GracefulShutdown::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown::changed(stop.clone()) => break,
        };
        let (stream, remote) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors, most likely: wait for some to be
                // freed instead of spinning on the error.
                tracing::error!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            EdgeStats::incr(&stats.connections_refused);
            tracing::debug!(%remote, "connection refused: --max-connections reached");
            drop(stream);
            continue;
        };
        // Without TCP_NODELAY a response's last write waits for the ACK of
        // the one before (Nagle), which the client delays by 40 ms.
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%remote, %error, "TCP_NODELAY could not be set");
        }
        let clock = Clock::new(limits);
        // HTTP/1 requests of this connection share one upstream connection.
        let upstream = UpstreamLink::default();
        let io = TokioIo::new(Watched::new(stream, Arc::clone(&clock), Arc::clone(&stats)));
        let app = app.clone();
        let service = hyper::service::service_fn(move |mut request: http::Request<Incoming>| {
            let request_guard = clock.request_started();
            request.extensions_mut().insert(ConnectInfo(remote));
            if request.version() < http::Version::HTTP_2 {
                request.extensions_mut().insert(upstream.clone());
            }
            let answer = app.clone().oneshot(request.map(Body::new));
            async move {
                let response = answer.await?;
                Ok::<_, std::convert::Infallible>(
                    response.map(|body| Body::new(Guarded::new(body, request_guard))),
                )
            }
        });
        let connection = graceful.watch(builder.serve_connection(io, service).into_owned());
        let stats = Arc::clone(&stats);
        EdgeStats::incr(&stats.connections);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%remote, error = %e, "connection ended with an error");
            }
            // The slot first: once the gauge drops, a new connection fits.
            drop(slot);
            stats.connections.fetch_sub(1, Ordering::Relaxed);
        });
    }
    // No new connections from here on: the port refuses them.
    drop(listener);
    graceful.shutdown().await;
}

/// hyper's server for both protocols, with the limits hyper enforces itself.
fn http_builder(edge: &EdgeArgs, stats: Arc<EdgeStats>) -> auto::Builder<StreamExecutor> {
    // HTTP/2 streams run under a watch that resets one whose client stops
    // taking its response (stream_stall.rs).
    let mut builder = auto::Builder::new(StreamExecutor::new(edge.response_write_timeout, stats));
    // The connection's clock (connection.rs) times request heads and
    // answers 408; hyper's own timeout would also close idle keep-alive
    // connections at the header timeout.
    builder.http1().header_read_timeout(None);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(edge.http2_max_streams)
        // A busy HTTP/2 connection whose client stops answering PINGs is
        // dead: it is dropped rather than holding its streams.
        .keep_alive_interval(edge.header_read_timeout)
        .keep_alive_timeout(edge.header_read_timeout);
    builder
}
