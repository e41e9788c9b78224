//! `GET /config` and `PUT /config` on the admin server: the engine's
//! effective configuration, and changes to it at run time (for the requests
//! that begin after the change).

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{Response, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde::{Deserialize, Deserializer};
use serde_json::json;
use tower_idempotency::store::StoreAdmin;
use tower_idempotency::{Concurrent, Config, Idempotency, LeaseExpiry};

use crate::admin::AdminState;
use crate::problem::problem;

/// The body of `PUT /config`: any subset of the settings.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigChange {
    ttl_secs: Option<u64>,
    lease_ttl_secs: Option<u64>,
    concurrent: Option<Policy>,
    wait_timeout_secs: Option<u64>,
    /// `null` stops the auto-cleanup; absent leaves it as it is.
    #[serde(default, deserialize_with = "present")]
    cleanup_interval_secs: Option<Option<u64>>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Policy {
    Reject,
    Wait,
}

/// Tells a field given as `null` from one left out.
fn present<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Option<u64>>, D::Error> {
    Option::<u64>::deserialize(deserializer).map(Some)
}

/// The effective configuration.
pub(crate) async fn get_config<S: StoreAdmin>(
    State(state): State<AdminState<S>>,
) -> Response<Body> {
    Json(shown(&state.engine.config())).into_response()
}

/// Applies a change, and answers the effective configuration; 400
/// problem+json (and nothing changed) for an invalid one.
pub(crate) async fn put_config<S: StoreAdmin>(
    State(state): State<AdminState<S>>,
    body: Bytes,
) -> Response<Body> {
    let change: ConfigChange = match serde_json::from_slice(&body) {
        Ok(change) => change,
        Err(error) => return invalid(&format!("The body is not a configuration change: {error}")),
    };
    match apply(&state.engine, change) {
        Ok(config) => Json(shown(&config)).into_response(),
        Err(detail) => invalid(&detail),
    }
}

fn apply<S: StoreAdmin>(engine: &Idempotency<S>, change: ConfigChange) -> Result<Config, String> {
    let current = engine.config();
    let policy = change.concurrent.unwrap_or(match current.concurrent {
        Concurrent::Reject => Policy::Reject,
        Concurrent::Wait { .. } => Policy::Wait,
    });
    let concurrent = match (policy, change.wait_timeout_secs) {
        (Policy::Reject, Some(_)) => {
            return Err("wait_timeout_secs applies to concurrent \"wait\" only".to_owned())
        }
        (Policy::Reject, None) => Concurrent::Reject,
        (Policy::Wait, Some(secs)) => Concurrent::Wait {
            timeout: Duration::from_secs(secs),
        },
        (Policy::Wait, None) => match current.concurrent {
            wait @ Concurrent::Wait { .. } => wait,
            Concurrent::Reject => Concurrent::wait(),
        },
    };
    engine
        .configure(|config| {
            if let Some(secs) = change.ttl_secs {
                config.ttl = Duration::from_secs(secs);
            }
            if let Some(secs) = change.lease_ttl_secs {
                config.lease_ttl = Duration::from_secs(secs);
            }
            config.concurrent = concurrent;
            if let Some(interval) = change.cleanup_interval_secs {
                config.cleanup_interval = interval.map(Duration::from_secs);
            }
        })
        .map_err(|error| error.to_string())
}

fn shown(config: &Config) -> serde_json::Value {
    let (concurrent, wait_timeout) = match config.concurrent {
        Concurrent::Reject => ("reject", None),
        Concurrent::Wait { timeout } => ("wait", Some(timeout.as_secs_f64())),
    };
    json!({
        "ttl_secs": config.ttl.as_secs_f64(),
        "lease_ttl_secs": config.lease_ttl.as_secs_f64(),
        "concurrent": concurrent,
        "wait_timeout_secs": wait_timeout,
        "cleanup_interval_secs": config.cleanup_interval.map(|i| i.as_secs_f64()),
        "lease_expiry": match config.lease_expiry {
            LeaseExpiry::Takeover => "takeover",
            LeaseExpiry::Block => "block",
        },
    })
}

fn invalid(detail: &str) -> Response<Body> {
    problem(StatusCode::BAD_REQUEST, "Invalid configuration", detail)
}
