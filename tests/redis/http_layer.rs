//! The HTTP layer on the Redis store: two servers sharing one Redis are two
//! instances of one service, and the fail mode answers for a Redis that is
//! down, until it comes back.
#![cfg(feature = "redis")]

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tokio::sync::Barrier;
use tower_idempotency::store::redis::RedisStore;
use tower_idempotency::{Concurrent, FailMode, IdempotencyLayer};

use crate::support::redis as support;

use support::{cleaned_prefix, free_port, prefix, redis_url, until_ok, OwnRedis, LIMIT};

/// A server with `layer` around an orders handler that counts its runs.
async fn serve(layer: IdempotencyLayer<RedisStore>, runs: Arc<AtomicUsize>) -> String {
    let handler = post(move |body: Bytes| {
        let runs = runs.clone();
        async move {
            let run = runs.fetch_add(1, SeqCst) + 1;
            // Hold the request a little so duplicates overlap on both
            // instances; no assertion depends on it.
            tokio::time::sleep(Duration::from_millis(50)).await;
            let body = String::from_utf8_lossy(&body).into_owned();
            (StatusCode::CREATED, format!("order {run}: {body}"))
        }
    });
    let app = Router::new().route("/orders", handler).layer(layer);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}/orders")
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// POSTs `body` with `key`: status, whether it was a replay, and the body.
async fn post_order(
    client: &HttpClient,
    url: &str,
    key: &str,
    body: &str,
) -> (StatusCode, bool, Bytes) {
    let request = Request::post(url)
        .header("idempotency-key", key)
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap();
    let response = tokio::time::timeout(LIMIT, client.request(request))
        .await
        .unwrap()
        .unwrap();
    let status = response.status();
    let replayed = response.headers().get("idempotent-replayed").is_some();
    let body = tokio::time::timeout(LIMIT, response.into_body().collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    (status, replayed, body)
}

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_servers_on_one_redis_run_a_retried_request_once() {
    let (prefix, _cleanup) = cleaned_prefix();
    let runs = Arc::new(AtomicUsize::new(0));
    let mut urls = Vec::new();
    let mut handles = Vec::new();
    for _ in 0..2 {
        let store = RedisStore::builder(redis_url())
            .prefix(&prefix)
            .build()
            .await
            .unwrap();
        let layer = IdempotencyLayer::builder()
            .store(store)
            .concurrent(Concurrent::Wait {
                timeout: Duration::from_secs(15),
            })
            .build()
            .unwrap();
        handles.push(layer.handle());
        urls.push(serve(layer, runs.clone()).await);
    }
    let client = client();
    let duplicates = 100;
    let barrier = Arc::new(Barrier::new(duplicates));
    let requests: Vec<_> = (0..duplicates)
        .map(|i| {
            let (client, url, barrier) = (client.clone(), urls[i % 2].clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                post_order(&client, &url, "order-key-1", r#"{"sku":"A1"}"#).await
            })
        })
        .collect();
    let mut fresh = 0;
    for request in requests {
        let (status, replayed, body) = tokio::time::timeout(LIMIT, request).await.unwrap().unwrap();
        assert_eq!(status, StatusCode::CREATED);
        assert_eq!(body, r#"order 1: {"sku":"A1"}"#);
        fresh += usize::from(!replayed);
    }
    assert_eq!(runs.load(SeqCst), 1);
    assert_eq!(fresh, 1, "exactly one response is the original");
    let executed: u64 = handles.iter().map(|h| h.stats().executed).sum();
    assert_eq!(executed, 1);
    handles[0].clear().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fail_mode_answers_while_redis_is_down_and_service_resumes_after() {
    let mut redis = OwnRedis::start(free_port()).await;
    let runs = Arc::new(AtomicUsize::new(0));
    let mut urls = Vec::new();
    let mut handles = Vec::new();
    for mode in [FailMode::Closed, FailMode::Open] {
        let store = RedisStore::builder(redis.url())
            .prefix(prefix())
            .build()
            .await
            .unwrap();
        let layer = IdempotencyLayer::builder()
            .store(store)
            .fail_mode(mode)
            .build()
            .unwrap();
        handles.push(layer.handle());
        urls.push(serve(layer, runs.clone()).await);
    }
    let [closed, open] = [&urls[0], &urls[1]];
    let client = client();

    redis.kill().await;
    let (status, _, body) = post_order(&client, closed, "k1", "{}").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let problem: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(problem["status"], 503);
    assert_eq!(runs.load(SeqCst), 0, "Closed runs nothing unprotected");
    for _ in 0..2 {
        let (status, replayed, _) = post_order(&client, open, "k1", "{}").await;
        assert_eq!((status, replayed), (StatusCode::CREATED, false));
    }
    assert_eq!(
        runs.load(SeqCst),
        2,
        "Open passes requests through unprotected"
    );
    assert!(handles[0].stats().store_errors >= 1);
    assert!(handles[1].stats().store_errors >= 2);

    // Redis returns: the same servers protect requests again.
    redis.restart().await;
    for handle in &handles {
        until_ok(|| handle.ping()).await;
    }
    for url in [closed, open] {
        let first = post_order(&client, url, "k2", "{}").await;
        let again = post_order(&client, url, "k2", "{}").await;
        assert_eq!((first.0, first.1), (StatusCode::CREATED, false));
        assert_eq!((again.0, again.1), (StatusCode::CREATED, true));
        assert_eq!(first.2, again.2);
    }
    assert_eq!(runs.load(SeqCst), 4);
}
