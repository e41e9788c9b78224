//! The edge limits, seen from slow and hostile clients over raw TCP: request
//! heads and bodies that never finish, idle keep-alive connections, and more
//! connections than the proxy holds.

use std::time::Duration;

use http::{Method, StatusCode};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

use super::eventually;
use super::harness::{send, Proxy, QUICK};
use super::upstream::Upstream;

/// A response read off a raw connection.
pub(crate) struct RawReply {
    pub(crate) status: u16,
    pub(crate) head: String,
    pub(crate) body: Vec<u8>,
}

impl RawReply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }
}

/// Connects to the proxy's port.
pub(crate) async fn connect(proxy: &Proxy) -> TcpStream {
    let addr = proxy.url.trim_start_matches("http://");
    timeout(QUICK, TcpStream::connect(addr))
        .await
        .expect("connect in time")
        .expect("the proxy accepts")
}

/// Reads one response (head, then a body of its content-length) under [`QUICK`].
pub(crate) async fn read_reply(stream: &mut TcpStream) -> RawReply {
    let read = async {
        let mut bytes = Vec::new();
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            if let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            let n = stream.read(&mut chunk).await.expect("read the answer");
            assert!(n > 0, "connection closed before a response: {bytes:?}");
            bytes.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&bytes[..head_end]).into_owned();
        let status = head[9..12].parse().expect("a status code");
        let length: usize = head
            .lines()
            .find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse().ok())?
            })
            .expect("a content-length");
        let mut body = bytes[head_end..].to_vec();
        while body.len() < length {
            let n = stream.read(&mut chunk).await.expect("read the body");
            assert!(n > 0, "connection closed mid-body");
            body.extend_from_slice(&chunk[..n]);
        }
        RawReply { status, head, body }
    };
    timeout(QUICK, read).await.expect("a response in time")
}

