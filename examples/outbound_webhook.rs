//! The idempotency layer on an outbound HTTP client: a webhook sender whose
//! retries never deliver an event twice.
//!
//! ```text
//! cargo run --example outbound_webhook
//! ```
//!
//! The same sender runs twice: on a bare hyper-util client, then on the
//! client wrapped in the layer. It gives each delivery attempt one second;
//! the receiver (a local server on 127.0.0.1, counting deliveries) is slow to
//! answer its first delivery, so the first attempt times out and the sender
//! resends, and later the sender replays its outbox once more.
//!
//! Without the layer the receiver acts on `evt-1` three times. With it, the
//! timed-out attempt keeps running in the background
//! (`Disconnect::Complete`), the resend waits for it (`Concurrent::Wait`) and
//! gets its response, the outbox replay gets the stored response, and the
//! receiver gets each event once. The key is an `ActionKey`: the event's
//! `webhook-id` header (as in the Standard Webhooks spec), the action
//! `deliver_webhook`, and the receiver's host as the target.

use std::error::Error;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use http::request::Parts;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_idempotency::extract::{fixed, from_header, ActionKey};
use tower_idempotency::{Concurrent, IdempotencyLayer, RequestBody};

/// How long the sender gives one attempt.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long the receiver takes over its first delivery.
const FIRST_DELIVERY_DELAY: Duration = Duration::from_millis(1_500);

type BoxError = Box<dyn Error + Send + Sync>;

#[derive(Clone, Default)]
struct Deliveries(Arc<AtomicU64>);

/// The webhook receiver: counts deliveries (as they arrive: the receiver acts
/// on an event even when its answer is late); slow to answer the first.
async fn receive(State(deliveries): State<Deliveries>, body: Bytes) -> (StatusCode, String) {
    let n = deliveries.0.fetch_add(1, SeqCst) + 1;
    println!(
        "  receiver: delivery #{n}: {}",
        String::from_utf8_lossy(&body)
    );
    if n == 1 {
        tokio::time::sleep(FIRST_DELIVERY_DELAY).await;
    }
    (StatusCode::OK, format!("{{\"received\":{n}}}"))
}

/// Sends one event through `sender`, retrying timed-out or failed attempts up
/// to five times; answers how many attempts it made.
async fn send_with_retries<Svc, ResBody>(
    sender: &Svc,
    url: &str,
    event_id: &str,
    payload: String,
) -> Result<u32, BoxError>
where
    Svc: Service<Request<Full<Bytes>>, Response = http::Response<ResBody>> + Clone,
    Svc::Error: Into<BoxError>,
    ResBody: http_body::Body,
    ResBody::Error: Into<BoxError>,
{
    for attempt in 1..=5 {
        let request = Request::post(url)
            .header("webhook-id", event_id)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(payload.clone())))?;
        let sent = tokio::time::timeout(ATTEMPT_TIMEOUT, sender.clone().oneshot(request)).await;
        match sent {
            Err(_elapsed) => println!("  sender: attempt {attempt} timed out, resending"),
            Ok(Err(error)) => {
                let error: BoxError = error.into();
                println!("  sender: attempt {attempt} failed ({error}), resending");
            }
            Ok(Ok(response)) => {
                let replayed = response.headers().contains_key("idempotent-replayed");
                let status = response.status();
                let body = response.into_body().collect().await.map_err(Into::into)?;
                let body = body.to_bytes();
                println!(
                    "  sender: attempt {attempt}: {status} {}{}",
                    String::from_utf8_lossy(&body),
                    if replayed { " (replayed)" } else { "" }
                );
                return Ok(attempt);
            }
        }
    }
    Err("gave up after five attempts".into())
}

/// The events the sender sends, in order: the second is a resend of the first.
const EVENTS: [(&str, &str); 3] = [
    ("evt-1", "the receiver is slow on its first delivery"),
    (
        "evt-1",
        "again: the sender restarted and replays its outbox",
    ),
    ("evt-2", "another event"),
];

/// Starts a receiver on 127.0.0.1:0; answers its URL and its delivery count.
async fn start_receiver() -> std::io::Result<(String, Deliveries)> {
    let deliveries = Deliveries::default();
    let app = Router::new()
        .route("/hooks", post(receive))
        .with_state(deliveries.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hooks", listener.local_addr()?);
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            eprintln!("receiver stopped: {error}");
        }
    });
    Ok((url, deliveries))
}

/// Sends every event; answers the attempts made.
async fn send_all<Svc, ResBody>(sender: &Svc, url: &str) -> Result<u32, BoxError>
where
    Svc: Service<Request<Full<Bytes>>, Response = http::Response<ResBody>> + Clone,
    Svc::Error: Into<BoxError>,
    ResBody: http_body::Body,
    ResBody::Error: Into<BoxError>,
{
    let mut attempts = 0;
    for (event_id, note) in EVENTS {
        println!("event {event_id} ({note}):");
        let payload = format!(r#"{{"type":"invoice.paid","id":"{event_id}"}}"#);
        attempts += send_with_retries(sender, url, event_id, payload).await?;
    }
    Ok(attempts)
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    println!("== without the layer ==");
    let (url, deliveries) = start_receiver().await?;
    let plain = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let attempts = send_all(&plain, &url).await?;
    let unprotected = deliveries.0.load(SeqCst);
    println!("receiver got {unprotected} deliveries for 2 events ({attempts} attempts)\n");

    println!("== with the idempotency layer ==");
    let (url, deliveries) = start_receiver().await?;
    let layer = IdempotencyLayer::builder()
        // A resend of an event still in flight waits for it and gets its response.
        .concurrent(Concurrent::Wait {
            timeout: Duration::from_secs(10),
        })
        .key_extractor(
            ActionKey::new(
                from_header("webhook-id"),
                fixed("deliver_webhook"),
                |parts: &Parts| parts.uri.authority().map(ToString::to_string),
            )
            // The same event id with another payload is a mismatch (422), not
            // a second event.
            .include_params_in_key(false),
        )
        .build()?;
    let handle = layer.handle();
    // The layer hands the client `RequestBody<B>`: the buffered request body.
    let client = Client::builder(TokioExecutor::new()).build_http::<RequestBody<Full<Bytes>>>();
    let sender = ServiceBuilder::new().layer(layer).service(client);
    let attempts = send_all(&sender, &url).await?;

    let delivered = deliveries.0.load(SeqCst);
    let stats = handle.stats();
    println!(
        "receiver got {delivered} deliveries for 2 events ({attempts} attempts; \
         {} executed, {} duplicates prevented)",
        stats.executed,
        stats.duplicates_prevented(),
    );
    assert_eq!(delivered, 2, "each event is delivered once");
    Ok(())
}
