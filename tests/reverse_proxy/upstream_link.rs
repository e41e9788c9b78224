//! The requests of one HTTP/1 client connection share one upstream
//! connection of their own, and a client connection keeps working when the
//! upstream closes that connection after an answer.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::time::timeout;

use super::edge::connect;
use super::harness::{Proxy, QUICK};

/// What the upstream does with a connection after an answer.
#[derive(Clone, Copy, PartialEq, Eq)]
enum AfterAnswer {
    KeepOpen,
    /// Says `connection: close`, and closes.
    Close,
    /// Says nothing, and closes once told to ([`CountingUpstream::close`]),
    /// as an upstream's idle timeout would: after the proxy has the answer.
    CloseSilently,
}

/// An HTTP/1 upstream that answers every request 201 and counts the
/// connections it accepted.
struct CountingUpstream {
    url: String,
    connections: Arc<AtomicU64>,
    close: Arc<Closing>,
}

/// Tells a silently closing upstream to close, and hears that it did.
#[derive(Default)]
struct Closing {
    now: Notify,
    done: Notify,
}

impl CountingUpstream {
    async fn start(after: AfterAnswer) -> CountingUpstream {
        Self::start_on("127.0.0.1:0", after).await
    }

    async fn start_on(address: &str, after: AfterAnswer) -> CountingUpstream {
        let listener = TcpListener::bind(address).await.unwrap();
        // `SocketAddr` writes an IPv6 address in brackets, as a URL has it.
        let url = format!("http://{}", listener.local_addr().unwrap());
        let connections = Arc::new(AtomicU64::new(0));
        let counted = Arc::clone(&connections);
        let close = Arc::new(Closing::default());
        let closing = Arc::clone(&close);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(answer_each(stream, after, Arc::clone(&closing)));
            }
        });
        CountingUpstream {
            url,
            connections,
            close,
        }
    }

    fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }

    /// Closes the connection that answered last (`CloseSilently`), and
    /// waits until it is closed.
    async fn close(&self) {
        let done = self.close.done.notified();
        self.close.now.notify_one();
        timeout(QUICK, done)
            .await
            .expect("the upstream closes in time");
    }
}

/// Reads requests (a head and a body of its content-length) and answers
/// each, until the client closes or, unless `after` keeps it open, after
/// one.
async fn answer_each(mut stream: TcpStream, after: AfterAnswer, close: Arc<Closing>) {
    let mut buffer = Vec::new();
    loop {
        let head_end = loop {
            if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buffer[..head_end]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|line| line.strip_prefix("content-length:"))
            .and_then(|value| value.trim().parse().ok())
            .unwrap_or(0);
        while buffer.len() < head_end + length {
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            }
        }
        buffer.drain(..head_end + length);
        let connection = if after == AfterAnswer::Close {
            "connection: close\r\n"
        } else {
            ""
        };
        let answer = format!("HTTP/1.1 201 Created\r\n{connection}content-length: 2\r\n\r\n{{}}");
        if stream.write_all(answer.as_bytes()).await.is_err() || after == AfterAnswer::Close {
            return;
        }
        if after == AfterAnswer::CloseSilently {
            close.now.notified().await;
            drop(stream);
            close.done.notify_one();
            return;
        }
    }
}

/// Sends `n` POSTs without a key, one after the other, on one HTTP/1
/// connection to the proxy; each must be a 201.
async fn posts_on_one_connection(proxy: &Proxy, n: usize) {
    posts_on_one_connection_then(proxy, n, None).await;
}

/// [`posts_on_one_connection`], closing the upstream's connection silently
/// after each answer when `upstream` is given.
async fn posts_on_one_connection_then(
    proxy: &Proxy,
    n: usize,
    upstream: Option<&CountingUpstream>,
) {
    let tcp = connect(proxy).await;
    let (mut sender, connection) = timeout(QUICK, http1::handshake(TokioIo::new(tcp)))
        .await
        .expect("handshake in time")
        .expect("HTTP/1 handshake");
    let connection = tokio::spawn(connection);
    for i in 0..n {
        let request = Request::builder()
            .method(Method::POST)
            .uri("/orders")
            .header("host", "proxy")
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap();
        let exchange = async {
            sender.ready().await.expect("the connection stays open");
            let response = sender.send_request(request).await.expect("an answer");
            let status = response.status();
            let body = response.into_body().collect().await.expect("the body");
            (status, body.to_bytes())
        };
        let (status, body) = timeout(QUICK, exchange).await.expect("the answer in time");
        assert_eq!(status, StatusCode::CREATED, "request {i}: {body:?}");
        if let Some(upstream) = upstream {
            upstream.close().await;
        }
    }
    drop(sender);
    let _ = timeout(QUICK, connection).await;
}

#[tokio::test]
async fn the_requests_of_one_client_connection_share_one_upstream_connection() {
    let upstream = CountingUpstream::start(AfterAnswer::KeepOpen).await;
    let proxy = Proxy::start(&["--upstream", &upstream.url]).await;
    posts_on_one_connection(&proxy, 5).await;
    assert_eq!(upstream.connections(), 1);
    // Another client connection has one of its own.
    posts_on_one_connection(&proxy, 3).await;
    assert_eq!(upstream.connections(), 2);
}

#[tokio::test]
async fn a_client_connection_goes_on_when_the_upstream_closes_after_each_answer() {
    let upstream = CountingUpstream::start(AfterAnswer::Close).await;
    let proxy = Proxy::start(&["--upstream", &upstream.url]).await;
    posts_on_one_connection(&proxy, 4).await;
    assert_eq!(
        upstream.connections(),
        4,
        "a new upstream connection per answer"
    );
}

#[tokio::test]
async fn an_upstream_named_by_an_ipv6_literal_gets_its_own_connections_too() {
    let upstream = CountingUpstream::start_on("[::1]:0", AfterAnswer::KeepOpen).await;
    let proxy = Proxy::start(&["--upstream", &upstream.url]).await;
    posts_on_one_connection(&proxy, 3).await;
    assert_eq!(upstream.connections(), 1);
}

/// An upstream that closes its connection without a word after the proxy
/// has its answer (as its idle timeout would): the proxy sees it closed
/// before sending the next request on it, and opens another, instead of
/// sending into a closed connection and answering 502.
#[tokio::test]
async fn a_client_connection_goes_on_when_the_upstream_closes_silently() {
    let upstream = CountingUpstream::start(AfterAnswer::CloseSilently).await;
    let proxy = Proxy::start(&["--upstream", &upstream.url]).await;
    posts_on_one_connection_then(&proxy, 4, Some(&upstream)).await;
    assert_eq!(upstream.connections(), 4);
}
