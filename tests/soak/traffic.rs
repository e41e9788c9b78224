//! The soak test's traffic: a handler that records every run it makes, and
//! clients that send a seeded random mix of requests through the layer.

use std::sync::{Arc, Mutex};
use std::task::Poll;
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
/// The error a cut-off body fails with.
const CUT_OFF_MESSAGE: &str = "soak: the body is cut off on purpose";
/// The layers' `max_response_body`, and the size of an oversized answer.
pub(crate) const MAX_RESPONSE_BODY: usize = 4 * 1024;
const OVERSIZED: usize = 6 * 1024;

/// What one handler run does, as its request asked (`x-soak-behaviour`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Behaviour {
    Answer,
    Slow,
    Panic,
    Fail,
    NoStore,
    /// A 201 of [`OVERSIZED`] bytes, over the layer's `max_response_body`.
    Oversized,
    /// A 201 whose body fails after its first frame.
    CutOff,
}

impl Behaviour {
    const ALL: [(Self, &'static str, u32); 7] = [
        (Self::Answer, "answer", 49),
        (Self::Slow, "slow", 20),
        (Self::Panic, "panic", 5),
        (Self::Fail, "fail", 10),
        (Self::NoStore, "no-store", 8),
        (Self::Oversized, "oversized", 6),
        (Self::CutOff, "cut-off", 2),
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
    /// Its number, from 1: the `x-soak-run` header of its answer, and in
    /// its body.
    pub(crate) id: usize,
    pub(crate) scope: String,
    pub(crate) key: String,
    /// When the client sent the request that ran it: the layer began the
    /// key's lease after that.
    pub(crate) sent: Instant,
    pub(crate) started: Instant,
    /// When the handler returned its response (or panicked): the layer
    /// frees the key no earlier.
    pub(crate) answered: Option<Instant>,
    /// When its body ended, failed or was dropped (or the handler panicked).
    pub(crate) ended: Option<Instant>,
    pub(crate) outcome: Outcome,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    Running,
    /// A 201 the layer stores; its whole body.
    Stored(Bytes),
    /// A 201 over `max_response_body`, its whole body: the layer records
    /// its head only.
    Omitted(Bytes),
    /// A 502 or a `no-store` 200, and its body: returned, not stored.
    NotStored(StatusCode, Bytes),
    /// A panic: the layer answers 500 and stores nothing.
    Panicked,
    /// A 201 whose body failed after its first frame: the layer abandons
    /// the lease, and the key's marker lives out its TTL.
    CutOff,
}

/// Every run of the handler, numbered from 1.
pub(crate) struct Runs {
    /// When the soak began: requests carry their send time from it.
    epoch: Instant,
    runs: Mutex<Vec<Run>>,
}

impl Runs {
    pub(crate) fn new(epoch: Instant) -> Self {
        Self {
            epoch,
            runs: Mutex::default(),
        }
    }

    fn start(&self, scope: String, key: String, sent: Instant) -> usize {
        let mut runs = self.runs.lock().unwrap();
        let id = runs.len() + 1;
        runs.push(Run {
            id,
            scope,
            key,
            sent,
            started: Instant::now(),
            answered: None,
            ended: None,
            outcome: Outcome::Running,
        });
        id
    }

    fn answer(&self, run: usize, outcome: Outcome) {
        let mut runs = self.runs.lock().unwrap();
        runs[run - 1].outcome = outcome;
        runs[run - 1].answered = Some(Instant::now());
    }

    fn end(&self, run: usize) {
        self.runs.lock().unwrap()[run - 1]
            .ended
            .get_or_insert_with(Instant::now);
    }

    pub(crate) fn snapshot(&self) -> Vec<Run> {
        self.runs.lock().unwrap().clone()
    }

    /// Runs whose body has not ended yet.
    pub(crate) fn running(&self) -> usize {
        let runs = self.runs.lock().unwrap();
        runs.iter().filter(|run| run.ended.is_none()).count()
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
    let sent = runs.epoch + Duration::from_micros(header("x-soak-sent-us").parse().unwrap_or(0));
    let run = runs.start(scope.clone(), key.clone(), sent);
    let payload = request.into_body().collect().await?.to_bytes();
    tokio::time::sleep(delay).await;
    let mut text = format!(
        "{scope}|{key}|run {run}|{}",
        String::from_utf8_lossy(&payload)
    );
    let (status, no_store, outcome): (_, _, fn(Bytes) -> Outcome) = match behaviour {
        Behaviour::Panic => {
            runs.answer(run, Outcome::Panicked);
            runs.end(run);
            panic!("{PANIC_MESSAGE}");
        }
        Behaviour::Fail => (StatusCode::BAD_GATEWAY, false, |body| {
            Outcome::NotStored(StatusCode::BAD_GATEWAY, body)
        }),
        Behaviour::NoStore => (StatusCode::OK, true, |body| {
            Outcome::NotStored(StatusCode::OK, body)
        }),
        Behaviour::Answer | Behaviour::Slow => (StatusCode::CREATED, false, Outcome::Stored),
        Behaviour::Oversized => {
            text.push('|');
            text.push_str(&".".repeat(OVERSIZED.saturating_sub(text.len())));
            (StatusCode::CREATED, false, Outcome::Omitted)
        }
        Behaviour::CutOff => (StatusCode::CREATED, false, |_| Outcome::CutOff),
    };
    let body = Bytes::from(text);
    let frames: Vec<Result<Bytes, BoxError>> = if behaviour == Behaviour::CutOff {
        vec![Ok(body.clone()), Err(CUT_OFF_MESSAGE.into())]
    } else {
        // In three frames, so the layer records a streamed body.
        let third = body.len() / 3;
        vec![
            Ok(body.slice(..third)),
            Ok(body.slice(third..2 * third)),
            Ok(body.slice(2 * third..)),
        ]
    };
    runs.answer(run, outcome(body));
    let mut response = Response::new(recorded_body(frames, runs, run));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert("x-soak-run", run.into());
    if no_store {
        headers.insert("cache-control", "no-store".parse().unwrap());
    }
    Ok(response)
}

/// A body of `frames` that tells `runs` when run `run`'s body ended: at its
/// end, at its error, or when it is dropped before either.
fn recorded_body(
    frames: Vec<Result<Bytes, BoxError>>,
    runs: Arc<Runs>,
    run: usize,
) -> BoxBody<Bytes, BoxError> {
    /// Ends the run once, whichever comes first.
    struct End(Arc<Runs>, usize);
    impl Drop for End {
        fn drop(&mut self) {
            self.0.end(self.1);
        }
    }
    let end = End(runs, run);
    let mut frames = frames.into_iter();
    let stream = futures_util::stream::poll_fn(move |_| {
        let frame = frames.next();
        if !matches!(frame, Some(Ok(_))) {
            end.0.end(end.1);
        }
        Poll::Ready(frame.map(|frame| frame.map(Frame::data)))
    });
    StreamBody::new(stream).boxed()
}

/// An answer a client got, at least its head.
#[derive(Debug)]
pub(crate) struct Answer {
    pub(crate) scope: &'static str,
    pub(crate) key: String,
    pub(crate) sent: Instant,
    /// When its body ended, failed or was dropped.
    pub(crate) received: Instant,
    pub(crate) status: StatusCode,
    /// The run that made it (`x-soak-run`): none for the layer's own answers.
    pub(crate) run: Option<usize>,
    pub(crate) replayed: bool,
    /// `Idempotency-Replay: omitted`: a recorded head, without its body.
    pub(crate) omitted: bool,
    pub(crate) no_store: bool,
    pub(crate) body: Body,
}

/// How an answer's body went.
#[derive(Debug)]
pub(crate) enum Body {
    /// Read to its end.
    Read(Bytes),
    /// Dropped unread once the head came.
    Unread,
    /// Failed before its end.
    Failed(String),
}

/// What one client sent and got.
#[derive(Debug, Default)]
pub(crate) struct ClientLog {
    pub(crate) sent: u64,
    /// Requests dropped before their answer was read to its end.
    pub(crate) given_up: u64,
    pub(crate) answers: Vec<Answer>,
    /// Requests that hung or failed at the transport level.
    pub(crate) errors: Vec<String>,
}

/// How a request ends on the client's side.
#[derive(Clone, Copy)]
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
/// retrying (up to three times, and not past `until`) until it reads a
/// stored-looking answer.
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
        for attempt in 0..4 {
            // No retry after the end: a `Wait` on a key whose marker was
            // abandoned lasts its whole budget.
            if attempt > 0 && Instant::now() >= until {
                break;
            }
            let endpoint = endpoints[rng.random_range(0..endpoints.len())].clone();
            let behaviour = Behaviour::pick(&mut rng);
            let delay = match behaviour {
                Behaviour::Slow => rng.random_range(20..300),
                _ => 0,
            };
            let sent = Instant::now();
            let request = Request::post("/orders")
                .header("authorization", scope)
                .header("idempotency-key", &key)
                .header("x-soak-behaviour", behaviour.name())
                .header("x-soak-delay-ms", delay)
                .header("x-soak-sent-us", (sent - start).as_micros() as u64)
                .body(Full::new(Bytes::from(format!("order {key}"))))
                .unwrap();
            let patience = match rng.random_range(0..100) {
                0..6 => Patience::For(Duration::from_millis(rng.random_range(1..40))),
                6..10 => Patience::HeadOnly,
                _ => Patience::Full,
            };
            log.sent += 1;
            match send(endpoint, request, patience).await {
                Ok(Some((head, body))) => {
                    let done =
                        head.status.is_success() && !head.no_store && matches!(body, Body::Read(_));
                    if matches!(body, Body::Unread) {
                        log.given_up += 1;
                    }
                    log.answers.push(Answer {
                        scope,
                        key: key.clone(),
                        sent,
                        received: Instant::now(),
                        status: head.status,
                        run: head.run,
                        replayed: head.replayed,
                        omitted: head.omitted,
                        no_store: head.no_store,
                        body,
                    });
                    if done {
                        break;
                    }
                }
                Ok(None) => log.given_up += 1,
                Err(error) => log.errors.push(format!("{scope} {key}: {error}")),
            }
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..30))).await;
        }
    }
    log
}

