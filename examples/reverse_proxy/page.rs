//! The operator's page: one self-contained HTML file (inline CSS, SVG and
//! script, nothing fetched from elsewhere, so it works offline) that reads
//! `/stats`, `/keys` and `/rate` every few seconds, and the request rate
//! history behind `/rate`, sampled here so the chart has the last minutes
//! even when the page was just opened.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

const PAGE: &str = include_str!("page.html");

/// How often the request counter is sampled.
const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// Samples kept: five minutes of rates need one more counter reading.
const SAMPLES: usize = 61;

/// Reads the total number of requests the proxy has seen.
pub(crate) type RequestCount = Box<dyn Fn() -> u64 + Send + Sync>;

/// The last minutes of the request counter, one reading per [`SAMPLE_EVERY`].
struct RequestHistory {
    readings: Mutex<VecDeque<u64>>,
}

impl RequestHistory {
    /// Starts sampling `requests`; the sampler stops once the history is dropped.
    fn start(requests: RequestCount) -> Arc<Self> {
        let history = Arc::new(Self {
            readings: Mutex::new(VecDeque::with_capacity(SAMPLES)),
        });
        let weak: Weak<Self> = Arc::downgrade(&history);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(SAMPLE_EVERY);
            loop {
                every.tick().await;
                let Some(history) = weak.upgrade() else {
                    return;
                };
                let mut readings = history.readings();
                if readings.len() == SAMPLES {
                    readings.pop_front();
                }
                readings.push_back(requests());
            }
        });
        history
    }

    fn readings(&self) -> std::sync::MutexGuard<'_, VecDeque<u64>> {
        self.readings
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Requests per second over each interval, oldest first.
    fn rates(&self) -> Vec<f64> {
        let readings = self.readings();
        let seconds = SAMPLE_EVERY.as_secs_f64();
        readings
            .iter()
            .zip(readings.iter().skip(1))
            // A counter reset (PUT /config does not, reset_stats does) reads as 0.
            .map(|(before, after)| after.saturating_sub(*before) as f64 / seconds)
            .collect()
    }
}

/// `GET /` (the page) and `GET /rate` (requests per second over the last
/// five minutes, one value per five seconds, oldest first).
pub(crate) fn router<T: Clone + Send + Sync + 'static>(requests: RequestCount) -> Router<T> {
    Router::new()
        .route("/", get(page))
        .route("/rate", get(rate))
        .with_state(RequestHistory::start(requests))
}

async fn page() -> Response {
    let mut response = Html(PAGE).into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

async fn rate(State(history): State<Arc<RequestHistory>>) -> Json<serde_json::Value> {
    Json(json!({
        "interval_secs": SAMPLE_EVERY.as_secs(),
        "requests_per_second": history.rates(),
    }))
}
