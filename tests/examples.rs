//! The orders examples (`axum_server`, `hyper_server`), run for real and
//! spoken to over loopback: a retry replays, a reused key with another body is
//! a 422, and without the layer the same retry runs again.

mod support;
mod examples {
    mod postgres;
}

use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::time::timeout;

const QUICK: Duration = Duration::from_secs(20);

/// Builds the example with this test's features and answers its path.
fn build(example: &str) -> std::path::PathBuf {
    support::build_example(example)
}

/// A running example; dropping it kills the process.
struct Example {
    _child: Child,
    url: String,
}

async fn start(example: &str, extra: &[&str]) -> Example {
    let mut child = Command::new(build(example))
        .args(["--listen", "127.0.0.1:0"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let url = timeout(QUICK, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(at) = line.find(" on http://") {
                let rest = &line[at + 4..];
                return rest.split_whitespace().next().unwrap().to_owned();
            }
        }
        panic!("{example} ended before it announced its address");
    })
    .await
    .expect("the example announces its address");
    // Keep draining stdout so the example never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Example { _child: child, url }
}

struct Reply {
    status: StatusCode,
    replayed: bool,
    body: Bytes,
}

async fn post(url: &str, key: &str, body: &'static str) -> Reply {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let request = Request::post(format!("{url}/orders"))
        .header("idempotency-key", key)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap();
    timeout(QUICK, async {
        let response = client.request(request).await.unwrap();
        let status = response.status();
        let replayed = response.headers().contains_key("idempotent-replayed");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        Reply {
            status,
            replayed,
            body,
        }
    })
    .await
    .expect("the example answers")
}

async fn retries_replay_and_reused_keys_are_refused(example: &str) {
    let server = start(example, &[]).await;
    let first = post(&server.url, "order-1", r#"{"item":"book"}"#).await;
    let retry = post(&server.url, "order-1", r#"{"item":"book"}"#).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert!(!first.replayed);
    assert!(retry.replayed, "{example}: the retry is a replay");
    assert_eq!(retry.status, first.status);
    assert_eq!(retry.body, first.body);
    let reused = post(&server.url, "order-1", r#"{"item":"pen"}"#).await;
    assert_eq!(reused.status, StatusCode::UNPROCESSABLE_ENTITY);
}

#[tokio::test]
async fn axum_server_replays_retries() {
    retries_replay_and_reused_keys_are_refused("axum_server").await;
}

#[tokio::test]
async fn hyper_server_replays_retries() {
    retries_replay_and_reused_keys_are_refused("hyper_server").await;
}

#[tokio::test]
async fn axum_server_without_the_layer_runs_every_retry() {
    let server = start("axum_server", &["--no-idempotency"]).await;
    let first = post(&server.url, "order-1", r#"{"item":"book"}"#).await;
    let retry = post(&server.url, "order-1", r#"{"item":"book"}"#).await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(!retry.replayed);
    assert_ne!(retry.body, first.body, "a new order each time");
}
