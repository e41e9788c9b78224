//! The admin plane's safety: the token on writes (and on reads with
//! `--admin-token-reads`), the `Host` rule, the headers of every answer and
//! the page's policy, the in-flight guard on `DELETE /keys`, paged `/keys`,
//! the response write timeout, and the flag mistakes refused at start.

use http::{Method, StatusCode};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::timeout;

use super::harness::{
    send, send_with, send_within, spawn, token_file, url_encode, Proxy, Reply, QUICK,
};
use super::upstream::Upstream;
use super::{eventually, redis_url};

fn assert_problem(reply: &Reply, status: StatusCode) {
    assert_eq!(reply.status, status, "{:?}", reply.body);
    assert_eq!(reply.content_type(), "application/problem+json");
    assert_eq!(reply.json()["status"], status.as_u16());
}

fn header<'a>(reply: &'a Reply, name: &str) -> &'a str {
    reply
        .headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// The storage key of the one key the proxy lists in state `state`.
async fn listed_key(proxy: &Proxy, state: &str) -> String {
    let (status, page) = proxy.admin_json("/keys").await;
    assert_eq!(status, StatusCode::OK);
    let keys: Vec<&Value> = page["keys"]
        .as_array()
        .expect("a page of keys")
        .iter()
        .filter(|key| key["state"] == state)
        .collect();
    assert_eq!(keys.len(), 1, "{page}");
    keys[0]["key"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn admin_writes_need_the_token_and_a_refused_write_changes_nothing() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start_with_token(&["--upstream", &upstream.url]).await;
    let created = proxy
        .send(Method::POST, "/orders", Some("tok-1"), "{}")
        .await;
    assert_eq!(created.status, StatusCode::CREATED);
    let key = listed_key(&proxy, "completed").await;
    let (_, before) = proxy.admin_json("/config").await;
    let config = format!("{}/config", proxy.admin);
    let delete = format!("{}/keys/{}", proxy.admin, url_encode(&key));

    let wrong = [("authorization", "Bearer not-the-token")];
    let basic = [("authorization", "Basic dXNlcjpwYXNz")];
    for headers in [&[][..], &wrong[..], &basic[..]] {
        for (method, url, body) in [
            (Method::PUT, &config, r#"{"ttl_secs": 5}"#),
            (Method::DELETE, &delete, ""),
        ] {
            let reply = send_with(method.clone(), url, headers, body).await;
            assert_problem(&reply, StatusCode::UNAUTHORIZED);
            assert_eq!(header(&reply, "www-authenticate"), "Bearer", "{method}");
        }
    }
    assert_eq!(
        proxy.admin_json("/config").await.1,
        before,
        "a refused PUT changed nothing"
    );
    assert_eq!(
        listed_key(&proxy, "completed").await,
        key,
        "a refused DELETE changed nothing"
    );

    // Reads stay open; with the token, writes go through.
    assert_eq!(proxy.admin_json("/stats").await.0, StatusCode::OK);
    let put = proxy
        .admin_write(Method::PUT, "/config", r#"{"ttl_secs": 5}"#)
        .await;
    assert_eq!(put.status, StatusCode::OK);
    assert_eq!(put.json()["ttl_secs"], 5.0);
    let path = format!("/keys/{}", url_encode(&key));
    let deleted = proxy.admin_write(Method::DELETE, &path, "").await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn without_a_token_the_admin_server_is_read_only() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(&["--upstream", &upstream.url]).await;
    let (_, before) = proxy.admin_json("/config").await;
    for (method, path) in [(Method::PUT, "/config"), (Method::DELETE, "/keys/a:b:c")] {
        let url = format!("{}{path}", proxy.admin);
        let bearer = [("authorization", "Bearer anything")];
        let reply = send_with(method, &url, &bearer, r#"{"ttl_secs": 5}"#).await;
        assert_problem(&reply, StatusCode::FORBIDDEN);
        let detail = reply.json()["detail"].as_str().unwrap().to_owned();
        assert!(
            detail.contains("--admin-token-file") && detail.contains("IDEMPOTENCY_ADMIN_TOKEN"),
            "{detail}"
        );
    }
    assert_eq!(proxy.admin_json("/config").await.1, before);
    for path in [
        "/", "/stats", "/metrics", "/healthz", "/keys", "/rate", "/config",
    ] {
        let reply = send(Method::GET, &format!("{}{path}", proxy.admin), None, "").await;
        assert_eq!(reply.status, StatusCode::OK, "{path}");
    }
}

#[tokio::test]
async fn the_token_may_come_from_the_environment() {
    let upstream = Upstream::start().await;
    let env = [("IDEMPOTENCY_ADMIN_TOKEN", "from-the-env")];
    let (child, ready, _log) =
        super::harness::spawn_env(&["--upstream", &upstream.url], &env).await;
    let ready = ready.expect("the proxy starts");
    let admin = ready
        .split("admin on ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .unwrap()
        .to_owned();
    let url = format!("{admin}/config");
    let refused = send_with(Method::PUT, &url, &[], "{}").await;
    assert_problem(&refused, StatusCode::UNAUTHORIZED);
    let bearer = [("authorization", "Bearer from-the-env")];
    assert_eq!(
        send_with(Method::PUT, &url, &bearer, "{}").await.status,
        StatusCode::OK
    );
    drop(child);
}

#[tokio::test]
async fn token_reads_put_every_read_but_the_page_behind_the_token() {
    let upstream = Upstream::start().await;
    let proxy =
        Proxy::start_with_token(&["--upstream", &upstream.url, "--admin-token-reads"]).await;
    for path in [
        "/stats", "/metrics", "/healthz", "/keys", "/rate", "/config",
    ] {
        let url = format!("{}{path}", proxy.admin);
        let refused = send(Method::GET, &url, None, "").await;
        assert_problem(&refused, StatusCode::UNAUTHORIZED);
        assert_eq!(
            proxy.admin_write(Method::GET, path, "").await.status,
            StatusCode::OK,
            "{path}"
        );
    }
    let page = send(Method::GET, &format!("{}/", proxy.admin), None, "").await;
    assert_eq!(page.status, StatusCode::OK, "the page itself holds no data");
}

#[tokio::test]
async fn a_token_file_others_may_read_is_refused_at_start() {
    for mode in [0o640, 0o604] {
        let (file, _) = token_file(mode);
        let file = file.display().to_string();
        let (mut child, ready, log) = spawn(&["--admin-token-file", &file]).await;
        assert!(ready.is_none(), "mode {mode:o} was accepted");
        let status = timeout(QUICK, child.wait()).await.unwrap().unwrap();
        assert_eq!(status.code(), Some(2));
        eventually("the error says how to fix it", || {
            let log = log.clone();
            async move { log.lock().unwrap().contains("chmod 600") }
        })
        .await;
    }
    let (mut child, ready, _) = spawn(&["--admin-token-reads"]).await;
    assert!(
        ready.is_none(),
        "--admin-token-reads without a token was accepted"
    );
    let status = timeout(QUICK, child.wait()).await.unwrap().unwrap();
    assert_eq!(status.code(), Some(2));
}

#[tokio::test]
async fn foreign_host_names_get_421_and_every_answer_is_stamped() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(&["--upstream", &upstream.url, "--admin-host", "Admin.Test"]).await;
    let port = proxy.admin.rsplit(':').next().unwrap().to_owned();
    let stats = format!("{}/stats", proxy.admin);
    for host in ["evil.example", "127.0.0.1.nip.io", "localhost.evil.example"] {
        let host = format!("{host}:{port}");
        let reply = send_with(Method::GET, &stats, &[("host", host.as_str())], "").await;
        assert_problem(&reply, StatusCode::MISDIRECTED_REQUEST);
        assert_eq!(header(&reply, "x-content-type-options"), "nosniff");
        assert_eq!(header(&reply, "cache-control"), "no-store");
    }
    for host in ["localhost", "admin.test", "127.0.0.1", "[::1]"] {
        let host = format!("{host}:{port}");
        let reply = send_with(Method::GET, &stats, &[("host", host.as_str())], "").await;
        assert_eq!(reply.status, StatusCode::OK, "{host}");
        assert_eq!(header(&reply, "x-content-type-options"), "nosniff");
        assert_eq!(header(&reply, "cache-control"), "no-store");
    }

    // The page's policy names its own inline script and style by hash.
    let page = send(Method::GET, &format!("{}/", proxy.admin), None, "").await;
    let html = String::from_utf8(page.body.to_vec()).unwrap();
    let policy = header(&page, "content-security-policy");
    for tag in ["script", "style"] {
        let start = html.find(&format!("<{tag}>")).unwrap() + tag.len() + 2;
        let end = start + html[start..].find(&format!("</{tag}>")).unwrap();
        let hash = base64(&Sha256::digest(&html.as_bytes()[start..end]));
        assert!(
            policy.contains(&format!("{tag}-src 'sha256-{hash}'")),
            "{tag}: {policy}"
        );
    }
    for part in ["default-src 'none'", "frame-ancestors 'none'"] {
        assert!(policy.contains(part), "{policy}");
    }
    assert_eq!(html.matches("<script").count(), 1, "one inline script");
    assert!(!html.contains(" style=\""), "no inline style attributes");
}

/// The HTTP/2 `:authority` is held to the same rule as `Host`.
#[tokio::test]
async fn http2_authority_is_checked_too() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(&["--upstream", &upstream.url]).await;
    let address = proxy.admin.trim_start_matches("http://").to_owned();
    let stream = timeout(QUICK, TcpStream::connect(&address))
        .await
        .unwrap()
        .unwrap();
    let (mut sender, connection) = timeout(
        QUICK,
        hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(stream),
        ),
    )
    .await
    .unwrap()
    .unwrap();
    tokio::spawn(connection);
    let port = address.rsplit(':').next().unwrap();
    for (authority, status) in [
        (
            format!("evil.example:{port}"),
            StatusCode::MISDIRECTED_REQUEST,
        ),
        (address.clone(), StatusCode::OK),
    ] {
        let request = http::Request::get(format!("http://{authority}/stats"))
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let response = timeout(QUICK, sender.send_request(request))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(response.status(), status, "{authority}");
    }
}

#[tokio::test]
async fn an_in_flight_key_is_deleted_only_with_in_flight_true() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start_with_token(&["--upstream", &upstream.url]).await;
    let url = format!("{}/slow", proxy.url);
    let held = tokio::spawn(async move {
        send_within(
            QUICK,
            Method::POST,
            &url,
            &[("idempotency-key", "held")],
            "{}",
        )
        .await
    });
    upstream.entered().await;
    let key = listed_key(&proxy, "in_flight").await;
    let path = format!("/keys/{}", url_encode(&key));

    let refused = proxy.admin_write(Method::DELETE, &path, "").await;
    assert_problem(&refused, StatusCode::CONFLICT);
    assert!(refused.json()["detail"]
        .as_str()
        .unwrap()
        .contains("in_flight=true"));
    assert_eq!(
        listed_key(&proxy, "in_flight").await,
        key,
        "still in flight"
    );
    assert_eq!(proxy.stats().await["admin_deletes"], 0);

    let forced = proxy
        .admin_write(Method::DELETE, &format!("{path}?in_flight=true"), "")
        .await;
    assert_eq!(forced.status, StatusCode::NO_CONTENT);
    assert_eq!(proxy.stats().await["admin_deletes"], 1);
    let metrics = send(Method::GET, &format!("{}/metrics", proxy.admin), None, "").await;
    let metrics = String::from_utf8_lossy(&metrics.body).into_owned();
    assert!(
        metrics
            .lines()
            .any(|l| l == "idempotency_admin_deletes_total 1"),
        "{metrics}"
    );
    eventually("the forced delete is logged with its key", || {
        let log = proxy.log_text();
        let key = key.clone();
        async move {
            log.lines()
                .any(|line| line.contains("WARN") && line.contains(&key))
        }
    })
    .await;
    let bad = proxy
        .admin_write(Method::DELETE, &format!("{path}?in_flight=maybe"), "")
        .await;
    assert_problem(&bad, StatusCode::BAD_REQUEST);

    upstream.release(1);
    let reply = timeout(QUICK, held).await.unwrap().unwrap();
    assert_eq!(reply.status, StatusCode::CREATED);
}

#[tokio::test]
async fn keys_are_listed_a_page_at_a_time() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(&["--upstream", &upstream.url]).await;
    for i in 0..25 {
        let reply = proxy
            .send(Method::POST, "/orders", Some(&format!("page-{i}")), "{}")
            .await;
        assert_eq!(reply.status, StatusCode::CREATED);
    }
    let (_, first) = proxy.admin_json("/keys").await;
    assert_eq!(
        first["keys"].as_array().unwrap().len(),
        25,
        "default limit 100"
    );
    assert_eq!(first["next_cursor"], Value::Null);

    let mut seen = std::collections::BTreeSet::new();
    let mut cursor: Option<String> = None;
    for _ in 0..10 {
        let path = match &cursor {
            Some(cursor) => format!("/keys?limit=10&cursor={}", url_encode(cursor)),
            None => "/keys?limit=10".to_owned(),
        };
        let (status, page) = proxy.admin_json(&path).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        let keys = page["keys"].as_array().unwrap();
        assert!(keys.len() <= 10, "{page}");
        seen.extend(keys.iter().map(|k| k["key"].as_str().unwrap().to_owned()));
        cursor = page["next_cursor"].as_str().map(str::to_owned);
        if cursor.is_none() {
            break;
        }
    }
    assert!(cursor.is_none(), "the pages end");
    assert_eq!(seen.len(), 25);

    for bad in [
        "/keys?limit=0",
        "/keys?limit=1001",
        "/keys?limit=ten",
        "/keys?cursor=not-ours",
    ] {
        let reply = send(Method::GET, &format!("{}{bad}", proxy.admin), None, "").await;
        assert_problem(&reply, StatusCode::BAD_REQUEST);
    }
}

