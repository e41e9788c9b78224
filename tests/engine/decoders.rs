//! The record decoder takes any bytes: arbitrary ones, and valid encodings
//! with bytes flipped, cut short, extended or with a length field replaced.
//! It answers a record or a `DecodeError`, never panics; and what it
//! answers encodes back to itself. (The Redis value codec has the same
//! properties, tested beside it in `src/store/redis/codec.rs`.)

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use proptest::prelude::*;
use tower_idempotency::store::DecodeError;
use tower_idempotency::{Fingerprint, Record, StoredResponse};

/// Decodes `bytes`; a record it answers must survive a round trip.
fn decodes_cleanly(bytes: &[u8]) -> Result<(), TestCaseError> {
    if let Ok(record) = Record::decode(bytes) {
        prop_assert_eq!(Record::decode(&record.encode()), Ok(record));
    }
    Ok(())
}

fn header_name() -> impl Strategy<Value = HeaderName> {
    "[a-z][a-z0-9-]{0,12}".prop_map(|name| HeaderName::from_bytes(name.as_bytes()).unwrap())
}

fn header_value() -> impl Strategy<Value = HeaderValue> {
    "[ -~]{0,24}".prop_map(|value| HeaderValue::from_str(&value).unwrap())
}

fn record() -> impl Strategy<Value = Record> {
    let fingerprint = any::<[u8; 32]>().prop_map(Fingerprint::from_bytes);
    let response = (
        100u16..1000,
        prop::collection::vec((header_name(), header_value()), 0..6),
        prop::collection::vec(any::<u8>(), 0..64),
    )
        .prop_map(|(status, headers, body)| {
            let mut map = HeaderMap::new();
            for (name, value) in headers {
                map.append(name, value);
            }
            StoredResponse::new(StatusCode::from_u16(status).unwrap(), &map, &body)
        });
    let value = prop::collection::vec(any::<u8>(), 0..64).prop_map(Bytes::from);
    (
        fingerprint,
        any::<u64>(),
        prop_oneof![
            response.prop_map(tower_idempotency::Payload::Response),
            value.prop_map(tower_idempotency::Payload::Value),
        ],
    )
        .prop_map(|(fingerprint, created_at_ms, payload)| Record {
            fingerprint,
            created_at_ms,
            payload,
        })
}

/// One change to a valid encoding.
#[derive(Debug, Clone)]
enum Mutation {
    Flip {
        at: usize,
        mask: u8,
    },
    Truncate {
        keep: usize,
    },
    Extend(Vec<u8>),
    /// Overwrites 2, 4 or 8 bytes (a length or count field, wherever it is)
    /// with a large number.
    Widen {
        at: usize,
        width: usize,
        fill: u8,
    },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1u8..=255).prop_map(|(at, mask)| Mutation::Flip { at, mask }),
        any::<usize>().prop_map(|keep| Mutation::Truncate { keep }),
        prop::collection::vec(any::<u8>(), 1..16).prop_map(Mutation::Extend),
        (
            any::<usize>(),
            prop_oneof![Just(2), Just(4), Just(8)],
            any::<u8>()
        )
            .prop_map(|(at, width, fill)| Mutation::Widen { at, width, fill }),
    ]
}

fn mutate(bytes: &mut Vec<u8>, mutation: &Mutation) {
    match mutation {
        Mutation::Flip { at, mask } if !bytes.is_empty() => {
            let at = at % bytes.len();
            bytes[at] ^= mask;
        }
        Mutation::Flip { .. } => {}
        Mutation::Truncate { keep } => bytes.truncate(keep % (bytes.len() + 1)),
        Mutation::Extend(more) => bytes.extend_from_slice(more),
        Mutation::Widen { at, width, fill } => {
            if bytes.len() >= *width {
                let at = at % (bytes.len() - width + 1);
                bytes[at..at + width].fill(*fill);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        decodes_cleanly(&bytes)?;
    }

    #[test]
    fn bytes_behind_a_record_header_never_panic(
        kind in 0u8..4,
        rest in prop::collection::vec(any::<u8>(), 0..256),
    ) {
        let mut bytes = b"TIR\x01".to_vec();
        bytes.push(kind);
        bytes.extend_from_slice(&rest);
        decodes_cleanly(&bytes)?;
    }

    #[test]
    fn valid_encodings_round_trip(record in record()) {
        prop_assert_eq!(Record::decode(&record.encode()), Ok(record));
    }

    #[test]
    fn mutated_encodings_never_panic(
        record in record(),
        mutations in prop::collection::vec(mutation(), 1..4),
    ) {
        let mut bytes = record.encode().to_vec();
        for mutation in &mutations {
            mutate(&mut bytes, mutation);
        }
        decodes_cleanly(&bytes)?;
    }
}

/// A response record with `count` headers named `h0`, `h1`... (or all one
/// name), each with an empty value: as many headers as a value can hold.
fn many_headers(count: usize, distinct: bool) -> Vec<u8> {
    let mut out = BytesMut::new();
    out.put_slice(b"TIR\x01\x01");
    out.put_slice(&[7u8; 32]);
    out.put_u64(1);
    out.put_u16(200);
    out.put_u32(count as u32);
    for i in 0..count {
        let name = if distinct {
            format!("h{i}")
        } else {
            "h".to_owned()
        };
        out.put_u16(name.len() as u16);
        out.put_slice(name.as_bytes());
        out.put_u32(0);
    }
    out.put_u64(0);
    out.to_vec()
}

#[test]
fn more_headers_than_a_header_map_holds_are_an_error() {
    // A header map holds at most 32,768 distinct names; a value claiming
    // more is not a record this crate wrote.
    let decoded = Record::decode(&many_headers(40_000, true));
    assert_eq!(decoded, Err(DecodeError::TooManyHeaders(40_000)));
    // Many values of one name are fine.
    let decoded = Record::decode(&many_headers(40_000, false)).unwrap();
    assert_eq!(decoded.as_response().unwrap().headers().len(), 40_000);
}
