//! The `grpc_orders` example's service behind the layer on a real tonic
//! server, called by a real tonic client over HTTP/2 on loopback, once per
//! store: a retry replays the message, status and trailers; a refused call
//! replays its status; duplicates in flight run once (`Wait`) or get
//! `ABORTED` (`Reject`); missing keys and mismatches are gRPC statuses; a
//! listed bidirectional method streams, an unlisted one ends with a status.

mod support;

// The example's own code: the generated protobuf module and its service.
#[path = "../examples/grpc_orders/orders.rs"]
#[allow(unreachable_pub, dead_code)]
#[rustfmt::skip]
mod orders;
#[path = "support/grpc.rs"]
mod grpc_support;
#[path = "../examples/grpc_orders/service.rs"]
mod service;

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use http::HeaderName;
use http_body_util::BodyExt;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Server};
use tonic::{Code, Response, Status};
use tower::util::MapResponseLayer;
use tower_idempotency::{Concurrent, IdempotencyLayer};

use grpc_support::{create, entries, replayed, Client, Gated, REPLAYED, STAMP};
use orders::orders_client::OrdersClient;
use orders::orders_server::OrdersServer;
use orders::{Note, Order};
use service::{keyed, OrdersService, SetIdempotencyKey, REJECTED_FIELD, STREAMING_PATHS};
use support::common::{until, within, Gate};
use support::stores::{per_store, TestStore};

/// No metadata of this server's answers is made anew for each answer.
const FRESH: &[&str] = &[];

