//! Run retried actions at most once per key, and hand every retry the first
//! result.
//!
//! `tower-idempotency` is a Tower middleware for axum and hyper services that
//! honours the `Idempotency-Key` header (Stripe-style, IETF
//! draft-ietf-httpapi-idempotency-key-header), and the engine under it, which
//! outbound code (webhook senders, third-party API calls) can use directly.
//!
//! * [`IdempotencyLayer`]: the Tower layer for `Idempotency-Key` (module
//!   [`layer`]: the guarantee and the behaviour table), answering its own
//!   errors as RFC 9457 [`problem`] details.
//! * [`Idempotency`]: the engine and its handle (stats, queries,
//!   maintenance). The whole protocol lives in one file, [`engine`].
//! * [`store`]: the [`Store`](store::Store) trait, the embedded moka
//!   [`MemoryStore`](store::MemoryStore) and, with feature `redis`, the shared
//!   Redis store; with feature `postgres`, the Postgres store and its
//!   transactional form of `execute`.
//! * [`key`]: [`IdempotencyKey`], [`Fingerprint`] and key extractors
//!   ([`HeaderKey`]).
//! * [`record`]: what a completed action leaves behind.
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod engine;
mod execute;
pub mod key;
pub mod layer;
pub mod problem;
pub mod record;
mod stats;
pub mod store;

pub use engine::{
    Begin, Concurrent, Config, ConfigError, Idempotency, IdempotencyBuilder, KeyFilter, Lease,
    LeaseExpiry,
};
pub use execute::ExecuteError;
pub use key::{ActionKey, Fingerprint, FingerprintMode, HeaderKey, IdempotencyKey};
pub use layer::{
    Disconnect, FailMode, IdempotencyLayer, IdempotencyLayerBuilder, Idempotent, RequestBody,
    ResponseBody, ResponseFuture,
};
pub use record::{Record, StoredResponse};
pub use stats::{CacheInfo, StatsSnapshot};
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use store::PostgresStore;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use store::RedisStore;
