//! The heartbeat: one task per engine renews every lease this process holds,
//! each third of the lease TTL, so a slow action is never taken over.

use std::sync::{Arc, Weak};
use std::time::Duration;

use super::flight::{Flight, FlightEntry};
use super::{lock, Idempotency, Inner};
use crate::stats::Stats;
use crate::store::{LeaseToken, Store};

impl<S: Store> Idempotency<S> {
    /// Restarts the heartbeat with the current lease TTL's period, when it
    /// ran, and has it renew every held lease at once under the new TTL: a
    /// lease granted under a shorter one would otherwise run out before the
    /// first renewal of the new period, and another instance take it over.
    pub(super) fn restart_heartbeat(&self) {
        let running = lock(&self.inner.heartbeat).take();
        if let Some(task) = running {
            task.abort();
            self.spawn_heartbeat(true);
        }
    }

    /// Makes sure the task that renews every held lease each third of the
    /// lease TTL runs: one per engine, started on first use, started again if
    /// the runtime it ran on has gone. It stops when the engine is dropped.
    pub(super) fn start_heartbeat(&self) {
        self.spawn_heartbeat(false);
    }

    /// Starts the heartbeat unless it runs; `at_once`: its first round
    /// renews now rather than a period from now.
    fn spawn_heartbeat(&self, at_once: bool) {
        let mut task = lock(&self.inner.heartbeat);
        if task.as_ref().is_some_and(|task| !task.is_finished()) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let engine = Arc::downgrade(&self.inner);
        let period = (self.inner.config().lease_ttl / 3).max(Duration::from_millis(1));
        *task = Some(
            runtime
                .spawn(heartbeat(engine, period, at_once))
                .abort_handle(),
        );
    }
}

/// How many leases one [`Store::renew_many`] call renews: large enough that
/// thousands of leases cost a few round trips, small enough that one batch
/// (one pipeline, one statement) stays well within a store's time limit.
const HEARTBEAT_BATCH: usize = 500;

async fn heartbeat<S: Store>(engine: Weak<Inner<S>>, period: Duration, at_once: bool) {
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    if !at_once {
        // The first tick is now: a lease just begun needs no renewal yet.
        ticks.tick().await;
    }
    loop {
        ticks.tick().await;
        let Some(inner) = engine.upgrade() else {
            return;
        };
        let held: Vec<(LeaseToken, Arc<Flight>)> = lock(&inner.flights)
            .iter()
            .filter_map(|FlightEntry(flight)| Some((*flight.lease.get()?, flight.clone())))
            .collect();
        let marker_ttl = inner.config().marker_ttl();
        for batch in held.chunks(HEARTBEAT_BATCH) {
            let leases: Vec<(&str, LeaseToken)> = batch
                .iter()
                .map(|(token, flight)| (flight.key.as_str(), *token))
                .collect();
            let asked_at = tokio::time::Instant::now();
            let renewed = inner.store.renew_many(&leases, marker_ttl).await;
            if renewed.len() != batch.len() {
                // A store that answers a batch with the wrong count breaks
                // the trait's contract; nothing of it can be trusted.
                Stats::incr(&inner.stats.here().store_errors);
                tracing::warn!(
                    asked = batch.len(),
                    answered = renewed.len(),
                    "idempotency lease renewal answered the wrong number of leases"
                );
                continue;
            }
            for ((_, flight), result) in batch.iter().zip(renewed) {
                match result {
                    Ok(true) => flight.confirm(asked_at),
                    Ok(false) => {}
                    Err(error) => {
                        Stats::incr(&inner.stats.here().store_errors);
                        let key = flight.key.as_str();
                        tracing::warn!(%error, key, "idempotency lease renewal failed");
                    }
                }
            }
        }
    }
}