/// A tonic server on 127.0.0.1:0 with `layer` on it, and a client for it.
struct Harness {
    client: Client,
    orders: OrdersService,
    layer: IdempotencyLayer<TestStore>,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn serve(layer: IdempotencyLayer<TestStore>, gate: Option<Gate>) -> Harness {
    let orders = OrdersService::default();
    let stamps = Arc::new(AtomicU64::new(0));
    let stamp = MapResponseLayer::new(move |response: http::Response<tonic::body::Body>| {
        let n = stamps.fetch_add(1, SeqCst) + 1;
        response.map(|body| {
            tonic::body::Body::new(body.map_frame(move |mut frame| {
                if let Some(trailers) = frame.trailers_mut() {
                    trailers.insert(STAMP, n.into());
                }
                frame
            }))
        })
    });
    let listener = within(TcpListener::bind("127.0.0.1:0")).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = Server::builder()
        .layer(layer.clone())
        .layer(stamp)
        .add_service(OrdersServer::new(Gated {
            orders: orders.clone(),
            gate,
        }));
    let server = tokio::spawn(router.serve_with_incoming(TcpIncoming::from(listener)));
    let channel = Channel::from_shared(format!("http://{addr}")).unwrap();
    let channel = within(channel.connect()).await.unwrap();
    Harness {
        client: OrdersClient::with_interceptor(channel, SetIdempotencyKey),
        orders,
        layer,
        server,
    }
}

fn layer_for(
    store: TestStore,
) -> tower_idempotency::IdempotencyLayerBuilder<tower_idempotency::IdempotencyBuilder<TestStore>> {
    IdempotencyLayer::builder()
        .store(store)
        .grpc_streaming_paths(STREAMING_PATHS)
}

per_store!(a_retried_call_runs_once_and_replays_its_message_status_and_trailers);
async fn a_retried_call_runs_once_and_replays_its_message_status_and_trailers(store: TestStore) {
    let h = serve(layer_for(store).build().unwrap(), None).await;

    let first = create(&h.client, Some("order-1"), "book", 2).await.unwrap();
    let retry = create(&h.client, Some("order-1"), "book", 2).await.unwrap();

    assert_eq!(h.orders.executions(), 1, "the retry did not run");
    assert_eq!(first.get_ref(), retry.get_ref(), "the same message");
    assert_eq!(first.get_ref().executions, 1);
    assert!(!replayed(first.metadata()));
    assert!(replayed(retry.metadata()));
    assert_eq!(first.metadata().get(STAMP).unwrap(), "1");
    assert_eq!(
        entries(first.metadata(), FRESH),
        entries(retry.metadata(), FRESH),
        "the same headers and trailers"
    );

    // Another key runs again, and its answer is stamped anew.
    let other = create(&h.client, Some("order-2"), "book", 2).await.unwrap();
    assert!(!replayed(other.metadata()));
    assert_eq!(other.metadata().get(STAMP).unwrap(), "2");
    assert_eq!(other.get_ref().id, 2);
    assert_eq!(h.orders.executions(), 2);

    let stats = h.layer.handle().stats();
    assert_eq!((stats.executed, stats.replayed), (2, 1));
}

per_store!(a_refused_call_replays_its_status_message_and_metadata_without_running_again);
async fn a_refused_call_replays_its_status_message_and_metadata_without_running_again(
    store: TestStore,
) {
    let h = serve(layer_for(store).build().unwrap(), None).await;

    let first = create(&h.client, Some("zero-1"), "pen", 0)
        .await
        .unwrap_err();
    let retry = create(&h.client, Some("zero-1"), "pen", 0)
        .await
        .unwrap_err();

    assert_eq!(h.orders.executions(), 1, "the retry did not run");
    assert_eq!(first.code(), Code::FailedPrecondition);
    assert_eq!(retry.code(), Code::FailedPrecondition);
    assert!(
        first.message().contains("quantity must be at least 1"),
        "{first:?}"
    );
    assert_eq!(first.message(), retry.message());
    assert_eq!(first.metadata().get(REJECTED_FIELD).unwrap(), "quantity");
    assert!(!replayed(first.metadata()));
    assert!(replayed(retry.metadata()));
    assert_eq!(
        entries(first.metadata(), FRESH),
        entries(retry.metadata(), FRESH)
    );
    assert_eq!(h.layer.handle().stats().replayed, 1);
}

/// Sends `n` calls with one key while the first is held in flight, lets it
/// go once every other one is waiting on it, and answers the replies.
async fn hold_first_of(h: &Harness, gate: &Gate, n: usize) -> Vec<Result<Response<Order>, Status>> {
    let calls: Vec<_> = (0..n)
        .map(|_| {
            let client = h.client.clone();
            tokio::spawn(async move { create(&client, Some("hedged"), "lamp", 1).await })
        })
        .collect();
    // The first is genuinely in flight, and every other call has joined it.
    gate.entered(1).await;
    until(|| h.layer.waiting() == n - 1).await;
    gate.open(1);
    let mut replies = Vec::new();
    for call in calls {
        replies.push(within(call).await.unwrap());
    }
    replies
}

fn waiting(store: TestStore) -> IdempotencyLayer<TestStore> {
    layer_for(store)
        .concurrent(Concurrent::Wait {
            timeout: Duration::from_secs(60),
        })
        .build()
        .unwrap()
}

per_store!(
    a_hedged_pair_under_wait_runs_once_and_both_get_the_answer,
    flavor = "multi_thread",
    worker_threads = 2
);
async fn a_hedged_pair_under_wait_runs_once_and_both_get_the_answer(store: TestStore) {
    let gate = Gate::default();
    let h = serve(waiting(store), Some(gate.clone())).await;

    let replies = hold_first_of(&h, &gate, 2).await;

    assert_eq!(h.orders.executions(), 1);
    let [a, b] = <[_; 2]>::try_from(replies).unwrap().map(Result::unwrap);
    assert_eq!(a.get_ref(), b.get_ref());
    assert_eq!(
        [replayed(a.metadata()), replayed(b.metadata())]
            .iter()
            .filter(|r| **r)
            .count(),
        1,
        "one ran, one was handed its answer"
    );
    assert_eq!(a.metadata().get(STAMP), b.metadata().get(STAMP));
    assert_eq!(h.layer.handle().stats().coalesced, 1);
}

per_store!(
    a_hundred_calls_with_one_key_under_wait_run_once_and_all_get_the_answer,
    flavor = "multi_thread",
    worker_threads = 2
);
async fn a_hundred_calls_with_one_key_under_wait_run_once_and_all_get_the_answer(store: TestStore) {
    let gate = Gate::default();
    let h = serve(waiting(store), Some(gate.clone())).await;

    let replies: Vec<_> = hold_first_of(&h, &gate, 100)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();

    assert_eq!(h.orders.executions(), 1);
    assert!(replies.iter().all(|r| r.get_ref() == replies[0].get_ref()));
    assert!(replies
        .iter()
        .all(|r| r.metadata().get(STAMP).unwrap() == "1"));
    assert_eq!(
        replies.iter().filter(|r| replayed(r.metadata())).count(),
        99
    );
    let stats = h.layer.handle().stats();
    assert_eq!((stats.executed, stats.coalesced), (1, 99));
}

per_store!(
    duplicates_in_flight_under_reject_get_aborted_with_retry_pushback,
    flavor = "multi_thread",
    worker_threads = 2
);
async fn duplicates_in_flight_under_reject_get_aborted_with_retry_pushback(store: TestStore) {
    let gate = Gate::default();
    let h = serve(
        layer_for(store)
            .concurrent(Concurrent::Reject)
            .build()
            .unwrap(),
        Some(gate.clone()),
    )
    .await;

    let first = {
        let client = h.client.clone();
        tokio::spawn(async move { create(&client, Some("held"), "lamp", 1).await })
    };
    gate.entered(1).await;
    let duplicates: Vec<_> = (0..100)
        .map(|_| {
            let client = h.client.clone();
            tokio::spawn(async move { create(&client, Some("held"), "lamp", 1).await })
        })
        .collect();
    for duplicate in duplicates {
        let status = within(duplicate).await.unwrap().unwrap_err();
        assert_eq!(status.code(), Code::Aborted, "{status:?}");
        let pushback = status
            .metadata()
            .get("grpc-retry-pushback-ms")
            .expect("a pushback");
        let ms: u64 = pushback.to_str().unwrap().parse().unwrap();
        assert!(ms > 0, "wait before retrying: {ms} ms");
        assert!(!replayed(status.metadata()));
    }
    gate.open(1);
    let first = within(first).await.unwrap().unwrap();
    assert!(!replayed(first.metadata()));
    assert_eq!(h.orders.executions(), 1);
    assert_eq!(h.layer.handle().stats().conflicts, 100);

    // Once it is done, a retry replays it.
    let retry = create(&h.client, Some("held"), "lamp", 1).await.unwrap();
    assert!(replayed(retry.metadata()));
    assert_eq!(retry.get_ref(), first.get_ref());
}

per_store!(a_missing_or_malformed_key_is_invalid_argument_when_keys_are_required);
async fn a_missing_or_malformed_key_is_invalid_argument_when_keys_are_required(store: TestStore) {
    let h = serve(layer_for(store).require_key(true).build().unwrap(), None).await;

    let missing = create(&h.client, None, "book", 1).await.unwrap_err();
    assert_eq!(missing.code(), Code::InvalidArgument, "{missing:?}");
    assert!(!missing.message().is_empty());

    let too_long = "k".repeat(300);
    let malformed = create(&h.client, Some(&too_long), "book", 1)
        .await
        .unwrap_err();
    assert_eq!(malformed.code(), Code::InvalidArgument, "{malformed:?}");

    assert_eq!(h.orders.executions(), 0, "the service was not called");
    assert_eq!(h.layer.handle().stats().rejected_keys, 2);
}

per_store!(another_message_under_the_same_key_is_failed_precondition);
async fn another_message_under_the_same_key_is_failed_precondition(store: TestStore) {
    let h = serve(layer_for(store).build().unwrap(), None).await;

    create(&h.client, Some("order-1"), "book", 2).await.unwrap();
    let mismatch = create(&h.client, Some("order-1"), "book", 3)
        .await
        .unwrap_err();

    assert_eq!(mismatch.code(), Code::FailedPrecondition, "{mismatch:?}");
    assert!(
        !mismatch.message().contains("quantity must be at least 1"),
        "the layer's answer, not the service's: {mismatch:?}"
    );
    assert!(!replayed(mismatch.metadata()));
    assert_eq!(h.orders.executions(), 1);
    assert_eq!(h.layer.handle().stats().mismatches, 1);
}

/// A request stream fed by the test, one note at a time.
fn notes() -> (
    mpsc::Sender<Note>,
    impl Stream<Item = Note> + Send + 'static,
) {
    let (tx, rx) = mpsc::channel(4);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|note| (note, rx))
    });
    (tx, stream)
}

