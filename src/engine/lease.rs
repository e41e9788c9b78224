//! The lease: the right to run one action, and what its `Drop` must still
//! do (release the key, or finish storing the result); and leaving every
//! held lease to expire at shutdown.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use tracing::Instrument;

use super::flight::{Flight, FlightEntry, FlightOutcome};
use super::retry::complete_until_lease_expires;
use super::{lock, Idempotency};
use crate::record::{Record, SharedRecord};
use crate::stats::Stats;
use crate::store::{LeaseToken, Store, StoreError};

impl<S: Store> Idempotency<S> {
    /// Leaves every lease this process holds to expire instead of releasing
    /// it, and stops renewing them: for a process about to exit while
    /// actions still run (a graceful shutdown whose drain timed out). Their
    /// outcome is unknown, so their keys must not be freed for a retry; each
    /// is counted in `ambiguous`. A run that still completes stores its
    /// result as usual.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// use tower_idempotency::{Begin, Fingerprint, Idempotency};
    ///
    /// let engine = Idempotency::new();
    /// let fp = Fingerprint::of_bytes(b"job");
    /// let Begin::Execute(lease) = engine.begin("k", fp).await.unwrap() else { panic!() };
    /// engine.abandon_leases();
    /// drop(lease); // not released
    /// assert!(matches!(engine.begin("k", fp).await.unwrap(), Begin::Conflict { .. }));
    /// # }
    /// ```
    pub fn abandon_leases(&self) {
        let held: Vec<Arc<Flight>> = lock(&self.inner.flights)
            .iter()
            .filter(|FlightEntry(flight)| flight.lease.get().is_some())
            .map(|FlightEntry(flight)| flight.clone())
            .collect();
        for flight in held {
            if !flight.abandoned.swap(true, Relaxed) {
                Stats::incr(&self.inner.stats.here().ambiguous);
                tracing::warn!(
                    key = flight.key.as_str(),
                    "idempotency lease abandoned at shutdown: left to its marker's TTL"
                );
            }
            // Out of the map, so the heartbeat no longer renews it.
            let mut flights = lock(&self.inner.flights);
            if flights
                .get(flight.key.as_str())
                .is_some_and(|current| Arc::ptr_eq(&current.0, &flight))
            {
                flights.remove(flight.key.as_str());
            }
        }
    }
}

/// The right to run one action: hold it while the action runs, then
/// [`complete`](Lease::complete) it with the result. Dropped without
/// completing (error, panic, cancellation), it releases the marker so the next
/// retry runs the action.
#[must_use = "dropping a lease releases it: complete it with the action's result"]
pub struct Lease<S: Store> {
    pub(super) engine: Idempotency<S>,
    pub(super) token: LeaseToken,
    pub(super) flight: Arc<Flight>,
    pub(super) state: LeaseState,
}

/// What dropping the lease must still do.
pub(super) enum LeaseState {
    /// Release the key: the action did not produce a result to keep.
    Held,
    /// Finish storing this result in the background: `complete` was dropped
    /// before the store confirmed it.
    Completing(SharedRecord),
    /// Nothing: completed or released.
    Finished,
}

impl<S: Store> std::fmt::Debug for Lease<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("key", &self.flight.key)
            .field("token", &self.token)
            .finish()
    }
}

impl<S: Store> Lease<S> {
    /// The lease the leader of `flight` acquired with `token`: held, to be
    /// completed, released or abandoned.
    pub(super) fn held(engine: Idempotency<S>, token: LeaseToken, flight: Arc<Flight>) -> Self {
        Self {
            engine,
            token,
            flight,
            state: LeaseState::Held,
        }
    }

    /// The storage key this lease is for.
    pub fn key(&self) -> &str {
        &self.flight.key
    }

    /// Stores `record` as the key's result and hands it to the duplicates
    /// waiting in this process. Answers `false` when the lease had been lost
    /// (it expired and another caller took the key over): the record is then
    /// not stored.
    ///
    /// A write that fails (the store is unreachable or times out) is retried
    /// with backoff, each failure counted in `store_errors`, for as long as
    /// the lease is surely still ours: until one lease TTL after the store
    /// last confirmed it (the `begin`, or the latest renewal). The future
    /// ends when the record is stored or the retries give up. Dropped before
    /// then, it goes on storing the record in the background rather than
    /// releasing the key: the action ran, and its result is the only record
    /// that it did.
    ///
    /// Duplicates waiting in this process are handed `record` only once it
    /// is stored. Meanwhile they wait (within their own wait budget); if it
    /// is never stored (lease lost, retries exhausted) they start over as
    /// after a release, and find the key as the store holds it.
    ///
    /// # Errors
    ///
    /// The last [`StoreError`] once the retries gave up (logged with the
    /// key). The marker is not released: under `LeaseExpiry::Takeover` it
    /// expires with its lease TTL and a retry then runs the action again;
    /// under `LeaseExpiry::Block` it refuses retries until the record TTL.
    pub async fn complete(mut self, record: Record) -> Result<bool, StoreError> {
        let record = Arc::new(record);
        self.state = LeaseState::Completing(record.clone());
        let stored =
            complete_until_lease_expires(&self.engine, self.token, &self.flight, &record, false)
                .await;
        self.state = LeaseState::Finished;
        stored
    }

