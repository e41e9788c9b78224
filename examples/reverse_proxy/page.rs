//! The operator's page: one self-contained HTML file (inline CSS, SVG and
//! script, nothing fetched from elsewhere, so it works offline) that reads
//! `/stats` and `/rate` every few seconds and lists `/keys` a page at a time
//! when asked, and the request rate history behind `/rate`, sampled here so
//! the chart has the last minutes even when the page was just opened.
//!
//! The page is served with a `Content-Security-Policy` that lets run only
//! its own inline script and style, by their SHA-256, computed here from
//! the page's text when the proxy starts (an edit of the page can never
//! leave a stale hash behind).

use std::collections::VecDeque;
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use sha2::{Digest, Sha256};

const PAGE: &str = include_str!("page.html");

/// The page's policy: nothing from elsewhere, no framing, and only the
/// inline script and style whose hashes it names.
static POLICY: LazyLock<HeaderValue> = LazyLock::new(|| {
    let policy = format!(
        "default-src 'none'; script-src '{}'; style-src '{}'; connect-src 'self'; \
         img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        hash_of(inline(PAGE, "script")),
        hash_of(inline(PAGE, "style")),
    );
    HeaderValue::from_str(&policy)
        .unwrap_or_else(|_| HeaderValue::from_static("default-src 'none'"))
});

/// The text of the page's one inline `<tag>` element.
fn inline<'a>(page: &'a str, tag: &str) -> &'a str {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let Some(start) = page.find(&open).map(|at| at + open.len()) else {
        return "";
    };
    let end = page[start..]
        .find(&close)
        .map_or(page.len(), |at| start + at);
    &page[start..end]
}

/// A CSP hash source: `sha256-` and the base64 of the text's SHA-256.
fn hash_of(text: &str) -> String {
    format!("sha256-{}", base64(&Sha256::digest(text.as_bytes())))
}

/// Standard base64, with padding.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

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
        crate::lock(&self.readings)
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
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_SECURITY_POLICY, POLICY.clone());
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    response
}

async fn rate(State(history): State<Arc<RequestHistory>>) -> Json<serde_json::Value> {
    Json(json!({
        "interval_secs": SAMPLE_EVERY.as_secs(),
        "requests_per_second": history.rates(),
    }))
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_matches_the_rfc_examples() {
        for (text, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(super::base64(text.as_bytes()), encoded);
        }
    }
}
