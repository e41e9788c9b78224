//! The admin server: counters, Prometheus metrics, health, the keys the
//! store holds (a page at a time) and the configuration (`/config`, changed
//! at run time), all through the engine handle. Who may ask is
//! `admin_access.rs`'s business.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue, Response, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use serde::Deserialize;
use serde_json::json;
use tower_http::timeout::TimeoutLayer;
use tower_idempotency::store::{Removal, StoreAdmin, StoreError, MAX_PAGE_LIMIT};
use tower_idempotency::{CacheInfo, Idempotency, KeyFilter, StatsSnapshot};

use crate::admin_access::{self, Access};

use crate::limits::EdgeStats;
use crate::page::{self, RequestCount};
use crate::problem::problem;
use crate::runtime_config;

/// How long `/healthz` waits for the store before calling it down.
const PING_TIMEOUT: Duration = Duration::from_secs(2);

/// How many requests wait for a decision right now (the layer's gauge).
pub(crate) type Waiting = Arc<dyn Fn() -> usize + Send + Sync>;

/// What the admin handlers share.
pub(crate) struct AdminState<S> {
    pub(crate) engine: Idempotency<S>,
    waiting: Waiting,
    shutting_down: Arc<AtomicBool>,
    edge: Arc<EdgeStats>,
    /// In-flight keys deleted with `?in_flight=true`.
    admin_deletes: Arc<AtomicU64>,
}

impl<S> Clone for AdminState<S> {
    fn clone(&self) -> Self {
        Self {
            engine: self.engine.clone(),
            waiting: self.waiting.clone(),
            shutting_down: self.shutting_down.clone(),
            edge: self.edge.clone(),
            admin_deletes: self.admin_deletes.clone(),
        }
    }
}

/// The admin routes over `engine` and the edge limits' `edge` counters,
/// answered under `access`; `/healthz` fails once `shutting_down` is set.
pub(crate) fn router<S: StoreAdmin>(
    engine: Idempotency<S>,
    waiting: Waiting,
    shutting_down: Arc<AtomicBool>,
    edge: Arc<EdgeStats>,
    access: Access,
) -> Router {
    let counter = engine.clone();
    let requests: RequestCount = Box::new(move || counter.stats().requests);
    Router::new()
        .merge(page::router(requests))
        .route("/stats", get(stats::<S>))
        .route("/metrics", get(metrics::<S>))
        .route("/healthz", get(healthz::<S>))
        .route("/keys", get(keys::<S>))
        .route(
            "/config",
            get(runtime_config::get_config::<S>).put(runtime_config::put_config::<S>),
        )
        // A wildcard, so a key holding a raw `/` (the header extractor's
        // action is "POST /orders") still reaches the handler.
        .route("/keys/{*key}", axum::routing::delete(delete_key::<S>))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            Duration::from_secs(10),
        ))
        .with_state(AdminState {
            engine,
            waiting,
            shutting_down,
            edge,
            admin_deletes: Arc::default(),
        })
        .layer(axum::middleware::from_fn_with_state(
            access,
            admin_access::guard,
        ))
}

/// The store's info from its counters or an estimate (never a walk of the
/// keys per request), or `None` (and zeros in the answers) when it is down.
async fn cache_info<S: StoreAdmin>(engine: &Idempotency<S>) -> Option<CacheInfo> {
    match tokio::time::timeout(PING_TIMEOUT, engine.cache_info_estimate()).await {
        Ok(Ok(info)) => Some(info),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "store did not answer cache info");
            None
        }
        Err(_) => {
            tracing::warn!("store did not answer cache info in time");
            None
        }
    }
}

