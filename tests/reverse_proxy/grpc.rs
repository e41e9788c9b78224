//! gRPC through the proxy (`--upstream-http2`): a real tonic client calls
//! the proxy, which forwards in HTTP/2 with prior knowledge to a real tonic
//! server running the `grpc_orders` example's service with no layer of its
//! own. A retried call runs once and replays its message, status and
//! trailers; a refused call replays; a hedged pair under `--concurrent wait`
//! runs once; the proxy's own answers (a missing key, an upstream slower
//! than `--upstream-timeout`, an unreachable upstream) are gRPC statuses;
//! and a plain HTTP/1.1 client still works through the same proxy. Each
//! behaviour runs on the embedded store and on Redis (`on_every_store!`).

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;

use axum::routing::post;
use http::{Method, StatusCode};
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic::Code;
use tower::util::MapResponseLayer;

use super::eventually;
use super::harness::{send, Proxy};
use super::idempotency::proxy;
use super::upstream::dead_url;
use crate::grpc_support::{create, entries, replayed, Client, Gated, REPLAYED, STAMP};
use crate::orders::orders_client::OrdersClient;
use crate::orders::orders_server::OrdersServer;
use crate::service::{OrdersService, SetIdempotencyKey, REJECTED_FIELD, STREAMING_PATHS};
use crate::support::common::{within, Gate};

/// The proxy's `x-request-id` is made anew for each answer, replays too.
const FRESH: &[&str] = &["x-request-id"];

/// The upstream: the orders service over HTTP/2 (and HTTP/1.1), with
/// [`STAMP`] trailers, and a plain `POST /orders` for HTTP/1.1 clients
/// (`201 {"executions": n}`).
struct GrpcUpstream {
    url: String,
    orders: OrdersService,
    plain_runs: Arc<AtomicU64>,
    server: JoinHandle<()>,
}

