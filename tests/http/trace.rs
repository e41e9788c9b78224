//! What runs on after its client went away keeps the request's tracing
//! span: a handler's logs carry `TraceLayer`'s span and its request id.

use crate::support::common;
use crate::support::stores;

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use axum::body::Body;
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use common::*;
use http::{Method, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use stores::{per_store, TestStore};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tower_http::trace::TraceLayer;
use tower_idempotency::store::EntryKind;
use tower_idempotency::{Idempotency, IdempotencyLayer, KeyFilter};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context as LayerContext, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

/// One event: its message and the `request_id` of the span it was in.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Logged {
    message: String,
    request_id: Option<String>,
}

/// A subscriber layer that keeps every event with its span's request id.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<Logged>>>);

impl Logs {
    fn find(&self, message: &str) -> Vec<Logged> {
        let logs = self.0.lock().unwrap();
        logs.iter()
            .filter(|l| l.message == message)
            .cloned()
            .collect()
    }
}

struct RequestId(String);

/// Reads one field of a span or an event as text.
struct FieldText {
    name: &'static str,
    value: Option<String>,
}

impl Visit for FieldText {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == self.name {
            self.value = Some(value.to_owned());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == self.name {
            self.value = Some(format!("{value:?}"));
        }
    }
}

impl<S> Layer<S> for Logs
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: LayerContext<'_, S>) {
        let mut field = FieldText {
            name: "request_id",
            value: None,
        };
        attrs.record(&mut field);
        if let (Some(value), Some(span)) = (field.value, ctx.span(id)) {
            span.extensions_mut().insert(RequestId(value));
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: LayerContext<'_, S>) {
        let mut message = FieldText {
            name: "message",
            value: None,
        };
        event.record(&mut message);
        let request_id = ctx.event_scope(event).and_then(|scope| {
            scope
                .from_root()
                .find_map(|span| span.extensions().get::<RequestId>().map(|id| id.0.clone()))
        });
        self.0.lock().unwrap().push(Logged {
            message: message.value.unwrap_or_default(),
            request_id,
        });
    }
}

/// A response body that signals when it is dropped before its end.
struct Probed {
    body: Body,
    signal: Option<DropSignal>,
}

impl http_body::Body for Probed {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            if let Some(signal) = self.signal.take() {
                signal.defuse();
            }
        }
        polled
    }
}

/// `app` behind the idempotency layer and `TraceLayer` (whose span carries
/// the request's `x-request-id`), inside a probe that signals `dropped` when
/// the server drops the request's future or its response body unfinished:
/// the client went away.
fn traced(app: Router, layer: IdempotencyLayer<TestStore>, dropped: Arc<Semaphore>) -> Router {
    let trace = TraceLayer::new_for_http().make_span_with(|request: &http::Request<Body>| {
        let id = request
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("none")
            .to_owned();
        tracing::info_span!("request", request_id = %id)
    });
    app.layer(layer)
        .layer(trace)
        .layer(axum::middleware::from_fn(
            move |request: axum::extract::Request, next: axum::middleware::Next| {
                let signal = DropSignal(Some(dropped.clone()));
                async move {
                    let response = next.run(request).await;
                    response.map(|body| {
                        Body::new(Probed {
                            body,
                            signal: Some(signal),
                        })
                    })
                }
            },
        ))
}

async fn until_completed(handle: &Idempotency<TestStore>) {
    within(async {
        loop {
            let keys = handle.keys(&KeyFilter::new()).await.unwrap();
            if keys.iter().any(|k| k.kind == EntryKind::Completed) {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    })
    .await
}

per_store!(a_handler_that_runs_on_after_its_client_left_logs_in_the_request_span);
async fn a_handler_that_runs_on_after_its_client_left_logs_in_the_request_span(store: TestStore) {
    let logs = Logs::default();
    let _subscriber =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(logs.clone()));
    let layer = IdempotencyLayer::builder().store(store).build().unwrap();
    let handle = layer.handle();
    let (runs, gate, dropped) = (
        Runs::default(),
        Gate::default(),
        Arc::new(Semaphore::new(0)),
    );
    let app = Router::new().route(
        "/orders",
        post({
            let (runs, gate) = (runs.clone(), gate.clone());
            move || {
                let (runs, gate) = (runs.clone(), gate.clone());
                async move {
                    let id = runs.bump();
                    gate.pass().await;
                    tracing::info!("order created");
                    (StatusCode::CREATED, format!("order {id}"))
                }
            }
        }),
    );
    let server = serve(traced(app, layer, dropped.clone())).await;

    let mut stream = within(TcpStream::connect(server.addr)).await.unwrap();
    let request = "POST /orders HTTP/1.1\r\nhost: x\r\nidempotency-key: gone\r\n\
                   x-request-id: req-gone\r\ncontent-length: 2\r\n\r\n{}";
    within(stream.write_all(request.as_bytes())).await.unwrap();
    gate.entered(1).await;
    drop(stream);
    // The server dropped the request's future: the handler runs on, handed
    // to a task.
    within(dropped.acquire()).await.unwrap().forget();
    gate.open(1);
    until_completed(&handle).await;

    assert_eq!(
        logs.find("order created"),
        vec![Logged {
            message: "order created".into(),
            request_id: Some("req-gone".into()),
        }]
    );
    let retry = server.post("/orders", Some("gone"), "{}").await;
    assert!(retry.replayed());
    assert_eq!(retry.text(), "order 1");
    assert_eq!(runs.get(), 1);
}

per_store!(a_body_read_on_after_its_client_left_logs_in_the_request_span);
async fn a_body_read_on_after_its_client_left_logs_in_the_request_span(store: TestStore) {
    let logs = Logs::default();
    let _subscriber =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(logs.clone()));
    let layer = IdempotencyLayer::builder().store(store).build().unwrap();
    let handle = layer.handle();
    let (gate, dropped) = (Gate::default(), Arc::new(Semaphore::new(0)));
    let app = Router::new().route(
        "/export",
        post({
            let gate = gate.clone();
            move || {
                let gate = gate.clone();
                async move {
                    let chunks = futures_util::stream::unfold(0, move |step| {
                        let gate = gate.clone();
                        async move {
                            let chunk = match step {
                                0 => "part1,",
                                1 => {
                                    gate.pass().await;
                                    tracing::info!("last part produced");
                                    "part2"
                                }
                                _ => return None,
                            };
                            Some((Ok::<_, BoxError>(Frame::data(Bytes::from(chunk))), step + 1))
                        }
                    });
                    Body::new(StreamBody::new(chunks))
                }
            }
        }),
    );
    let server = serve(traced(app, layer, dropped.clone())).await;

    let request = server
        .request(Method::POST, "/export")
        .header("idempotency-key", "left")
        .header("x-request-id", "req-left")
        .body(full(""))
        .unwrap();
    let mut body = server.raw(request).await.into_body();
    let first = within(body.frame()).await.unwrap().unwrap();
    assert_eq!(first.into_data().unwrap(), "part1,");
    gate.entered(1).await;
    drop(body);
    // The server dropped the response body unfinished: the rest is read on a
    // task.
    within(dropped.acquire()).await.unwrap().forget();
    gate.open(1);
    until_completed(&handle).await;

    assert_eq!(
        logs.find("last part produced"),
        vec![Logged {
            message: "last part produced".into(),
            request_id: Some("req-left".into()),
        }]
    );
    let retry = server.post("/export", Some("left"), "").await;
    assert!(retry.replayed());
    assert_eq!(retry.text(), "part1,part2");
}
