//! [`Recording`]: the lease of a first request and what is kept of its
//! response until the record is stored.

use std::sync::Arc;

use bytes::Bytes;

use super::body::Gathered;
use super::layer::Shared;
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
        }
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
            .filter(|&len| len <= settings.max_response_body)
            .unwrap_or(0);
        self.head = Some(stored_head(head, settings, room));
        true
    }

    fn keep_data(&mut self, data: &Bytes) -> bool {
        if self.body.len() + data.len() > self.shared.settings.max_response_body {
            return false;
        }
        self.body.push(data.clone());
        true
    }

    fn store(self: Box<Self>) -> Pending {
        let Self {
            lease,
            fingerprint,
            shared,
            head,
            body,
        } = *self;
        let Some(head) = head else {
            // A body recorded without its head is a bug: release, store nothing.
            return Box::pin(release(lease));
        };
        let response = head.finish(&body.into_bytes());
        Box::pin(async move {
            match lease
                .complete(Record::response(fingerprint, response))
                .await
            {
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
