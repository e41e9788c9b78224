//! HTTP/2 with prior knowledge under the edge limits: the cap on concurrent
//! streams per connection, seen by a client that ignores it (raw frames) and
//! by one that honours it (hyper's client), which still gets replays.

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

use super::edge::{closed_by_proxy, connect};
use super::eventually;
use super::harness::{Proxy, Reply, QUICK};
use super::upstream::Upstream;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const END_HEADERS: u8 = 0x4;
const ACK: u8 = 0x1;
const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
const REFUSED_STREAM: u32 = 0x7;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let length = u32::try_from(payload.len()).unwrap().to_be_bytes();
    let mut frame = vec![length[1], length[2], length[3], kind, flags];
    frame.extend_from_slice(&stream.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// A POST request head in HPACK, literal fields without indexing.
fn post_head(path: &str) -> Vec<u8> {
    let literal = |index: u8, value: &str| {
        let mut field = vec![index, u8::try_from(value.len()).unwrap()];
        field.extend_from_slice(value.as_bytes());
        field
    };
    // :method POST and :scheme http are entries 3 and 6 of the static table.
    let mut block = vec![0x83, 0x86];
    block.extend(literal(0x04, path)); // :path
    block.extend(literal(0x01, "127.0.0.1")); // :authority
    block
}

struct RawFrame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

async fn read_frame(stream: &mut TcpStream) -> RawFrame {
    let read = async {
        let mut header = [0u8; 9];
        stream
            .read_exact(&mut header)
            .await
            .expect("a frame header");
        let length = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
        let mut payload = vec![0u8; length];
        stream
            .read_exact(&mut payload)
            .await
            .expect("a frame payload");
        RawFrame {
            kind: header[3],
            flags: header[4],
            stream: u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & 0x7fff_ffff,
            payload,
        }
    };
    timeout(QUICK, read).await.expect("a frame in time")
}

#[tokio::test]
async fn streams_past_the_cap_are_refused() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(&["--upstream", &upstream.url, "--http2-max-streams", "2"]).await;
    let mut stream = connect(&proxy).await;
    let mut hello = PREFACE.to_vec();
    hello.extend(frame(SETTINGS, 0, 0, &[]));
    stream.write_all(&hello).await.unwrap();

    let settings = loop {
        let frame = read_frame(&mut stream).await;
        if frame.kind == SETTINGS && frame.flags & ACK == 0 {
            break frame.payload;
        }
    };
    let max_streams = settings.chunks_exact(6).find_map(|setting| {
        let id = u16::from_be_bytes([setting[0], setting[1]]);
        (id == SETTINGS_MAX_CONCURRENT_STREAMS)
            .then(|| u32::from_be_bytes([setting[2], setting[3], setting[4], setting[5]]))
    });
    assert_eq!(max_streams, Some(2), "the proxy announces its cap");

    // Three requests whose bodies never end: all three would stay open.
    let mut requests = frame(SETTINGS, ACK, 0, &[]);
    for id in [1, 3, 5] {
        requests.extend(frame(HEADERS, END_HEADERS, id, &post_head("/echo")));
    }
    stream.write_all(&requests).await.unwrap();

    let refused = loop {
        let frame = read_frame(&mut stream).await;
        assert_ne!(frame.kind, GOAWAY, "the proxy gave up the whole connection");
        if frame.kind == RST_STREAM {
            break frame;
        }
    };
    assert_eq!(
        refused.stream, 5,
        "the stream past the cap is the one refused"
    );
    let code = u32::from_be_bytes(refused.payload[..4].try_into().unwrap());
    assert_eq!(code, REFUSED_STREAM);
}

/// One HTTP/2 connection to the proxy, driven by hyper's client.
async fn h2_client(proxy: &Proxy) -> http2::SendRequest<Full<Bytes>> {
    let tcp = connect(proxy).await;
    let (sender, connection) = timeout(
        QUICK,
        http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)),
    )
    .await
    .expect("handshake in time")
    .expect("HTTP/2 handshake");
    tokio::spawn(connection);
    sender
}

