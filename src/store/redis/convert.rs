//! Between Redis's answers and errors and the store's.

use std::time::Duration;

use redis::RedisError;

use crate::config::ttl_millis;
use crate::store::StoreError;

/// Time left from a PTTL answer: -1 (no expiry, not written by this store)
/// reads as never.
pub(super) fn expires_in(pttl: i64) -> Duration {
    match u64::try_from(pttl) {
        Ok(ms) => Duration::from_millis(ms),
        Err(_) if pttl == -1 => Duration::MAX,
        Err(_) => Duration::ZERO,
    }
}

/// A TTL as Redis takes it: whole milliseconds, at least one, at most
/// [`MAX_DURATION`](crate::MAX_DURATION) (Redis refuses expiries that
/// overflow).
pub(super) fn px(ttl: Duration) -> Vec<u8> {
    ttl_millis(ttl).to_string().into_bytes()
}

/// Connection failures, timeouts and a server that cannot serve now (loading,
/// failing over, out of memory) are `Unavailable` (the layer's fail mode
/// applies); the rest is `Backend`.
pub(super) fn map_error(error: RedisError) -> StoreError {
    use redis::{ErrorKind, ServerErrorKind};
    let unavailable = error.is_io_error()
        || error.is_timeout()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || error.is_unrecoverable_error()
        || matches!(
            error.kind(),
            // A cluster between slot tables (a failover, a resharding): no
            // node to send to yet, or a redirection the client could not
            // follow. Nothing was read, so the fail mode applies.
            ErrorKind::ClusterConnectionNotFound
                | ErrorKind::Server(ServerErrorKind::Moved | ServerErrorKind::Ask)
        )
        || matches!(
            error.kind(),
            ErrorKind::Server(
                ServerErrorKind::TryAgain
                    | ServerErrorKind::MasterDown
                    | ServerErrorKind::ClusterDown
                    | ServerErrorKind::BusyLoading
                    | ServerErrorKind::ReadOnly
            )
        );
    // A Redis out of memory (`OOM`, under `maxmemory` with `noeviction`) or
    // unable to persist (`MISCONF`) refuses writes for now: like a server
    // that cannot be reached, it read and wrote nothing, so the fail mode
    // applies rather than the 500 of a value the store cannot stand by.
    let refusing_writes = matches!(error.code(), Some("OOM" | "MISCONF"));
    if unavailable || refusing_writes {
        StoreError::unavailable(error)
    } else {
        StoreError::backend(error)
    }
}
