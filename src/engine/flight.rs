//! The single flight: within one process, duplicates of a key that is being
//! begun or run join the first caller's flight instead of going to the store
//! (see the engine's module docs). The leader asks the store; followers wait
//! for its outcome.

use std::borrow::Borrow;
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{later, lock, Begin, Idempotency, Lease};
use crate::key::Fingerprint;
use crate::record::SharedRecord;
use crate::store::{BeginOutcome, LeaseToken, Store, StoreError};

/// One key being begun or run in this process.
pub(super) struct Flight {
    /// The storage key.
    pub(super) key: String,
    pub(super) fingerprint: Fingerprint,
    /// Set once the leader holds the store lease; the heartbeat renews it.
    pub(super) lease: std::sync::OnceLock<LeaseToken>,
    /// When the lease was last known to be ours: just before the `begin` that
    /// acquired it, or the latest `renew` that found it.
    pub(super) confirmed_at: Mutex<tokio::time::Instant>,
    /// Where the flight is, and its followers' wake-up. One `Notify`, not a
    /// `watch` channel: a `watch` send wakes eight shards of waiters, sixteen
    /// lock round trips for the two sends of every run, most often with
    /// nobody waiting.
    outcome: Mutex<FlightOutcome>,
    changed: tokio::sync::Notify,
    /// Set by [`Idempotency::abandon_leases`]: the lease is left to expire,
    /// and its `Drop` must not release it.
    pub(super) abandoned: std::sync::atomic::AtomicBool,
}

impl Flight {
    fn new(key: String, fingerprint: Fingerprint) -> Self {
        Self {
            key,
            fingerprint,
            abandoned: std::sync::atomic::AtomicBool::new(false),
            lease: std::sync::OnceLock::new(),
            confirmed_at: Mutex::new(tokio::time::Instant::now()),
            outcome: Mutex::new(FlightOutcome::Running),
            changed: tokio::sync::Notify::new(),
        }
    }

    /// Records that the store held the lease as of `asked_at` (when the
    /// request that found it was sent).
    pub(super) fn confirm(&self, asked_at: tokio::time::Instant) {
        let mut confirmed = lock(&self.confirmed_at);
        *confirmed = (*confirmed).max(asked_at);
    }

    /// Until when the lease is surely ours, if nothing renews it: `lease_ttl`
    /// after it was last confirmed.
    pub(super) fn lease_ours_until(&self, lease_ttl: Duration) -> tokio::time::Instant {
        later(*lock(&self.confirmed_at), lease_ttl)
    }

    /// Moves the flight on, and wakes its followers.
    pub(super) fn set(&self, outcome: FlightOutcome) {
        *lock(&self.outcome) = outcome;
        self.changed.notify_waiters();
    }

    /// Waits until the outcome satisfies `reached`, and answers it. Every
    /// flight ends with an outcome (the leader's guards see to it), so this
    /// ends when the flight does.
    async fn wait_for(&self, reached: impl Fn(&FlightOutcome) -> bool) -> FlightOutcome {
        loop {
            // Registered before the outcome is read, so a change between the
            // read and the await still wakes this waiter.
            let mut changed = pin!(self.changed.notified());
            changed.as_mut().enable();
            {
                let outcome = lock(&self.outcome);
                if reached(&outcome) {
                    return outcome.clone();
                }
            }
            changed.await;
        }
    }
}

/// A flight in the engine's set, found by its key.
pub(super) struct FlightEntry(pub(super) Arc<Flight>);

impl Borrow<str> for FlightEntry {
    fn borrow(&self) -> &str {
        &self.0.key
    }
}

// Hashed and compared as its key, as `Borrow<str>` requires.
impl std::hash::Hash for FlightEntry {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.key.as_str().hash(state);
    }
}

impl PartialEq for FlightEntry {
    fn eq(&self, other: &Self) -> bool {
        self.0.key == other.0.key
    }
}

impl Eq for FlightEntry {}

#[derive(Clone)]
pub(super) enum FlightOutcome {
    /// The leader is asking the store: the key may well hold a result.
    Running,
    /// The leader holds the lease and runs the action.
    Executing,
    /// The store answered that another process runs the action; the leader
    /// (under `Wait`) polls it until it ends.
    InFlightElsewhere,
    Completed(SharedRecord),
    /// Ended without a stored result: waiters start over.
    Released,
}

