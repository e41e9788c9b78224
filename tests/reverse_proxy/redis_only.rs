//! What only a proxy on Redis does: survive a Redis that is down (503, or
//! pass-through with --fail-open, and an unhealthy /healthz either way) and
//! share keys between instances.

use http::{Method, StatusCode};

use super::harness::Proxy;
use super::redis_answers;
use super::store_args;
use super::upstream::{dead_url, Upstream};

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
        "Redis does not answer on {}: start it (bash .ci/run does)",
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
