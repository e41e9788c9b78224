//! Three outbound actions, each run twice and executed once, through the
//! closure API; then the engine's stats dashboard.
//!
//! ```text
//! cargo run --example actions
//! ```
//!
//! A service reacting to incoming signals creates a Trello card, uploads a
//! file to Drive and posts a Slack message. Its own retry logic fires each
//! action twice (a timeout it could not tell from a failure); the second
//! attempt gets the first result and the third party sees one request. The
//! "third parties" are local receivers on 127.0.0.1 that count what they get.

use std::error::Error;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tower_idempotency::{Idempotency, IdempotencyKey};

/// A third party: an HTTP server that counts the requests it gets and answers
/// each with a new id.
struct Receiver {
    name: &'static str,
    url: String,
    received: Arc<AtomicU64>,
}

impl Receiver {
    async fn start(name: &'static str) -> std::io::Result<Self> {
        let received = Arc::new(AtomicU64::new(0));
        let app = Router::new()
            .route("/", post(receive))
            .with_state((name, received.clone()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr: SocketAddr = listener.local_addr()?;
        tokio::spawn(async move {
            if let Err(error) = axum::serve(listener, app).await {
                eprintln!("{name} receiver stopped: {error}");
            }
        });
        Ok(Self {
            name,
            url: format!("http://{addr}/"),
            received,
        })
    }
}

async fn receive(
    State((name, received)): State<(&'static str, Arc<AtomicU64>)>,
    Json(params): Json<Value>,
) -> Json<Created> {
    let n = received.fetch_add(1, SeqCst) + 1;
    Json(Created {
        id: format!("{name}-{n}"),
        echo: params,
    })
}

/// What a third party answers: the id of what it created.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Created {
    id: String,
    echo: Value,
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// The action itself: one POST to the third party.
async fn call(client: &HttpClient, url: &str, params: &Value) -> std::io::Result<Created> {
    let request = http::Request::post(url)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(params.to_string())))
        .map_err(std::io::Error::other)?;
    let response = client
        .request(request)
        .await
        .map_err(std::io::Error::other)?;
    if !response.status().is_success() {
        return Err(std::io::Error::other(format!(
            "third party answered {}",
            response.status()
        )));
    }
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(std::io::Error::other)?;
    serde_json::from_slice(&body.to_bytes()).map_err(std::io::Error::other)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let engine = Idempotency::builder()
        .ttl(Duration::from_secs(3600))
        .max_entries(1_000)
        .build()?;
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();

    let trello = Receiver::start("trello").await?;
    let drive = Receiver::start("drive").await?;
    let slack = Receiver::start("slack").await?;
    let actions = [
        (
            "signal-123",
            "create_task",
            &trello,
            json!({"list": "todo", "title": "Ship the release"}),
        ),
        (
            "signal-124",
            "upload_file",
            &drive,
            json!({"folder": "reports", "name": "q3.pdf", "size": 48213}),
        ),
        (
            "signal-125",
            "send_notification",
            &slack,
            json!({"channel": "#ops", "text": "Release shipped"}),
        ),
    ];

    for (signal, action, receiver, params) in &actions {
        // The params are part of the key, canonically: the same params in
        // another key order are the same action.
        let key = IdempotencyKey::new(*signal, *action, receiver.name).params_json(params)?;
        for attempt in 1..=2 {
            let created: Created = engine
                .execute(&key, || call(&client, &receiver.url, params))
                .await?;
            println!(
                "{action:<17} on {:<6} attempt {attempt}: {}",
                receiver.name, created.id
            );
        }
        println!(
            "{:<6} receiver got {} request(s)\n",
            receiver.name,
            receiver.received.load(SeqCst)
        );
        assert_eq!(receiver.received.load(SeqCst), 1);
    }

    // A result known from elsewhere, kept only briefly: it shows up as
    // expiring soon.
    let imported = IdempotencyKey::new("signal-099", "send_notification", "slack");
    engine
        .mark_executed(
            &imported,
            &json!({"id": "slack-imported"}),
            Duration::from_secs(90),
        )
        .await?;

    dashboard(&engine).await
}

async fn dashboard(engine: &Idempotency) -> Result<(), Box<dyn Error>> {
    let stats = engine.stats();
    let cache = engine.cache_info().await?;
    let soon = Duration::from_secs(5 * 60);
    let expiring = engine.expiring_within(soon).await?;

    println!("== idempotency dashboard ==");
    let max = cache
        .max_entries
        .map_or_else(|| "unbounded".to_owned(), |max| max.to_string());
    println!(
        "{:<28}{} / {max} entries ({:.1}% utilization)",
        "cache used",
        cache.entries,
        cache.utilization_percent()
    );
    println!("{:<28}{}", "actions executed", stats.executed);
    println!("{:<28}{:.1}%", "hit rate", stats.hit_rate());
    println!(
        "{:<28}{}",
        "duplicates prevented",
        stats.duplicates_prevented()
    );
    println!(
        "{:<28}{}",
        format!("expiring within {}s", soon.as_secs()),
        expiring.len()
    );
    for entry in &expiring {
        println!("  {} (in {}s)", entry.key, entry.expires_in.as_secs());
    }
    for action in ["create_task", "upload_file", "send_notification"] {
        let keys = engine.find_by_action(action).await?;
        println!("{:<28}{}", format!("keys for {action}"), keys.len());
    }
    Ok(())
}
