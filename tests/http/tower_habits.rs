//! Tower habits: `Idempotent::{get_ref, get_mut, into_inner, layer}`, and
//! what axum's `Router::layer` and `route_layer` protect (the fallback too,
//! or only the routes).

use std::convert::Infallible;
use std::time::Duration;

use axum::body::Body;
use axum::routing::post;
use axum::Router;
use http::{Request, Response, StatusCode};
use tokio::time::timeout;
use tower::{Layer, ServiceExt};
use tower_idempotency::{IdempotencyLayer, Idempotent, RequestBody};

const LIMIT: Duration = Duration::from_secs(20);

fn keyed_post(path: &str, key: &str) -> Request<Body> {
    Request::post(path)
        .header("idempotency-key", key)
        .body(Body::from("{}"))
        .unwrap()
}

async fn create() -> (StatusCode, &'static str) {
    (StatusCode::CREATED, "created")
}

#[tokio::test]
async fn router_layer_also_covers_the_fallback_and_stores_its_404() {
    let layer = IdempotencyLayer::new();
    let handle = layer.handle();
    let app = Router::new().route("/orders", post(create)).layer(layer);

    let first = timeout(LIMIT, app.clone().oneshot(keyed_post("/nowhere", "k-1")))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.status(), StatusCode::NOT_FOUND);
    let retry = timeout(LIMIT, app.oneshot(keyed_post("/nowhere", "k-1")))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(retry.status(), StatusCode::NOT_FOUND);
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    assert_eq!((handle.stats().executed, handle.stats().replayed), (1, 1));
}

#[tokio::test]
async fn route_layer_leaves_the_fallback_alone() {
    let layer = IdempotencyLayer::new();
    let handle = layer.handle();
    let app = Router::new()
        .route("/orders", post(create))
        .route_layer(layer);

    for _ in 0..2 {
        let answer = timeout(LIMIT, app.clone().oneshot(keyed_post("/nowhere", "k-1")))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(answer.status(), StatusCode::NOT_FOUND);
        assert!(answer.headers().get("idempotent-replayed").is_none());
    }
    assert_eq!(handle.stats().executed, 0);

    // The routes are protected as with `layer`.
    let first = timeout(LIMIT, app.clone().oneshot(keyed_post("/orders", "k-2")))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    let retry = timeout(LIMIT, app.oneshot(keyed_post("/orders", "k-2")))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
}

/// A service with a state to look at through the wrapper.
#[derive(Clone)]
struct Named(&'static str);

impl tower::Service<Request<RequestBody<Body>>> for Named {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Response<Body>, Infallible>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<RequestBody<Body>>) -> Self::Future {
        std::future::ready(Ok(Response::new(Body::from(self.0))))
    }
}

#[tokio::test]
async fn the_inner_service_can_be_read_changed_and_taken_back() {
    let layer = Idempotent::layer().require_key(true).build().unwrap();
    let mut service = layer.layer(Named("first"));
    assert_eq!(service.get_ref().0, "first");
    service.get_mut().0 = "second";
    assert_eq!(service.get_ref().0, "second");

    // The layer from `Idempotent::layer()` is the builder's: keyless POSTs
    // are refused, so the setting took.
    let refused = timeout(
        LIMIT,
        service
            .clone()
            .oneshot(Request::post("/").body(Body::empty()).unwrap()),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
    let answered = timeout(LIMIT, service.clone().oneshot(keyed_post("/", "k-1")))
        .await
        .unwrap()
        .unwrap();
    let body = axum::body::to_bytes(Body::new(answered.into_body()), 64)
        .await
        .unwrap();
    assert_eq!(body, "second");

    let inner: Named = service.into_inner();
    assert_eq!(inner.0, "second");
}
