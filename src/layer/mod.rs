//! The Tower layer for the `Idempotency-Key` header.
//!
//! What it guarantees and how it behaves, row by row, is in `docs.md`, which
//! rustdoc renders on [`IdempotencyLayer`].

mod body;
mod builder;
mod driver;
mod future;
mod grpc;
mod hand_off;
#[allow(clippy::module_inception)]
mod layer;
mod recording;
mod replay;
mod service;
mod tee;

pub use body::{BoxError, RequestBody, ResponseBody};
pub use builder::IdempotencyLayerBuilder;
pub use future::ResponseFuture;
pub(crate) use grpc::answer as grpc_answer;
pub use grpc::GrpcCode;
pub use layer::{
    Disconnect, FailMode, IdempotencyLayer, OutcomeUnknown, OversizedResponse, UnclearOutcome,
    DEFAULT_GRPC_REQUEST_TIMEOUT, DEFAULT_MAX_BODY,
};
pub use service::Idempotent;
