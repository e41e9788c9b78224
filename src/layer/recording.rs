//! [`Recording`]: the lease of a first request and what is kept of its
//! response until the record is stored.

use std::sync::Arc;

use bytes::Bytes;

use super::body::Gathered;
use super::grpc;
use super::layer::{OversizedResponse, Shared, UnclearOutcome};
use super::replay::{storable, stored_head};
use super::tee::{GiveUp, Pending, Recorder};
use crate::engine::Lease;
use crate::key::Fingerprint;
use crate::record::{Record, StoredHead};
use crate::stats::Stats;
use crate::store::Store;

/// A first request's lease, and its response as far as it is recorded.
pub(crate) struct Recording<S: Store, K> {
    lease: Lease<S>,
    fingerprint: Fingerprint,
    shared: Arc<Shared<S, K>>,
    /// The stored status and headers, once the head is known and storable.
    head: Option<StoredHead>,
    body: Gathered,
    /// Set once the body outgrew what is stored: only the head is kept.
    omitted: bool,
    trailers: Option<http::HeaderMap>,
    /// A gRPC answer's fate, read from the `grpc-status` of its trailers.
    grpc: GrpcFate,
}

/// Whether a gRPC answer is stored: it depends on the status its trailers
/// bring at the end of the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GrpcFate {
    /// Not a gRPC answer, or one decided by its Trailers-Only head.
    Decided,
    /// A gRPC answer whose trailers have not come yet.
    AwaitingStatus,
    /// Its status is one the policy stores.
    Stored,
    /// Its status is one the policy does not store, or no status at all.
    NotStored,
}

impl<S: Store, K> Recording<S, K> {
    pub(crate) fn new(
        lease: Lease<S>,
        fingerprint: Fingerprint,
        shared: Arc<Shared<S, K>>,
    ) -> Self {
        Self {
            lease,
            fingerprint,
            shared,
            head: None,
            body: Gathered::default(),
            omitted: false,
            trailers: None,
            grpc: GrpcFate::Decided,
        }
    }

    /// The largest body stored: the layer's limit, or the store's largest
    /// record if smaller (a record the store would drop at once must not be
    /// reported stored).
    fn max_body(&self) -> usize {
        let limit = self.shared.settings.max_response_body;
        let store = self.shared.engine.store().max_record_size();
        store.map_or(limit, |store| limit.min(store))
    }
}

impl<S: Store, K: Send + Sync + 'static> Recorder for Recording<S, K> {
    fn keep_head(&mut self, head: &http::response::Parts, declared: Option<u64>) -> bool {
        let settings = &self.shared.settings;
        if !storable(head, settings) {
            return false;
        }
        // With room for a body of known length (one that fits the stored
        // maximum), so the record is finished in place: its buffer is kept
        // for the record's TTL, and sized to what it holds either way.
        let room = declared
            .and_then(|len| usize::try_from(len).ok())
            .filter(|&len| len <= self.max_body())
            .unwrap_or(0);
        self.head = Some(stored_head(head, settings, room));
        if grpc::is_grpc(&head.headers) && grpc::status_in(&head.headers).is_none() {
            self.grpc = GrpcFate::AwaitingStatus;
        }
        true
    }

    fn keep_data(&mut self, data: &Bytes) -> bool {
        if self.omitted {
            return true;
        }
        if self.body.len() + data.len() > self.max_body() {
            return match self.shared.settings.oversized {
                OversizedResponse::RecordHead => {
                    self.omitted = true;
                    self.body = Gathered::default();
                    true
                }
                OversizedResponse::Release => false,
            };
        }
        self.body.push(data.clone());
        true
    }

    fn keep_trailers(&mut self, trailers: &http::HeaderMap) {
        if self.grpc == GrpcFate::AwaitingStatus {
            let policy = &self.shared.settings.grpc_store_status;
            self.grpc = match grpc::status_in(trailers) {
                Some(Some(code)) if policy(code) => GrpcFate::Stored,
                _ => GrpcFate::NotStored,
            };
        }
        self.trailers = Some(trailers.clone());
    }

    fn store(self: Box<Self>) -> Pending {
        match self.grpc {
            GrpcFate::Decided | GrpcFate::Stored => {}
            GrpcFate::NotStored => return self.give_up(GiveUp::NotStored),
            // A gRPC stream that ended without its status was cut off.
            GrpcFate::AwaitingStatus => return self.give_up(GiveUp::Unclear),
        }
        let Self {
            lease,
            fingerprint,
            shared,
            head,
            body,
            omitted,
            trailers,
            grpc: _,
        } = *self;
        let Some(head) = head else {
            // A body recorded without its head is a bug: release, store nothing.
            return Box::pin(release(lease));
        };
        let response = if omitted {
            head.finish_omitted(trailers.as_ref())
        } else {
            head.finish(trailers.as_ref(), &body.into_bytes())
        };
        Box::pin(async move {
            match lease
                .complete(Record::response(fingerprint, response))
                .await
            {
                Ok(true) if omitted => {
                    Stats::incr(&shared.engine.counters().here().omitted);
                }
                Ok(true) => {}
                Ok(false) => {
                    Stats::incr(&shared.engine.counters().here().not_stored);
                    tracing::warn!("idempotency lease was lost before the response was stored");
                }
                Err(error) => tracing::warn!(%error, "storing the idempotent response failed"),
            }
        })
    }

    fn give_up(self: Box<Self>, why: GiveUp) -> Pending {
        match why {
            GiveUp::NotStored => Stats::incr(&self.shared.engine.counters().here().not_stored),
            GiveUp::Panicked => tracing::error!(
                key = self.lease.key(),
                "the service or its response body panicked: lease released"
            ),
            GiveUp::Failed => {}
            GiveUp::Unclear => match self.shared.settings.unclear {
                UnclearOutcome::LeaveToExpire => {
                    self.lease.abandon();
                    return Box::pin(std::future::ready(()));
                }
                UnclearOutcome::Release => tracing::warn!(
                    key = self.lease.key(),
                    "idempotency outcome unknown: key released (UnclearOutcome::Release)"
                ),
            },
        }
        Box::pin(release(self.lease))
    }
}

/// Releases the key, so the next retry runs the action again.
pub(crate) async fn release<S: Store>(lease: Lease<S>) {
    if let Err(error) = lease.release().await {
        tracing::warn!(%error, "idempotency lease release failed; it expires with its TTL");
    }
}
