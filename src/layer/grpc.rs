//! gRPC calls: recognised by their content type, answered in gRPC.
//!
//! A gRPC call is an HTTP/2 POST whose status travels in trailers: the
//! layer's own answers (a conflict, a mismatch, a missing key) become
//! Trailers-Only responses (HTTP 200, `grpc-status` and `grpc-message` in the
//! headers), and whether a first answer is stored is read from its
//! `grpc-status`, not from its HTTP status (always 200).

use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, Response, StatusCode};

use crate::problem::Problem;

/// The metadata entry that asks a client to wait before it retries an
/// `ABORTED` call, in milliseconds (gRPC's retry pushback).
const RETRY_PUSHBACK: &str = "grpc-retry-pushback-ms";

/// A gRPC status code, as `grpc-status` carries it.
///
/// ```
/// use tower_idempotency::GrpcCode;
///
/// assert_eq!(GrpcCode::FailedPrecondition as u32, 9);
/// assert_eq!(GrpcCode::from_u32(14), Some(GrpcCode::Unavailable));
/// assert!(GrpcCode::Ok.is_stored_by_default());
/// assert!(!GrpcCode::Unavailable.is_stored_by_default());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(missing_docs)] // The names are gRPC's own.
pub enum GrpcCode {
    Ok = 0,
    Cancelled = 1,
    Unknown = 2,
    InvalidArgument = 3,
    DeadlineExceeded = 4,
    NotFound = 5,
    AlreadyExists = 6,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    FailedPrecondition = 9,
    Aborted = 10,
    OutOfRange = 11,
    Unimplemented = 12,
    Internal = 13,
    Unavailable = 14,
    DataLoss = 15,
    Unauthenticated = 16,
}

impl GrpcCode {
    /// The code of a `grpc-status` number, if it is one.
    pub fn from_u32(code: u32) -> Option<Self> {
        use GrpcCode::*;
        Some(match code {
            0 => Ok,
            1 => Cancelled,
            2 => Unknown,
            3 => InvalidArgument,
            4 => DeadlineExceeded,
            5 => NotFound,
            6 => AlreadyExists,
            7 => PermissionDenied,
            8 => ResourceExhausted,
            9 => FailedPrecondition,
            10 => Aborted,
            11 => OutOfRange,
            12 => Unimplemented,
            13 => Internal,
            14 => Unavailable,
            15 => DataLoss,
            16 => Unauthenticated,
            _ => return None,
        })
    }

    /// Whether a call that ended with this code is stored by default: the
    /// definite answers (`OK`, and the errors a retry would meet again:
    /// `INVALID_ARGUMENT`, `NOT_FOUND`, `ALREADY_EXISTS`,
    /// `PERMISSION_DENIED`, `FAILED_PRECONDITION`, `OUT_OF_RANGE`,
    /// `UNIMPLEMENTED`, `UNAUTHENTICATED`). The rest (`UNAVAILABLE`,
    /// `DEADLINE_EXCEEDED`, `RESOURCE_EXHAUSTED`, `ABORTED`, `INTERNAL`,
    /// `UNKNOWN`, `CANCELLED`, `DATA_LOSS`) release the key, so a retry runs
    /// the call again.
    pub fn is_stored_by_default(self) -> bool {
        use GrpcCode::*;
        matches!(
            self,
            Ok | InvalidArgument
                | NotFound
                | AlreadyExists
                | PermissionDenied
                | FailedPrecondition
                | OutOfRange
                | Unimplemented
                | Unauthenticated
        )
    }
}

/// Which gRPC statuses are stored: the layer's policy for gRPC calls.
pub(crate) type GrpcStatusPolicy = dyn Fn(GrpcCode) -> bool + Send + Sync;

/// The default policy: [`GrpcCode::is_stored_by_default`].
pub(crate) fn default_policy() -> Arc<GrpcStatusPolicy> {
    Arc::new(GrpcCode::is_stored_by_default)
}

/// Whether `headers` are those of a gRPC message (`application/grpc`,
/// `application/grpc+proto`, `application/grpc+json`...).
pub(crate) fn is_grpc(headers: &HeaderMap) -> bool {
    headers.get(CONTENT_TYPE).is_some_and(|value| {
        let value = value.as_bytes();
        value.starts_with(b"application/grpc") && matches!(value.get(16), None | Some(b'+' | b';'))
    })
}

/// The `grpc-status` that `headers` (a Trailers-Only head, or trailers)
/// carry: `None` when there is none, `Some(None)` when it is no code.
pub(crate) fn status_in(headers: &HeaderMap) -> Option<Option<GrpcCode>> {
    let value = headers.get("grpc-status")?;
    Some(
        value
            .to_str()
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .and_then(GrpcCode::from_u32),
    )
}

/// The layer's own answer in the request's protocol: problem+json, or for a
/// gRPC call a Trailers-Only status.
pub(crate) fn own_answer(grpc: bool, answer: Response<Bytes>) -> Response<Bytes> {
    if grpc {
        self::answer(answer)
    } else {
        answer
    }
}

