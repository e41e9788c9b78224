//! This crate's layer against the `axum-idempotent` crate (0.6) on the same
//! axum handler, with the same bodies (0 B, 1 KiB, 64 KiB), in the same run.
//! Both routers are driven in process with `tower::ServiceExt::oneshot`.
//!
//! `axum-idempotent` is set up as its README says: header mode on
//! `Idempotency-Key`, inside a `ruts` `SessionLayer` (moka session store)
//! inside a `CookieManagerLayer`. It caches nothing for a request without a
//! session, so each simulated client logs in once (untimed, on a route outside
//! the idempotency layer) and sends its cookie; on the miss path a client
//! takes a fresh session every 100 keys, since the session store rewrites a
//! session's whole field map on every write. Only the requests to `/orders`
//! are timed. This crate's router gets the same requests, cookie included.
//!
//! `axum-idempotent-hashing` is the peer in its default mode (the key is a
//! hash of method, path, headers and body), the closer match to this crate,
//! which fingerprints the body.

use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue, Request, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use axum::Router;
use axum_idempotent::{IdempotentLayer, IdempotentOptions};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use http_body_util::BodyExt;
use ruts::store::moka::MokaStore;
use ruts::store::Ttl;
use ruts::{CookieOptions, Session, SessionLayer};
use std::sync::Arc;
use tower::ServiceExt;
use tower_cookies::CookieManagerLayer;
use tower_idempotency::IdempotencyLayer;

const ANSWER: &[u8] = br#"{"id":42,"status":"created"}"#;
const SIZES: [(&str, usize); 3] = [("0B", 0), ("1KiB", 1024), ("64KiB", 64 * 1024)];
/// Keys one peer session takes before the client logs in again.
const KEYS_PER_SESSION: u64 = 100;

/// The handler both routers run: reads the body, answers a small JSON.
async fn create(body: Bytes) -> impl IntoResponse {
    std::hint::black_box(body.len());
    (
        StatusCode::CREATED,
        [(header::CONTENT_TYPE, "application/json")],
        ANSWER,
    )
}

async fn login(session: Session<MokaStore>) -> &'static str {
    session
        .set("user", &"bench", Ttl::new(3600).expect("ttl"), None)
        .await
        .expect("session write");
    "logged in"
}

fn bare_router() -> Router {
    Router::new().route("/orders", post(create))
}

fn ours_router() -> Router {
    Router::new()
        .route("/orders", post(create))
        .layer(IdempotencyLayer::new())
}

/// The peer as its README sets it up (header mode); with `hashing`, in its
/// default mode instead, where the key is a BLAKE3 hash of the method, path,
/// headers and body (so a changed body is a new request, as this crate's
/// fingerprint makes it a 422).
fn peer_router(hashing: bool) -> Router {
    let sessions = Arc::new(MokaStore::builder().build());
    let options = IdempotentOptions::default().expire_after(60 * 5);
    let options = if hashing {
        options
    } else {
        options.use_idempotency_key_header(Some("Idempotency-Key"), true)
    };
    Router::new()
        .route("/orders", post(create))
        .layer(IdempotentLayer::<MokaStore>::new(options))
        .route("/login", post(login))
        .layer(
            SessionLayer::new(sessions).with_cookie_options(
                CookieOptions::build()
                    .name("session")
                    .max_age(3600)
                    .path("/"),
            ),
        )
        .layer(CookieManagerLayer::new())
}

