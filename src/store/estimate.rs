//! A remote store's size when counting it is a walk (Redis `SCAN`, Postgres
//! `count(*)`): the last count, answered at once, and counted again in the
//! background at most every [`ESTIMATE_MAX_AGE`], so a dashboard polling
//! `/stats` costs one walk per period, whatever its rate.

use std::time::Duration;

// What keeps a remote store's count: the memory store counts as it goes.
#[cfg(any(feature = "redis", feature = "postgres"))]
use std::sync::atomic::{AtomicBool, Ordering};
#[cfg(any(feature = "redis", feature = "postgres"))]
use std::sync::{Arc, Mutex, PoisonError};
#[cfg(any(feature = "redis", feature = "postgres"))]
use std::time::Instant;

#[cfg(any(feature = "redis", feature = "postgres"))]
use super::{StoreAdmin, StoreError};
#[cfg(any(feature = "redis", feature = "postgres"))]
use crate::stats::CacheInfo;

/// How old an estimate may be before a request triggers a new count.
pub const ESTIMATE_MAX_AGE: Duration = Duration::from_secs(5);

/// The last count of one store.
#[cfg(any(feature = "redis", feature = "postgres"))]
#[derive(Debug, Default)]
pub(crate) struct Estimate {
    last: Mutex<Option<(Instant, CacheInfo)>>,
    /// Set while a background count runs, so that only one does.
    refreshing: AtomicBool,
}

#[cfg(any(feature = "redis", feature = "postgres"))]
impl Estimate {
    fn set(&self, info: CacheInfo) {
        *self.last.lock().unwrap_or_else(PoisonError::into_inner) = Some((Instant::now(), info));
    }

    /// The store's last count: when none was made yet, counts now; when it is
    /// older than [`ESTIMATE_MAX_AGE`], answers it and counts again in the
    /// background.
    pub(crate) async fn get<S: StoreAdmin + Clone>(
        self: &Arc<Self>,
        store: &S,
    ) -> Result<CacheInfo, StoreError> {
        let last = *self.last.lock().unwrap_or_else(PoisonError::into_inner);
        let Some((at, info)) = last else {
            let info = store.info().await?;
            self.set(info);
            return Ok(info);
        };
        if at.elapsed() >= ESTIMATE_MAX_AGE && !self.refreshing.swap(true, Ordering::AcqRel) {
            let (estimate, store) = (Arc::clone(self), store.clone());
            let count = async move {
                match store.info().await {
                    Ok(info) => estimate.set(info),
                    Err(error) => tracing::debug!(%error, "the store could not be counted"),
                }
                estimate.refreshing.store(false, Ordering::Release);
            };
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => drop(runtime.spawn(count)),
                Err(_) => count.await,
            }
        }
        Ok(info)
    }
}
