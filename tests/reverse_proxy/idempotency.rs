//! What the idempotency layer in the proxy does, seen from a client, with the
//! upstream counting what really ran. Every test runs on the embedded store
//! and, when Redis answers on `REDIS_URL` (default 127.0.0.1:6379) and the `redis` feature is on,
//! again with `--redis` under a fresh prefix.

use http::{Method, StatusCode};
use serde_json::Value;
use tokio::time::timeout;

use super::harness::{send, url_encode, Proxy, QUICK};
use super::upstream::{dead_url, Upstream};
use super::{first_and_waiting_duplicate, store_args};

/// Starts a proxy in front of `upstream` with `args`, on the store `redis` picks.
pub(crate) async fn proxy(upstream: &str, redis: bool, args: &[&str]) -> Proxy {
    let mut all: Vec<String> = vec!["--upstream".into(), upstream.into()];
    all.extend(store_args(redis));
    all.extend(args.iter().map(|arg| (*arg).to_owned()));
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    Proxy::start_with_token(&all).await
}

pub(crate) async fn retry_is_replayed_and_runs_upstream_once(redis: bool) {
    let upstream = Upstream::start().await;
    let proxy = proxy(&upstream.url, redis, &[]).await;

    let first = proxy
        .send(
            Method::POST,
            "/orders",
            Some("order-1"),
            r#"{"item":"book"}"#,
        )
        .await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert!(!first.replayed(), "a first response is not marked replayed");
    let retry = proxy
        .send(
            Method::POST,
            "/orders",
            Some("order-1"),
            r#"{"item":"book"}"#,
        )
        .await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(retry.replayed());
    assert_eq!(retry.body, first.body);
    assert_eq!(upstream.executions(), 1);

    let other = proxy
        .send(
            Method::POST,
            "/orders",
            Some("order-2"),
            r#"{"item":"book"}"#,
        )
        .await;
    assert!(!other.replayed());
    assert_eq!(other.json()["order_id"], 2);
    assert_eq!(upstream.executions(), 2);
}

pub(crate) async fn duplicate_in_flight_is_409_under_reject(redis: bool) {
    let upstream = Upstream::start().await;
    let proxy = proxy(&upstream.url, redis, &[]).await;
    let url = format!("{}/slow", proxy.url);
    let first = tokio::spawn(async move { send(Method::POST, &url, Some("slow-1"), "{}").await });
    upstream.entered().await;

    let duplicate = proxy
        .send(Method::POST, "/slow", Some("slow-1"), "{}")
        .await;
    assert_eq!(duplicate.status, StatusCode::CONFLICT);
    assert_eq!(duplicate.content_type(), "application/problem+json");
    let retry_after: u64 = duplicate.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after >= 1);

    upstream.release(1);
    let first = timeout(QUICK, first).await.unwrap().unwrap();
    assert_eq!(first.status, StatusCode::CREATED);
    let retry = proxy
        .send(Method::POST, "/slow", Some("slow-1"), "{}")
        .await;
    assert!(retry.replayed());
    assert_eq!(retry.body, first.body);
    assert_eq!(upstream.executions(), 1);
    assert_eq!(proxy.stats().await["conflicts"], 1);
}

pub(crate) async fn duplicate_in_flight_is_coalesced_under_wait(redis: bool) {
    let upstream = Upstream::start().await;
    let proxy = proxy(&upstream.url, redis, &["--concurrent", "wait"]).await;
    let (first, duplicate) = first_and_waiting_duplicate(&proxy, &upstream, "slow-2").await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(duplicate.status, StatusCode::CREATED);
    assert!(duplicate.replayed());
    assert_eq!(duplicate.body, first.body);
    assert_eq!(upstream.executions(), 1);
    let stats = proxy.stats().await;
    assert_eq!(stats["coalesced"], 1);
    assert_eq!(stats["conflicts"], 0);
}

