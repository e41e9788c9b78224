//! Runs the real `reverse_proxy` example binary and talks to it over loopback.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::time::timeout;

/// Budget for anything that should be quick (a request, a start-up).
pub(crate) const QUICK: Duration = Duration::from_secs(20);

/// Builds the example once per test binary, with this test's features, and
/// answers its path.
fn binary() -> &'static PathBuf {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| crate::support::build_example("reverse_proxy"))
}

/// A running proxy. Dropping it kills the process (and shows its log when
/// the test failed).
pub(crate) struct Proxy {
    pub(crate) child: Child,
    pub(crate) url: String,
    pub(crate) admin: String,
    log: Arc<Mutex<String>>,
    /// The admin token, for a proxy started with one.
    pub(crate) token: Option<String>,
}

impl Proxy {
    /// Starts the proxy with `args` (listening on ephemeral ports) and waits
    /// for its `ready:` line.
    pub(crate) async fn start(args: &[&str]) -> Proxy {
        let (child, ready, log) = spawn(args).await;
        let ready = ready.expect("the proxy reports ready");
        let url = between(&ready, "proxy on ", ",");
        let admin = between(&ready, "admin on ", ",");
        Proxy {
            child,
            url,
            admin,
            log,
            token: None,
        }
    }

    /// [`start`](Self::start) with an admin token, in a file only its owner
    /// may read (`--admin-token-file`): admin writes are then allowed with
    /// [`admin_write`](Self::admin_write).
    pub(crate) async fn start_with_token(args: &[&str]) -> Proxy {
        let (file, token) = token_file(0o600);
        let file = file.display().to_string();
        let mut all = vec!["--admin-token-file", file.as_str()];
        all.extend_from_slice(args);
        let mut proxy = Self::start(&all).await;
        proxy.token = Some(token);
        proxy
    }

    /// A request to the admin server with the admin token.
    pub(crate) async fn admin_write(&self, method: Method, path: &str, body: &str) -> Reply {
        let token = self.token.as_deref().expect("a proxy started with a token");
        let bearer = format!("Bearer {token}");
        let url = format!("{}{path}", self.admin);
        send_with(method, &url, &[("authorization", bearer.as_str())], body).await
    }

    /// Sends a request to the proxy.
    pub(crate) async fn send(
        &self,
        method: Method,
        path: &str,
        key: Option<&str>,
        body: &str,
    ) -> Reply {
        send(method, &format!("{}{path}", self.url), key, body).await
    }

    /// `GET` on the admin server, answered as JSON.
    pub(crate) async fn admin_json(&self, path: &str) -> (StatusCode, Value) {
        let reply = send(Method::GET, &format!("{}{path}", self.admin), None, "").await;
        (reply.status, reply.json())
    }

    /// Every key `/keys?{query}` lists, following `next_cursor` to the end:
    /// a Redis page may end before its scan has seen every key.
    pub(crate) async fn all_keys(&self, query: &str) -> Vec<Value> {
        let mut keys = Vec::new();
        let mut path = format!("/keys?{query}");
        loop {
            let (status, page) = self.admin_json(&path).await;
            assert_eq!(status, StatusCode::OK, "{page}");
            keys.extend(page["keys"].as_array().expect("a JSON array").clone());
            match page["next_cursor"].as_str() {
                Some(cursor) => path = format!("/keys?{query}&cursor={cursor}"),
                None => return keys,
            }
        }
    }

    /// `/stats` as a JSON object.
    pub(crate) async fn stats(&self) -> Value {
        let (status, stats) = self.admin_json("/stats").await;
        assert_eq!(status, StatusCode::OK);
        stats
    }

    /// What the proxy logged so far.
    pub(crate) fn log_text(&self) -> String {
        self.log.lock().map(|log| log.clone()).unwrap_or_default()
    }

    /// Sends SIGTERM.
    pub(crate) fn terminate(&self) {
        let pid = self.child.id().expect("the proxy is running");
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
    }

