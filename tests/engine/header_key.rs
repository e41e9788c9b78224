//! Property tests of `Idempotency-Key` parsing: quoted and bare forms,
//! escapes, length bounds, and no panic on arbitrary input. The parser is
//! crate-private; these go through the public `HeaderKey` extractor.

use http::request::Parts;
use proptest::prelude::*;
use tower_idempotency::extract::{HeaderKey, KeyExtractor, MAX_KEY_LEN};

fn bare_char() -> impl Strategy<Value = char> {
    (0x21u8..=0x7e)
        .prop_filter("not a quote, backslash or comma", |b| {
            !matches!(b, b'"' | b'\\' | b',')
        })
        .prop_map(char::from)
}

fn sf_string_char() -> impl Strategy<Value = char> {
    (0x20u8..=0x7e).prop_map(char::from)
}

/// The RFC 9651 serialisation of `s` as an sf-string.
fn quote(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

fn parts(value: &[u8]) -> Option<Parts> {
    let value = http::HeaderValue::from_bytes(value).ok()?;
    let (parts, ()) = http::Request::post("/orders")
        .header("idempotency-key", value)
        .body(())
        .ok()?
        .into_parts();
    Some(parts)
}

/// The key `HeaderKey` reads from an `Idempotency-Key` field holding `value`,
/// or why it refused it (bytes that are no header value at all included).
fn parse_key(value: &[u8]) -> Result<String, String> {
    let Some(parts) = parts(value) else {
        return Err("not a header value".to_owned());
    };
    match HeaderKey::new().extract(&parts) {
        Ok(Some(key)) => Ok(key.signal),
        Ok(None) => Err("no key".to_owned()),
        Err(rejection) => Err(rejection.detail().to_owned()),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_bytes_never_panic(value in proptest::collection::vec(any::<u8>(), 0..600)) {
        let result = parse_key(&value);
        if let Ok(key) = &result {
            prop_assert!(!key.is_empty() && key.chars().count() <= MAX_KEY_LEN);
            prop_assert!(key.chars().all(|c| (' '..='~').contains(&c)));
        }
    }

    #[test]
    fn arbitrary_text_never_panics(value in "\\PC{0,300}") {
        let _ = parse_key(value.as_bytes());
    }

    #[test]
    fn bare_keys_round_trip_within_bounds(key in proptest::collection::vec(bare_char(), 1..=MAX_KEY_LEN)) {
        let key: String = key.into_iter().collect();
        prop_assert_eq!(parse_key(key.as_bytes()).unwrap(), key.clone());
        // The quoted form names the same key.
        prop_assert_eq!(parse_key(quote(&key).as_bytes()).unwrap(), key);
    }

    #[test]
    fn quoted_keys_with_escapes_round_trip(key in proptest::collection::vec(sf_string_char(), 1..=MAX_KEY_LEN)) {
        let key: String = key.into_iter().collect();
        prop_assert_eq!(parse_key(quote(&key).as_bytes()).unwrap(), key);
    }

    #[test]
    fn keys_over_the_limit_are_rejected(extra in 1usize..100, c in bare_char()) {
        let key: String = std::iter::repeat_n(c, MAX_KEY_LEN + extra).collect();
        prop_assert!(parse_key(key.as_bytes()).is_err());
        prop_assert!(parse_key(quote(&key).as_bytes()).is_err());
    }

    #[test]
    fn a_bare_value_with_a_forbidden_byte_is_rejected(
        prefix in proptest::collection::vec(bare_char(), 1..20),
        bad in prop_oneof![Just(b'"'), Just(b'\\'), Just(b','), Just(b' '), 0u8..0x20, 0x7fu8..=0xff],
        suffix in proptest::collection::vec(bare_char(), 1..20),
    ) {
        let mut value: Vec<u8> = prefix.into_iter().map(|c| c as u8).collect();
        value.push(bad);
        value.extend(suffix.into_iter().map(|c| c as u8));
        prop_assert!(parse_key(&value).is_err());
    }
}