impl Drop for GrpcUpstream {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl GrpcUpstream {
    async fn start(gate: Option<Gate>) -> GrpcUpstream {
        let orders = OrdersService::default();
        let plain_runs = Arc::new(AtomicU64::new(0));
        let stamps = Arc::new(AtomicU64::new(0));
        let stamp = MapResponseLayer::new(move |response: http::Response<axum::body::Body>| {
            let n = stamps.fetch_add(1, SeqCst) + 1;
            response.map(|body| {
                axum::body::Body::new(body.map_frame(move |mut frame| {
                    if let Some(trailers) = frame.trailers_mut() {
                        trailers.insert(STAMP, n.into());
                    }
                    frame
                }))
            })
        });
        let runs = Arc::clone(&plain_runs);
        let router = tonic::service::Routes::new(OrdersServer::new(Gated {
            orders: orders.clone(),
            gate,
        }))
        .into_axum_router()
        .route(
            "/orders",
            post(move || {
                let n = runs.fetch_add(1, SeqCst) + 1;
                async move {
                    (
                        StatusCode::CREATED,
                        axum::Json(serde_json::json!({ "executions": n })),
                    )
                }
            }),
        )
        .layer(stamp);
        let listener = within(TcpListener::bind("127.0.0.1:0")).await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let service = TowerToHyperService::new(router.clone());
                tokio::spawn(async move {
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        GrpcUpstream {
            url,
            orders,
            plain_runs,
            server,
        }
    }
}

/// The proxy in front of `upstream` in HTTP/2, the example's streaming
/// method listed, with `args` besides.
async fn grpc_proxy(upstream: &GrpcUpstream, redis: bool, args: &[&str]) -> Proxy {
    let mut all = vec![
        "--upstream-http2",
        "--grpc-streaming-path",
        STREAMING_PATHS[0],
    ];
    all.extend_from_slice(args);
    proxy(&upstream.url, redis, &all).await
}

/// A tonic client of the proxy (HTTP/2 with prior knowledge).
async fn client(proxy: &Proxy) -> Client {
    let channel = Channel::from_shared(proxy.url.clone()).unwrap();
    let channel = within(channel.connect()).await.unwrap();
    OrdersClient::with_interceptor(channel, SetIdempotencyKey)
}

pub(crate) async fn grpc_retried_call_runs_once_and_replays_message_status_and_trailers(
    redis: bool,
) {
    let upstream = GrpcUpstream::start(None).await;
    let proxy = grpc_proxy(&upstream, redis, &[]).await;
    let client = client(&proxy).await;

    let first = create(&client, Some("order-1"), "book", 2).await.unwrap();
    let retry = create(&client, Some("order-1"), "book", 2).await.unwrap();

    assert_eq!(upstream.orders.executions(), 1, "the retry did not run");
    assert_eq!(first.get_ref(), retry.get_ref(), "the same message");
    assert_eq!(first.get_ref().executions, 1);
    assert!(!replayed(first.metadata()));
    assert!(replayed(retry.metadata()));
    assert_eq!(
        first.metadata().get(STAMP).expect("the upstream's trailer"),
        "1"
    );
    assert_eq!(
        entries(first.metadata(), FRESH),
        entries(retry.metadata(), FRESH),
        "the same headers and trailers"
    );

    let other = create(&client, Some("order-2"), "book", 2).await.unwrap();
    assert!(!replayed(other.metadata()));
    assert_eq!(other.metadata().get(STAMP).unwrap(), "2");
    assert_eq!(upstream.orders.executions(), 2);
    let stats = proxy.stats().await;
    assert_eq!(
        (stats["executed"].as_u64(), stats["replayed"].as_u64()),
        (Some(2), Some(1))
    );
}

pub(crate) async fn grpc_refused_call_replays_its_status_and_metadata(redis: bool) {
    let upstream = GrpcUpstream::start(None).await;
    let proxy = grpc_proxy(&upstream, redis, &[]).await;
    let client = client(&proxy).await;

    let first = create(&client, Some("zero-1"), "pen", 0).await.unwrap_err();
    let retry = create(&client, Some("zero-1"), "pen", 0).await.unwrap_err();

    assert_eq!(upstream.orders.executions(), 1, "the retry did not run");
    assert_eq!(first.code(), Code::FailedPrecondition, "{first:?}");
    assert_eq!(retry.code(), Code::FailedPrecondition, "{retry:?}");
    assert!(first.message().contains("quantity must be at least 1"));
    assert_eq!(first.message(), retry.message());
    assert_eq!(first.metadata().get(REJECTED_FIELD).unwrap(), "quantity");
    assert!(!replayed(first.metadata()));
    assert!(replayed(retry.metadata()));
    assert_eq!(
        entries(first.metadata(), FRESH),
        entries(retry.metadata(), FRESH)
    );
}

pub(crate) async fn grpc_hedged_pair_under_wait_runs_once(redis: bool) {
    let gate = Gate::default();
    let upstream = GrpcUpstream::start(Some(gate.clone())).await;
    let proxy = grpc_proxy(&upstream, redis, &["--concurrent", "wait"]).await;
    let client = client(&proxy).await;

    let call = || {
        let client = client.clone();
        tokio::spawn(async move { create(&client, Some("hedged"), "lamp", 1).await })
    };
    let first = call();
    gate.entered(1).await;
    let second = call();
    let admin = proxy.admin.clone();
    eventually("the hedged call waits on the first", || {
        let admin = admin.clone();
        async move {
            let stats = send(Method::GET, &format!("{admin}/stats"), None, "").await;
            stats.json()["waiting"] == 1
        }
    })
    .await;
    gate.open(1);
    let first = within(first).await.unwrap().unwrap();
    let second = within(second).await.unwrap().unwrap();

    assert_eq!(upstream.orders.executions(), 1);
    assert_eq!(first.get_ref(), second.get_ref());
    assert!(!replayed(first.metadata()));
    assert!(replayed(second.metadata()), "handed the first's answer");
    assert_eq!(first.metadata().get(STAMP), second.metadata().get(STAMP));
    assert_eq!(proxy.stats().await["coalesced"], 1);
}

pub(crate) async fn grpc_missing_key_is_invalid_argument_with_require_key(redis: bool) {
    let upstream = GrpcUpstream::start(None).await;
    let proxy = grpc_proxy(&upstream, redis, &["--require-key"]).await;
    let client = client(&proxy).await;

    let missing = create(&client, None, "book", 1).await.unwrap_err();

    assert_eq!(missing.code(), Code::InvalidArgument, "{missing:?}");
    assert!(!missing.message().is_empty());
    assert_eq!(upstream.orders.executions(), 0, "not forwarded");
}

pub(crate) async fn grpc_upstream_timeout_is_deadline_exceeded_and_a_late_retry_gets_the_answer(
    redis: bool,
) {
    let gate = Gate::default();
    let upstream = GrpcUpstream::start(Some(gate.clone())).await;
    let args = [
        "--upstream-timeout",
        "0.5",
        "--lease-ttl",
        "120",
        "--concurrent",
        "wait",
    ];
    let proxy = grpc_proxy(&upstream, redis, &args).await;
    let client = client(&proxy).await;

    let first = create(&client, Some("slow-1"), "desk", 1)
        .await
        .unwrap_err();
    gate.entered(1).await;
    assert_eq!(first.code(), Code::DeadlineExceeded, "{first:?}");
    assert!(first.message().contains("not known"), "{first:?}");
    assert!(
        first.message().contains("same Idempotency-Key"),
        "{first:?}"
    );

    // The upstream finishes in the background; the retry gets its answer
    // (waiting for it if it is not recorded yet).
    gate.open(1);
    let late = create(&client, Some("slow-1"), "desk", 1).await.unwrap();
    assert!(replayed(late.metadata()));
    assert_eq!(late.get_ref().executions, 1, "the upstream's own answer");
    assert_eq!(late.metadata().get(STAMP).unwrap(), "1");
    assert_eq!(upstream.orders.executions(), 1);
}

pub(crate) async fn grpc_and_http1_clients_share_the_proxy(redis: bool) {
    let upstream = GrpcUpstream::start(None).await;
    let proxy = grpc_proxy(&upstream, redis, &[]).await;
    let client = client(&proxy).await;

    create(&client, Some("grpc-1"), "book", 1).await.unwrap();
    let first = proxy
        .send(Method::POST, "/orders", Some("plain-1"), "{}")
        .await;
    let retry = proxy
        .send(Method::POST, "/orders", Some("plain-1"), "{}")
        .await;

    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(first.json()["executions"], 1);
    assert!(!first.replayed());
    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(retry.replayed());
    assert_eq!(retry.body, first.body);
    assert_eq!(upstream.plain_runs.load(SeqCst), 1);
    assert_eq!(upstream.orders.executions(), 1);
}

/// An upstream that cannot be reached: `UNAVAILABLE`, saying nothing was
/// sent, and the key is free (the retry meets no marker).
#[tokio::test]
async fn grpc_unreachable_upstream_is_unavailable() {
    let dead = dead_url().await;
    let proxy = Proxy::start(&["--upstream", &dead, "--upstream-http2"]).await;
    let client = client(&proxy).await;

    for _ in 0..2 {
        let status = create(&client, Some("order-1"), "book", 1)
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(status.message().contains("nothing was sent"), "{status:?}");
    }
    assert_eq!(proxy.stats().await["conflicts"], 0);
}

/// `--replay-header idempotency-replayed` names the marker on HTTP replays,
/// in gRPC metadata, and in the request log.
#[tokio::test]
async fn replay_header_flag_names_the_replay_marker() {
    let upstream = GrpcUpstream::start(None).await;
    let proxy = grpc_proxy(
        &upstream,
        false,
        &["--replay-header", "idempotency-replayed"],
    )
    .await;
    let client = client(&proxy).await;

    proxy
        .send(Method::POST, "/orders", Some("plain-1"), "{}")
        .await;
    let retry = proxy
        .send(Method::POST, "/orders", Some("plain-1"), "{}")
        .await;
    assert_eq!(retry.headers["idempotency-replayed"], "true");
    assert!(retry.headers.get(REPLAYED).is_none());

    create(&client, Some("grpc-1"), "book", 1).await.unwrap();
    let grpc_retry = create(&client, Some("grpc-1"), "book", 1).await.unwrap();
    assert_eq!(
        grpc_retry.metadata().get("idempotency-replayed").unwrap(),
        "true"
    );
    assert!(grpc_retry.metadata().get(REPLAYED).is_none());
    assert_eq!(upstream.orders.executions(), 1);

    eventually("the request log reports the replays", || {
        let log = proxy.log_text();
        async move { log.matches("replayed=true").count() >= 2 }
    })
    .await;
}