    /// Waits for the process to exit; answers its exit code.
    pub(crate) async fn exit_code(&mut self) -> Option<i32> {
        let status = timeout(QUICK, self.child.wait())
            .await
            .expect("the proxy exits in time")
            .expect("wait on the proxy");
        status.code()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        if std::thread::panicking() {
            if let Ok(log) = self.log.lock() {
                eprintln!("--- reverse_proxy log ---\n{log}--- end of log ---");
            }
        }
    }
}

/// Runs the proxy with `args` and waits until it reports ready or exits:
/// answers the child, its `ready:` line (None when it exited first), and its
/// log (stderr).
pub(crate) async fn spawn(args: &[&str]) -> (Child, Option<String>, Arc<Mutex<String>>) {
    spawn_env(args, &[]).await
}

/// [`spawn`] with environment variables `env` set for the proxy.
pub(crate) async fn spawn_env(
    args: &[&str],
    env: &[(&str, &str)],
) -> (Child, Option<String>, Arc<Mutex<String>>) {
    let mut child = Command::new(binary())
        .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .args(args)
        .envs(env.iter().copied())
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the example starts");
    let log = Arc::new(Mutex::new(String::new()));
    let mut stderr = child.stderr.take().expect("piped stderr");
    let sink = log.clone();
    tokio::spawn(async move {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = stderr.read(&mut chunk).await {
            if n == 0 {
                break;
            }
            if let Ok(mut log) = sink.lock() {
                log.push_str(&String::from_utf8_lossy(&chunk[..n]));
            }
        }
    });
    let mut lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
    let ready = timeout(QUICK, async {
        while let Some(line) = lines.next_line().await.expect("read stdout") {
            if line.starts_with("ready:") {
                return Some(line);
            }
        }
        None
    })
    .await
    .expect("the proxy reports ready or exits in time");
    // Keep reading stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, ready, log)
}

/// A file holding a fresh admin token, with permissions `mode`; answers its
/// path and the token.
pub(crate) fn token_file(mode: u32) -> (PathBuf, String) {
    use std::os::unix::fs::PermissionsExt;
    let token = format!("{:032x}", rand::random::<u128>());
    let path = std::env::temp_dir().join(format!("admin-token-{:016x}", rand::random::<u64>()));
    std::fs::write(&path, format!("{token}\n")).expect("write the token file");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
        .expect("set the token file's mode");
    (path, token)
}

fn between(text: &str, start: &str, end: &str) -> String {
    let from = text.find(start).expect("marker in ready line") + start.len();
    let rest = &text[from..];
    rest[..rest.find(end).unwrap_or(rest.len())].to_owned()
}

/// An answer, fully read.
#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
}

impl Reply {
    pub(crate) fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    pub(crate) fn replayed(&self) -> bool {
        self.headers
            .get("idempotent-replayed")
            .is_some_and(|v| v == "true")
    }

    pub(crate) fn content_type(&self) -> &str {
        self.headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

/// Sends one request, with an `Idempotency-Key` when `key` is given.
pub(crate) async fn send(method: Method, url: &str, key: Option<&str>, body: &str) -> Reply {
    let key = key.map(|key| ("idempotency-key", key));
    send_with(method, url, key.as_slice(), body).await
}

/// Sends one request with `headers` and reads the whole answer, all under [`QUICK`].
pub(crate) async fn send_with(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Reply {
    send_within(QUICK, method, url, headers, body).await
}

/// [`send_with`], waiting up to `limit` for the answer: for a request the
/// upstream holds while the test does something slow.
pub(crate) async fn send_within(
    limit: Duration,
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Reply {
    let mut request = Request::builder().method(method).uri(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    if !body.is_empty() {
        request = request.header("content-type", "application/json");
    }
    let request = request
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap();
    // A client per request: each test has its own runtime, and a pooled
    // connection must not outlive the runtime that drives it.
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let response = timeout(limit, client.request(request))
        .await
        .expect("the answer comes in time")
        .expect("the request goes through");
    let (parts, body) = response.into_parts();
    let body = timeout(QUICK, body.collect())
        .await
        .expect("the body comes in time")
        .expect("the body reads")
        .to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// Percent-encodes everything but unreserved characters (RFC 3986): a key
/// or a cursor as one segment of an admin path or query.
pub(crate) fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