/// Waits until the proxy closes `stream` (end of stream or reset).
pub(crate) async fn closed_by_proxy(stream: &mut TcpStream) {
    let mut chunk = [0u8; 256];
    let closed = timeout(QUICK, async {
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the proxy kept the connection open");
}

async fn stat(proxy: &Proxy, name: &str) -> u64 {
    proxy.stats().await[name]
        .as_u64()
        .unwrap_or_else(|| panic!("{name} in /stats"))
}

#[tokio::test]
async fn half_open_connections_are_closed_after_the_header_timeout() {
    const HALF_OPEN: usize = 300;
    let upstream = Upstream::start().await;
    let proxy = &Proxy::start(&["--upstream", &upstream.url, "--header-read-timeout", "2"]).await;

    let mut half_open = Vec::with_capacity(HALF_OPEN);
    for _ in 0..HALF_OPEN {
        let mut stream = connect(proxy).await;
        stream
            .write_all(b"POST /x HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            .await
            .unwrap();
        half_open.push(stream);
    }
    // Every connection is accepted: held, or (on a machine slow enough that
    // opening them all took longer than the header timeout) already
    // answered. Counted, not timed: no check races the proxy's clock.
    eventually(
        "the proxy accounts for every half-open connection",
        || async move {
            let stats = proxy.stats().await;
            let count = |name: &str| stats[name].as_u64().unwrap_or_default();
            count("connections") + count("header_timeouts") >= HALF_OPEN as u64
        },
    )
    .await;

    // They hold no one up.
    let served = proxy.send(Method::POST, "/orders", Some("k"), "{}").await;
    assert_eq!(served.status, StatusCode::CREATED);

    for stream in &mut half_open {
        let reply = read_reply(stream).await;
        assert_eq!(reply.status, 408, "{}", reply.head);
        assert!(
            reply
                .head
                .to_ascii_lowercase()
                .contains("connection: close"),
            "{}",
            reply.head
        );
        closed_by_proxy(stream).await;
    }
    assert_eq!(stat(proxy, "header_timeouts").await, HALF_OPEN as u64);
    eventually("the proxy holds none of them", || async move {
        stat(proxy, "connections").await == 0
    })
    .await;
}

#[tokio::test]
async fn a_trickling_body_is_refused_with_408_and_the_key_is_not_held() {
    let upstream = Upstream::start().await;
    let proxy = &Proxy::start(&["--upstream", &upstream.url, "--body-read-timeout", "1"]).await;
    let body = r#"{"item":"book"}"#;

    let stream = connect(proxy).await;
    let (mut reader, mut writer) = stream.into_split();
    let head = format!(
        "POST /orders HTTP/1.1\r\nHost: 127.0.0.1\r\nIdempotency-Key: slow-body\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    writer.write_all(head.as_bytes()).await.unwrap();
    // One byte a second: the whole body would take 15 s.
    let trickle = tokio::spawn({
        let body = body.as_bytes().to_vec();
        async move {
            let mut every_second = tokio::time::interval(Duration::from_secs(1));
            for byte in body {
                every_second.tick().await;
                if writer.write_all(&[byte]).await.is_err() {
                    return;
                }
            }
        }
    });
    let mut answer = Vec::new();
    timeout(QUICK, reader.read_to_end(&mut answer))
        .await
        .expect("the proxy answers and closes in time")
        .expect("read the answer");
    trickle.abort();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
    assert!(answer.contains("application/problem+json"), "{answer}");
    assert!(answer.contains(r#""status":408"#), "{answer}");
    assert_eq!(upstream.executions(), 0);
    assert_eq!(stat(proxy, "body_timeouts").await, 1);

    // The key was never taken: a retry runs.
    let retry = proxy
        .send(Method::POST, "/orders", Some("slow-body"), body)
        .await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(!retry.replayed());
    assert_eq!(upstream.executions(), 1);
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    let upstream = Upstream::start().await;
    let proxy = &Proxy::start(&[
        "--upstream",
        &upstream.url,
        "--idle-timeout",
        "3",
        "--header-read-timeout",
        "60",
    ])
    .await;
    let mut stream = connect(proxy).await;
    for _ in 0..2 {
        stream
            .write_all(b"POST /orders HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\n\r\n{}")
            .await
            .unwrap();
        let reply = read_reply(&mut stream).await;
        assert_eq!(reply.status, 201, "kept alive between requests");
    }
    assert_eq!(upstream.executions(), 2);
    closed_by_proxy(&mut stream).await;
    assert_eq!(stat(proxy, "idle_closed").await, 1);
    assert_eq!(stat(proxy, "header_timeouts").await, 0);
}

#[tokio::test]
async fn the_connection_cap_refuses_past_it_and_serves_again_once_one_closes() {
    let upstream = Upstream::start().await;
    let proxy = &Proxy::start(&[
        "--upstream",
        &upstream.url,
        "--max-connections",
        "2",
        "--header-read-timeout",
        "60",
    ])
    .await;
    let mut first = connect(proxy).await;
    let second = connect(proxy).await;
    eventually("the proxy holds both connections", || async move {
        stat(proxy, "connections").await == 2
    })
    .await;

    let mut third = connect(proxy).await;
    closed_by_proxy(&mut third).await;
    assert_eq!(stat(proxy, "connections_refused").await, 1);

    // A client it holds is still served.
    first
        .write_all(b"POST /orders HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\n\r\n{}")
        .await
        .unwrap();
    let reply = read_reply(&mut first).await;
    assert_eq!(reply.status, 201);
    assert_eq!(reply.json()["executions"], 1);

    drop(second);
    eventually("the proxy lets the closed connection go", || async move {
        stat(proxy, "connections").await == 1
    })
    .await;
    let served = proxy.send(Method::POST, "/orders", None, "{}").await;
    assert_eq!(served.status, StatusCode::CREATED);
    assert_eq!(stat(proxy, "connections_refused").await, 1);

    let metrics = send(Method::GET, &format!("{}/metrics", proxy.admin), None, "").await;
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(
        text.contains("idempotency_connections_refused_total 1"),
        "{text}"
    );
}
