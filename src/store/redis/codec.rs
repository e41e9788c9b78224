//! What a Redis value holds: an in-flight marker or a record.
//!
//! Both encodings start with `"TI"`, then a type byte (`'M'` marker, `'R'`
//! record, see [`Record::encode`]), then a version byte. The marker, version 1:
//!
//! ```text
//! magic "TIM" | version u8 = 1 | lease token u128 | fingerprint [u8; 32] | created_at_ms u64
//! ```
//!
//! The lease token comes right after the header so that the fencing check in
//! the Lua scripts is one comparison of the value's first 20 bytes.

use bytes::{BufMut, Bytes, BytesMut};

use crate::key::Fingerprint;
use crate::record::{is_known_version, DecodeError, Record};
use crate::store::{EntryKind, LeaseToken};

pub(super) const MARKER_MAGIC: &[u8; 3] = b"TIM";
const RECORD_MAGIC: &[u8; 3] = b"TIR";
const MARKER_VERSION: u8 = 1;
/// Header and lease token: what the scripts compare to fence a lease.
pub(super) const LEASE_PREFIX_LEN: usize = 4 + 16;
const MARKER_LEN: usize = LEASE_PREFIX_LEN + 32 + 8;
/// Bytes of a value that tell its kind and creation time (the longer of the
/// marker and the record header), what `scan` reads of each value.
pub(super) const PEEK_LEN: usize = MARKER_LEN;
/// Record header: magic, version, kind, fingerprint, then created_at_ms.
const RECORD_CREATED_AT: usize = 3 + 1 + 1 + 32;

/// An in-flight marker as stored in Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Marker {
    pub(super) lease: LeaseToken,
    pub(super) fingerprint: Fingerprint,
    pub(super) created_at_ms: u64,
}

impl Marker {
    pub(super) fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(MARKER_LEN);
        out.put_slice(&lease_prefix(self.lease));
        out.put_slice(self.fingerprint.as_bytes());
        out.put_u64(self.created_at_ms);
        out.freeze()
    }

    fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        match bytes.get(3) {
            None => return Err(DecodeError::Truncated),
            Some(&MARKER_VERSION) => {}
            Some(&other) => return Err(DecodeError::UnknownVersion(other)),
        }
        if bytes.len() < MARKER_LEN {
            return Err(DecodeError::Truncated);
        }
        if bytes.len() > MARKER_LEN {
            return Err(DecodeError::TrailingBytes(bytes.len() - MARKER_LEN));
        }
        let lease = u128::from_be_bytes(array(&bytes[4..20]));
        let fingerprint = Fingerprint::from_bytes(array(&bytes[20..52]));
        let created_at_ms = u64::from_be_bytes(array(&bytes[52..60]));
        Ok(Self {
            lease: LeaseToken::from_u128(lease),
            fingerprint,
            created_at_ms,
        })
    }
}

/// The first bytes of the marker that `lease` holds: what the scripts compare.
pub(super) fn lease_prefix(lease: LeaseToken) -> [u8; LEASE_PREFIX_LEN] {
    let mut out = [0u8; LEASE_PREFIX_LEN];
    out[..3].copy_from_slice(MARKER_MAGIC);
    out[3] = MARKER_VERSION;
    out[4..].copy_from_slice(&lease.as_u128().to_be_bytes());
    out
}

/// A decoded value.
#[derive(Debug)]
pub(super) enum Stored {
    Marker(Marker),
    Record(Record),
}

/// Decodes a whole value; anything that is neither a marker nor a record of
/// a known version is an error, never a panic.
pub(super) fn decode(bytes: &[u8]) -> Result<Stored, DecodeError> {
    if bytes.starts_with(MARKER_MAGIC) {
        Marker::decode(bytes).map(Stored::Marker)
    } else {
        Record::decode(bytes).map(Stored::Record)
    }
}

/// The kind and creation time of a value from its first [`PEEK_LEN`] bytes,
/// or `None` for a value that is neither a marker nor a record.
pub(super) fn peek(head: &[u8]) -> Option<(EntryKind, u64)> {
    if head.starts_with(MARKER_MAGIC) {
        let marker = Marker::decode(head).ok()?;
        return Some((EntryKind::InFlight, marker.created_at_ms));
    }
    if head.starts_with(RECORD_MAGIC) && head.get(3).is_some_and(|&v| is_known_version(v)) {
        let created = head.get(RECORD_CREATED_AT..RECORD_CREATED_AT + 8)?;
        return Some((EntryKind::Completed, u64::from_be_bytes(array(created))));
    }
    None
}

