//! The HTTP layer (docs TBD).

mod body;
mod driver;
mod future;
#[allow(clippy::module_inception)]
mod layer;
mod service;

pub use body::{BoxError, RequestBody, ResponseBody};
pub use future::ResponseFuture;
pub use layer::{
    Disconnect, FailMode, IdempotencyLayer, IdempotencyLayerBuilder, DEFAULT_MAX_BODY,
};
pub use service::Idempotent;
