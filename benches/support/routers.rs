//! The routers the peer benches drive: the same axum handler bare, behind
//! this crate's layer, and behind `axum-idempotent` set up as its README
//! says; and a simulated client of them. Shared by `peer.rs` (criterion, one
//! request at a time) and `concurrent.rs` (16 client tasks).

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue, Request, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use axum::Router;
use axum_idempotent::{IdempotentLayer, IdempotentOptions};
use http_body_util::BodyExt;
use ruts::store::moka::MokaStore;
use ruts::store::Ttl;
use ruts::{CookieOptions, Session, SessionLayer};
use tower::ServiceExt;
use tower_cookies::CookieManagerLayer;
use tower_idempotency::IdempotencyLayer;

pub(crate) const ANSWER: &[u8] = br#"{"id":42,"status":"created"}"#;
pub(crate) const SIZES: [(&str, usize); 3] = [("0B", 0), ("1KiB", 1024), ("64KiB", 64 * 1024)];
/// Keys one peer session takes before the client logs in again.
pub(crate) const KEYS_PER_SESSION: u64 = 100;

/// The handler both routers run: reads the body, answers a small JSON.
pub(crate) async fn create(body: Bytes) -> impl IntoResponse {
    std::hint::black_box(body.len());
    (
        StatusCode::CREATED,
        [(header::CONTENT_TYPE, "application/json")],
        ANSWER,
    )
}

pub(crate) async fn login(session: Session<MokaStore>) -> &'static str {
    session
        .set("user", &"bench", Ttl::new(3600).expect("ttl"), None)
        .await
        .expect("session write");
    "logged in"
}

/// The router as `axum::serve` runs it: `into_make_service` calls
/// `with_state(())`, which makes every route's service once. A `Router`
/// called as it is makes them per request instead (a clone of the handler
/// and of every layer on it, and for a layer holding an `Arc`, a count
/// bumped and dropped on a cache line every core shares).
fn served(router: Router) -> Router {
    router.with_state(())
}

pub(crate) fn bare_router() -> Router {
    served(Router::new().route("/orders", post(create)))
}

/// The bare router behind a layer that does nothing (an identity
/// `MapRequestLayer`): what any layer on a `Router` costs axum (a boxed
/// service per route, its clone and future per call), apart from what the
/// layer itself does.
pub(crate) fn noop_layer_router() -> Router {
    served(
        Router::new()
            .route("/orders", post(create))
            .layer(tower::util::MapRequestLayer::new(
                |request: Request<Body>| request,
            )),
    )
}

/// This crate's layer with its defaults; `MAX_ENTRIES` in the environment
/// sets another bound for the memory store (to see the first request at a
/// bound the run never reaches).
pub(crate) fn ours_router() -> Router {
    ours_router_bounded(
        std::env::var("MAX_ENTRIES")
            .ok()
            .and_then(|n| n.parse().ok()),
    )
}

/// A bound for the memory store that no bench run reaches: the store never
/// evicts, as the peer's session store never does in these runs.
pub(crate) const UNREACHED_BOUND: u64 = 100_000_000;

/// This crate's layer with its defaults but the memory store's bound
/// (`None`: the default one).
pub(crate) fn ours_router_bounded(max_entries: Option<u64>) -> Router {
    let layer = match max_entries {
        Some(max_entries) => IdempotencyLayer::builder()
            .max_entries(max_entries)
            .build()
            .expect("a valid bound"),
        None => IdempotencyLayer::new(),
    };
    served(Router::new().route("/orders", post(create)).layer(layer))
}

/// The peer as its README sets it up (header mode); with `hashing`, in its
/// default mode instead, where the key is a BLAKE3 hash of the method, path,
/// headers and body (so a changed body is a new request, as this crate's
/// fingerprint makes it a 422).
pub(crate) fn peer_router(hashing: bool) -> Router {
    let sessions = Arc::new(MokaStore::builder().build());
    let options = IdempotentOptions::default().expire_after(60 * 5);
    let options = if hashing {
        options
    } else {
        options.use_idempotency_key_header(Some("Idempotency-Key"), true)
    };
    served(
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
            .layer(CookieManagerLayer::new()),
    )
}

/// Logs a client in on the peer's router and answers its cookie.
pub(crate) async fn session_cookie(router: &Router) -> HeaderValue {
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

pub(crate) fn order(body: &Bytes, key: &str, cookie: &HeaderValue) -> Request<Body> {
    Request::post("/orders")
        .header(header::CONTENT_TYPE, "application/json")
        .header("idempotency-key", key)
        .header(header::COOKIE, cookie.clone())
        .body(Body::from(body.clone()))
        .expect("request")
}

/// Sends one request, reads the whole response; answers whether it was a replay.
pub(crate) async fn send(router: &Router, request: Request<Body>) -> bool {
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
pub(crate) struct Client {
    router: Router,
    logs_in: bool,
    pub(crate) cookie: HeaderValue,
    used: u64,
}

impl Client {
    pub(crate) async fn new(router: &Router, logs_in: bool) -> Self {
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
    pub(crate) async fn next_key(&mut self) {
        self.used += 1;
        if self.logs_in && self.used.is_multiple_of(KEYS_PER_SESSION) {
            self.cookie = session_cookie(&self.router).await;
        }
    }
}
