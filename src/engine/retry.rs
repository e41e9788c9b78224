//! Store writes the engine does not give up on after one failure.
//!
//! * **Completing a held result.** The action ran; its result is the only
//!   record that it did. A `complete` that fails (Redis timed out, the
//!   connection dropped) is retried with backoff while the lease is still
//!   ours, so one failed write does not make the next retry run the action
//!   again.
//! * **Releasing a token the store may hold.** A `begin` that timed out, or
//!   whose future was dropped while the store answered, may have written the
//!   caller's marker all the same (the command reached Redis; its answer did
//!   not come back). Nothing ran under that token, so the engine, which made
//!   the token, releases it in the background; otherwise the key would be
//!   refused for the lease TTL (or, under [`LeaseExpiry::Block`], the record
//!   TTL). Releases that failed are queued the same way.
//!
//! [`LeaseExpiry::Block`]: super::LeaseExpiry::Block

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::task::AbortHandle;
use tokio::time::Instant;

use super::flight::{Flight, FlightOutcome};
use super::{lock, Idempotency, Inner};
use crate::record::SharedRecord;
use crate::stats::Stats;
use crate::store::{LeaseToken, Store, StoreError};

/// The first pause between two attempts; it doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(20);
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// The most releases kept waiting for a store that does not answer; past it
/// the oldest is dropped (its marker then expires with its TTL).
const MAX_PENDING_RELEASES: usize = 10_000;

/// Stores `record` under `key` for the lease `token`, retrying a failed
/// write until the lease would expire (one lease TTL after it was last known
/// to be ours), then ends the flight: followers get the record only if it
/// was stored. Answers whether it was stored (`false`: the lease was lost).
/// `resumed`: an earlier attempt was abandoned unanswered, and may have
/// stored the record.
pub(super) async fn complete_until_lease_expires<S: Store>(
    engine: &Idempotency<S>,
    token: LeaseToken,
    flight: &Arc<Flight>,
    record: &SharedRecord,
    resumed: bool,
) -> Result<bool, StoreError> {
    let key = flight.key.as_str();
    let inner = &engine.inner;
    let deadline = flight.lease_ours_until(inner.config().lease_ttl);
    let mut backoff = MIN_BACKOFF;
    let mut failures = 0_u32;
    let result = loop {
        let attempt = inner
            .store
            .complete(key, token, record.clone(), inner.config().ttl)
            .await;
        match attempt {
            Ok(true) => break Ok(true),
            // An attempt that failed may have been carried out all the same
            // (the answer was lost, not the command): then this one finds
            // our record instead of our marker.
            Ok(false) if resumed || failures > 0 => break Ok(holds(engine, key, record).await),
            Ok(false) => break Ok(false),
            Err(error) => {
                Stats::incr(&inner.stats.here().store_errors);
                failures += 1;
                let now = Instant::now();
                if matches!(error, StoreError::Corrupt { .. }) || now >= deadline {
                    tracing::error!(
                        %error,
                        key,
                        attempts = failures,
                        "storing the idempotent result failed; the key is not recorded"
                    );
                    break Err(error);
                }
                tracing::debug!(%error, key, attempt = failures, "storing the result failed; retrying");
                tokio::time::sleep_until(deadline.min(now + backoff)).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    };
    let outcome = match result {
        Ok(true) => FlightOutcome::Completed(record.clone()),
        _ => FlightOutcome::Released,
    };
    engine.end_flight(flight, outcome);
    result
}

/// Whether the store holds exactly `record` under `key`.
async fn holds<S: Store>(engine: &Idempotency<S>, key: &str, record: &SharedRecord) -> bool {
    match engine.inner.store.completed_record(key).await {
        Ok(Some(stored)) => *stored == **record,
        Ok(None) => false,
        Err(_) => {
            Stats::incr(&engine.inner.stats.here().store_errors);
            false
        }
    }
}

/// Releases waiting for the store to answer, drained by one task at a time.
#[derive(Default)]
pub(super) struct PendingReleases {
    queue: Mutex<ReleaseQueue>,
}

#[derive(Default)]
struct ReleaseQueue {
    entries: VecDeque<PendingRelease>,
    /// Whether the drain task runs; it clears this under the lock when it
    /// finds the queue empty, so an entry pushed meanwhile starts a new one.
    draining: bool,
    task: Option<AbortHandle>,
}

struct PendingRelease {
    key: String,
    token: LeaseToken,
    /// Past this the marker has expired by itself.
    until: Instant,
}

impl PendingReleases {
    /// Stops the drain task (the engine is going away).
    pub(super) fn stop(&self) {
        if let Some(task) = lock(&self.queue).task.take() {
            task.abort();
        }
    }
}

impl<S: Store> Idempotency<S> {
    /// Releases `token` on `key` in the background, retrying while the store
    /// fails, until `until` (when the marker expires by itself).
    pub(super) fn release_later(&self, key: String, token: LeaseToken, until: Instant) {
        let mut queue = lock(&self.inner.releases.queue);
        if queue.entries.len() >= MAX_PENDING_RELEASES {
            if let Some(dropped) = queue.entries.pop_front() {
                tracing::warn!(
                    key = dropped.key,
                    "too many idempotency releases pending; this key's marker expires with its TTL"
                );
            }
        }
        queue
            .entries
            .push_back(PendingRelease { key, token, until });
        let running = queue.draining && queue.task.as_ref().is_some_and(|t| !t.is_finished());
        if running {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // Drained by the next call made inside a runtime.
            return;
        };
        queue.draining = true;
        let engine = Arc::downgrade(&self.inner);
        queue.task = Some(runtime.spawn(drain(engine)).abort_handle());
    }
}

/// Works through the pending releases in order, pausing with backoff while
/// the store fails, and ends when none is left or the engine is dropped.
async fn drain<S: Store>(engine: Weak<Inner<S>>) {
    let mut backoff = MIN_BACKOFF;
    loop {
        let Some(inner) = engine.upgrade() else {
            return;
        };
        let next = {
            let mut queue = lock(&inner.releases.queue);
            match queue.entries.pop_front() {
                Some(next) => next,
                None => {
                    queue.draining = false;
                    return;
                }
            }
        };
        if Instant::now() >= next.until {
            continue;
        }
        match inner.store.release(&next.key, next.token).await {
            Ok(_) => backoff = MIN_BACKOFF,
            // Not counted in `store_errors`: the failure that queued it was,
            // and retries during an outage would swamp the count.
            Err(error) => {
                tracing::debug!(%error, key = next.key, "idempotency release failed; retrying");
                lock(&inner.releases.queue).entries.push_front(next);
                drop(inner);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}
