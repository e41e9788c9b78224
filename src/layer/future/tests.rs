use std::convert::Infallible;

use http::Request;
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody};
use tower::{service_fn, ServiceBuilder, ServiceExt};

use super::*;
use crate::store::EntryKind;
use crate::{IdempotencyLayer, KeyFilter, RequestBody};

fn post(key: &str) -> Request<Full<Bytes>> {
    Request::post("/orders")
        .header("idempotency-key", key)
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap()
}

async fn completed(layer: &IdempotencyLayer) -> usize {
    let keys = layer.handle().keys(&KeyFilter::new()).await.unwrap();
    keys.iter()
        .filter(|k| k.kind == EntryKind::Completed)
        .count()
}

#[tokio::test]
async fn a_small_body_of_known_length_is_stored_before_its_head_is_handed_on() {
    let layer = IdempotencyLayer::new();
    let service = ServiceBuilder::new()
        .layer(layer.clone())
        .service(service_fn(|_: Request<RequestBody<Full<Bytes>>>| async {
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"created"))))
        }));
    let response = service.oneshot(post("small")).await.unwrap();
    // Head and body are handed on together: the body is whole, and the
    // record already stored.
    assert_eq!(response.body().size_hint().exact(), Some(7));
    assert_eq!(completed(&layer).await, 1);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "created");
}

#[tokio::test]
async fn a_streamed_body_hands_its_head_on_at_once_and_is_stored_at_its_end() {
    let layer = IdempotencyLayer::new();
    let service = ServiceBuilder::new()
        .layer(layer.clone())
        .service(service_fn(|_: Request<RequestBody<Full<Bytes>>>| async {
            let frames = ["part1,", "part2"]
                .map(|part| Ok::<_, Infallible>(Frame::data(Bytes::from_static(part.as_bytes()))));
            let body = StreamBody::new(futures_util::stream::iter(frames));
            Ok::<_, Infallible>(Response::new(body))
        }));
    let response = service.oneshot(post("streamed")).await.unwrap();
    assert_eq!(
        completed(&layer).await,
        0,
        "nothing stored before the body is read"
    );
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "part1,part2");
    assert_eq!(completed(&layer).await, 1);
}