impl<S: Store> Idempotency<S> {
    /// Joins the key's flight as a follower, or starts it and leads it; a
    /// follower sent to start over (the flight ended without a result) goes
    /// round again, and may lead the next flight.
    pub(super) async fn begin_inner(
        &self,
        mut key: String,
        fingerprint: Fingerprint,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<Begin<S>, StoreError> {
        let mut waited = false;
        loop {
            match self.join_flight(key, fingerprint) {
                Joined::Leading(flight) => {
                    return self
                        .lead_flight(flight, fingerprint, deadline, waited)
                        .await;
                }
                Joined::Following(flight, given_back) => {
                    key = given_back;
                    // Boxed, for the reason given in `lead`: a duplicate
                    // in this process is rare, a first request is not.
                    match Box::pin(follow(&flight, fingerprint, deadline)).await {
                        Followed::Answer(begun) => return Ok(begun),
                        Followed::StartOver { waited: now } => waited |= now,
                    }
                }
            }
        }
    }

    /// The key's flight in this process: the one running (and the key back),
    /// or a new one this caller leads, which takes the key.
    fn join_flight(&self, key: String, fingerprint: Fingerprint) -> Joined {
        let mut flights = lock(&self.inner.flights);
        match flights.get(key.as_str()) {
            Some(FlightEntry(flight)) => Joined::Following(flight.clone(), key),
            None => {
                let flight = Arc::new(Flight::new(key, fingerprint));
                flights.insert(FlightEntry(flight.clone()));
                Joined::Leading(flight)
            }
        }
    }

    /// The leader's turn: asks the store (see [`lead`](Self::lead)), turns
    /// its answer into the caller's, and ends the flight unless the caller
    /// now holds the lease.
    async fn lead_flight(
        &self,
        flight: Arc<Flight>,
        fingerprint: Fingerprint,
        deadline: Option<tokio::time::Instant>,
        waited: bool,
    ) -> Result<Begin<S>, StoreError> {
        // If this future is dropped while the store answers, the guard ends
        // the flight, so followers start over instead of waiting on a leader
        // that is gone, and releases the token the store was asked for: it
        // may have written the marker.
        let mut leading = Leading {
            engine: self,
            flight: &flight,
            asked: None,
        };
        let led = self
            .lead(&flight, fingerprint, deadline, &mut leading.asked)
            .await;
        if let Some(token) = leading.asked.take() {
            // The store failed to answer: the marker may be written.
            self.release_later(flight.key.clone(), token, self.marker_expiry());
        }
        std::mem::forget(leading);
        let (outcome, begun) = match led {
            Ok(Led::Acquired { token, asked_at }) => {
                flight.confirm(asked_at);
                let _ = flight.lease.set(token);
                flight.set(FlightOutcome::Executing);
                self.start_heartbeat();
                return Ok(Begin::Execute(Lease::held(self.clone(), token, flight)));
            }
            Ok(Led::Completed(record)) => (
                FlightOutcome::Completed(record.clone()),
                Ok(replay_or_mismatch(record, fingerprint, waited)),
            ),
            Ok(Led::Mismatch) => (FlightOutcome::Released, Ok(Begin::Mismatch)),
            Ok(Led::Conflict) => (FlightOutcome::Released, Ok(conflict())),
            Err(error) => (FlightOutcome::Released, Err(error)),
        };
        self.end_flight(&flight, outcome);
        begun
    }

    /// The leader's part: ask the store, and under `Wait` poll it (with
    /// backoff, within the deadline) while another process holds the lease.
    /// `asked` holds the token of a `begin` sent and not answered (the store
    /// failed, or this future is dropped meanwhile): the store may have
    /// written its marker.
    async fn lead(
        &self,
        flight: &Flight,
        fingerprint: Fingerprint,
        deadline: Option<tokio::time::Instant>,
        asked: &mut Option<LeaseToken>,
    ) -> Result<Led, StoreError> {
        let key = flight.key.as_str();
        let marker_ttl = self.inner.config().marker_ttl();
        let mut backoff = Duration::from_millis(5);
        loop {
            let token = LeaseToken::random();
            let asked_at = tokio::time::Instant::now();
            *asked = Some(token);
            let answer = self
                .inner
                .store
                .begin(key, fingerprint, token, marker_ttl)
                .await;
            // Only an unanswered `begin` may have written unseen: any answer,
            // a decoding error included, says what the key holds.
            if !matches!(answer, Err(StoreError::Unavailable(_))) {
                *asked = None;
            }
            match answer? {
                BeginOutcome::Acquired => return Ok(Led::Acquired { token, asked_at }),
                BeginOutcome::Completed(record) => return Ok(Led::Completed(record)),
                BeginOutcome::InFlight {
                    fingerprint: held, ..
                } => {
                    if held != fingerprint {
                        return Ok(Led::Mismatch);
                    }
                    let Some(deadline) = deadline else {
                        return Ok(Led::Conflict);
                    };
                    let now = tokio::time::Instant::now();
                    if now >= deadline {
                        return Ok(Led::Conflict);
                    }
                    // Duplicates under `Reject` need not wait for the polls.
                    flight.set(FlightOutcome::InFlightElsewhere);
                    // Until the next poll, or until the store announces that
                    // the key changed (Redis pub/sub), whichever is first.
                    // Boxed: a wait on another process is rare, and its timer
                    // would otherwise make every first request's (boxed)
                    // state larger by its size.
                    Box::pin(
                        self.inner
                            .store
                            .until_changed(key, deadline.min(now + backoff)),
                    )
                    .await;
                    backoff = (backoff * 2).min(Duration::from_millis(250));
                }
            }
        }
    }

    /// Removes `flight` from the map (if it is still the one there) and tells
    /// its followers how it ended.
    pub(super) fn end_flight(&self, flight: &Arc<Flight>, outcome: FlightOutcome) {
        {
            let mut flights = lock(&self.inner.flights);
            let key = flight.key.as_str();
            if flights
                .get(key)
                .is_some_and(|current| Arc::ptr_eq(&current.0, flight))
            {
                flights.remove(key);
            }
        }
        flight.set(outcome);
    }
}

/// A leader asking the store. Dropped (its `begin` future was), it ends the
/// flight and releases the token of a `begin` still unanswered.
struct Leading<'a, S: Store> {
    engine: &'a Idempotency<S>,
    flight: &'a Arc<Flight>,
    asked: Option<LeaseToken>,
}

