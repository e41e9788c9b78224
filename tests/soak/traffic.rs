//! The soak test's traffic: a handler that records every run it makes, and
//! clients that send a seeded random mix of requests through the layer.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::{timeout, Instant};
use tower::util::BoxCloneSyncService;
use tower::{service_fn, Layer, ServiceExt};
use tower_idempotency::store::Store;
use tower_idempotency::{IdempotencyLayer, RequestBody};

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// One layered service, whatever its store.
pub(crate) type Endpoint =
    BoxCloneSyncService<Request<Full<Bytes>>, Response<BoxBody<Bytes, BoxError>>, BoxError>;

/// The clients' scopes: each client sends one `Authorization`, and every
/// scope uses the same key names.
pub(crate) const SCOPES: [&str; 3] = ["Bearer alice", "Bearer bob", "Bearer carol"];
/// Keys per scope in use at any one time: the pool slides on by one key
/// every [`KEY_PERIOD`], so new keys keep arriving while retries of the
/// older ones go on.
pub(crate) const KEYS: u64 = 12;
const KEY_PERIOD: Duration = Duration::from_millis(150);
/// The limit on any one wait.
pub(crate) const LIMIT: Duration = Duration::from_secs(20);
/// What the handler panics with (the test's panic hook keeps it quiet).
pub(crate) const PANIC_MESSAGE: &str = "soak: the handler panics on purpose";

/// What one handler run does, as its request asked (`x-soak-behaviour`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Behaviour {
    Answer,
    Slow,
    Panic,
    Fail,
    NoStore,
}

impl Behaviour {
    const ALL: [(Self, &'static str, u32); 5] = [
        (Self::Answer, "answer", 55),
        (Self::Slow, "slow", 20),
        (Self::Panic, "panic", 5),
        (Self::Fail, "fail", 10),
        (Self::NoStore, "no-store", 10),
    ];

    fn pick(rng: &mut StdRng) -> Self {
        let total: u32 = Self::ALL.iter().map(|(_, _, weight)| weight).sum();
        let mut roll = rng.random_range(0..total);
        for (behaviour, _, weight) in Self::ALL {
            if roll < weight {
                return behaviour;
            }
            roll -= weight;
        }
        Self::Answer
    }

    fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(behaviour, _, _)| *behaviour == self)
            .map_or("answer", |(_, name, _)| name)
    }

    fn parse(name: &str) -> Self {
        Self::ALL
            .iter()
            .find(|(_, known, _)| *known == name)
            .map_or(Self::Answer, |(behaviour, _, _)| *behaviour)
    }
}

/// One run of the handler.
#[derive(Clone, Debug)]
pub(crate) struct Run {
    pub(crate) scope: String,
    pub(crate) key: String,
    pub(crate) outcome: Outcome,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    Running,
    /// A 201 the layer stores; its whole body.
    Storable(Bytes),
    /// A 502 or a `no-store` answer: returned, not stored.
    NotStored,
    /// A panic: the layer answers 500 and stores nothing.
    Panicked,
}

/// Every run of the handler, numbered from 1.
#[derive(Default)]
pub(crate) struct Runs(Mutex<Vec<Run>>);

impl Runs {
    fn start(&self, scope: String, key: String) -> usize {
        let mut runs = self.0.lock().unwrap();
        runs.push(Run {
            scope,
            key,
            outcome: Outcome::Running,
        });
        runs.len()
    }

    fn finish(&self, run: usize, outcome: Outcome) {
        self.0.lock().unwrap()[run - 1].outcome = outcome;
    }

    pub(crate) fn snapshot(&self) -> Vec<Run> {
        self.0.lock().unwrap().clone()
    }

    pub(crate) fn running(&self) -> usize {
        let runs = self.0.lock().unwrap();
        runs.iter()
            .filter(|run| run.outcome == Outcome::Running)
            .count()
    }
}

/// `layer` around the recording handler.
pub(crate) fn endpoint<S: Store>(layer: &IdempotencyLayer<S>, runs: Arc<Runs>) -> Endpoint {
    let handler = service_fn(move |request| handle(runs.clone(), request));
    BoxCloneSyncService::new(
        layer
            .layer(handler)
            .map_response(|response| response.map(|body| body.map_err(Into::into).boxed())),
    )
}