/// Copies a slice whose length the caller checked.
fn array<const N: usize>(slice: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&slice[..N]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn marker() -> Marker {
        Marker {
            lease: LeaseToken::random(),
            fingerprint: Fingerprint::of_bytes(b"fp"),
            created_at_ms: 1_700_000_000_000,
        }
    }

    #[test]
    fn marker_round_trips_and_peeks() {
        let marker = marker();
        let bytes = marker.encode();
        assert!(matches!(decode(&bytes), Ok(Stored::Marker(m)) if m == marker));
        assert_eq!(
            peek(&bytes),
            Some((EntryKind::InFlight, marker.created_at_ms))
        );
        assert!(bytes.starts_with(&lease_prefix(marker.lease)));
    }

    #[test]
    fn record_peeks_its_creation_time() {
        let record = Record::value(Fingerprint::of_bytes(b"fp"), Bytes::from_static(b"v"));
        let bytes = record.encode();
        let head = &bytes[..bytes.len().min(PEEK_LEN)];
        assert_eq!(
            peek(head),
            Some((EntryKind::Completed, record.created_at_ms))
        );
    }

    #[test]
    fn response_records_round_trip_and_peek_in_both_versions() {
        let mut headers = http::HeaderMap::new();
        headers.insert("content-type", http::HeaderValue::from_static("text/plain"));
        let response = crate::StoredResponse::new(http::StatusCode::OK, &headers, b"hi");
        let record = Record::response(Fingerprint::of_bytes(b"fp"), response);
        let bytes = record.encode();
        assert!(matches!(decode(&bytes), Ok(Stored::Record(r)) if r == record));
        let completed = Some((EntryKind::Completed, record.created_at_ms));
        assert_eq!(peek(&bytes[..PEEK_LEN]), completed);
        // A record written by version 1 has the same header.
        let mut older = bytes.to_vec();
        older[3] = 1;
        assert_eq!(peek(&older[..PEEK_LEN]), completed);
        older[3] = crate::record::ENCODING_VERSION + 1;
        assert_eq!(peek(&older[..PEEK_LEN]), None);
    }

    #[test]
    fn every_truncated_marker_is_an_error() {
        let bytes = marker().encode();
        for len in 0..bytes.len() {
            assert!(decode(&bytes[..len]).is_err(), "prefix of {len} bytes");
        }
        let mut newer = bytes.to_vec();
        newer[3] = 2;
        assert!(matches!(
            decode(&newer),
            Err(DecodeError::UnknownVersion(2))
        ));
        assert_eq!(peek(b"garbage"), None);
    }

    /// Property tests: the codec takes any bytes (arbitrary, or a valid
    /// encoding flipped, cut short or extended) and answers a value or an
    /// error, never a panic; what it answers encodes back to itself.
    mod properties {
        use super::*;
        use proptest::collection::vec;
        use proptest::prelude::*;

        fn a_marker() -> impl Strategy<Value = Marker> {
            (any::<u128>(), any::<[u8; 32]>(), any::<u64>()).prop_map(
                |(lease, fingerprint, created_at_ms)| Marker {
                    lease: LeaseToken::from_u128(lease),
                    fingerprint: Fingerprint::from_bytes(fingerprint),
                    created_at_ms,
                },
            )
        }

        fn a_record() -> impl Strategy<Value = Record> {
            (any::<[u8; 32]>(), vec(any::<u8>(), 0..48)).prop_map(|(fingerprint, value)| {
                Record::value(Fingerprint::from_bytes(fingerprint), Bytes::from(value))
            })
        }

        /// Decodes and peeks `bytes`, checking what they answer.
        fn check(bytes: &[u8]) -> Result<(), TestCaseError> {
            match decode(bytes) {
                Ok(Stored::Marker(marker)) => {
                    prop_assert_eq!(&marker.encode()[..], bytes);
                    prop_assert_eq!(
                        peek(bytes),
                        Some((EntryKind::InFlight, marker.created_at_ms))
                    );
                }
                Ok(Stored::Record(record)) => {
                    prop_assert_eq!(Record::decode(&record.encode()), Ok(record));
                }
                Err(_) => {}
            }
            let _ = peek(&bytes[..bytes.len().min(PEEK_LEN)]);
            Ok(())
        }

        /// Flips bytes of `bytes`, then cuts it at `keep` (if shorter) and
        /// appends `extra`.
        fn mutate(bytes: &[u8], flips: &[(usize, u8)], keep: usize, extra: &[u8]) -> Vec<u8> {
            let mut bytes = bytes.to_vec();
            for &(at, mask) in flips {
                let at = at % bytes.len();
                bytes[at] ^= mask;
            }
            bytes.truncate(keep);
            bytes.extend_from_slice(extra);
            bytes
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2_000))]

            #[test]
            fn arbitrary_bytes_never_panic(bytes in vec(any::<u8>(), 0..128)) {
                check(&bytes)?;
            }

            #[test]
            fn bytes_behind_a_marker_header_never_panic(
                version in any::<u8>(),
                rest in vec(any::<u8>(), 0..96),
            ) {
                let mut bytes = MARKER_MAGIC.to_vec();
                bytes.push(version);
                bytes.extend_from_slice(&rest);
                check(&bytes)?;
            }

            #[test]
            fn mutated_markers_never_panic(
                marker in a_marker(),
                flips in vec((any::<usize>(), 1u8..=255), 0..4),
                keep in 0..=MARKER_LEN,
                extra in vec(any::<u8>(), 0..8),
            ) {
                let bytes = marker.encode();
                check(&bytes)?;
                check(&mutate(&bytes, &flips, keep, &extra))?;
            }

            #[test]
            fn mutated_records_never_panic(
                record in a_record(),
                flips in vec((any::<usize>(), 1u8..=255), 0..4),
                keep in any::<usize>(),
                extra in vec(any::<u8>(), 0..8),
            ) {
                let bytes = record.encode();
                check(&bytes)?;
                check(&mutate(&bytes, &flips, keep % (bytes.len() + 1), &extra))?;
            }
        }
    }
}
