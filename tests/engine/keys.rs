//! The text form of `IdempotencyKey`, as properties (params equivalence is
//! proved next to it, in `src/key/params/proptests.rs`).

use proptest::prelude::*;
use tower_idempotency::IdempotencyKey;

/// Components rich in the characters the text form must escape.
fn component() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9:%/ _-]{0,12}",
        "(%3A|%25|%|:|3A|25|A){0,6}",
        any::<String>(),
    ]
}

fn key() -> impl Strategy<Value = IdempotencyKey> {
    (
        component(),
        component(),
        component(),
        proptest::option::of(any::<Vec<u8>>()),
    )
        .prop_map(|(signal, action, target, params)| {
            let key = IdempotencyKey::new(signal, action, target);
            match params {
                Some(params) => key.params(params),
                None => key,
            }
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn display_parse_round_trips(key in key()) {
        let text = key.to_string();
        // Escaping leaves exactly the separators in the text.
        let separators = if key.params_hash().is_some() { 3 } else { 2 };
        prop_assert_eq!(text.matches(':').count(), separators);
        prop_assert_eq!(IdempotencyKey::parse(&text), Ok(key.clone()));
        prop_assert_eq!(text.parse::<IdempotencyKey>(), Ok(key));
    }

    #[test]
    fn parse_never_panics(text in any::<String>()) {
        let _ = IdempotencyKey::parse(&text);
    }

    #[test]
    fn parse_never_panics_on_escape_soup(text in "[:%3A25a-f]{0,40}") {
        if let Ok(key) = IdempotencyKey::parse(&text) {
            // Whatever parses prints back to text that parses to the same key.
            prop_assert_eq!(IdempotencyKey::parse(&key.to_string()), Ok(key));
        }
    }
}
