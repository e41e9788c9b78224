//! The `reverse_proxy` example, run for real: the built binary in front of a
//! real upstream server, over loopback (the test binary `reverse_proxy`).

#[path = "../support/mod.rs"]
mod support;

// The `grpc_orders` example's generated code, where its service (run as
// the upstream of `grpc`) finds it: `crate::orders`.
#[path = "../../examples/grpc_orders/orders.rs"]
#[allow(unreachable_pub, dead_code)]
#[rustfmt::skip]
mod orders;
#[path = "../support/grpc.rs"]
mod grpc_support;
#[path = "../../examples/grpc_orders/service.rs"]
mod service;

mod admin;
#[cfg(feature = "cluster-tests")]
mod cluster;
#[cfg(feature = "cluster-tests")]
use crate::support::stores::cluster as cluster_support;
mod config;
mod edge;
mod grpc;
mod harness;
mod hostile;
mod http2;
mod idempotency;
#[cfg(feature = "browser-tests")]
mod page;
#[cfg(feature = "postgres")]
mod postgres_only;
#[cfg(feature = "postgres")]
use crate::support::stores::postgres as postgres_support;
#[cfg(feature = "redis")]
mod redis_only;
mod unclear;
mod upstream;
mod upstream_link;

use std::time::Duration;

use http::{Method, StatusCode};
use serde_json::Value;
use tokio::time::timeout;

use harness::{send, send_with, spawn, Proxy, Reply, QUICK};
use upstream::{dead_url, Upstream};

/// The flags that put the proxy on Redis under a prefix of its own, or none
/// for the embedded store.
pub(crate) fn store_args(redis: bool) -> Vec<String> {
    if !redis {
        return Vec::new();
    }
    let prefix = format!("test-proxy-{:016x}:", rand::random::<u64>());
    // A short TTL: what a test leaves in the shared Redis goes soon.
    vec![
        "--redis".into(),
        redis_url(),
        "--redis-prefix".into(),
        prefix,
        "--ttl".into(),
        "300".into(),
    ]
}

/// `REDIS_URL`, or the Redis on 127.0.0.1:6379.
pub(crate) fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// Whether the Redis on [`redis_url`] answers a PING.
#[cfg(feature = "redis")]
pub(crate) async fn redis_answers() -> bool {
    let ping = async {
        let client = ::redis::Client::open(redis_url()).ok()?;
        let mut connection = client.get_multiplexed_async_connection().await.ok()?;
        let answer: String = ::redis::cmd("PING")
            .query_async(&mut connection)
            .await
            .ok()?;
        Some(answer == "PONG")
    };
    matches!(timeout(Duration::from_secs(2), ping).await, Ok(Some(true)))
}

/// Each behaviour of `idempotency`, `unclear` and `grpc` (`module::function`) as a
/// test on the embedded store and, with feature `redis`, one on Redis.
macro_rules! on_every_store {
    ($($module:ident :: $name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test]
                async fn $name() {
                    crate::$module::$name(false).await;
                }
            )*
        }
        #[cfg(feature = "redis")]
        mod redis {
            $(
                #[tokio::test]
                async fn $name() {
                    assert!(
        crate::redis_answers().await,
        "Redis does not answer on {}: start it (.ci/test does)",
        crate::redis_url()
    );
                    crate::$module::$name(true).await;
                }
            )*
        }
    };
}

on_every_store!(
    idempotency::retry_is_replayed_and_runs_upstream_once,
    idempotency::duplicate_in_flight_is_409_under_reject,
    idempotency::duplicate_in_flight_is_coalesced_under_wait,
    idempotency::changed_body_is_422,
    idempotency::body_over_max_body_is_413,
    idempotency::server_errors_are_not_stored,
    idempotency::upstream_down_is_502_and_not_stored,
    idempotency::large_response_is_passed_through_not_stored,
    idempotency::require_key_refuses_keyless_posts,
    idempotency::admin_reports_a_known_sequence,
    unclear::unclear_slow_upstream_runs_once_and_its_answer_is_replayed,
    unclear::unclear_slow_upstream_answers_a_waiting_duplicate,
    unclear::unclear_exchange_past_upstream_abandon_holds_the_key,
    unclear::unclear_reset_after_the_request_runs_once_and_holds_the_key,
    unclear::unclear_body_cut_off_after_its_head_runs_once_and_holds_the_key,
    unclear::unclear_oversized_answer_runs_once_and_its_head_is_replayed,
    unclear::unclear_connect_error_is_502_and_frees_the_key,
    grpc::grpc_retried_call_runs_once_and_replays_message_status_and_trailers,
    grpc::grpc_refused_call_replays_its_status_and_metadata,
    grpc::grpc_hedged_pair_under_wait_runs_once,
    grpc::grpc_missing_key_is_invalid_argument_with_require_key,
    grpc::grpc_upstream_timeout_is_deadline_exceeded_and_a_late_retry_gets_the_answer,
    grpc::grpc_and_http1_clients_share_the_proxy,
);