/// One flat JSON object of numbers: every counter and the cache info.
async fn stats<S: StoreAdmin>(State(state): State<AdminState<S>>) -> impl IntoResponse {
    let s = state.engine.stats();
    let info = cache_info(&state.engine).await;
    let cache = info.unwrap_or_default();
    Json(json!({
        "requests": s.requests,
        "executed": s.executed,
        "replayed": s.replayed,
        "coalesced": s.coalesced,
        "conflicts": s.conflicts,
        "mismatches": s.mismatches,
        "rejected_keys": s.rejected_keys,
        "too_large": s.too_large,
        "not_stored": s.not_stored,
        "omitted": s.omitted,
        "ambiguous": s.ambiguous,
        "store_errors": s.store_errors,
        "expired": s.expired,
        "evicted": s.evicted,
        "duplicates_prevented": s.duplicates_prevented(),
        "hit_rate": s.hit_rate(),
        "entries": cache.entries,
        // 0 means unbounded (a store without an entry bound, such as Redis).
        "max_entries": cache.max_entries.unwrap_or(0),
        "weighted_bytes": cache.weighted_bytes,
        "utilization_percent": cache.utilization_percent(),
        "store_up": u8::from(info.is_some()),
        // Writes fewer replicas acknowledged in time than --redis-replicas asked.
        "unacknowledged_writes": state.engine.unacknowledged_writes(),
        // Duplicates waiting on a first request (--concurrent wait) or on a slow store.
        "waiting": (state.waiting)(),
        // The edge limits (limits.rs).
        "connections": EdgeStats::get(&state.edge.connections),
        "connections_refused": EdgeStats::get(&state.edge.connections_refused),
        "header_timeouts": EdgeStats::get(&state.edge.header_timeouts),
        "body_timeouts": EdgeStats::get(&state.edge.body_timeouts),
        "idle_closed": EdgeStats::get(&state.edge.idle_closed),
        "write_timeouts": EdgeStats::get(&state.edge.write_timeouts),
        // Access-log lines dropped because the writer was behind (access_log.rs).
        "access_log_dropped": EdgeStats::get(&state.edge.access_log_dropped),
        "admin_deletes": state.admin_deletes.load(Ordering::Relaxed),
    }))
}

/// Prometheus text exposition, encoded by `prometheus-client`.
async fn metrics<S: StoreAdmin>(State(state): State<AdminState<S>>) -> Response<Body> {
    let stats = state.engine.stats();
    let info = cache_info(&state.engine).await;
    let mut registry = registry(&stats, info, (state.waiting)());
    registry.register(
        "unacknowledged_writes",
        "Writes fewer replicas acknowledged in time than asked (Redis replica ack)",
        ConstCounter::new(state.engine.unacknowledged_writes()),
    );
    register_edge(&mut registry, &state.edge);
    registry.register(
        "admin_deletes",
        "In-flight keys deleted through the admin server (?in_flight=true)",
        ConstCounter::new(state.admin_deletes.load(Ordering::Relaxed)),
    );
    let mut text = String::new();
    if let Err(e) = encode(&mut text, &registry) {
        return problem(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Metrics encoding failed",
            &e.to_string(),
        );
    }
    let mut response = Response::new(Body::from(text));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    response
}

