//! What only a proxy on Redis does: survive a Redis that is down (503, or
//! pass-through with --fail-open, and an unhealthy /healthz either way),
//! share keys between instances, and leave them to a later instance across
//! a shutdown.

use http::{Method, StatusCode};
use tokio::time::timeout;

use super::harness::{send, Proxy, QUICK};
use super::upstream::{dead_url, Upstream};
use super::{eventually, redis_answers, redis_url, store_args};

#[tokio::test]
async fn redis_down_is_503_and_unhealthy() {
    let upstream = Upstream::start().await;
    let dead = dead_url().await.replace("http://", "redis://");
    let proxy = Proxy::start(&["--upstream", &upstream.url, "--redis", &dead]).await;

    let reply = proxy
        .send(Method::POST, "/orders", Some("k-down"), "{}")
        .await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.content_type(), "application/problem+json");
    assert_eq!(reply.headers["retry-after"], "1");
    assert_eq!(
        upstream.executions(),
        0,
        "fail closed: nothing ran unprotected"
    );
    let (status, health) = proxy.admin_json("/healthz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(health["status"], "store_unavailable");
    let stats = proxy.stats().await;
    // One request hit the dead store; the admin scrapes do not count.
    assert_eq!(stats["store_errors"], 1, "{stats}");
    assert_eq!(stats["store_up"], 0);
}

#[tokio::test]
async fn redis_down_with_fail_open_passes_through_but_is_unhealthy() {
    let upstream = Upstream::start().await;
    let dead = dead_url().await.replace("http://", "redis://");
    let proxy = Proxy::start(&["--upstream", &upstream.url, "--redis", &dead, "--fail-open"]).await;

    for n in 1..=2 {
        let reply = proxy
            .send(Method::POST, "/orders", Some("k-open"), "{}")
            .await;
        assert_eq!(reply.status, StatusCode::CREATED);
        assert!(!reply.replayed());
        assert_eq!(
            upstream.executions(),
            n,
            "unprotected while the store is down"
        );
    }
    let (status, _) = proxy.admin_json("/healthz").await;
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "even with --fail-open"
    );
    assert_eq!(proxy.stats().await["store_errors"], 2);
}

#[tokio::test]
async fn two_proxies_with_one_redis_prefix_share_keys() {
    assert!(
        redis_answers().await,
        "Redis does not answer on {}: start it (.ci/test does)",
        super::redis_url()
    );
    let upstream = Upstream::start().await;
    let store = store_args(true);
    let mut args = vec!["--upstream", upstream.url.as_str()];
    args.extend(store.iter().map(String::as_str));
    let first = Proxy::start(&args).await;
    let second = Proxy::start(&args).await;

    let sent = first
        .send(Method::POST, "/orders", Some("shared-1"), "{}")
        .await;
    assert_eq!(sent.status, StatusCode::CREATED);
    let retried = second
        .send(Method::POST, "/orders", Some("shared-1"), "{}")
        .await;
    assert!(retried.replayed(), "the other instance replays");
    assert_eq!(retried.body, sent.body);
    assert_eq!(upstream.executions(), 1);
}

/// A proxy on Redis under a fresh prefix, with `extra` flags, and the flags
/// a second instance on the same keys needs.
fn shared_args(upstream: &Upstream, extra: &[&str]) -> Vec<String> {
    let mut args = vec!["--upstream".to_owned(), upstream.url.clone()];
    args.extend(store_args(true));
    args.extend(extra.iter().map(|arg| (*arg).to_owned()));
    args
}

/// POSTs `{}` to `path` with `key` on a task, whatever becomes of it (the
/// proxy may exit under it).
fn post_in_background(url: String, key: &'static str) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let request = http::Request::post(url)
            .header("idempotency-key", key)
            .body(http_body_util::Full::new(bytes::Bytes::from_static(b"{}")))
            .unwrap();
        let client: hyper_util::client::legacy::Client<_, _> =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http();
        let _ = tokio::time::timeout(QUICK, client.request(request)).await;
    })
}

#[tokio::test]
async fn shutdown_drains_a_background_exchange_and_records_it() {
    assert!(
        redis_answers().await,
        "Redis does not answer on {}",
        redis_url()
    );
    let upstream = Upstream::start().await;
    let args = shared_args(
        &upstream,
        &["--upstream-timeout", "1", "--lease-ttl", "120"],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut first = Proxy::start(&args).await;

    let timed_out = first
        .send(Method::POST, "/slow", Some("drain-1"), "{}")
        .await;
    upstream.entered().await;
    assert_eq!(timed_out.status, StatusCode::GATEWAY_TIMEOUT);
    first.terminate();
    let admin = first.admin.clone();
    eventually("the proxy drains", || {
        let admin = admin.clone();
        async move {
            let reply = send(Method::GET, &format!("{admin}/healthz"), None, "").await;
            reply.status == StatusCode::SERVICE_UNAVAILABLE
        }
    })
    .await;
    // The client is gone; the drain still waits for its exchange.
    upstream.release(1);
    assert_eq!(first.exit_code().await, Some(0));

    let second = Proxy::start(&args).await;
    let retry = second
        .send(Method::POST, "/slow", Some("drain-1"), "{}")
        .await;
    assert!(retry.replayed(), "{retry:?}");
    assert_eq!(retry.json()["executions"], 1);
    assert_eq!(upstream.executions(), 1);
}

#[tokio::test]
async fn shutdown_leaves_a_running_exchange_to_its_marker() {
    assert!(
        redis_answers().await,
        "Redis does not answer on {}",
        redis_url()
    );
    let upstream = Upstream::start().await;
    let args = shared_args(&upstream, &["--drain-timeout", "0.3", "--lease-ttl", "120"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut first = Proxy::start(&args).await;

    let in_flight = post_in_background(format!("{}/slow", first.url), "drain-2");
    upstream.entered().await;
    first.terminate();
    assert_eq!(first.exit_code().await, Some(0));
    let _ = timeout(QUICK, in_flight).await;

    let second = Proxy::start(&args).await;
    let retry = second
        .send(Method::POST, "/slow", Some("drain-2"), "{}")
        .await;
    assert_eq!(
        retry.status,
        StatusCode::CONFLICT,
        "the key is left to its marker, not freed: {retry:?}"
    );
    assert_eq!(upstream.executions(), 1);
    upstream.release(1);
}