/// Polls `check` until it holds; every try is a real request, the whole wait
/// is bounded.
pub(crate) async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let waited = timeout(QUICK, async {
        while !check().await {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "timed out waiting until {what}");
}

/// A first POST of `key` held by the upstream's slow route, and a duplicate
/// sent once it is there; once the proxy counts the duplicate waiting, the
/// first is let go. Answers the first's reply and the duplicate's.
pub(crate) async fn first_and_waiting_duplicate(
    proxy: &Proxy,
    upstream: &Upstream,
    key: &'static str,
) -> (Reply, Reply) {
    let url = format!("{}/slow", proxy.url);
    let first = {
        let url = url.clone();
        tokio::spawn(async move { send(Method::POST, &url, Some(key), "{}").await })
    };
    upstream.entered().await;
    let duplicate = tokio::spawn(async move { send(Method::POST, &url, Some(key), "{}").await });
    let admin = proxy.admin.clone();
    eventually("the duplicate waits on the first", || {
        let admin = admin.clone();
        async move {
            let stats = send(Method::GET, &format!("{admin}/stats"), None, "")
                .await
                .json();
            stats["waiting"] == 1
        }
    })
    .await;
    upstream.release(1);
    let first = timeout(QUICK, first).await.unwrap().unwrap();
    let duplicate = timeout(QUICK, duplicate).await.unwrap().unwrap();
    (first, duplicate)
}

#[tokio::test]
async fn forwards_method_path_query_headers_and_body() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(&["--upstream", &upstream.url]).await;

    let reply = send_with(
        Method::PUT,
        &format!("{}/echo/a/b?x=1&y=two", proxy.url),
        &[
            ("x-custom", "kept"),
            ("x-forwarded-for", "10.0.0.1"),
            ("connection", "x-hop"),
            ("x-hop", "connection-scoped"),
        ],
        r#"{"hello":"world"}"#,
    )
    .await;

    assert_eq!(reply.status, StatusCode::OK);
    let seen = reply.json();
    assert_eq!(seen["method"], "PUT");
    assert_eq!(seen["uri"], "/echo/a/b?x=1&y=two");
    assert_eq!(seen["body"], r#"{"hello":"world"}"#);
    let headers = &seen["headers"];
    assert_eq!(headers["x-custom"], "kept");
    assert_eq!(headers["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
    assert_eq!(headers["x-forwarded-proto"], "http");
    let proxy_host = proxy.url.trim_start_matches("http://");
    assert_eq!(headers["x-forwarded-host"], proxy_host);
    assert_eq!(
        headers["host"],
        upstream.url.trim_start_matches("http://"),
        "the upstream sees its own host"
    );
    assert!(
        headers.get("x-hop").is_none(),
        "hop-by-hop header forwarded"
    );
    assert_eq!(upstream.executions(), 0, "/echo counts nothing");
    let request_id = headers["x-request-id"].as_str().expect("a request id");
    assert_eq!(
        reply.headers["x-request-id"], request_id,
        "the client sees the request id the upstream saw"
    );
}

#[tokio::test]
async fn upstream_down_is_502_problem() {
    let dead = dead_url().await;
    let proxy = Proxy::start(&["--upstream", &dead]).await;
    let reply = proxy.send(Method::POST, "/orders", None, "{}").await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    assert_eq!(reply.content_type(), "application/problem+json");
    assert_eq!(reply.json()["status"], 502);
}

#[tokio::test]
async fn upstream_timeout_is_504_problem() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(&["--upstream", &upstream.url, "--upstream-timeout", "0.3"]).await;
    let reply = proxy.send(Method::POST, "/hang", None, "{}").await;
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
    assert!(!reply.replayed());
    assert_eq!(reply.content_type(), "application/problem+json");
    assert_eq!(reply.json()["status"], 504);
}

#[tokio::test]
async fn admin_answers_health_stats_and_metrics() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(&["--upstream", &upstream.url, "--max-entries", "500"]).await;

    let (status, health) = proxy.admin_json("/healthz").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(health["status"], "ok");

    let stats = proxy.stats().await;
    let fields = [
        "requests",
        "executed",
        "replayed",
        "coalesced",
        "conflicts",
        "mismatches",
        "rejected_keys",
        "too_large",
        "not_stored",
        "omitted",
        "ambiguous",
        "store_errors",
        "expired",
        "evicted",
        "duplicates_prevented",
        "hit_rate",
        "entries",
        "max_entries",
        "weighted_bytes",
        "utilization_percent",
    ];
    let object = stats.as_object().expect("one flat object");
    for field in fields {
        assert!(
            object.get(field).is_some_and(Value::is_number),
            "{field} in {stats}"
        );
    }
    assert!(
        object.values().all(Value::is_number),
        "numbers only: {stats}"
    );
    assert_eq!(stats["max_entries"], 500);

    let metrics = send(Method::GET, &format!("{}/metrics", proxy.admin), None, "").await;
    assert_eq!(metrics.status, StatusCode::OK);
    let text = String::from_utf8(metrics.body.to_vec()).unwrap();
    for line in [
        "# HELP idempotency_requests ",
        "# TYPE idempotency_requests counter",
        "idempotency_requests_total 0",
        "# TYPE idempotency_duplicates_prevented counter",
        "# TYPE idempotency_cache_entries gauge",
        "idempotency_cache_max_entries 500",
    ] {
        assert!(text.contains(line), "{line:?} missing from:\n{text}");
    }
}

#[tokio::test]
async fn sigterm_drains_an_in_flight_request_and_exits_0() {
    let upstream = Upstream::start().await;
    let mut proxy = Proxy::start(&["--upstream", &upstream.url]).await;

    let url = format!("{}/slow", proxy.url);
    let in_flight = tokio::spawn(async move { send(Method::POST, &url, None, "{}").await });
    upstream.entered().await;

    proxy.terminate();
    // While draining, the admin server says so and the proxy takes no new
    // connections.
    let admin = proxy.admin.clone();
    eventually("/healthz answers 503", || {
        let admin = admin.clone();
        async move {
            let reply = send(Method::GET, &format!("{admin}/healthz"), None, "").await;
            reply.status == StatusCode::SERVICE_UNAVAILABLE
        }
    })
    .await;
    let addr = proxy.url.trim_start_matches("http://").to_owned();
    eventually("the proxy refuses new connections", || {
        let addr = addr.clone();
        async move { tokio::net::TcpStream::connect(addr).await.is_err() }
    })
    .await;

    upstream.release(1);
    let reply = timeout(QUICK, in_flight).await.unwrap().unwrap();
    assert_eq!(reply.status, StatusCode::CREATED);
    assert_eq!(reply.json()["executions"], 1);
    assert_eq!(proxy.exit_code().await, Some(0));
}

#[tokio::test]
async fn drain_timeout_bounds_the_shutdown() {
    let upstream = Upstream::start().await;
    let mut proxy = Proxy::start(&["--upstream", &upstream.url, "--drain-timeout", "0.3"]).await;
    let url = format!("{}/slow", proxy.url);
    let in_flight = tokio::spawn(async move { send(Method::POST, &url, None, "{}").await });
    upstream.entered().await;

    proxy.terminate();
    // The upstream never answers; the proxy still exits, and exits cleanly.
    assert_eq!(proxy.exit_code().await, Some(0));
    in_flight.abort();
}

#[tokio::test]
async fn bad_flags_are_refused_at_start_up() {
    for args in [
        &["--ttl", "0"][..],
        &["--lease-ttl", "-1"],
        &["--upstream", "https://example.com"],
        &["--concurrent", "sometimes"],
        &["--max-entries", "0"],
        &["--header-read-timeout", "0"],
        &["--body-read-timeout", "soon"],
        &["--max-connections", "0"],
        &["--http2-max-streams", "0"],
        &["--upstream-http2"],
        &["--replay-header", "not a name"],
    ] {
        let (mut child, ready, _log) = spawn(args).await;
        assert!(ready.is_none(), "{args:?} was accepted");
        let status = timeout(QUICK, child.wait()).await.unwrap().unwrap();
        assert_eq!(status.code(), Some(2), "{args:?}: clap's usage error");
    }
}

#[tokio::test]
async fn a_zero_lease_ttl_is_refused_with_its_reason() {
    // Zero passes the number parsing that refuses `-1`: this is the check
    // that a lease must last.
    let (mut child, ready, log) = spawn(&["--lease-ttl", "0"]).await;
    assert!(ready.is_none(), "--lease-ttl 0 was accepted");
    let status = timeout(QUICK, child.wait()).await.unwrap().unwrap();
    assert_eq!(status.code(), Some(2));
    eventually("the error says why", || {
        let log = log.clone();
        async move {
            let log = log.lock().unwrap();
            log.contains("--lease-ttl") && log.contains("greater than zero")
        }
    })
    .await;
}

#[tokio::test]
async fn the_demo_upstream_serves_orders() {
    let proxy = Proxy::start(&[]).await;
    let first = proxy.send(Method::POST, "/orders", None, "{}").await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(first.json()["executions"], 1);
    let second = proxy.send(Method::POST, "/orders", None, "{}").await;
    assert_eq!(second.json()["executions"], 2, "no key: not protected");
}

#[cfg(not(feature = "redis"))]
#[tokio::test]
async fn redis_flag_without_the_feature_is_refused() {
    let (mut child, ready, log) = spawn(&["--redis", &redis_url()]).await;
    assert!(ready.is_none());
    let status = timeout(QUICK, child.wait()).await.unwrap().unwrap();
    assert_eq!(status.code(), Some(1));
    // The reader task may still be copying the last bytes of stderr.
    eventually("the error names the feature", || {
        let log = log.clone();
        async move { log.lock().unwrap().contains("--features redis") }
    })
    .await;
}