/// A registry of constant metrics holding this scrape's values: the engine
/// keeps its own counters, so nothing here has to track them.
fn registry(s: &StatsSnapshot, info: Option<CacheInfo>, waiting: usize) -> Registry {
    let mut registry = Registry::with_prefix("idempotency");
    let counters: [(&str, &str, u64); 15] = [
        (
            "requests",
            "Requests the layer saw, protected or not",
            s.requests,
        ),
        (
            "executed",
            "Requests forwarded to the upstream under a fresh key",
            s.executed,
        ),
        (
            "replayed",
            "Stored responses replayed to a retry",
            s.replayed,
        ),
        (
            "coalesced",
            "Duplicates that waited for the first and got its response",
            s.coalesced,
        ),
        (
            "conflicts",
            "Duplicates refused with 409 while the first was in flight",
            s.conflicts,
        ),
        (
            "mismatches",
            "Retries whose request differed from the first (422)",
            s.mismatches,
        ),
        (
            "rejected_keys",
            "Requests refused for a missing or malformed key (400)",
            s.rejected_keys,
        ),
        (
            "too_large",
            "Requests refused for a body over the limit (413)",
            s.too_large,
        ),
        (
            "not_stored",
            "Responses returned but not stored",
            s.not_stored,
        ),
        (
            "omitted",
            "Oversized responses recorded head only, their body omitted",
            s.omitted,
        ),
        (
            "ambiguous",
            "Keys left to their marker: the upstream may have acted, no answer came",
            s.ambiguous,
        ),
        (
            "store_errors",
            "Store operations that failed",
            s.store_errors,
        ),
        (
            "expired",
            "Entries dropped because their TTL ran out",
            s.expired,
        ),
        (
            "evicted",
            "Entries dropped to stay within the store's bounds",
            s.evicted,
        ),
        (
            "duplicates_prevented",
            "Replayed + coalesced + conflicts",
            s.duplicates_prevented(),
        ),
    ];
    for (name, help, value) in counters {
        registry.register(name, help, ConstCounter::new(value));
    }
    let cache = info.unwrap_or_default();
    let gauges: [(&str, &str, f64); 7] = [
        (
            "waiting",
            "Requests waiting for a decision right now",
            waiting as f64,
        ),
        (
            "hit_rate_percent",
            "Percent of answered actions served from a stored result",
            s.hit_rate(),
        ),
        (
            "cache_entries",
            "Entries the store holds",
            cache.entries as f64,
        ),
        (
            "cache_max_entries",
            "The store's entry bound (0: unbounded)",
            cache.max_entries.unwrap_or(0) as f64,
        ),
        (
            "cache_weighted_bytes",
            "Bytes the store holds, as it weighs them",
            cache.weighted_bytes as f64,
        ),
        (
            "cache_utilization_percent",
            "Entries as a percent of the bound",
            cache.utilization_percent(),
        ),
        (
            "store_up",
            "1 when the store answered this scrape, else 0",
            if info.is_some() { 1.0 } else { 0.0 },
        ),
    ];
    for (name, help, value) in gauges {
        registry.register(name, help, ConstGauge::new(value));
    }
    registry
}

/// The edge limits' counters and the open connections gauge.
fn register_edge(registry: &mut Registry, edge: &EdgeStats) {
    let counters = [
        (
            "connections_refused",
            "Connections closed on accept because --max-connections were open",
            &edge.connections_refused,
        ),
        (
            "header_timeouts",
            "Connections closed because a request head did not arrive in time",
            &edge.header_timeouts,
        ),
        (
            "body_timeouts",
            "Requests refused (408) because their body did not arrive in time",
            &edge.body_timeouts,
        ),
        (
            "idle_closed",
            "Keep-alive connections closed for idling too long",
            &edge.idle_closed,
        ),
        (
            "write_timeouts",
            "Responses cut off because the client took none of their bytes in time",
            &edge.write_timeouts,
        ),
        (
            "access_log_dropped",
            "Access-log lines dropped because the log writer was behind",
            &edge.access_log_dropped,
        ),
    ];
    for (name, help, counter) in counters {
        registry.register(name, help, ConstCounter::new(EdgeStats::get(counter)));
    }
    registry.register(
        "connections",
        "Client connections open right now",
        ConstGauge::new(EdgeStats::get(&edge.connections) as f64),
    );
}

/// 200 while serving and the store answers; 503 while it does not (even
/// with --fail-open: the proxy is then unprotected) or while shutting down.
async fn healthz<S: StoreAdmin>(State(state): State<AdminState<S>>) -> Response<Body> {
    let (status, body) = if state.shutting_down.load(Ordering::SeqCst) {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({ "status": "shutting_down" }),
        )
    } else {
        match tokio::time::timeout(PING_TIMEOUT, state.engine.ping()).await {
            Ok(Ok(())) => (StatusCode::OK, json!({ "status": "ok" })),
            Ok(Err(e)) => (
                StatusCode::SERVICE_UNAVAILABLE,
                json!({ "status": "store_unavailable", "detail": e.to_string() }),
            ),
            Err(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                json!({ "status": "store_unavailable", "detail": "the store did not answer in time" }),
            ),
        }
    };
    (status, Json(body)).into_response()
}

#[derive(Debug, Deserialize)]
struct KeysQuery {
    signal: Option<String>,
    action: Option<String>,
    target: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
}