/// The layer's own answer `response` (a problem+json of `crate::problem`)
/// as a gRPC client reads it: Trailers-Only, its status mapped to a code
/// and its detail the message. Anything else (a replay) is left as it is.
pub(crate) fn answer(response: Response<Bytes>) -> Response<Bytes> {
    let Some(problem) = response.extensions().get::<Problem>() else {
        return response;
    };
    let code = match StatusCode::from_u16(problem.status) {
        Ok(StatusCode::BAD_REQUEST) => GrpcCode::InvalidArgument,
        Ok(StatusCode::PAYLOAD_TOO_LARGE) => GrpcCode::ResourceExhausted,
        Ok(StatusCode::UNPROCESSABLE_ENTITY) => GrpcCode::FailedPrecondition,
        Ok(StatusCode::CONFLICT) => GrpcCode::Aborted,
        Ok(StatusCode::SERVICE_UNAVAILABLE | StatusCode::BAD_GATEWAY) => GrpcCode::Unavailable,
        Ok(StatusCode::GATEWAY_TIMEOUT) => GrpcCode::DeadlineExceeded,
        _ => GrpcCode::Internal,
    };
    let pushback = response
        .headers()
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .filter(|_| code == GrpcCode::Aborted)
        .map(|secs| secs.saturating_mul(1000));
    let mut message = problem.title.clone();
    if !problem.detail.is_empty() {
        message.push_str(": ");
        message.push_str(&problem.detail);
    }
    let mut status = trailers_only(code, &message);
    if let Some(ms) = pushback {
        status
            .headers_mut()
            .insert(RETRY_PUSHBACK, HeaderValue::from(ms));
    }
    status
}

/// The code a replay of an `OK` call whose message was too large to keep
/// answers: the call ran (a create "already exists"), and a retry must not
/// expect its message.
pub(crate) const COMPLETED_NOT_KEPT: GrpcCode = GrpcCode::AlreadyExists;

/// Rewrites the trailers of a replayed gRPC answer recorded without its
/// message: an `OK` becomes [`COMPLETED_NOT_KEPT`], saying so, since an
/// `OK` with no message would read as an empty reply. Other statuses are
/// replayed as recorded.
pub(crate) fn say_response_not_kept(trailers: &mut HeaderMap) {
    if status_in(trailers) != Some(Some(GrpcCode::Ok)) {
        return;
    }
    trailers.insert("grpc-status", HeaderValue::from(COMPLETED_NOT_KEPT as u32));
    let message = "the call completed (OK) but its response was larger than the idempotency \
                   layer stores and was not kept; it is not run again";
    if let Ok(message) = HeaderValue::from_str(&percent_encode(message)) {
        trailers.insert("grpc-message", message);
    }
}

/// The answer to a gRPC call whose request stream did not end in time: a
/// streaming method not listed as one. Nothing ran.
pub(crate) fn unfinished_request() -> Response<Bytes> {
    trailers_only(
        GrpcCode::Unimplemented,
        "the request stream did not end in time: the idempotency layer protects unary calls, \
         whose request it reads whole; list streaming methods in grpc_streaming_paths \
         (--grpc-streaming-path on the proxy) to pass them through. The call was not run.",
    )
}

/// A Trailers-Only gRPC response: HTTP 200, no message, `code` and
/// `message` in the headers.
pub(crate) fn trailers_only(code: GrpcCode, message: &str) -> Response<Bytes> {
    let mut response = Response::new(Bytes::new());
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    headers.insert("grpc-status", HeaderValue::from(code as u32));
    if let Ok(message) = HeaderValue::from_str(&percent_encode(message)) {
        headers.insert("grpc-message", message);
    }
    response
}

/// `grpc-message` is percent-encoded: bytes outside printable ASCII, and
/// `%` itself.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if (0x20..=0x7e).contains(&byte) && byte != b'%' {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::problem;

    #[test]
    fn grpc_content_types_are_recognised() {
        let with = |value: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert(CONTENT_TYPE, HeaderValue::from_static(value));
            is_grpc(&headers)
        };
        assert!(with("application/grpc"));
        assert!(with("application/grpc+proto"));
        assert!(with("application/grpc+json"));
        assert!(with("application/grpc;charset=utf-8"));
        assert!(!with("application/grpcx"));
        assert!(!with("application/json"));
        assert!(!is_grpc(&HeaderMap::new()));
    }

    #[test]
    fn problems_become_trailers_only_statuses() {
        let conflict = answer(problem::conflict(2));
        assert_eq!(conflict.status(), StatusCode::OK);
        assert_eq!(conflict.headers()["content-type"], "application/grpc");
        assert_eq!(conflict.headers()["grpc-status"], "10");
        assert_eq!(conflict.headers()[RETRY_PUSHBACK], "2000");
        assert!(conflict.body().is_empty());
        let mismatch = answer(problem::key_reused());
        assert_eq!(mismatch.headers()["grpc-status"], "9");
        assert!(mismatch.headers().get(RETRY_PUSHBACK).is_none());
        assert_eq!(answer(problem::missing_key()).headers()["grpc-status"], "3");
        assert_eq!(answer(problem::too_large(1)).headers()["grpc-status"], "8");
        assert_eq!(
            answer(problem::store_unavailable()).headers()["grpc-status"],
            "14"
        );
        assert_eq!(
            answer(problem::store_failed()).headers()["grpc-status"],
            "13"
        );
    }

    #[test]
    fn messages_are_percent_encoded() {
        assert_eq!(percent_encode("50% done: é"), "50%25 done: %C3%A9");
    }

    #[test]
    fn status_codes_read_from_headers() {
        let mut headers = HeaderMap::new();
        assert_eq!(status_in(&headers), None);
        headers.insert("grpc-status", HeaderValue::from_static("9"));
        assert_eq!(
            status_in(&headers),
            Some(Some(GrpcCode::FailedPrecondition))
        );
        headers.insert("grpc-status", HeaderValue::from_static("99"));
        assert_eq!(status_in(&headers), Some(None));
    }
}
