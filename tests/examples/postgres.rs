//! The `postgres_orders` example, run for real and spoken to over loopback:
//! a retry replays, and a handler that dies after its write and before the
//! commit leaves no order, so the retry creates it once.
#![cfg(feature = "postgres")]

use crate::support::stores::postgres;

use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use postgres::{database_url, random_table, DropTables};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::time::timeout;

const QUICK: Duration = Duration::from_secs(20);

/// Builds the example with this test's features and answers its path.
fn build() -> std::path::PathBuf {
    crate::support::build_example("postgres_orders")
}

/// The running example (killed when dropped) and its URL.
async fn start(orders: &str, records: &str) -> (Child, String) {
    let mut child = Command::new(build())
        .args(["--listen", "127.0.0.1:0", "--database", &database_url()])
        .args(["--orders-table", orders, "--records-table", records])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let url = timeout(QUICK, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(at) = line.find(" on http://") {
                return line[at + 4..].trim().to_owned();
            }
        }
        panic!("the example ended before it announced its address");
    })
    .await
    .expect("the example announces its address");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, url)
}

/// POSTs an order; `None` when the connection was cut (the handler died).
async fn post(url: &str, key: &str, query: &str) -> Option<(StatusCode, Value)> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let request = Request::post(format!("{url}/orders{query}"))
        .header("idempotency-key", key)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(br#"{"item":"book"}"#)))
        .unwrap();
    timeout(QUICK, async {
        let response = client.request(request).await.ok()?;
        let status = response.status();
        let body = response.into_body().collect().await.ok()?.to_bytes();
        Some((status, serde_json::from_slice(&body).unwrap()))
    })
    .await
    .expect("the example answers")
}

async fn list(url: &str) -> Vec<Value> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let request = Request::get(format!("{url}/orders"))
        .body(Full::default())
        .unwrap();
    timeout(QUICK, async {
        let response = client.request(request).await.unwrap();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&body).unwrap()
    })
    .await
    .expect("the example answers")
}

#[tokio::test]
async fn orders_are_created_once_per_key_even_when_the_handler_dies() {
    let (orders, records) = (random_table("orders"), random_table("records"));
    let cleanup = DropTables::new(&orders);
    cleanup.add(&records);
    let (_example, url) = start(&orders, &records).await;

    let (status, first) = post(&url, "order-1", "").await.unwrap();
    assert_eq!(status, StatusCode::CREATED);
    let (status, retry) = post(&url, "order-1", "").await.unwrap();
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(retry, first, "the retry answers the first order");

    assert!(
        post(&url, "order-2", "?crash=true").await.is_none(),
        "the handler died and the connection was cut"
    );
    assert_eq!(
        list(&url).await.len(),
        1,
        "the dead handler's order was kept"
    );
    let (status, created) = post(&url, "order-2", "").await.unwrap();
    assert_eq!(status, StatusCode::CREATED);
    let (_, again) = post(&url, "order-2", "").await.unwrap();
    assert_eq!(again, created);

    let listed = list(&url).await;
    assert_eq!(listed, vec![first, created]);
}