async fn handle(
    runs: Arc<Runs>,
    request: Request<RequestBody<Full<Bytes>>>,
) -> Result<Response<BoxBody<Bytes, BoxError>>, BoxError> {
    let header = |name: &str| {
        request
            .headers()
            .get(name)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let (scope, key) = (header("authorization"), header("idempotency-key"));
    let behaviour = Behaviour::parse(&header("x-soak-behaviour"));
    let delay = Duration::from_millis(header("x-soak-delay-ms").parse().unwrap_or(0));
    let run = runs.start(scope.clone(), key.clone());
    let payload = request.into_body().collect().await?.to_bytes();
    tokio::time::sleep(delay).await;
    let text = format!(
        "{scope}|{key}|run {run}|{}",
        String::from_utf8_lossy(&payload)
    );
    let (status, no_store) = match behaviour {
        Behaviour::Panic => {
            runs.finish(run, Outcome::Panicked);
            panic!("{PANIC_MESSAGE}");
        }
        Behaviour::Fail => (StatusCode::BAD_GATEWAY, false),
        Behaviour::NoStore => (StatusCode::OK, true),
        Behaviour::Answer | Behaviour::Slow => (StatusCode::CREATED, false),
    };
    let body = Bytes::from(text);
    let outcome = if status == StatusCode::CREATED {
        Outcome::Storable(body.clone())
    } else {
        Outcome::NotStored
    };
    runs.finish(run, outcome);
    // In three frames, so the layer records a streamed body.
    let third = body.len() / 3;
    let frames = [
        body.slice(..third),
        body.slice(third..2 * third),
        body.slice(2 * third..),
    ]
    .map(|chunk| Ok::<_, Infallible>(Frame::data(chunk)));
    let stream = StreamBody::new(futures_util::stream::iter(frames));
    let mut response = Response::new(stream.map_err(|never| match never {}).boxed());
    *response.status_mut() = status;
    if no_store {
        response
            .headers_mut()
            .insert("cache-control", "no-store".parse().unwrap());
    }
    Ok(response)
}

/// An answer a client read to the end.
#[derive(Debug)]
pub(crate) struct Answer {
    pub(crate) scope: &'static str,
    pub(crate) key: String,
    pub(crate) status: StatusCode,
    pub(crate) replayed: bool,
    pub(crate) no_store: bool,
    pub(crate) body: Bytes,
}

/// What one client sent and got.
#[derive(Debug, Default)]
pub(crate) struct ClientLog {
    pub(crate) sent: u64,
    pub(crate) given_up: u64,
    pub(crate) answers: Vec<Answer>,
    /// Requests that hung or failed at the transport level.
    pub(crate) errors: Vec<String>,
}

/// How a request ends on the client's side.
enum Patience {
    /// Reads the whole answer.
    Full,
    /// Gives up (drops the request) after this long.
    For(Duration),
    /// Drops the response body unread once the head came.
    HeadOnly,
}

/// One client: from `start` until `until`, picks a key of the pool in its
/// scope and sends it, with a random behaviour, patience and endpoint,
/// retrying (up to three times) until it gets a stored-looking answer.
pub(crate) async fn client(
    id: usize,
    seed: u64,
    endpoints: Arc<Vec<Endpoint>>,
    start: Instant,
    until: Instant,
) -> ClientLog {
    let mut rng = StdRng::seed_from_u64(seed ^ (id as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let scope = SCOPES[id % SCOPES.len()];
    let mut log = ClientLog::default();
    while Instant::now() < until {
        let oldest = (start.elapsed().as_millis() / KEY_PERIOD.as_millis()) as u64;
        let key = format!("k{}", oldest + rng.random_range(0..KEYS));
        for _attempt in 0..4 {
            let endpoint = endpoints[rng.random_range(0..endpoints.len())].clone();
            let behaviour = Behaviour::pick(&mut rng);
            let delay = match behaviour {
                Behaviour::Slow => rng.random_range(20..300),
                _ => 0,
            };
            let request = Request::post("/orders")
                .header("authorization", scope)
                .header("idempotency-key", &key)
                .header("x-soak-behaviour", behaviour.name())
                .header("x-soak-delay-ms", delay)
                .body(Full::new(Bytes::from(format!("order {key}"))))
                .unwrap();
            let patience = match rng.random_range(0..100) {
                0..6 => Patience::For(Duration::from_millis(rng.random_range(1..40))),
                6..10 => Patience::HeadOnly,
                _ => Patience::Full,
            };
            log.sent += 1;
            match send(endpoint, request, patience).await {
                Sent::Answer(status, replayed, no_store, body) => {
                    let done = status.is_success() && !no_store;
                    log.answers.push(Answer {
                        scope,
                        key: key.clone(),
                        status,
                        replayed,
                        no_store,
                        body,
                    });
                    if done {
                        break;
                    }
                }
                Sent::GaveUp => log.given_up += 1,
                Sent::Failed(error) => log.errors.push(format!("{scope} {key}: {error}")),
            }
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..30))).await;
        }
    }
    log
}

enum Sent {
    Answer(StatusCode, bool, bool, Bytes),
    GaveUp,
    Failed(String),
}

async fn send(endpoint: Endpoint, request: Request<Full<Bytes>>, patience: Patience) -> Sent {
    let (limit, gave_up) = match patience {
        Patience::Full => (LIMIT, Sent::Failed(format!("no answer within {LIMIT:?}"))),
        Patience::For(patience) => (patience, Sent::GaveUp),
        Patience::HeadOnly => {
            return match timeout(LIMIT, endpoint.oneshot(request)).await {
                // The body is dropped unread.
                Ok(Ok(_response)) => Sent::GaveUp,
                Ok(Err(error)) => Sent::Failed(error.to_string()),
                Err(_) => Sent::Failed(format!("no head within {LIMIT:?}")),
            };
        }
    };
    let exchange = async move {
        let response = endpoint.oneshot(request).await?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await?.to_bytes();
        let replayed = parts.headers.contains_key("idempotent-replayed");
        let no_store = parts
            .headers
            .get("cache-control")
            .is_some_and(|value| value == "no-store");
        Ok::<_, BoxError>(Sent::Answer(parts.status, replayed, no_store, body))
    };
    match timeout(limit, exchange).await {
        Ok(Ok(sent)) => sent,
        Ok(Err(error)) => Sent::Failed(error.to_string()),
        Err(_) => gave_up,
    }
}
