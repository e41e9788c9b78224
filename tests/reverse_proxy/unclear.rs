//! At most once when the outcome is unclear: an upstream slower than
//! `--upstream-timeout`, one that resets after reading the request, one that
//! cuts its body off after the head, one that answers more than
//! `--max-response-body`, and one that cannot be reached. A retry sent at
//! once and one sent after the upstream finished make the upstream run
//! exactly once per key; only a definite answer or the marker running out
//! frees the key (see the README's reverse-proxy section). Each runs on the
//! embedded store and on Redis (`on_every_store!`).

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use tokio::time::timeout;

use super::eventually;
use super::harness::{send, Proxy, Reply, QUICK};
use super::hostile::{Break, Hostile};
use super::idempotency::proxy;
use super::upstream::{dead_url, Upstream};

/// Long enough that no marker runs out while a test looks at it.
const LEASE_TTL: &str = "120";

/// (a) The client gets its 504 at once; the exchange goes on in the
/// background with the key held, and its answer is recorded and replayed.
pub(crate) async fn unclear_slow_upstream_runs_once_and_its_answer_is_replayed(redis: bool) {
    let upstream = Upstream::start().await;
    let args = ["--upstream-timeout", "1", "--lease-ttl", LEASE_TTL];
    let proxy = proxy(&upstream.url, redis, &args).await;

    let first = proxy
        .send(Method::POST, "/slow", Some("slow-a"), "{}")
        .await;
    upstream.entered().await;
    assert_eq!(first.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(first.content_type(), "application/problem+json");
    let detail = first.json()["detail"].as_str().unwrap().to_owned();
    assert!(detail.contains("not known"), "{detail}");
    assert!(detail.contains("retry"), "{detail}");

    let at_once = proxy
        .send(Method::POST, "/slow", Some("slow-a"), "{}")
        .await;
    assert_eq!(
        at_once.status,
        StatusCode::CONFLICT,
        "the first run goes on: {at_once:?}"
    );

    upstream.release(1);
    let late = replayed_once_recorded(&proxy, "/slow", "slow-a").await;
    assert_eq!(late.status, StatusCode::CREATED);
    assert_eq!(late.json()["executions"], 1, "the upstream's own answer");
    assert_eq!(upstream.executions(), 1);
    let stats = proxy.stats().await;
    assert_eq!(stats["executed"], 1, "{stats}");
    assert_eq!(stats["ambiguous"], 0, "an answer came: {stats}");
}

/// (a) under `--concurrent wait`: the upstream timeout does not cut a
/// duplicate's wait short; it gets the background exchange's answer.
pub(crate) async fn unclear_slow_upstream_answers_a_waiting_duplicate(redis: bool) {
    let upstream = Upstream::start().await;
    let args = [
        "--upstream-timeout",
        "1",
        "--lease-ttl",
        LEASE_TTL,
        "--concurrent",
        "wait",
    ];
    let proxy = proxy(&upstream.url, redis, &args).await;

    let first = proxy
        .send(Method::POST, "/slow", Some("slow-w"), "{}")
        .await;
    upstream.entered().await;
    assert_eq!(first.status, StatusCode::GATEWAY_TIMEOUT);

    let url = format!("{}/slow", proxy.url);
    let duplicate =
        tokio::spawn(async move { send(Method::POST, &url, Some("slow-w"), "{}").await });
    let admin = proxy.admin.clone();
    eventually("the duplicate waits on the background exchange", || {
        let admin = admin.clone();
        async move {
            let stats = send(Method::GET, &format!("{admin}/stats"), None, "").await;
            stats.json()["waiting"] == 1
        }
    })
    .await;
    upstream.release(1);
    let duplicate = timeout(QUICK, duplicate).await.unwrap().unwrap();
    assert_eq!(duplicate.status, StatusCode::CREATED);
    assert!(duplicate.replayed());
    assert_eq!(duplicate.json()["executions"], 1);
    assert_eq!(upstream.executions(), 1);
}

/// (a) past `--upstream-abandon`: the proxy gives the exchange up, and the
/// key is left to its marker (an answer after it is not recorded).
pub(crate) async fn unclear_exchange_past_upstream_abandon_holds_the_key(redis: bool) {
    let upstream = Upstream::start().await;
    let args = [
        "--upstream-timeout",
        "0.5",
        "--upstream-abandon",
        "1",
        "--lease-ttl",
        LEASE_TTL,
    ];
    let proxy = proxy(&upstream.url, redis, &args).await;

    let first = proxy
        .send(Method::POST, "/slow", Some("slow-x"), "{}")
        .await;
    upstream.entered().await;
    assert_eq!(first.status, StatusCode::GATEWAY_TIMEOUT);
    let admin = proxy.admin.clone();
    eventually("the background exchange is abandoned", || {
        let admin = admin.clone();
        async move {
            let stats = send(Method::GET, &format!("{admin}/stats"), None, "").await;
            stats.json()["ambiguous"] == 1
        }
    })
    .await;
    upstream.release(1);
    let late = proxy
        .send(Method::POST, "/slow", Some("slow-x"), "{}")
        .await;
    assert_eq!(late.status, StatusCode::CONFLICT, "{late:?}");
    assert_eq!(upstream.executions(), 1);
}

/// (b) The upstream read the request and reset the connection: 502 at
/// once, and the key stays taken while its marker lives.
pub(crate) async fn unclear_reset_after_the_request_runs_once_and_holds_the_key(redis: bool) {
    let upstream = Hostile::start(Break::Reset).await;
    let proxy = proxy(&upstream.url, redis, &["--lease-ttl", LEASE_TTL]).await;

    let first = proxy
        .send(Method::POST, "/reset", Some("reset-b"), "{}")
        .await;
    assert_eq!(first.status, StatusCode::BAD_GATEWAY);
    assert_eq!(first.content_type(), "application/problem+json");
    let detail = first.json()["detail"].as_str().unwrap().to_owned();
    assert!(detail.contains("not known"), "{detail}");

    let at_once = proxy
        .send(Method::POST, "/reset", Some("reset-b"), "{}")
        .await;
    assert_eq!(at_once.status, StatusCode::CONFLICT, "{at_once:?}");
    upstream.finished().await;
    let late = proxy
        .send(Method::POST, "/reset", Some("reset-b"), "{}")
        .await;
    assert_eq!(late.status, StatusCode::CONFLICT, "{late:?}");

    assert_eq!(upstream.requests(), 1);
    let stats = proxy.stats().await;
    assert_eq!(stats["executed"], 1, "{stats}");
    assert_eq!(stats["ambiguous"], 1, "{stats}");
}

/// (c) The upstream sent its head and half its body, then closed: the
/// client's response ends with an error, and the key stays taken.
pub(crate) async fn unclear_body_cut_off_after_its_head_runs_once_and_holds_the_key(redis: bool) {
    let upstream = Hostile::start(Break::CutBody).await;
    let proxy = proxy(&upstream.url, redis, &["--lease-ttl", LEASE_TTL]).await;

    let (status, body) = open(&proxy, "/cut", "cut-c").await;
    assert_eq!(status, StatusCode::CREATED, "the head streams at once");

    let at_once = proxy.send(Method::POST, "/cut", Some("cut-c"), "{}").await;
    assert_eq!(at_once.status, StatusCode::CONFLICT, "{at_once:?}");

    upstream.release();
    upstream.finished().await;
    let read = timeout(QUICK, body.collect())
        .await
        .expect("the body ends in time");
    assert!(read.is_err(), "a body cut off must end with an error");

    let late = proxy.send(Method::POST, "/cut", Some("cut-c"), "{}").await;
    assert_eq!(late.status, StatusCode::CONFLICT, "{late:?}");
    assert_eq!(upstream.requests(), 1);
    let stats = proxy.stats().await;
    assert_eq!(stats["executed"], 1, "{stats}");
    assert_eq!(stats["ambiguous"], 1, "{stats}");
}

/// (d) A 2 MiB answer over a 1 MiB `--max-response-body` streams through
/// whole; its head is recorded and replayed, with no body.
pub(crate) async fn unclear_oversized_answer_runs_once_and_its_head_is_replayed(redis: bool) {
    const TWO_MIB: usize = 2 << 20;
    let upstream = Upstream::start().await;
    let args = ["--max-response-body", "1048576", "--lease-ttl", LEASE_TTL];
    let proxy = proxy(&upstream.url, redis, &args).await;
    let path = format!("/big?bytes={TWO_MIB}");

    let (status, body) = open(&proxy, &path, "big-d").await;
    assert_eq!(status, StatusCode::CREATED);
    // Sent while the first's body is still on its way (or, if the sockets
    // took it all already, after it was recorded): never a second run.
    let at_once = proxy.send(Method::POST, &path, Some("big-d"), "{}").await;
    assert!(
        at_once.status == StatusCode::CONFLICT || omitted_replay(&at_once),
        "{at_once:?}"
    );
    let body = timeout(QUICK, body.collect())
        .await
        .expect("the body comes in time")
        .expect("the body reads whole")
        .to_bytes();
    assert_eq!(body.len(), TWO_MIB, "streamed through whole");

    let late = proxy.send(Method::POST, &path, Some("big-d"), "{}").await;
    assert!(omitted_replay(&late), "{late:?}");
    assert_eq!(late.headers["content-length"], "0");
    assert_eq!(upstream.executions(), 1);
    let stats = proxy.stats().await;
    assert_eq!(stats["omitted"], 1, "{stats}");
    assert_eq!(stats["not_stored"], 0, "{stats}");
}

/// A connect error: nothing was sent, so the key is free at once, and a
/// retry once the upstream is back runs it exactly once.
pub(crate) async fn unclear_connect_error_is_502_and_frees_the_key(redis: bool) {
    let dead = dead_url().await;
    let proxy = proxy(&dead, redis, &["--lease-ttl", LEASE_TTL]).await;

    let first = proxy
        .send(Method::POST, "/orders", Some("down-e"), "{}")
        .await;
    assert_eq!(first.status, StatusCode::BAD_GATEWAY);
    assert_eq!(first.content_type(), "application/problem+json");

    let upstream = Upstream::start_at(&dead).await;
    let retry = proxy
        .send(Method::POST, "/orders", Some("down-e"), "{}")
        .await;
    assert_eq!(retry.status, StatusCode::CREATED, "{retry:?}");
    assert!(!retry.replayed());
    let again = proxy
        .send(Method::POST, "/orders", Some("down-e"), "{}")
        .await;
    assert!(again.replayed());
    assert_eq!(again.body, retry.body);
    assert_eq!(upstream.executions(), 1);
    assert_eq!(proxy.stats().await["ambiguous"], 0);
}

/// Retries `key` until it is replayed (each try is answered 409 while the
/// first run goes on, never run again); answers the replay.
async fn replayed_once_recorded(proxy: &Proxy, path: &str, key: &str) -> Reply {
    timeout(QUICK, async {
        loop {
            let reply = proxy.send(Method::POST, path, Some(key), "{}").await;
            if reply.replayed() {
                return reply;
            }
            assert_eq!(reply.status, StatusCode::CONFLICT, "{reply:?}");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the background exchange is recorded in time")
}

/// A replay of a recorded head, its body omitted.
fn omitted_replay(reply: &Reply) -> bool {
    reply.status == StatusCode::CREATED
        && reply.replayed()
        && reply.body.is_empty()
        && reply
            .headers
            .get("idempotency-replay")
            .is_some_and(|v| v == "omitted")
}

/// POSTs `{}` to `path` with `key` and answers the head's status and the
/// body still to read.
async fn open(proxy: &Proxy, path: &str, key: &str) -> (StatusCode, Incoming) {
    let request = Request::post(format!("{}{path}", proxy.url))
        .header("idempotency-key", key)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let response = timeout(QUICK, client.request(request))
        .await
        .expect("the head comes in time")
        .expect("the request goes through");
    (response.status(), response.into_body())
}
