//! Canonical JSON for params: when two bodies ask for the same thing.
//!
//! JSON is canonicalised per RFC 8785 (JCS) by `serde_jcs`; see
//! [`canonical_json`] for the two shapes refused so that canonicalising never
//! makes different requests look the same.

use std::collections::HashSet;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Serialize;
use serde_json::{Map, Number, Value};

use super::{params_hash, IdempotencyKey};

/// Largest integer magnitude an IEEE double holds exactly.
const MAX_EXACT_INT: u64 = 1 << 53;

/// The RFC 8785 canonical form of a JSON document (object keys sorted, no
/// insignificant whitespace, numbers in their shortest IEEE double form), or
/// `None` when `body` is not JSON.
///
/// Two kinds of JSON are refused (`None`, so they are compared byte for byte),
/// because canonicalising them would make *different* requests look the same:
///
/// * an object with a duplicate key (`{"a":1,"a":2}`): parsers disagree on
///   which one wins, so the application may read another value than the one
///   the canonical form keeps;
/// * an integer beyond ±2^53: as an IEEE double it would collide with its
///   neighbours (`9007199254740993` would equal `9007199254740992`), while
///   the application, reading it as an `i64`/`u64`, sees two different ids.
pub(crate) fn canonical_json(body: &[u8]) -> Option<Vec<u8>> {
    let StrictJson(value) = serde_json::from_slice(body).ok()?;
    serde_jcs::to_vec(&value).ok()
}

/// Whether two params ask for the same thing: equal bytes, or JSON documents
/// with the same canonical form (object keys in another order, other
/// whitespace, `1.0` for `1`). Anything that is not JSON is compared exactly.
/// The oracle of the equivalence properties (module `proptests`).
#[cfg(test)]
pub(crate) fn params_equivalent(a: &[u8], b: &[u8]) -> bool {
    if a == b {
        return true;
    }
    match (canonical_json(a), canonical_json(b)) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
}

impl IdempotencyKey {
    /// Adds the params hash of `params` serialized as canonical JSON, so the
    /// same params built with fields or map entries in another order give
    /// the same key.
    ///
    /// The hash is that of the RFC 8785 canonical form of the `serde_json`
    /// encoding (object keys sorted, no insignificant whitespace, numbers in
    /// their shortest IEEE double form), or of the encoding itself when it
    /// cannot be canonicalised (an integer beyond ±2^53).
    ///
    /// # Errors
    ///
    /// The `serde_json` error when `params` cannot be serialized (a map with
    /// non-string keys, a failing `Serialize` impl).
    ///
    /// # Example
    ///
    /// ```
    /// use serde_json::json;
    /// use tower_idempotency::IdempotencyKey;
    ///
    /// let a = IdempotencyKey::new("signal-123", "create_task", "trello")
    ///     .params_json(&json!({"title": "Ship it", "list": "todo"}))?;
    /// let b = IdempotencyKey::new("signal-123", "create_task", "trello")
    ///     .params_json(&json!({"list": "todo", "title": "Ship it"}))?;
    /// assert_eq!(a, b);
    /// assert_eq!(a.params_hash().map(str::len), Some(16));
    /// # Ok::<(), serde_json::Error>(())
    /// ```
    pub fn params_json<T: Serialize + ?Sized>(self, params: &T) -> Result<Self, serde_json::Error> {
        let encoded = serde_json::to_vec(params)?;
        let hash = match canonical_json(&encoded) {
            Some(canonical) => params_hash(&canonical),
            None => params_hash(&encoded),
        };
        Ok(self.with_params_hash(hash))
    }
}

/// A JSON value read strictly: duplicate object keys and integers an IEEE
/// double cannot hold exactly are errors.
struct StrictJson(Value);

impl<'de> Deserialize<'de> for StrictJson {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(StrictVisitor).map(StrictJson)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        if v.unsigned_abs() > MAX_EXACT_INT {
            return Err(E::custom("integer beyond 2^53"));
        }
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        if v > MAX_EXACT_INT {
            return Err(E::custom("integer beyond 2^53"));
        }
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom("number out of range"))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(StrictJson(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = Map::new();
        let mut seen = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(key.clone()) {
                return Err(de::Error::custom("duplicate object key"));
            }
            let StrictJson(value) = map.next_value()?;
            object.insert(key, value);
        }
        Ok(Value::Object(object))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reordered_and_reformatted_json_is_equivalent() {
        let a = br#"{"amount":100,"currency":"EUR","items":[{"sku":"a","qty":1}]}"#;
        let b = b"{\n  \"items\": [ { \"qty\": 1.0, \"sku\": \"a\" } ],\n  \"currency\": \"EUR\",\n  \"amount\": 1e2\n}";
        assert!(params_equivalent(a, b));
        // Array order is significant.
        assert!(!params_equivalent(b"[1,2]", b"[2,1]"));
    }

    #[test]
    fn unicode_escapes_canonicalise() {
        assert!(params_equivalent(
            br#"{"k":"\u00e9"}"#,
            "{\"k\":\"é\"}".as_bytes()
        ));
    }

    #[test]
    fn ambiguous_json_is_compared_exactly() {
        assert_eq!(canonical_json(br#"{"a":1,"a":2}"#), None);
        assert!(!params_equivalent(br#"{"a":1,"a":2}"#, br#"{"a":2}"#));
        assert_eq!(canonical_json(b"9007199254740993"), None);
        assert!(!params_equivalent(b"9007199254740993", b"9007199254740992"));
        assert!(canonical_json(b"9007199254740992").is_some());
        assert!(canonical_json(b"-9007199254740992").is_some());
    }

    #[test]
    fn json_and_non_json_differ() {
        assert!(!params_equivalent(b"{}", b"{ } trailing"));
        assert!(!params_equivalent(b"", b"{}"));
        assert!(params_equivalent(b"", b""));
        assert!(params_equivalent(b"\xff\xfe", b"\xff\xfe"));
    }

    #[test]
    fn deeply_nested_json_does_not_overflow() {
        let deep = "[".repeat(100_000);
        assert_eq!(canonical_json(deep.as_bytes()), None);
    }

    #[test]
    fn params_json_ignores_map_order() {
        let mut first = std::collections::BTreeMap::new();
        first.insert("b", 2);
        first.insert("a", 1);
        let hashed = IdempotencyKey::new("s", "a", "t")
            .params_json(&first)
            .unwrap();
        let raw = IdempotencyKey::new("s", "a", "t").params(br#"{"a":1,"b":2}"#);
        assert_eq!(hashed, raw);
    }
}

#[cfg(test)]
mod proptests;
