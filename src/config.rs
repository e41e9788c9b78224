//! The limits every builder checks its settings against, and the error it
//! refuses them with: one place for the engine's builder and every store's.

use std::time::Duration;

/// The longest duration any setting of this crate takes: a century.
///
/// One rule for every duration (record TTL, lease TTL, wait timeout,
/// auto-cleanup interval, the Redis store's local-cache TTL and timeouts,
/// the Postgres store's timeout): a builder refuses a longer one with a
/// [`ConfigError`] that names this maximum, so `Duration::MAX` is an error
/// at `build()`, never a panic when a clock reading plus the duration
/// overflows later. Durations passed per call instead of set at build (the
/// budget of a [`Concurrent::Wait`](crate::Concurrent::Wait) handed to
/// `begin_with`, the TTL handed to `mark_executed` or to a store) cannot be
/// refused that way: they are cut to this maximum.
///
/// ```
/// use std::time::Duration;
/// use tower_idempotency::MAX_DURATION;
/// use tower_idempotency::Idempotency;
///
/// let error = Idempotency::builder().ttl(Duration::MAX).build().unwrap_err();
/// assert!(error.to_string().contains("at most 3153600000 s"));
/// assert!(Idempotency::builder().ttl(MAX_DURATION).build().is_ok());
/// ```
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);

/// An invalid configuration, refused when the engine, a store or the layer
/// is built, or by [`Idempotency::configure`](crate::Idempotency::configure).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid idempotency configuration: {0}")]
pub struct ConfigError(String);

impl ConfigError {
    pub(crate) fn new(reason: impl Into<String>) -> Self {
        Self(reason.into())
    }
}

/// Refuses a duration setting over [`MAX_DURATION`], naming the setting and
/// the maximum.
pub(crate) fn check_duration(name: &str, value: Duration) -> Result<(), ConfigError> {
    if value > MAX_DURATION {
        return Err(ConfigError::new(format!(
            "{name} must be at most {} s (a century, MAX_DURATION), got {value:?}",
            MAX_DURATION.as_secs()
        )));
    }
    Ok(())
}

/// A TTL handed to a remote store, in whole milliseconds: at least one, at
/// most [`MAX_DURATION`] (the server refuses, or overflows on, a longer
/// expiry).
#[cfg(any(feature = "redis", feature = "postgres"))]
pub(crate) fn ttl_millis(ttl: Duration) -> u64 {
    let max = MAX_DURATION.as_millis() as u64;
    u64::try_from(ttl.as_millis()).map_or(max, |ms| ms.clamp(1, max))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_up_to_the_maximum_pass() {
        assert!(check_duration("ttl", MAX_DURATION).is_ok());
        let error = check_duration("ttl", Duration::MAX).unwrap_err();
        assert!(error
            .to_string()
            .contains("ttl must be at most 3153600000 s"));
    }

    #[cfg(any(feature = "redis", feature = "postgres"))]
    #[test]
    fn ttls_in_millis_are_clamped() {
        assert_eq!(ttl_millis(Duration::ZERO), 1);
        assert_eq!(ttl_millis(Duration::from_millis(1500)), 1500);
        assert_eq!(ttl_millis(Duration::MAX), MAX_DURATION.as_millis() as u64);
    }
}
