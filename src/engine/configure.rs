//! Runtime configuration: [`Idempotency::configure`] and the auto-cleanup
//! task it starts and stops.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::AbortHandle;

use super::config::check_cleanup_interval;
use super::{lock, Config, Idempotency, Inner};
use crate::config::ConfigError;
use crate::store::Store;

impl<S: Store> Idempotency<S> {
    /// Changes the configuration of the running engine, for the calls that
    /// begin after this one: `change` edits a copy of the current
    /// [`Config`], which is checked like [`build`](super::IdempotencyBuilder::build)
    /// checks it and then takes effect whole. Answers the new configuration.
    ///
    /// * `ttl`: records stored from now on (a run in flight stores its record
    ///   with the TTL in force when it completes).
    /// * `lease_ttl` and `lease_expiry`: markers written from now on; the
    ///   heartbeat restarts at once with the new period, and renews the
    ///   leases already held with the new TTL.
    /// * `concurrent` (policy and wait budget): the duplicates that begin from
    ///   now on, in every frontend that reads the engine's policy (the HTTP
    ///   layer does at each request).
    /// * `cleanup_interval`: `Some` starts (or restarts) the auto-cleanup
    ///   task with that interval, `None` stops it.
    ///
    /// The bounds of the memory store (`max_entries`, `max_bytes`) are not
    /// part of it: moka fixes them when the cache is built. Build a new
    /// engine to change them.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// use std::time::Duration;
    /// use tower_idempotency::{Concurrent, Idempotency};
    ///
    /// let engine = Idempotency::new();
    /// let config = engine
    ///     .configure(|config| {
    ///         config.ttl = Duration::from_secs(600);
    ///         config.concurrent = Concurrent::wait();
    ///     })
    ///     .unwrap();
    /// assert_eq!(engine.config(), config);
    ///
    /// // Refused as `build()` refuses it, and nothing changes.
    /// assert!(engine.configure(|config| config.ttl = Duration::ZERO).is_err());
    /// assert_eq!(engine.config().ttl, Duration::from_secs(600));
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// [`ConfigError`] for the values `build()` refuses (a zero TTL or lease
    /// TTL, a duration over [`MAX_DURATION`](crate::MAX_DURATION)), a zero
    /// cleanup interval, or a cleanup interval set outside a Tokio runtime.
    /// The configuration is then unchanged.
    pub fn configure(&self, change: impl FnOnce(&mut Config)) -> Result<Config, ConfigError> {
        let inner = &self.inner;
        let mut config = inner
            .config
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut next = *config;
        change(&mut next);
        next.validate()?;
        // The only step that can fail past validation comes first, so a
        // refusal leaves everything as it was.
        let cleanup = match next.cleanup_interval {
            Some(interval) if config.cleanup_interval != Some(interval) => {
                Some(Some(spawn_auto_cleanup(inner, interval)?))
            }
            Some(_) => None,
            None => Some(None),
        };
        let renewals_changed =
            next.marker_ttl() != config.marker_ttl() || next.lease_ttl != config.lease_ttl;
        *config = next;
        drop(config);
        if let Some(task) = cleanup {
            replace_auto_cleanup(inner, task);
        }
        if renewals_changed {
            self.restart_heartbeat();
        }
        Ok(next)
    }

    /// Starts a task that runs the store's maintenance (dropping expired
    /// entries, so the `expired` counter and `cache_info` are current) every
    /// `interval`. Replaces a task already running; stops when
    /// [`stop_auto_cleanup`](Self::stop_auto_cleanup) is called or the engine
    /// is dropped. [`Config::cleanup_interval`] shows it.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] for a zero interval, one over
    /// [`MAX_DURATION`](crate::MAX_DURATION), or when called outside
    /// a Tokio runtime.
    pub fn start_auto_cleanup(&self, interval: Duration) -> Result<(), ConfigError> {
        check_cleanup_interval(interval)?;
        let task = spawn_auto_cleanup(&self.inner, interval)?;
        let mut config = self
            .inner
            .config
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        config.cleanup_interval = Some(interval);
        replace_auto_cleanup(&self.inner, Some(task));
        Ok(())
    }

    /// Stops the auto-cleanup task, if one runs.
    pub fn stop_auto_cleanup(&self) {
        let mut config = self
            .inner
            .config
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        config.cleanup_interval = None;
        replace_auto_cleanup(&self.inner, None);
    }

    /// Whether an auto-cleanup task runs.
    pub fn auto_cleanup_running(&self) -> bool {
        lock(&self.inner.auto_cleanup)
            .as_ref()
            .is_some_and(|task| !task.is_finished())
    }
}

fn replace_auto_cleanup<S>(inner: &Inner<S>, task: Option<AbortHandle>) {
    let previous = std::mem::replace(&mut *lock(&inner.auto_cleanup), task);
    if let Some(previous) = previous {
        previous.abort();
    }
}

fn spawn_auto_cleanup<S: Store>(
    inner: &Arc<Inner<S>>,
    interval: Duration,
) -> Result<AbortHandle, ConfigError> {
    let runtime = tokio::runtime::Handle::try_current()
        .map_err(|_| ConfigError::new("auto-cleanup needs a Tokio runtime"))?;
    let engine = Arc::downgrade(inner);
    let task = runtime.spawn(async move {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let Some(inner) = engine.upgrade() else {
                return;
            };
            if let Err(error) = inner.store.cleanup_expired().await {
                tracing::warn!(%error, "idempotency auto-cleanup failed");
            }
        }
    });
    Ok(task.abort_handle())
}
