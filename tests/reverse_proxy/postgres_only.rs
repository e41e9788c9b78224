//! What a proxy on Postgres does: a retry replays, from the same proxy or
//! another on the same table, and a database that does not answer is a 503.

use http::{Method, StatusCode};

use super::harness::Proxy;
use super::postgres_support::{database_url, random_table, DropTables};
use super::upstream::{dead_url, Upstream};

#[tokio::test]
async fn a_retry_through_proxies_on_one_postgres_table_replays() {
    let table = random_table("proxy");
    let _cleanup = DropTables::new(&table);
    let upstream = Upstream::start().await;
    let url = database_url();
    let args = [
        "--upstream",
        &upstream.url,
        "--postgres",
        &url,
        "--postgres-table",
        &table,
    ];
    let first = Proxy::start(&args).await;
    let second = Proxy::start(&args).await;

    let sent = first
        .send(Method::POST, "/orders", Some("pg-1"), "{}")
        .await;
    assert_eq!(sent.status, StatusCode::CREATED);
    assert!(!sent.replayed());
    let retried = first
        .send(Method::POST, "/orders", Some("pg-1"), "{}")
        .await;
    assert!(retried.replayed(), "the retry replays");
    assert_eq!(retried.body, sent.body);
    let elsewhere = second
        .send(Method::POST, "/orders", Some("pg-1"), "{}")
        .await;
    assert!(elsewhere.replayed(), "the other instance replays");
    assert_eq!(elsewhere.body, sent.body);
    assert_eq!(upstream.executions(), 1);
}

#[tokio::test]
async fn postgres_down_is_503_and_unhealthy() {
    let upstream = Upstream::start().await;
    let dead = dead_url().await.replace("http://", "postgres://postgres@");
    let proxy = Proxy::start(&["--upstream", &upstream.url, "--postgres", &dead]).await;

    let reply = proxy
        .send(Method::POST, "/orders", Some("pg-down"), "{}")
        .await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.headers["retry-after"], "1");
    assert_eq!(upstream.executions(), 0, "nothing ran unprotected");
    let (status, _) = proxy.admin_json("/healthz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
}