impl<S: Store> Drop for Leading<'_, S> {
    fn drop(&mut self) {
        if let Some(token) = self.asked.take() {
            let until = self.engine.marker_expiry();
            self.engine
                .release_later(self.flight.key.clone(), token, until);
        }
        self.engine.end_flight(self.flight, FlightOutcome::Released);
    }
}

enum Led {
    Acquired {
        token: LeaseToken,
        asked_at: tokio::time::Instant,
    },
    Completed(SharedRecord),
    Mismatch,
    Conflict,
}

/// Where [`Idempotency::join_flight`] put the caller.
enum Joined {
    Leading(Arc<Flight>),
    /// The flight followed, and the caller's key given back.
    Following(Arc<Flight>, String),
}

/// How a follower's wait ended.
enum Followed<S: Store> {
    /// The caller's answer, from the flight's outcome.
    Answer(Begin<S>),
    /// The flight ended without a result: begin again. `waited`: the caller
    /// waited under `Wait` (a replay found next is then coalesced).
    StartOver { waited: bool },
}

/// The answer to a duplicate that found a conflict.
fn conflict<S: Store>() -> Begin<S> {
    Begin::Conflict {
        retry_after: Duration::from_secs(1),
    }
}

/// The follower's turn: the answer a duplicate gets from the flight it
/// joined. No store round trip of its own.
async fn follow<S: Store>(
    flight: &Flight,
    fingerprint: Fingerprint,
    deadline: Option<tokio::time::Instant>,
) -> Followed<S> {
    if flight.fingerprint != fingerprint {
        return Followed::Answer(Begin::Mismatch);
    }
    let Some(deadline) = deadline else {
        // Under `Reject` a duplicate conflicts with a run, not with a leader
        // that is still asking the store: most often that leader finds the
        // stored result, and this caller replays it too. The wait lasts one
        // store answer.
        let answered = flight
            .wait_for(|o| !matches!(o, FlightOutcome::Running))
            .await;
        return match answered {
            FlightOutcome::Completed(record) => {
                Followed::Answer(replay_or_mismatch(record, fingerprint, false))
            }
            FlightOutcome::Executing | FlightOutcome::InFlightElsewhere => {
                Followed::Answer(conflict())
            }
            FlightOutcome::Released | FlightOutcome::Running => {
                Followed::StartOver { waited: false }
            }
        };
    };
    let ended = tokio::time::timeout_at(
        deadline,
        flight.wait_for(|o| matches!(o, FlightOutcome::Completed(_) | FlightOutcome::Released)),
    )
    .await;
    match ended {
        Err(_elapsed) => Followed::Answer(conflict()),
        Ok(FlightOutcome::Completed(record)) => {
            Followed::Answer(replay_or_mismatch(record, fingerprint, true))
        }
        Ok(_) => Followed::StartOver { waited: true },
    }
}

pub(super) fn replay_or_mismatch<S: Store>(
    record: SharedRecord,
    fingerprint: Fingerprint,
    coalesced: bool,
) -> Begin<S> {
    if record.fingerprint == fingerprint {
        Begin::Replay { record, coalesced }
    } else {
        Begin::Mismatch
    }
}
