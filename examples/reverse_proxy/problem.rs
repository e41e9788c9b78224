//! RFC 9457 problem+json answers of the proxy itself (502, 504, admin errors),
//! and the same answers as gRPC statuses for a gRPC call.

use axum::body::Body;
use http::{header, HeaderMap, HeaderValue, Response, StatusCode};
use tower_idempotency::problem::Problem;

/// A `application/problem+json` response.
pub(crate) fn problem(status: StatusCode, title: &str, detail: &str) -> Response<Body> {
    let body = serde_json::json!({
        "type": "about:blank",
        "title": title,
        "status": status.as_u16(),
        "detail": detail,
    });
    let mut response = Response::new(Body::from(body.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    response
}

/// The proxy's answer to a request: [`problem`], or for a gRPC call
/// ([`is_grpc`]) the same problem as a Trailers-Only status (HTTP 200;
/// 400 `INVALID_ARGUMENT`, 502 `UNAVAILABLE`, 504 `DEADLINE_EXCEEDED`, as
/// [`Problem::into_grpc_response`] maps them), which a gRPC client can read.
pub(crate) fn answer(grpc: bool, status: StatusCode, title: &str, detail: &str) -> Response<Body> {
    if !grpc {
        return problem(status, title, detail);
    }
    Problem::new("about:blank", status, title, detail)
        .into_grpc_response()
        .map(Body::from)
}

/// Whether a request with these headers is a gRPC call (`application/grpc`,
/// `application/grpc+proto`, ...), as the idempotency layer tells them.
pub(crate) fn is_grpc(headers: &HeaderMap) -> bool {
    headers.get(header::CONTENT_TYPE).is_some_and(|value| {
        let value = value.as_bytes();
        value.starts_with(b"application/grpc") && matches!(value.get(16), None | Some(b'+' | b';'))
    })
}