async fn post(
    mut sender: http2::SendRequest<Full<Bytes>>,
    proxy_url: String,
    path: &str,
    key: &str,
) -> Reply {
    let request = Request::builder()
        .method(Method::POST)
        .uri(format!("{proxy_url}{path}"))
        .header("idempotency-key", key)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let exchange = async {
        let response = sender.send_request(request).await.expect("an answer");
        let (parts, body) = response.into_parts();
        let body = body.collect().await.expect("the body").to_bytes();
        Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    };
    timeout(QUICK, exchange).await.expect("the answer in time")
}

#[tokio::test]
async fn a_client_over_the_stream_cap_is_held_to_it_and_replays_still_work() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(&["--upstream", &upstream.url, "--http2-max-streams", "2"]).await;
    let sender = h2_client(&proxy).await;
    // A first exchange: the client has the proxy's SETTINGS (and so its cap)
    // before it opens streams side by side. Streams sent before them may
    // overshoot and are refused, as the raw test above shows.
    let first = post(sender.clone(), proxy.url.clone(), "/orders", "first").await;
    assert_eq!(first.status, StatusCode::CREATED);

    let in_flight: Vec<_> = ["a", "b", "c"]
        .into_iter()
        .map(|key| tokio::spawn(post(sender.clone(), proxy.url.clone(), "/slow", key)))
        .collect();
    upstream.entered().await;
    upstream.entered().await;
    // Two streams are open and held upstream; the third waits for a free one.
    let (status, keys) = proxy.admin_json("/keys").await;
    assert_eq!(status, StatusCode::OK);
    let in_flight_keys = keys["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|entry| entry["state"] == "in_flight")
        .count();
    assert_eq!(in_flight_keys, 2, "{keys}");

    upstream.release(1);
    upstream.entered().await;
    upstream.release(2);
    for request in in_flight {
        let reply = timeout(QUICK, request).await.unwrap().unwrap();
        assert_eq!(reply.status, StatusCode::CREATED);
        assert!(!reply.replayed());
    }
    assert_eq!(upstream.executions(), 4);

    let retry = post(sender, proxy.url.clone(), "/slow", "b").await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(retry.replayed(), "a retried key replays over HTTP/2");
    assert_eq!(upstream.executions(), 4);
}

#[tokio::test]
async fn an_http2_connection_that_opens_no_stream_is_closed_after_the_header_timeout() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(&["--upstream", &upstream.url, "--header-read-timeout", "1"]).await;
    let mut stream = connect(&proxy).await;
    let mut hello = PREFACE.to_vec();
    hello.extend(frame(SETTINGS, 0, 0, &[]));
    stream.write_all(&hello).await.unwrap();
    closed_by_proxy(&mut stream).await;
    assert_eq!(proxy.stats().await["header_timeouts"], 1);
}

#[tokio::test]
async fn an_idle_http2_connection_is_closed_after_the_idle_timeout() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(&[
        "--upstream",
        &upstream.url,
        "--idle-timeout",
        "1",
        "--header-read-timeout",
        "60",
    ])
    .await;
    let tcp = connect(&proxy).await;
    let (sender, connection) = timeout(
        QUICK,
        http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)),
    )
    .await
    .expect("handshake in time")
    .expect("HTTP/2 handshake");
    let connection = tokio::spawn(connection);
    let reply = post(sender.clone(), proxy.url.clone(), "/orders", "idle").await;
    assert_eq!(reply.status, StatusCode::CREATED);
    // The client keeps its end open; the proxy ends the connection.
    timeout(QUICK, connection)
        .await
        .expect("the proxy closes the idle connection in time")
        .expect("the connection task ends")
        .ok();
    assert_eq!(proxy.stats().await["idle_closed"], 1);
    drop(sender);
}