pub(crate) async fn changed_body_is_422(redis: bool) {
    let upstream = Upstream::start().await;
    let proxy = proxy(&upstream.url, redis, &[]).await;
    proxy
        .send(Method::POST, "/orders", Some("k-422"), r#"{"item":"book"}"#)
        .await;
    let changed = proxy
        .send(Method::POST, "/orders", Some("k-422"), r#"{"item":"pen"}"#)
        .await;
    assert_eq!(changed.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(changed.content_type(), "application/problem+json");
    assert_eq!(changed.json()["status"], 422);
    assert_eq!(upstream.executions(), 1);
}

pub(crate) async fn body_over_max_body_is_413(redis: bool) {
    let upstream = Upstream::start().await;
    let proxy = proxy(&upstream.url, redis, &["--max-body", "16"]).await;
    let big = format!(r#"{{"item":"{}"}}"#, "x".repeat(100));
    let reply = proxy
        .send(Method::POST, "/orders", Some("k-413"), &big)
        .await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(reply.content_type(), "application/problem+json");
    assert_eq!(upstream.executions(), 0, "the upstream never saw it");
    let small = proxy
        .send(Method::POST, "/orders", Some("k-413"), "{}")
        .await;
    assert_eq!(small.status, StatusCode::CREATED);
}

pub(crate) async fn server_errors_are_not_stored(redis: bool) {
    let upstream = Upstream::start().await;
    let proxy = proxy(&upstream.url, redis, &[]).await;
    for n in 1..=2 {
        let reply = proxy.send(Method::POST, "/fail", Some("k-500"), "{}").await;
        assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(!reply.replayed());
        assert_eq!(upstream.executions(), n, "each retry runs again");
    }
    assert_eq!(proxy.stats().await["not_stored"], 2);
}

pub(crate) async fn upstream_down_is_502_and_not_stored(redis: bool) {
    let dead = dead_url().await;
    let proxy = proxy(&dead, redis, &[]).await;
    for _ in 0..2 {
        let reply = proxy
            .send(Method::POST, "/orders", Some("k-502"), "{}")
            .await;
        assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
        assert_eq!(reply.content_type(), "application/problem+json");
        assert!(!reply.replayed());
    }
    assert_eq!(proxy.stats().await["executed"], 2);
}

/// `--oversized-response release`, the opt-in (the default records the
/// head: `unclear::unclear_oversized_answer_runs_once_and_its_head_is_replayed`).
pub(crate) async fn large_response_is_passed_through_not_stored(redis: bool) {
    let upstream = Upstream::start().await;
    let args = [
        "--max-response-body",
        "1000",
        "--oversized-response",
        "release",
    ];
    let proxy = proxy(&upstream.url, redis, &args).await;
    for n in 1..=2 {
        let reply = proxy
            .send(Method::POST, "/big?bytes=5000", Some("k-big"), "{}")
            .await;
        assert_eq!(reply.status, StatusCode::CREATED);
        assert_eq!(reply.body.len(), 5000, "streamed through whole");
        assert!(!reply.replayed());
        assert_eq!(upstream.executions(), n);
    }
    assert_eq!(proxy.stats().await["not_stored"], 2);
}

pub(crate) async fn require_key_refuses_keyless_posts(redis: bool) {
    let upstream = Upstream::start().await;
    let proxy = proxy(&upstream.url, redis, &["--require-key"]).await;
    let reply = proxy.send(Method::POST, "/orders", None, "{}").await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.content_type(), "application/problem+json");
    let get = proxy.send(Method::GET, "/echo", None, "").await;
    assert_eq!(get.status, StatusCode::OK, "GET is not protected");
    assert_eq!(upstream.executions(), 0);
}

/// A known sequence of requests, then every admin endpoint.
pub(crate) async fn admin_reports_a_known_sequence(redis: bool) {
    let upstream = Upstream::start().await;
    let proxy = proxy(&upstream.url, redis, &["--max-body", "64"]).await;
    let book = r#"{"item":"book"}"#;
    let steps: [(Method, &str, Option<&str>, &str, StatusCode); 8] = [
        (
            Method::POST,
            "/orders",
            Some("seq-1"),
            book,
            StatusCode::CREATED,
        ), // executed
        (
            Method::POST,
            "/orders",
            Some("seq-1"),
            book,
            StatusCode::CREATED,
        ), // replayed
        (
            Method::POST,
            "/orders",
            Some("seq-1"),
            "{}",
            StatusCode::UNPROCESSABLE_ENTITY,
        ), // mismatch
        (
            Method::POST,
            "/fail",
            Some("seq-2"),
            "{}",
            StatusCode::INTERNAL_SERVER_ERROR,
        ), // executed, not stored
        (Method::POST, "/orders", None, "{}", StatusCode::CREATED), // no key: passed through
        (Method::GET, "/echo", None, "", StatusCode::OK),           // not protected
        (
            Method::POST,
            "/orders",
            Some("bad\tkey"),
            "{}",
            StatusCode::BAD_REQUEST,
        ), // rejected key
        (
            Method::POST,
            "/orders",
            Some("seq-3"),
            &"x".repeat(100),
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
    ];
    for (method, path, key, body, status) in steps {
        let reply = proxy.send(method.clone(), path, key, body).await;
        assert_eq!(reply.status, status, "{method} {path} {key:?}");
    }

    let stats = proxy.stats().await;
    let expect = [
        ("requests", 8.0),
        ("executed", 2.0),
        ("replayed", 1.0),
        ("coalesced", 0.0),
        ("conflicts", 0.0),
        ("mismatches", 1.0),
        ("rejected_keys", 1.0),
        ("too_large", 1.0),
        ("not_stored", 1.0),
        ("store_errors", 0.0),
        ("duplicates_prevented", 1.0),
        ("hit_rate", 100.0 / 3.0),
        ("entries", 1.0),
    ];
    for (field, value) in expect {
        let actual = stats[field].as_f64().unwrap();
        assert!(
            (actual - value).abs() < 1e-9,
            "{field}: {actual} != {value} in {stats}"
        );
    }
    assert_eq!(upstream.executions(), 3);

    let metrics = send(Method::GET, &format!("{}/metrics", proxy.admin), None, "").await;
    let text = String::from_utf8(metrics.body.to_vec()).unwrap();
    for line in [
        "idempotency_requests_total 8",
        "idempotency_replayed_total 1",
        "idempotency_duplicates_prevented_total 1",
        "idempotency_cache_entries 1",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(line)),
            "{line:?} missing:\n{text}"
        );
    }

    // On the shared Redis a page can end before the scan has seen every key
    // (other tests' keys are there too): the cursor is followed to the end.
    let keys = proxy.all_keys("signal=seq-1").await;
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert_eq!(keys[0]["state"], "completed");
    assert!(keys[0]["expires_in_ms"].as_u64().unwrap() > 0);
    let key = keys[0]["key"].as_str().unwrap().to_owned();
    let (_, none) = proxy.admin_json("/keys?signal=nothing-like-it").await;
    assert_eq!(none["keys"], Value::Array(vec![]));

    let path = format!("/keys/{}", url_encode(&key));
    assert_eq!(
        proxy.admin_write(Method::DELETE, &path, "").await.status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        proxy.admin_write(Method::DELETE, &path, "").await.status,
        StatusCode::NOT_FOUND
    );
    let again = proxy
        .send(Method::POST, "/orders", Some("seq-1"), book)
        .await;
    assert!(!again.replayed(), "a deleted key runs again");
    assert_eq!(upstream.executions(), 4);
}
