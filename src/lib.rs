//! Run retried actions at most once per key, and hand every retry the first
//! result.
//!
//! `tower-idempotency` is a Tower middleware for axum and hyper services that
//! honours the `Idempotency-Key` header (Stripe-style, IETF
//! draft-ietf-httpapi-idempotency-key-header), and the engine under it, which
//! outbound code (webhook senders, third-party API calls) can use directly.
//!
//! # Where things are
//!
//! Every public item has one path.
//!
//! * **The layer** (at the root): [`IdempotencyLayer`], built by
//!   [`IdempotencyLayerBuilder`], wraps a service in [`Idempotent`], whose
//!   [`ResponseFuture`] answers a [`ResponseBody`]; the inner service reads a
//!   [`RequestBody`]. Policies: [`Concurrent`], [`LeaseExpiry`],
//!   [`Disconnect`], [`FailMode`], [`FingerprintMode`]. Its own error
//!   responses are RFC 9457 [`problem`] details.
//! * **The engine and `execute`** (at the root): [`Idempotency`], built by
//!   [`IdempotencyBuilder`] from a [`Config`], is the engine and the handle
//!   (stats, cache info, queries, maintenance). [`Idempotency::execute`] runs
//!   a closure at most once per [`IdempotencyKey`]; [`Idempotency::begin`]
//!   answers a [`Begin`] and hands out a [`Lease`]; a completed action
//!   leaves a [`Record`].
//! * **Key extractors**: [`extract`] holds the [`KeyExtractor`](extract::KeyExtractor)
//!   trait, the default [`HeaderKey`](extract::HeaderKey), [`ActionKey`](extract::ActionKey)
//!   and the component functions it is built from.
//! * **Store authors**: [`store`] holds the [`Store`](store::Store) protocol
//!   (four methods to implement), [`StoreAdmin`](store::StoreAdmin) for
//!   listing and maintenance, their types, and the stores: the embedded
//!   [`MemoryStore`](store::MemoryStore) in `store` itself, the Redis store in
//!   `store::redis` (feature `redis`), the Postgres store in `store::postgres`
//!   (feature `postgres`), and the conformance suite in `store::conformance`
//!   (feature `test-util`).
//!
//! # What "at most once" covers
//!
//! For one storage key and within the record TTL, the action runs at most
//! once **while the process that runs it lives**: duplicates in flight get
//! 409 (or wait for the first's result), later retries get the stored
//! result. A crash between the side effect and the store leaves nothing that
//! says the effect happened: under [`LeaseExpiry::Takeover`] (the default) a
//! retry after the lease TTL runs the action again; under
//! [`LeaseExpiry::Block`] the key is refused until the record TTL. The
//! layer's behaviour, request by request, is on [`IdempotencyLayer`]; the
//! engine's protocol on [`Idempotency`].
#![cfg_attr(docsrs, feature(doc_cfg))]

mod config;
mod engine;
mod execute;
mod key;
mod layer;
pub mod problem;
mod record;
mod stats;
pub mod store;

pub use config::{ConfigError, MAX_DURATION};
pub use engine::{
    Begin, Concurrent, Config, Idempotency, IdempotencyBuilder, KeyFilter, Lease, LeaseExpiry,
    DEFAULT_LEASE_TTL, DEFAULT_TTL, DEFAULT_WAIT_TIMEOUT,
};
pub use execute::ExecuteError;
pub use key::{Fingerprint, FingerprintMode, IdempotencyKey, KeyParseError};
pub use layer::{
    BoxError, Disconnect, FailMode, GrpcCode, IdempotencyLayer, IdempotencyLayerBuilder,
    Idempotent, OutcomeUnknown, OversizedResponse, RequestBody, ResponseBody, ResponseFuture,
    UnclearOutcome, DEFAULT_GRPC_REQUEST_TIMEOUT, DEFAULT_MAX_BODY,
};
pub use record::{Payload, Record, StoredResponse};
pub use stats::{CacheInfo, StatsSnapshot};

pub mod extract {
    //! Key extractors: how the HTTP layer finds an action's key in a request.
    //!
    //! [`HeaderKey`] (the `Idempotency-Key` header) is the default;
    //! [`ActionKey`] builds a `signal:action:target` key from the request
    //! head, out of the component functions of this module ([`from_header`],
    //! [`from_path_segment`], [`from_query`], [`fixed`]). A
    //! [`KeyExtractor`] of your own answers [`KeyParts`], or a
    //! [`KeyRejection`] (a 400).
    //!
    //! ```
    //! use tower_idempotency::extract::{fixed, from_header, from_path_segment, ActionKey};
    //! use tower_idempotency::IdempotencyLayer;
    //!
    //! let layer = IdempotencyLayer::builder()
    //!     .key_extractor(ActionKey::new(
    //!         from_header("x-signal-id"), fixed("create_task"), from_path_segment(1)))
    //!     .build()
    //!     .unwrap();
    //! # drop(layer);
    //! ```

    pub use crate::key::{
        fixed, from_header, from_path_segment, from_query, ActionKey, HeaderKey, KeyExtractor,
        KeyParts, KeyRejection, IDEMPOTENCY_KEY, MAX_COMPONENT_LEN, MAX_KEY_LEN,
    };
}