/// A client that asks for a large response and never reads: its connection
/// is closed after --response-write-timeout, its slot freed, and the
/// response is recorded all the same (the retry replays it).
#[tokio::test]
async fn a_client_that_never_reads_is_cut_off_and_the_result_recorded() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(&[
        "--upstream",
        &upstream.url,
        "--response-write-timeout",
        "1",
        "--max-response-body",
        "67108864",
        "--concurrent",
        "wait",
    ])
    .await;
    const BYTES: usize = 32 << 20;
    let address = proxy.url.trim_start_matches("http://").to_owned();
    let mut stalled = timeout(QUICK, TcpStream::connect(&address))
        .await
        .unwrap()
        .unwrap();
    let request = format!(
        "POST /big?bytes={BYTES} HTTP/1.1\r\nhost: {address}\r\nidempotency-key: stall\r\n\
         content-length: 2\r\n\r\n{{}}"
    );
    timeout(QUICK, stalled.write_all(request.as_bytes()))
        .await
        .unwrap()
        .unwrap();
    // Never read. The proxy gives up on the connection and frees its slot.
    eventually("the stalled connection is closed", || async {
        let stats = proxy.stats().await;
        stats["write_timeouts"] == 1 && stats["connections"] == 0
    })
    .await;
    assert_eq!(upstream.executions(), 1);
    let retry = proxy
        .send(
            Method::POST,
            &format!("/big?bytes={BYTES}"),
            Some("stall"),
            "{}",
        )
        .await;
    assert!(retry.replayed(), "the result was recorded");
    assert_eq!(retry.body.len(), BYTES);
    assert_eq!(upstream.executions(), 1);
    drop(stalled);
}

#[tokio::test]
async fn flag_mistakes_are_refused_with_exit_code_2() {
    let postgres = "postgres://postgres@127.0.0.1:5432/test";
    let redis = redis_url();
    for args in [
        &["--postgres", postgres, "--redis-replicas", "1"][..],
        &["--redis-replicas", "1"],
        &["--redis", redis.as_str(), "--max-entries", "100"],
        &[
            "--redis-cluster",
            "redis://127.0.0.1:7000",
            "--max-entries",
            "100",
        ],
        &["--postgres", postgres, "--max-entries", "100"],
    ] {
        let (mut child, ready, log) = spawn(args).await;
        assert!(ready.is_none(), "{args:?} was accepted");
        let status = timeout(QUICK, child.wait()).await.unwrap().unwrap();
        assert_eq!(status.code(), Some(2), "{args:?}: {}", log.lock().unwrap());
    }
}

/// Standard base64, to check the page's hashes.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            out.push(if i <= chunk.len() {
                char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63])
            } else {
                '='
            });
        }
    }
    out
}