/// A client that opens a stream for a large response and never reads it
/// (it sends no WINDOW_UPDATE for it): after --response-write-timeout that
/// stream is reset, the connection's other streams go on, and the result is
/// recorded all the same (the retry replays it).
#[tokio::test]
async fn an_http2_stream_whose_client_never_reads_is_reset_and_the_result_recorded() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(&[
        "--upstream",
        &upstream.url,
        "--response-write-timeout",
        "1",
        "--max-response-body",
        "67108864",
        // The retry may arrive while the record is still being written.
        "--concurrent",
        "wait",
        // The stream's watch and the record's hand-off on a current-thread
        // runtime too.
        "--worker-threads",
        "1",
    ])
    .await;
    const BYTES: usize = 8 << 20;
    let tcp = connect(&proxy).await;
    // A small stream window and a large connection window: the unread
    // stream stalls while the connection keeps room for others.
    let (sender, connection) = timeout(
        QUICK,
        http2::Builder::new(TokioExecutor::new())
            .adaptive_window(false)
            .initial_stream_window_size(65_535)
            .initial_connection_window_size(32 << 20)
            .handshake(TokioIo::new(tcp)),
    )
    .await
    .expect("handshake in time")
    .expect("HTTP/2 handshake");
    tokio::spawn(connection);

    let request = Request::builder()
        .method(Method::POST)
        .uri(format!("{}/big?bytes={BYTES}", proxy.url))
        .header("idempotency-key", "stall-h2")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let stalled = timeout(QUICK, sender.clone().send_request(request))
        .await
        .expect("the head in time")
        .expect("an answer");
    assert_eq!(stalled.status(), StatusCode::CREATED);

    // The body is never read: the proxy gives up on that stream only.
    eventually("the stalled stream is reset", || async {
        proxy.stats().await["write_timeouts"] == 1
    })
    .await;
    let stats = proxy.stats().await;
    assert_eq!(
        stats["connections"], 1,
        "the connection stays open: {stats}"
    );
    let other = post(sender.clone(), proxy.url.clone(), "/orders", "other").await;
    assert_eq!(other.status, StatusCode::CREATED, "the connection goes on");

    // What the client did receive ends in the reset, not in the whole body.
    let read = timeout(QUICK, stalled.into_body().collect())
        .await
        .expect("the stalled body ends in time");
    assert!(read.is_err(), "the stalled stream was reset");

    let retry = post(
        sender,
        proxy.url.clone(),
        &format!("/big?bytes={BYTES}"),
        "stall-h2",
    )
    .await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(retry.replayed(), "the result was recorded");
    assert_eq!(retry.body.len(), BYTES);
    assert_eq!(upstream.executions(), 2, "one for each key");
}

/// The write timeout counts only the time the client leaves the proxy's
/// bytes untaken: an upstream that pauses mid-body for longer is waited for,
/// on HTTP/1 and on HTTP/2.
#[tokio::test]
async fn an_upstream_pausing_mid_body_is_not_cut_by_the_write_timeout() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(&["--upstream", &upstream.url, "--response-write-timeout", "1"]).await;
    let sender = h2_client(&proxy).await;
    let over_http2 = tokio::spawn(post(sender, proxy.url.clone(), "/drip", "drip-h2"));
    let over_http1 = tokio::spawn({
        let url = proxy.url.clone();
        async move {
            super::harness::send(Method::POST, &format!("{url}/drip"), Some("drip-h1"), "{}").await
        }
    });
    upstream.entered().await;
    upstream.entered().await;
    // Both bodies have sent their first chunk and wait on the upstream for
    // more than the write timeout, which must not fire for this wait.
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    upstream.release(2);
    for reply in [
        timeout(QUICK, over_http2).await.unwrap().unwrap(),
        timeout(QUICK, over_http1).await.unwrap().unwrap(),
    ] {
        assert_eq!(reply.status, StatusCode::CREATED);
        assert_eq!(&reply.body[..], b"first\nrest\n");
    }
    assert_eq!(proxy.stats().await["write_timeouts"], 0);
}
