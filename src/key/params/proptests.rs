//! Params equivalence and canonical JSON, as properties (moved from the
//! integration tests when `canonical_json` and `params_equivalent` became
//! crate-private).

use proptest::prelude::*;
use serde_json::{Map, Value};

use super::{canonical_json, params_equivalent};
use crate::key::IdempotencyKey;

/// Arbitrary JSON without the two shapes canonicalisation refuses
/// (duplicate keys cannot be built through `Map`; integers stay small).
fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        (-1_000_000i64..1_000_000).prop_map(Value::from),
        (-1e6f64..1e6).prop_map(Value::from),
        "[a-zA-Z0-9 \"\\\\é\u{1F600}]{0,8}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map("[a-z]{1,4}", inner, 0..6)
                .prop_map(|map| Value::Object(map.into_iter().collect())),
        ]
    })
}

/// `value` written with its object keys in reverse order and with spaces and
/// newlines between tokens.
fn reordered_and_spaced(value: &Value) -> String {
    match value {
        Value::Object(map) => {
            let members: Vec<String> = map
                .iter()
                .rev()
                .map(|(k, v)| {
                    format!(
                        "\n  {} :\t{}",
                        Value::String(k.clone()),
                        reordered_and_spaced(v)
                    )
                })
                .collect();
            format!("{{ {} }}", members.join(" ,"))
        }
        Value::Array(items) => {
            let items: Vec<String> = items.iter().map(reordered_and_spaced).collect();
            format!("[ {} ]", items.join(" , "))
        }
        other => other.to_string(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn reordered_json_is_equivalent(value in json()) {
        let compact = serde_json::to_vec(&value).unwrap();
        let spaced = reordered_and_spaced(&value);
        prop_assert!(params_equivalent(&compact, spaced.as_bytes()), "{}", spaced);
        prop_assert_eq!(canonical_json(&compact), canonical_json(spaced.as_bytes()));
    }

    #[test]
    fn changed_json_is_not_equivalent(value in json(), extra in "[a-z]{5}") {
        let mut changed = Map::new();
        changed.insert(extra, value.clone());
        let changed = Value::Object(changed);
        prop_assert!(!params_equivalent(
            &serde_json::to_vec(&value).unwrap(),
            &serde_json::to_vec(&changed).unwrap(),
        ));
    }

    #[test]
    fn equivalence_never_panics(a in any::<Vec<u8>>(), b in any::<Vec<u8>>()) {
        prop_assert!(params_equivalent(&a, &a));
        prop_assert_eq!(params_equivalent(&a, &b), params_equivalent(&b, &a));
    }
}

#[test]
fn canonical_json_sorts_keys_and_refuses_what_is_not_json() {
    let canonical = canonical_json(br#"{ "b": [1, 2.50], "a": "x" }"#).unwrap();
    assert_eq!(canonical, br#"{"a":"x","b":[1,2.5]}"#);
    assert_eq!(canonical_json(b"not json"), None);
}

#[test]
fn params_are_equivalent_when_their_canonical_json_is() {
    assert!(params_equivalent(
        br#"{"a":1,"b":2}"#,
        b"{ \"b\": 2,\n \"a\": 1 }"
    ));
    assert!(!params_equivalent(br#"{"a":1}"#, br#"{"a":2}"#));
    assert!(params_equivalent(b"plain text", b"plain text"));
    assert!(!params_equivalent(b"plain text", b"plain  text"));
}

#[test]
fn params_json_gives_the_key_of_reordered_json() {
    let typed = IdempotencyKey::new("signal-1", "create_task", "trello")
        .params_json(&serde_json::json!({"title": "Ship it", "list": "todo", "pos": 1.0}))
        .unwrap();
    let canonical = canonical_json(br#"{ "pos": 1, "list": "todo", "title": "Ship it" }"#).unwrap();
    let from_bytes = IdempotencyKey::new("signal-1", "create_task", "trello").params(canonical);
    assert_eq!(typed, from_bytes);
    assert_ne!(
        typed,
        IdempotencyKey::new("signal-1", "create_task", "trello")
            .params_json(&serde_json::json!({"title": "Ship it twice", "list": "todo", "pos": 1}))
            .unwrap()
    );
}
