//! RFC 9457 problem details: the bodies of the responses the layer answers
//! itself (400, 409, 413, 422, 500, 503).
//!
//! Every such response has `Content-Type: application/problem+json` and a
//! JSON object with `type`, `title`, `status` and `detail`. The `type` URIs
//! are the constants of this module (RFC 4151 `tag:` URIs: stable names that
//! a client can match on, not links to follow).
//!
//! ```json
//! {
//!   "type": "tag:tower-idempotency,2026:conflict",
//!   "title": "A request with this Idempotency-Key is still being processed",
//!   "status": 409,
//!   "detail": "Retry after the first request finishes."
//! }
//! ```

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use http::{Response, StatusCode};
use serde::Serialize;

/// The media type of problem details.
pub const CONTENT_TYPE_PROBLEM: &str = "application/problem+json";

/// 400: a protected request without a key, under `require_key(true)`.
pub const MISSING_KEY: &str = "tag:tower-idempotency,2026:missing-key";
/// 400: an `Idempotency-Key` that is not a valid key.
pub const MALFORMED_KEY: &str = "tag:tower-idempotency,2026:malformed-key";
/// 400: a request body that could not be read.
pub const UNREADABLE_BODY: &str = "tag:tower-idempotency,2026:unreadable-body";
/// 413: a request body over `max_request_body`.
pub const BODY_TOO_LARGE: &str = "tag:tower-idempotency,2026:body-too-large";
/// 422: the key was used for another request (another fingerprint).
pub const KEY_REUSED: &str = "tag:tower-idempotency,2026:key-reused";
/// 409: the first request with this key is still in flight.
pub const CONFLICT: &str = "tag:tower-idempotency,2026:conflict";
/// 503: the idempotency store could not be reached (`FailMode::Closed`).
pub const STORE_UNAVAILABLE: &str = "tag:tower-idempotency,2026:store-unavailable";
/// 500: the idempotency store answered with something it cannot stand by (a
/// corrupt, foreign or unknown-version value under the key), whatever the
/// fail mode.
pub const STORE_FAILED: &str = "tag:tower-idempotency,2026:store-failed";
/// 500: the service panicked while handling the request.
pub const INTERNAL_ERROR: &str = "tag:tower-idempotency,2026:internal-error";

/// One problem details object (RFC 9457 §3.1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Problem {
    /// A URI naming the kind of problem (one of this module's constants).
    #[serde(rename = "type")]
    pub kind: String,
    /// A short summary of the kind of problem.
    pub title: String,
    /// The HTTP status code.
    pub status: u16,
    /// What happened to this request.
    pub detail: String,
}

impl Problem {
    /// A problem of `kind` with `status`, `title` and `detail`.
    pub fn new(
        kind: &str,
        status: StatusCode,
        title: impl Into<String>,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            kind: kind.to_owned(),
            title: title.into(),
            status: status.as_u16(),
            detail: detail.into(),
        }
    }

    /// The JSON body.
    pub fn to_json(&self) -> Bytes {
        // Serialising four strings and a number into a Vec cannot fail.
        serde_json::to_vec(self)
            .map(Bytes::from)
            .unwrap_or_default()
    }

    /// The response: status, `Content-Type: application/problem+json` and
    /// the JSON body.
    pub fn into_response(self) -> Response<Bytes> {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = Response::new(self.to_json());
        *response.status_mut() = status;
        // Kept beside its JSON, so that a gRPC call's answer is made from it.
        response.extensions_mut().insert(self);
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE_PROBLEM));
        response
    }
}

pub(crate) fn missing_key() -> Response<Bytes> {
    Problem::new(
        MISSING_KEY,
        StatusCode::BAD_REQUEST,
        "Idempotency-Key required",
        "This request must carry an Idempotency-Key header.",
    )
    .into_response()
}

pub(crate) fn malformed_key(detail: &str) -> Response<Bytes> {
    Problem::new(
        MALFORMED_KEY,
        StatusCode::BAD_REQUEST,
        "Malformed Idempotency-Key",
        detail,
    )
    .into_response()
}

pub(crate) fn unreadable_body(detail: &str) -> Response<Bytes> {
    Problem::new(
        UNREADABLE_BODY,
        StatusCode::BAD_REQUEST,
        "Request body could not be read",
        detail,
    )
    .into_response()
}

pub(crate) fn too_large(limit: usize) -> Response<Bytes> {
    Problem::new(
        BODY_TOO_LARGE,
        StatusCode::PAYLOAD_TOO_LARGE,
        "Request body too large",
        format!("A request with an Idempotency-Key may carry at most {limit} bytes of body."),
    )
    .into_response()
}

pub(crate) fn key_reused() -> Response<Bytes> {
    Problem::new(
        KEY_REUSED,
        StatusCode::UNPROCESSABLE_ENTITY,
        "Idempotency-Key reused for another request",
        "This Idempotency-Key was already used with another method, path, query or body. \
         Use a new key for a new request.",
    )
    .into_response()
}

pub(crate) fn conflict(retry_after_secs: u64) -> Response<Bytes> {
    let mut response = Problem::new(
        CONFLICT,
        StatusCode::CONFLICT,
        "A request with this Idempotency-Key is still being processed",
        "Retry after the first request finishes.",
    )
    .into_response();
    response
        .headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from(retry_after_secs.max(1)));
    response
}

pub(crate) fn store_unavailable() -> Response<Bytes> {
    let mut response = Problem::new(
        STORE_UNAVAILABLE,
        StatusCode::SERVICE_UNAVAILABLE,
        "Idempotency store unavailable",
        "The request was not processed because its Idempotency-Key could not be checked. \
         Retry with the same key.",
    )
    .into_response();
    response
        .headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from_static("1"));
    response
}

pub(crate) fn store_failed() -> Response<Bytes> {
    Problem::new(
        STORE_FAILED,
        StatusCode::INTERNAL_SERVER_ERROR,
        "Idempotency store failed",
        "The request was not processed: what the idempotency store holds for its \
         Idempotency-Key cannot be read, so it is not known whether it already ran.",
    )
    .into_response()
}

pub(crate) fn internal_error() -> Response<Bytes> {
    Problem::new(
        INTERNAL_ERROR,
        StatusCode::INTERNAL_SERVER_ERROR,
        "Internal error",
        "The service failed while handling the request; nothing was stored, \
         a retry with the same key runs it again.",
    )
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conflict_has_retry_after_and_problem_json() {
        let response = conflict(0);
        assert_eq!(response.status(), StatusCode::CONFLICT);
        assert_eq!(response.headers()[RETRY_AFTER], "1");
        assert_eq!(response.headers()[CONTENT_TYPE], CONTENT_TYPE_PROBLEM);
        let problem: Problem = serde_json::from_slice(response.body()).unwrap();
        assert_eq!(problem.status, 409);
        assert_eq!(problem.kind, CONFLICT);
    }
}