/// Logs a client in on the peer's router and answers its cookie.
async fn session_cookie(router: &Router) -> HeaderValue {
    let request = Request::post("/login")
        .body(Body::empty())
        .expect("request");
    let response = router.clone().oneshot(request).await.expect("login");
    let set_cookie = response
        .headers()
        .get_all(header::SET_COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .find(|value| value.starts_with("session="))
        .expect("the login sets a session cookie");
    let pair = set_cookie.split(';').next().unwrap_or(set_cookie);
    HeaderValue::from_str(pair).expect("cookie")
}

fn order(body: &Bytes, key: &str, cookie: &HeaderValue) -> Request<Body> {
    Request::post("/orders")
        .header(header::CONTENT_TYPE, "application/json")
        .header("idempotency-key", key)
        .header(header::COOKIE, cookie.clone())
        .body(Body::from(body.clone()))
        .expect("request")
}

/// Sends one request, reads the whole response; answers whether it was a replay.
async fn send(router: &Router, request: Request<Body>) -> bool {
    let response = router.clone().oneshot(request).await.expect("call");
    assert_eq!(response.status(), StatusCode::CREATED);
    let replayed = response.headers().contains_key("idempotent-replayed")
        || response.headers().contains_key("idempotency-replayed");
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    assert_eq!(&body[..], ANSWER);
    replayed
}

/// A client of `router`: its cookie, and how many keys it has used on it.
struct Client {
    router: Router,
    logs_in: bool,
    cookie: HeaderValue,
    used: u64,
}

impl Client {
    async fn new(router: &Router, logs_in: bool) -> Self {
        let cookie = if logs_in {
            session_cookie(router).await
        } else {
            HeaderValue::from_static("session=none")
        };
        Self {
            router: router.clone(),
            logs_in,
            cookie,
            used: 0,
        }
    }

    /// A new session every `KEYS_PER_SESSION` keys (untimed).
    async fn next_key(&mut self) {
        self.used += 1;
        if self.logs_in && self.used.is_multiple_of(KEYS_PER_SESSION) {
            self.cookie = session_cookie(&self.router).await;
        }
    }
}

fn compare(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let bare = bare_router();
    let ours = ours_router();
    let peer = peer_router(false);
    let peer_hashing = peer_router(true);
    let mut next_key = 0u64;

    for (label, size) in SIZES {
        let body = Bytes::from(vec![b'x'; size]);
        let mut group = c.benchmark_group(format!("peer/{label}"));
        group.throughput(Throughput::Elements(1));

        let anyone = HeaderValue::from_static("session=none");
        group.bench_function(BenchmarkId::from_parameter("bare"), |b| {
            b.to_async(&rt).iter(|| async {
                let key = "unused";
                send(&bare, order(&body, key, &anyone)).await
            });
        });

        for (name, router, logs_in) in [
            ("ours", &ours, false),
            ("axum-idempotent", &peer, true),
            ("axum-idempotent-hashing", &peer_hashing, true),
        ] {
            // Replay: one client, one key, answered from the store after the
            // first call (checked before timing).
            let key = format!("replay-{label}");
            let cookie = rt.block_on(async {
                let client = Client::new(router, logs_in).await;
                assert!(!send(router, order(&body, &key, &client.cookie)).await);
                assert!(
                    send(router, order(&body, &key, &client.cookie)).await,
                    "{name} replays the second call"
                );
                client.cookie
            });
            group.bench_function(BenchmarkId::new("replay", name), |b| {
                b.to_async(&rt)
                    .iter(|| async { send(router, order(&body, &key, &cookie)).await });
            });

            // Miss: a new key each call; logins are not timed.
            group.bench_function(BenchmarkId::new("miss", name), |b| {
                b.to_async(&rt).iter_custom(|iters| {
                    let router = router.clone();
                    let body = body.clone();
                    let first = next_key;
                    next_key += iters;
                    async move {
                        let mut client = Client::new(&router, logs_in).await;
                        let mut timed = Duration::ZERO;
                        for n in first..first + iters {
                            let key = format!("miss-{n}");
                            let request = order(&body, &key, &client.cookie);
                            let start = Instant::now();
                            let replayed = send(&router, request).await;
                            timed += start.elapsed();
                            assert!(!replayed, "a new key is not a replay");
                            client.next_key().await;
                        }
                        timed
                    }
                });
            });
        }
        group.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(20);
    targets = compare
}
criterion_main!(benches);
