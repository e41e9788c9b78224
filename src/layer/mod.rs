//! The Tower layer for the `Idempotency-Key` header.
//!
//! [`IdempotencyLayer`] makes every protected request (by default POST and
//! PATCH) that carries an `Idempotency-Key` run **at most once per key**, and
//! hands every retry the first response, marked `idempotent-replayed: true`.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use axum::{routing::post, Router};
//! use tower_idempotency::{Concurrent, IdempotencyLayer};
//!
//! async fn create_order(body: String) -> (http::StatusCode, String) {
//!     (http::StatusCode::CREATED, format!("created from {body}"))
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let idem = IdempotencyLayer::builder()
//!     .ttl(Duration::from_secs(3600))
//!     .concurrent(Concurrent::Wait { timeout: Duration::from_secs(30) })
//!     .build()?;
//! let handle = idem.handle(); // stats, cache info, queries, maintenance
//! let app = Router::new().route("/orders", post(create_order)).layer(idem);
//!
//! use tower::ServiceExt;
//! let request = || {
//!     http::Request::post("/orders")
//!         .header("idempotency-key", "\"8e03978e-40d5-43e8\"")
//!         .body(axum::body::Body::from("{}"))
//!         .unwrap()
//! };
//! let first = app.clone().oneshot(request()).await?;
//! let retry = app.oneshot(request()).await?;
//! assert_eq!(retry.status(), http::StatusCode::CREATED);
//! assert_eq!(retry.headers()["idempotent-replayed"], "true");
//! assert!(first.headers().get("idempotent-replayed").is_none());
//! assert_eq!((handle.stats().executed, handle.stats().replayed), (1, 1));
//! # Ok(())
//! # }
//! ```
//!
//! With axum, `Router::layer` also wraps the router's fallback: a keyed POST
//! to a path no route matches runs the fallback under the layer, and its 404
//! is stored (a retry replays it, marked `idempotent-replayed`). To protect
//! the routes only, use `Router::route_layer`: unknown paths then pass by the
//! layer.
//!
//! The same layer wraps a plain hyper service or sits in a
//! `tower::ServiceBuilder` stack: the inner service receives
//! `Request<`[`RequestBody<B>`](RequestBody)`>` and answers any
//! `Response<ResBody>`; the client gets `Response<`[`ResponseBody<ResBody>`](ResponseBody)`>`.
//!
//! # What "at most once" covers
//!
//! For one storage key (client key, method, path and client scope) and
//! within the record TTL, the service runs at most once **while the process
//! that runs it lives**: duplicates in flight get 409 (or wait for the
//! first's response), later retries get the stored response. The record is
//! written after the service answered and its body ended, and before the
//! last chunk of that body reaches the client.
//!
//! It does not cover a crash between the side effect and the store: if the
//! process dies after the handler did its work (charged the card, created
//! the order) but before the response was stored, nothing records that the
//! work happened. Under [`LeaseExpiry::Takeover`](crate::LeaseExpiry) (the
//! default) a retry after the lease TTL **runs the handler again**; under
//! [`LeaseExpiry::Block`](crate::LeaseExpiry) the key answers 409 until the
//! record TTL, so nothing runs twice but the client cannot get an answer.
//! Neither can undo a half-done side effect: handlers whose effects must be
//! exactly-once should also make them idempotent downstream (a unique
//! constraint, the key passed to the payment provider).
//!
//! Responses not stored by policy (5xx, 408, 429, `Cache-Control: no-store`,
//! bodies over [`max_response_body`](IdempotencyLayerBuilder::max_response_body),
//! inner errors and panics) release the key: the next retry runs again.
//!
//! # Behaviour
//!
//! Checks run in this order: method, key (400), body size (413), fingerprint
//! (422), conflict (409).
//!
//! | situation | response |
//! |---|---|
//! | method not protected (default: only POST and PATCH are) | passed through untouched, body not buffered |
//! | no key, key optional (default) | passed through untouched |
//! | no key, `require_key(true)` | 400 problem+json |
//! | malformed key (empty, over 255 characters, control characters, bad quoting, several fields) | 400 problem+json |
//! | request body over `max_request_body` (default 1 MiB) | 413 problem+json, service not called |
//! | first request | the service runs; its response streams to the client as it comes; the record is stored before the last chunk reaches the client, so a retry sent after the response arrived replays |
//! | retry after completion, same fingerprint | stored status, headers and body, plus `idempotent-replayed: true` |
//! | retry, different fingerprint (method, path and query, body) | 422 problem+json |
//! | duplicate in flight, different fingerprint | 422 (mismatch wins over conflict) |
//! | duplicate in flight | `Concurrent::Reject` (default): 409 problem+json with `Retry-After` (at least 1 s); `Concurrent::Wait { timeout }`: the first's response, replayed and counted as `coalesced`; if the first ends without a stored result, the waiters start over and one runs; past the timeout, 409 |
//! | client disconnects while its request runs | `Disconnect::Complete` (default): the service and its body run on, handed to a task (in the request's tracing span), and the result is stored, so the retry replays it; `Disconnect::Cancel`: the service's future and body are dropped and the key released |
//! | service returns `Err` | key released, the error is returned |
//! | service panics (in `call`, its future or its body) | key released, 500 problem+json (or, mid-body, the body ends in an error) |
//! | action runs longer than the lease TTL | the engine renews the lease every third of the lease TTL while the action runs |
//! | response carries `Cache-Control: no-store` | returned, not stored, key released |
//! | process dies while holding a lease | `LeaseExpiry::Takeover` (default): after the lease TTL a retry runs again; `LeaseExpiry::Block`: 409 until the record TTL |
//! | response status 5xx, 408 or 429 (default `store_status`) | returned, not stored, key released |
//! | response body over `max_response_body` (default 1 MiB) | streamed through, not stored, key released |
//! | store unreachable | `FailMode::Closed` (default): 503 problem+json with `Retry-After: 1`; `FailMode::Open`: passed through unprotected; both counted in `store_errors` |
//! | store holds a corrupt, foreign or unknown-version value under the key | 500 problem+json whatever the fail mode (never an unprotected run), counted in `store_errors`, logged with the key |
//!
//! Replays drop hop-by-hop headers (and those named by `Connection`),
//! `Date` (the server writes a fresh one) and, unless
//! [`replay_set_cookie(true)`](IdempotencyLayerBuilder::replay_set_cookie),
//! `Set-Cookie`. Trailers are forwarded to the first client but not stored.
//! Error bodies are RFC 9457 problem details ([`crate::problem`]).
//!
//! # Cost
//!
//! Requests that are not protected, or carry no key, pay one method check and
//! one header lookup: no allocation, no body buffering, no hashing, no store
//! access; their future and body are polled in place. A protected request
//! buffers its body (up to the limit), hashes it and begins in one boxed
//! future; a replay, conflict or mismatch is answered from there. A request
//! that runs runs there too: the layer's response future polls the service's
//! future, and its response body records the service's body as the client
//! reads it, with no task and no channel in between. Only a client that goes
//! away before the end under `Disconnect::Complete` hands what is left to a
//! spawned task, inside the request's tracing span, which finishes the action
//! and stores its record.
//!
//! A small response body whose length is known up front (64 KiB at most) is
//! read whole and stored before its head is handed on, so head and body
//! leave in one write; a server without `TCP_NODELAY` would otherwise hold a
//! body written after the store's round trip for a delayed ACK (40 ms).

mod body;
mod builder;
mod driver;
mod future;
#[allow(clippy::module_inception)]
mod layer;
mod recording;
mod replay;
mod service;
mod tee;

pub use body::{BoxError, RequestBody, ResponseBody};
pub use builder::IdempotencyLayerBuilder;
pub use future::ResponseFuture;
pub use layer::{Disconnect, FailMode, IdempotencyLayer, DEFAULT_MAX_BODY};
pub use service::Idempotent;
