//! What a store answers: lease tokens, `begin`'s outcome, and the entries
//! that listing and maintenance see.

use std::time::Duration;

use crate::key::Fingerprint;
use crate::record::SharedRecord;

/// A random token that names one holder of one lease.
///
/// ```
/// use tower_idempotency::store::LeaseToken;
///
/// let token = LeaseToken::random();
/// assert_ne!(token, LeaseToken::random());
/// assert_eq!(LeaseToken::parse(&token.to_string()), Some(token));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LeaseToken(u128);

impl LeaseToken {
    /// A fresh token (128 random bits).
    pub fn random() -> Self {
        Self(rand::random())
    }

    /// The token as a number, for the crate's stores that keep it binary. A
    /// store of your own keeps its text form (`Display`, read back with
    /// [`parse`](Self::parse)).
    #[cfg(feature = "redis")]
    pub(crate) const fn as_u128(self) -> u128 {
        self.0
    }

    /// A token from the number a store kept.
    #[cfg(feature = "redis")]
    pub(crate) const fn from_u128(value: u128) -> Self {
        Self(value)
    }

    /// Parses the 32 hex characters written by `Display`.
    pub fn parse(text: &str) -> Option<Self> {
        if text.len() != 32 {
            return None;
        }
        u128::from_str_radix(text, 16).ok().map(Self)
    }
}

impl std::fmt::Display for LeaseToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// What [`Store::begin`](super::Store::begin) found.
#[derive(Debug, Clone)]
pub enum BeginOutcome {
    /// The key was free; the caller's marker is written and the caller runs the action.
    Acquired,
    /// The action completed; here is its record.
    Completed(SharedRecord),
    /// Another caller holds the lease.
    InFlight {
        /// Fingerprint of the request that holds the lease.
        fingerprint: Fingerprint,
        /// Time left before the marker expires.
        expires_in: Duration,
    },
}

/// What a key holds.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The marker or the record.
    pub state: EntryState,
    /// Time left before the entry expires.
    pub expires_in: Duration,
}

/// The two things a key can hold.
#[derive(Debug, Clone)]
pub enum EntryState {
    /// An action is running under a lease.
    InFlight {
        /// Fingerprint of the request that holds the lease.
        fingerprint: Fingerprint,
        /// The lease's token.
        lease: LeaseToken,
    },
    /// The action completed.
    Completed(SharedRecord),
}

/// One entry as [`StoreAdmin::scan`](super::StoreAdmin::scan) lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanEntry {
    /// The storage key.
    pub key: String,
    /// Marker or record.
    pub kind: EntryKind,
    /// Time left before the entry expires.
    pub expires_in: Duration,
    /// When the entry was written, in milliseconds since the Unix epoch.
    pub created_at_ms: u64,
}

/// Serialized as `{"key", "state": "in_flight"|"completed", "expires_in_ms",
/// "created_at_ms"}`, the form the proxy's `GET /keys` answers.
impl serde::Serialize for ScanEntry {
    fn serialize<Ser: serde::Serializer>(&self, serializer: Ser) -> Result<Ser::Ok, Ser::Error> {
        use serde::ser::SerializeStruct;
        let mut out = serializer.serialize_struct("ScanEntry", 4)?;
        out.serialize_field("key", &self.key)?;
        out.serialize_field("state", &self.kind)?;
        out.serialize_field("expires_in_ms", &(self.expires_in.as_millis() as u64))?;
        out.serialize_field("created_at_ms", &self.created_at_ms)?;
        out.end()
    }
}

/// Whether an entry is an in-flight marker or a completed record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    /// An in-flight marker.
    InFlight,
    /// A completed record.
    Completed,
}

/// Entries a store dropped by itself, since it was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RemovalCounts {
    /// Dropped because their TTL ran out.
    pub expired: u64,
    /// Dropped to stay within the store's bounds.
    pub evicted: u64,
}
