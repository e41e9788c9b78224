//! `GET /config` and `PUT /config` on the proxy's admin server: the
//! configuration changes at run time, for the requests after the change, and
//! an invalid change is refused with 400 problem+json and changes nothing.

use http::{Method, StatusCode};
use serde_json::{json, Value};

use super::first_and_waiting_duplicate;
use super::harness::Proxy;
use super::upstream::Upstream;

async fn put_config(proxy: &Proxy, body: &str) -> (StatusCode, Value, String) {
    let reply = proxy.admin_write(Method::PUT, "/config", body).await;
    let content_type = reply.content_type().to_owned();
    (reply.status, reply.json(), content_type)
}

#[tokio::test]
async fn config_changes_at_run_time_and_refuses_invalid_values() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start_with_token(&["--upstream", &upstream.url]).await;

    let (status, initial) = proxy.admin_json("/config").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(initial["concurrent"], "reject");
    assert_eq!(initial["wait_timeout_secs"], Value::Null);
    assert_eq!(initial["cleanup_interval_secs"], Value::Null);

    // Invalid changes: 400 problem+json, and the configuration is unchanged.
    for invalid in [
        r#"{"ttl_secs": 0}"#,
        r#"{"lease_ttl_secs": 0, "ttl_secs": 60}"#,
        r#"{"wait_timeout_secs": 99999999999, "concurrent": "wait"}"#,
        r#"{"cleanup_interval_secs": 0}"#,
        r#"{"concurrent": "reject", "wait_timeout_secs": 5}"#,
        r#"{"concurrent": "sometimes"}"#,
        r#"{"ttl_secs": -1}"#,
        r#"{"ttl": 60}"#,
        "not json",
    ] {
        let (status, problem, content_type) = put_config(&proxy, invalid).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{invalid}: {problem}");
        assert_eq!(content_type, "application/problem+json", "{invalid}");
        assert_eq!(problem["status"], 400);
        assert_eq!(proxy.admin_json("/config").await.1, initial, "{invalid}");
    }

    // A subset: the answer is the effective configuration.
    let (status, changed, _) = put_config(
        &proxy,
        r#"{"ttl_secs": 60, "concurrent": "wait", "wait_timeout_secs": 15, "cleanup_interval_secs": 30}"#,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{changed}");
    assert_eq!(changed["ttl_secs"], 60.0);
    assert_eq!(changed["concurrent"], "wait");
    assert_eq!(changed["wait_timeout_secs"], 15.0);
    assert_eq!(changed["cleanup_interval_secs"], 30.0);
    assert_eq!(changed["lease_ttl_secs"], initial["lease_ttl_secs"]);
    assert_eq!(proxy.admin_json("/config").await.1, changed);

    // The new TTL applies to the next record.
    let created = proxy
        .send(Method::POST, "/orders", Some("cfg-ttl"), "{}")
        .await;
    assert_eq!(created.status, StatusCode::CREATED);
    let (_, keys) = proxy.admin_json("/keys?signal=cfg-ttl").await;
    let expires_in_ms = keys["keys"][0]["expires_in_ms"]
        .as_u64()
        .expect("the record is listed");
    assert!(expires_in_ms <= 60_000, "{keys}");

    // The new policy applies to the next duplicate: it waits and replays.
    let (first, duplicate) = first_and_waiting_duplicate(&proxy, &upstream, "cfg-wait").await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert!(duplicate.replayed());
    assert_eq!(duplicate.body, first.body);

    // `null` stops the auto-cleanup; back to `reject` drops the wait budget.
    let (status, back, _) = put_config(
        &proxy,
        &json!({"concurrent": "reject", "cleanup_interval_secs": null}).to_string(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{back}");
    assert_eq!(back["concurrent"], "reject");
    assert_eq!(back["wait_timeout_secs"], Value::Null);
    assert_eq!(back["cleanup_interval_secs"], Value::Null);
    assert_eq!(back["ttl_secs"], 60.0);
}