    /// Deletes the marker now, so the next retry runs the action.
    ///
    /// # Errors
    ///
    /// The [`StoreError`] of a store that failed; the engine then retries the
    /// release in the background until the store answers or the marker
    /// expires.
    pub async fn release(mut self) -> Result<(), StoreError> {
        let result = self
            .engine
            .inner
            .store
            .release(&self.flight.key, self.token)
            .await;
        self.state = LeaseState::Finished;
        if result.is_err() {
            self.release_later();
        }
        self.engine
            .end_flight(&self.flight, FlightOutcome::Released);
        self.engine.counted(result).map(drop)
    }

    /// Leaves the key to its marker: not released, no longer renewed. For an
    /// action that may have run but gave no definite answer (an upstream
    /// that timed out or broke the connection after the request was sent, a
    /// response body cut off after its head): releasing would let the next
    /// retry run it a second time, perhaps while the first still runs.
    ///
    /// The marker then lives out its TTL (the lease TTL since its last
    /// renewal; under [`LeaseExpiry::Block`] the record TTL), after which
    /// [`LeaseExpiry`] decides as for a process that died holding it:
    /// `Takeover` lets a retry run the action again, `Block` never does.
    /// Duplicates waiting in this process start over and find the marker:
    /// a conflict, or under [`Concurrent::Wait`] a wait until it goes.
    /// Counted in `ambiguous`.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// use tower_idempotency::{Begin, Fingerprint, Idempotency};
    ///
    /// let engine = Idempotency::new();
    /// let fp = Fingerprint::of_bytes(b"charge");
    /// let Begin::Execute(lease) = engine.begin("k", fp).await.unwrap() else { panic!() };
    /// // ... the payment provider's connection broke after the request went out.
    /// lease.abandon();
    /// assert!(matches!(engine.begin("k", fp).await.unwrap(), Begin::Conflict { .. }));
    /// assert_eq!(engine.stats().ambiguous, 1);
    /// # }
    /// ```
    ///
    /// [`LeaseExpiry`]: super::LeaseExpiry
    /// [`LeaseExpiry::Block`]: super::LeaseExpiry::Block
    /// [`Concurrent::Wait`]: super::Concurrent::Wait
    pub fn abandon(mut self) {
        self.state = LeaseState::Finished;
        Stats::incr(&self.engine.inner.stats.here().ambiguous);
        tracing::warn!(
            key = self.flight.key.as_str(),
            "idempotency outcome unknown: the key is left to its marker's TTL, not released"
        );
        self.engine
            .end_flight(&self.flight, FlightOutcome::Released);
    }

    /// Hands the release to the engine's background queue.
    pub(super) fn release_later(&self) {
        let marker_ttl = self.engine.inner.config().marker_ttl();
        let until = self.flight.lease_ours_until(marker_ttl);
        self.engine
            .release_later(self.flight.key.clone(), self.token, until);
    }
}

impl<S: Store> Drop for Lease<S> {
    fn drop(&mut self) {
        let state = std::mem::replace(&mut self.state, LeaseState::Finished);
        if matches!(state, LeaseState::Finished) {
            return;
        }
        if matches!(state, LeaseState::Held) && self.flight.abandoned.load(Relaxed) {
            // Left to expire by `abandon_leases`: the action may have run.
            self.engine
                .end_flight(&self.flight, FlightOutcome::Released);
            return;
        }
        let engine = self.engine.clone();
        let token = self.token;
        let flight = self.flight.clone();
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            engine.end_flight(&flight, FlightOutcome::Released);
            return;
        };
        match state {
            LeaseState::Completing(record) => {
                runtime.spawn(
                    async move {
                        let _ =
                            complete_until_lease_expires(&engine, token, &flight, &record, true)
                                .await;
                    }
                    .in_current_span(),
                );
            }
            // Release before telling the waiters, so the one that starts
            // over finds the key free rather than polling a stale marker.
            LeaseState::Held => {
                runtime.spawn(release_now(engine, token, flight).in_current_span());
            }
            LeaseState::Finished => {}
        }
    }
}

/// Releases a dropped lease's key, queueing the release to be retried if the
/// store fails, then tells the waiters.
async fn release_now<S: Store>(engine: Idempotency<S>, token: LeaseToken, flight: Arc<Flight>) {
    let key = flight.key.as_str();
    let result = engine.inner.store.release(key, token).await;
    if let Err(error) = engine.counted(result) {
        tracing::warn!(%error, key, "idempotency lease release failed; retrying in the background");
        let until = flight.lease_ours_until(engine.inner.config().marker_ttl());
        engine.release_later(key.to_owned(), token, until);
    }
    engine.end_flight(&flight, FlightOutcome::Released);
}
