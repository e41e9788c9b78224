//! Between Postgres's rows and errors and the store's.

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgRow;
use sqlx::Row;

use crate::config::ttl_millis;
use crate::key::Fingerprint;
use crate::record::{DecodeError, Record};
use crate::store::{EntryKind, EntryState, LeaseToken, ScanEntry, StoreError};

/// A TTL as the statements take it: whole milliseconds, at least one, at
/// most [`MAX_DURATION`](crate::MAX_DURATION) (so `clock_timestamp() + ttl`
/// never overflows).
pub(super) fn ttl_ms(ttl: Duration) -> i64 {
    ttl_millis(ttl) as i64
}

/// Milliseconds a row answered (never negative) as a duration.
fn millis(ms: i64) -> Duration {
    Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

/// The kind a row's `state` column names.
fn kind(state: &str) -> Option<EntryKind> {
    match state {
        "in_flight" => Some(EntryKind::InFlight),
        "completed" => Some(EntryKind::Completed),
        _ => None,
    }
}

/// What a live row holds and the time it has left, from the columns of
/// `sql::HELD`. A value this build cannot read is `StoreError::Corrupt`.
pub(super) fn held(key: &str, row: &PgRow) -> Result<(EntryState, Duration), StoreError> {
    let corrupt = |source| StoreError::Corrupt {
        key: key.to_owned(),
        source,
    };
    let state: &str = row.try_get("state").map_err(map_error)?;
    let expires_in = millis(row.try_get("expires_in_ms").map_err(map_error)?);
    let held = match kind(state) {
        Some(EntryKind::InFlight) => {
            let lease: Option<&str> = row.try_get("lease_token").map_err(map_error)?;
            let lease = lease
                .and_then(LeaseToken::parse)
                .ok_or(DecodeError::NotARecord)
                .map_err(corrupt)?;
            let fingerprint: &[u8] = row.try_get("fingerprint").map_err(map_error)?;
            let fingerprint = <[u8; 32]>::try_from(fingerprint)
                .map(Fingerprint::from_bytes)
                .map_err(|_| corrupt(DecodeError::Truncated))?;
            EntryState::InFlight { fingerprint, lease }
        }
        Some(EntryKind::Completed) => {
            let record: Option<&[u8]> = row.try_get("record").map_err(map_error)?;
            let record = Record::decode(record.unwrap_or_default()).map_err(corrupt)?;
            EntryState::Completed(Arc::new(record))
        }
        None => return Err(corrupt(DecodeError::NotARecord)),
    };
    Ok((held, expires_in))
}

/// One row of `scan`: key, kind, time left and creation time, no payload.
pub(super) fn scan_entry(row: &PgRow) -> Result<ScanEntry, StoreError> {
    let key: String = row.try_get("key").map_err(map_error)?;
    let state: &str = row.try_get("state").map_err(map_error)?;
    let Some(kind) = kind(state) else {
        return Err(StoreError::Corrupt {
            key,
            source: DecodeError::NotARecord,
        });
    };
    let created_at_ms: i64 = row.try_get("created_at_ms").map_err(map_error)?;
    Ok(ScanEntry {
        expires_in: millis(row.try_get("expires_in_ms").map_err(map_error)?),
        created_at_ms: u64::try_from(created_at_ms).unwrap_or(0),
        key,
        kind,
    })
}

/// Connection failures, timeouts, a server shutting down or refusing
/// connections are `Unavailable` (the layer's fail mode applies); a
/// serialization failure or a deadlock (class 40: the transaction rolled
/// back) is `SerializationFailure`, retryable; the rest is `Backend`.
pub(super) fn map_error(error: sqlx::Error) -> StoreError {
    let unavailable = match &error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(error) => error.code().is_some_and(|code| unavailable_state(&code)),
        _ => false,
    };
    let conflicted = matches!(&error, sqlx::Error::Database(error)
        if error.code().is_some_and(|code| matches!(&*code, "40001" | "40P01")));
    if unavailable {
        StoreError::unavailable(error)
    } else if conflicted {
        StoreError::SerializationFailure(Box::new(error))
    } else {
        StoreError::backend(error)
    }
}

/// SQLSTATEs of a server that cannot serve now: connection exceptions (class
/// 08), too many connections and other resource shortages (class 53), and
/// shutdowns, among them a backend ended by `pg_terminate_backend` (57P01 to
/// 57P03).
fn unavailable_state(code: &str) -> bool {
    code.starts_with("08") || code.starts_with("53") || matches!(code, "57P01" | "57P02" | "57P03")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls_are_whole_milliseconds_within_a_century() {
        assert_eq!(ttl_ms(Duration::from_micros(10)), 1);
        assert_eq!(ttl_ms(Duration::from_secs(2)), 2_000);
        assert_eq!(
            ttl_ms(Duration::MAX),
            crate::MAX_DURATION.as_millis() as i64
        );
    }

    #[test]
    fn lost_connections_are_unavailable() {
        let refused = sqlx::Error::Io(std::io::ErrorKind::ConnectionRefused.into());
        assert!(matches!(map_error(refused), StoreError::Unavailable(_)));
        assert!(matches!(
            map_error(sqlx::Error::PoolTimedOut),
            StoreError::Unavailable(_)
        ));
        assert!(matches!(
            map_error(sqlx::Error::RowNotFound),
            StoreError::Backend(_)
        ));
        assert!(unavailable_state("57P01") && unavailable_state("08006"));
        assert!(!unavailable_state("23505"));
    }
}