fn note(text: &str) -> Note {
    Note {
        text: text.to_owned(),
    }
}

per_store!(a_listed_bidirectional_method_streams_through);
async fn a_listed_bidirectional_method_streams_through(store: TestStore) {
    let h = serve(layer_for(store).build().unwrap(), None).await;

    // Twice under one key: a streaming call is not protected, nor replayed.
    for _ in 0..2 {
        let (tx, outbound) = notes();
        let mut client = h.client.clone();
        let response = within(client.chat(keyed("chat-1", outbound))).await;
        // The answer's head came before the request stream ended; each echo
        // comes back before the next note is sent.
        let response = response.unwrap();
        assert!(!replayed(response.metadata()));
        let mut inbound = response.into_inner();
        for text in ["one", "two"] {
            within(tx.send(note(text))).await.unwrap();
            let echo = within(inbound.message()).await.unwrap().unwrap();
            assert_eq!(echo.text, format!("echo: {text}"));
        }
        drop(tx);
        assert_eq!(within(inbound.message()).await.unwrap(), None);
    }
    assert_eq!(h.layer.handle().stats().executed, 0);
}

per_store!(an_unlisted_bidirectional_method_ends_with_a_status_instead_of_hanging);
async fn an_unlisted_bidirectional_method_ends_with_a_status_instead_of_hanging(store: TestStore) {
    let layer = IdempotencyLayer::builder()
        .store(store)
        .grpc_request_timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let h = serve(layer, None).await;

    // The client sends a note and waits for its echo before it sends more
    // or ends its stream: read as a unary call, this would never end.
    let (tx, outbound) = notes();
    tx.send(note("one")).await.unwrap();
    let mut client = h.client.clone();
    let status = match within(client.chat(keyed("chat-1", outbound))).await {
        Err(status) => status,
        Ok(response) => within(response.into_inner().message())
            .await
            .expect_err("an unlisted streaming call is not served"),
    };
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
    assert!(
        status.message().contains("grpc_streaming_paths"),
        "the status says how to fix it: {status:?}"
    );
    drop(tx);
    assert_eq!(h.layer.handle().stats().executed, 0);
}

#[tokio::test]
async fn the_replay_marker_takes_its_configured_name() {
    let layer = layer_for(TestStore::memory())
        .replay_header(HeaderName::from_static("idempotency-replayed"))
        .build()
        .unwrap();
    let h = serve(layer, None).await;

    create(&h.client, Some("order-1"), "book", 2).await.unwrap();
    let retry = create(&h.client, Some("order-1"), "book", 2).await.unwrap();

    assert_eq!(
        retry.metadata().get("idempotency-replayed").unwrap(),
        "true"
    );
    assert!(retry.metadata().get(REPLAYED).is_none());
    assert_eq!(h.orders.executions(), 1);
}