/// Keys a page holds unless `limit` says otherwise.
const DEFAULT_PAGE_LIMIT: usize = 100;

/// One page of the live keys, filtered by the components of their text
/// form: `{"keys": [...], "next_cursor": "..." | null}`.
async fn keys<S: StoreAdmin>(
    State(state): State<AdminState<S>>,
    query: Result<Query<KeysQuery>, axum::extract::rejection::QueryRejection>,
) -> Response<Body> {
    let Ok(Query(query)) = query else {
        return bad_request("The query of /keys is signal, action, target, limit and cursor.");
    };
    let limit = match query.limit.as_deref().map(str::parse::<usize>) {
        None => DEFAULT_PAGE_LIMIT,
        Some(Ok(limit)) if (1..=MAX_PAGE_LIMIT).contains(&limit) => limit,
        Some(_) => {
            return bad_request(&format!(
                "limit is a number of keys from 1 to {MAX_PAGE_LIMIT}."
            ))
        }
    };
    let mut filter = KeyFilter::new();
    if let Some(signal) = query.signal.filter(|s| !s.is_empty()) {
        filter = filter.signal(signal);
    }
    if let Some(action) = query.action.filter(|s| !s.is_empty()) {
        filter = filter.action(action);
    }
    if let Some(target) = query.target.filter(|s| !s.is_empty()) {
        filter = filter.target(target);
    }
    let cursor = query.cursor.filter(|c| !c.is_empty());
    match state
        .engine
        .keys_page(&filter, cursor.as_deref(), limit)
        .await
    {
        Ok(page) => Json(page).into_response(),
        Err(StoreError::InvalidCursor) => {
            bad_request("cursor is not one a page of /keys answered (use its next_cursor).")
        }
        Err(e) => store_down(&e),
    }
}

#[derive(Debug, Deserialize)]
struct DeleteQuery {
    #[serde(default)]
    in_flight: bool,
}

/// Deletes one key (its text form, URL-encoded in the path): the next request
/// with it runs upstream again. An in-flight key is refused (409) unless
/// `?in_flight=true`: then a retry may run while the first is still running.
async fn delete_key<S: StoreAdmin>(
    State(state): State<AdminState<S>>,
    Path(key): Path<String>,
    query: Result<Query<DeleteQuery>, axum::extract::rejection::QueryRejection>,
) -> Response<Body> {
    let Ok(Query(query)) = query else {
        return bad_request("The query of DELETE /keys/{key} is in_flight=true or nothing.");
    };
    let removal = match state.engine.remove(&key).await {
        Ok(removal) => removal,
        Err(e) => return store_down(&e),
    };
    match removal {
        Removal::Removed => StatusCode::NO_CONTENT.into_response(),
        Removal::Absent => problem(
            StatusCode::NOT_FOUND,
            "No such key",
            &format!("The store holds nothing under {key:?}."),
        ),
        Removal::InFlight if !query.in_flight => problem(
            StatusCode::CONFLICT,
            "Key in flight",
            &format!(
                "{key:?} is in flight: its request is running (or its lease has not run out). \
                 Deleting it lets a retry run while the first may still be running; add \
                 ?in_flight=true to delete it anyway."
            ),
        ),
        Removal::InFlight => match state.engine.remove_in_flight(&key).await {
            Ok(removed) => {
                if removed {
                    tracing::warn!(key = %key, "in-flight key deleted through the admin server");
                    state.admin_deletes.fetch_add(1, Ordering::Relaxed);
                    StatusCode::NO_CONTENT.into_response()
                } else {
                    problem(
                        StatusCode::NOT_FOUND,
                        "No such key",
                        &format!("{key:?} ended before it could be deleted."),
                    )
                }
            }
            Err(e) => store_down(&e),
        },
    }
}

fn bad_request(detail: &str) -> Response<Body> {
    problem(StatusCode::BAD_REQUEST, "Invalid admin request", detail)
}

fn store_down(error: &dyn std::error::Error) -> Response<Body> {
    problem(
        StatusCode::SERVICE_UNAVAILABLE,
        "Store unavailable",
        &error.to_string(),
    )
}
