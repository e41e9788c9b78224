//! First responses stream to the client, and are stored before their last
//! chunk arrives: a retry sent the moment the response ended always replays.

use crate::support::common;
use crate::support::stores;

use axum::body::Body;
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use common::*;
use http::{HeaderMap, Method, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use stores::{per_store, TestStore};
use tower_idempotency::IdempotencyLayer;

/// A body of `parts` frames, each produced after a yield to the scheduler.
fn chunked(parts: usize) -> Body {
    let frames = futures_util::stream::unfold(0, move |i| async move {
        if i == parts {
            return None;
        }
        tokio::task::yield_now().await;
        Some((
            Ok::<_, BoxError>(Frame::data(Bytes::from(format!("part{i};")))),
            i + 1,
        ))
    });
    Body::new(StreamBody::new(frames))
}

fn app(runs: Runs, store: TestStore) -> Router {
    let count = move |runs: Runs| {
        move || {
            runs.bump();
        }
    };
    let (a, b, c, d, e) = (
        count(runs.clone()),
        count(runs.clone()),
        count(runs.clone()),
        count(runs.clone()),
        count(runs),
    );
    Router::new()
        // Chunked: the end is only known when the body ends.
        .route(
            "/chunked",
            post(move || {
                a();
                async { chunked(5) }
            }),
        )
        // A declared length with a body that does not know its own end: the
        // frame that reaches the length ends the response for the client.
        .route(
            "/declared",
            post(move || {
                b();
                async { ([("content-length", "30")], chunked(5)) }
            }),
        )
        // One full frame.
        .route(
            "/full",
            post(move || {
                c();
                async { "the whole body" }
            }),
        )
        // No body at all.
        .route(
            "/empty",
            post(move || {
                d();
                async { StatusCode::NO_CONTENT }
            }),
        )
        // Data, then trailers.
        .route(
            "/trailers",
            post(move || {
                e();
                async {
                    let mut trailers = HeaderMap::new();
                    trailers.insert("x-checksum", "abc".parse().unwrap());
                    let frames = futures_util::stream::iter([
                        Ok::<_, BoxError>(Frame::data(Bytes::from("data"))),
                        Ok(Frame::trailers(trailers)),
                    ]);
                    // HTTP/1 sends only the trailers the head announces.
                    (
                        [("trailer", "x-checksum")],
                        Body::new(StreamBody::new(frames)),
                    )
                }
            }),
        )
        .layer(IdempotencyLayer::builder().store(store).build().unwrap())
}

per_store!(
    a_retry_sent_when_the_response_ended_always_replays,
    flavor = "multi_thread",
    worker_threads = 2
);
async fn a_retry_sent_when_the_response_ended_always_replays(store: TestStore) {
    let runs = Runs::default();
    let server = serve(app(runs.clone(), store)).await;
    let rounds = 40;
    for path in ["/chunked", "/declared", "/full", "/empty"] {
        for round in 0..rounds {
            let key = format!("{path}-{round}");
            let first = server.post(path, Some(&key), "").await;
            assert!(first.status.is_success(), "{path}: {first:?}");
            // Sent the moment the first response was read to its end: the
            // record must already be there (Reject would answer 409 otherwise).
            let retry = server.post(path, Some(&key), "").await;
            assert_eq!(retry.status, first.status, "{path} round {round}");
            assert!(retry.replayed(), "{path} round {round}");
            assert_eq!(retry.body, first.body);
        }
    }
    assert_eq!(runs.get(), 4 * rounds);
}

per_store!(chunked_and_declared_bodies_arrive_whole);
async fn chunked_and_declared_bodies_arrive_whole(store: TestStore) {
    let server = serve(app(Runs::default(), store)).await;
    let chunked = server.post("/chunked", Some("c"), "").await;
    assert_eq!(chunked.text(), "part0;part1;part2;part3;part4;");
    let declared = server.post("/declared", Some("d"), "").await;
    assert_eq!(declared.text(), "part0;part1;part2;part3;part4;");
    assert_eq!(declared.headers["content-length"], "30");
}

per_store!(trailers_reach_the_first_client_and_the_body_is_replayed);
async fn trailers_reach_the_first_client_and_the_body_is_replayed(store: TestStore) {
    let runs = Runs::default();
    let server = serve(app(runs.clone(), store)).await;
    let request = || {
        server
            .request(Method::POST, "/trailers")
            .header("idempotency-key", "t")
            .header("te", "trailers")
            .body(full(""))
            .unwrap()
    };
    let response = server.raw(request()).await;
    let collected = within(response.into_body().collect()).await.unwrap();
    assert_eq!(collected.trailers().unwrap()["x-checksum"], "abc");
    assert_eq!(collected.to_bytes(), "data");
    let retry = server.send(request()).await;
    assert!(retry.replayed());
    assert_eq!(retry.text(), "data");
    assert!(retry.headers.get("trailer").is_none());
    assert_eq!(runs.get(), 1);
}

per_store!(a_body_that_fails_midway_is_an_error_for_the_client_and_not_stored);
async fn a_body_that_fails_midway_is_an_error_for_the_client_and_not_stored(store: TestStore) {
    let runs = Runs::default();
    let app = Router::new()
        .route(
            "/broken",
            post({
                let runs = runs.clone();
                move || {
                    let run = runs.bump();
                    async move {
                        let frames = futures_util::stream::unfold(0, move |i| async move {
                            match i {
                                0 => {
                                    Some((Ok::<_, BoxError>(Frame::data(Bytes::from("start;"))), 1))
                                }
                                1 if run == 1 => panic!("the body breaks"),
                                1 => Some((Ok(Frame::data(Bytes::from("end"))), 2)),
                                _ => None,
                            }
                        });
                        Body::new(StreamBody::new(frames))
                    }
                }
            }),
        )
        .layer(IdempotencyLayer::builder().store(store).build().unwrap());
    let server = serve(app).await;
    let request = || {
        server
            .request(Method::POST, "/broken")
            .header("idempotency-key", "b")
            .body(full(""))
            .unwrap()
    };
    // A chunked body that breaks must not look complete: the client sees an
    // error, at the head (hyper had not flushed it yet) or in the body.
    match within(server.client.request(request())).await {
        Err(_) => {}
        Ok(response) => assert!(within(response.into_body().collect()).await.is_err()),
    }
    // The broken connection is gone; a new client retries.
    let fresh = Server {
        addr: server.addr,
        client: client(),
    };
    let retry = fresh.send(request()).await;
    assert_eq!(retry.text(), "start;end");
    assert!(!retry.replayed());
    assert_eq!(runs.get(), 2);
}

per_store!(trailers_are_recorded_and_replayed_after_the_body);
/// Trailers end the first response and its replay alike (in process, where
/// no HTTP/1 framing drops them), with the same names, order and values.
async fn trailers_are_recorded_and_replayed_after_the_body(store: TestStore) {
    use tower::ServiceExt;
    let runs = Runs::default();
    let app = Router::new()
        .route(
            "/status",
            post({
                let runs = runs.clone();
                move || async move {
                    runs.bump();
                    let mut trailers = HeaderMap::new();
                    trailers.insert("grpc-status", "9".parse().unwrap());
                    trailers.append("x-detail", "a".parse().unwrap());
                    trailers.append("x-detail", "b".parse().unwrap());
                    let frames = futures_util::stream::iter([
                        Ok::<_, BoxError>(Frame::data(Bytes::from("message"))),
                        Ok(Frame::trailers(trailers)),
                    ]);
                    // Announced, so the record waits for them.
                    (
                        [("trailer", "grpc-status, x-detail")],
                        Body::new(StreamBody::new(frames)),
                    )
                }
            }),
        )
        .layer(IdempotencyLayer::builder().store(store).build().unwrap());
    let request = || {
        http::Request::post("/status")
            .header("idempotency-key", "tr")
            .body(Body::empty())
            .unwrap()
    };
    let mut seen = Vec::new();
    for _ in 0..2 {
        let response = within(app.clone().oneshot(request())).await.unwrap();
        let replayed = response.headers().contains_key("idempotent-replayed");
        let collected = within(response.into_body().collect()).await.unwrap();
        let trailers = collected
            .trailers()
            .cloned()
            .expect("trailers follow the body");
        seen.push((replayed, collected.to_bytes(), trailers));
    }
    assert!(!seen[0].0 && seen[1].0);
    assert_eq!(seen[0].1, "message");
    assert_eq!(seen[1].1, "message");
    assert_eq!(seen[1].2, seen[0].2);
    let details: Vec<_> = seen[1].2.get_all("x-detail").iter().collect();
    assert_eq!(details, ["a", "b"]);
    assert_eq!(runs.get(), 1);
}