/// What a client reads in an answer's head.
struct Head {
    status: StatusCode,
    run: Option<usize>,
    replayed: bool,
    omitted: bool,
    no_store: bool,
}

impl Head {
    fn of(parts: &http::response::Parts) -> Self {
        let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok());
        Self {
            status: parts.status,
            run: header("x-soak-run").and_then(|run| run.parse().ok()),
            replayed: parts.headers.contains_key("idempotent-replayed"),
            omitted: header("idempotency-replay") == Some("omitted"),
            no_store: header("cache-control") == Some("no-store"),
        }
    }
}

/// Sends `request` and reads its answer as `patience` says: `None` when the
/// client gave up before the head, or before the body's end.
async fn send(
    endpoint: Endpoint,
    request: Request<Full<Bytes>>,
    patience: Patience,
) -> Result<Option<(Head, Body)>, String> {
    let limit = match patience {
        Patience::For(patience) => patience,
        Patience::Full | Patience::HeadOnly => LIMIT,
    };
    let exchange = async move {
        let response = endpoint.oneshot(request).await?;
        let (parts, body) = response.into_parts();
        let body = match patience {
            Patience::HeadOnly => Body::Unread,
            Patience::Full | Patience::For(_) => match body.collect().await {
                Ok(body) => Body::Read(body.to_bytes()),
                Err(error) => Body::Failed(error.to_string()),
            },
        };
        Ok::<_, BoxError>((Head::of(&parts), body))
    };
    match timeout(limit, exchange).await {
        Ok(Ok(answer)) => Ok(Some(answer)),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) if matches!(patience, Patience::For(_)) => Ok(None),
        Err(_) => Err(format!("no answer within {LIMIT:?}")),
    }
}
