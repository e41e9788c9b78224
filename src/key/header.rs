//! The `Idempotency-Key` header: the default [`KeyExtractor`] of the HTTP layer.

use std::fmt;
use std::sync::Arc;

use http::header::{HeaderName, AUTHORIZATION};
use http::request::Parts;
use sha2::{Digest, Sha256};

use super::{hex_lower, storage_key_rest_len, KeyExtractor, KeyParts, KeyRejection};

/// The longest key accepted, in characters (quotes of the Structured Field
/// form not counted).
pub const MAX_KEY_LEN: usize = 255;

/// The request header that carries the key.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

type ScopeFn = dyn Fn(&Parts) -> String + Send + Sync;

/// Finds the key in the `Idempotency-Key` header (IETF
/// draft-ietf-httpapi-idempotency-key-header, and Stripe's form).
///
/// # Accepted values
///
/// * A Structured Field string item (RFC 9651), the draft's form:
///   `"8e03978e-40d5-43e8-bc93-6894a57f9324"`. It may hold spaces and
///   escaped `\"` and `\\`; parameters (`"abc";x=1`) are ignored, as RFC 9651
///   asks of unknown parameters.
/// * A bare value, as Stripe's clients send it: `8e03978e-40d5-...`, visible
///   ASCII (0x21–0x7E) without `"`, `\` or `,`. Such a value may start with a
///   digit, so it is not an sf-token; it is read as it is.
///
/// Either way the key is 1 to 255 characters, and `"abc"` and `abc` name the
/// same key. Anything else (an empty value, a longer key, control or
/// non-ASCII characters, bad quoting, several `Idempotency-Key` fields) is a
/// [`KeyRejection`], which the layer answers with 400.
///
/// # The storage key
///
/// `signal` = the client's key, `action` = `"<METHOD> <path>"` (the query is
/// part of the fingerprint, not the key), `target` = the *scope*. The default
/// scope is the first 16 hex characters of the SHA-256 of the `Authorization`
/// header (empty without one), so one client is never replayed another's
/// response; [`scope`](HeaderKey::scope) replaces it.
///
/// # Example
///
/// ```
/// use tower_idempotency::extract::KeyExtractor;
/// use tower_idempotency::extract::HeaderKey;
///
/// let (parts, ()) = http::Request::post("/orders?draft=1")
///     .header("idempotency-key", "\"8e03978e-40d5\"")
///     .body(())
///     .unwrap()
///     .into_parts();
/// let key = HeaderKey::new().extract(&parts).unwrap().unwrap();
/// assert_eq!(key.signal, "8e03978e-40d5");
/// assert_eq!(key.action, "POST /orders");
/// assert_eq!(key.target, "");
///
/// // A per-tenant scope instead of the Authorization hash.
/// let by_tenant = HeaderKey::new().scope(|parts: &http::request::Parts| {
///     parts.headers.get("x-tenant").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned()
/// });
/// # drop(by_tenant);
/// ```
#[derive(Clone, Default)]
pub struct HeaderKey {
    scope: Option<Arc<ScopeFn>>,
}

impl HeaderKey {
    /// The `Idempotency-Key` header, scoped by the `Authorization` header.
    pub fn new() -> Self {
        Self::default()
    }

    /// Replaces the default scope (SHA-256 of `Authorization`) by `scope`,
    /// which names the client a request comes from.
    pub fn scope<F>(mut self, scope: F) -> Self
    where
        F: Fn(&Parts) -> String + Send + Sync + 'static,
    {
        self.scope = Some(Arc::new(scope));
        self
    }
}

impl fmt::Debug for HeaderKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HeaderKey")
            .field("custom_scope", &self.scope.is_some())
            .finish()
    }
}

impl KeyExtractor for HeaderKey {
    fn extract(&self, parts: &Parts) -> Result<Option<KeyParts>, KeyRejection> {
        // A scan of the names, not a hashed lookup: a request carries a few
        // dozen fields at most, mostly standard ones that differ from this
        // name at the first compare, and hashing a custom name costs more.
        let mut values = parts
            .headers
            .iter()
            .filter(|(name, _)| *name == IDEMPOTENCY_KEY)
            .map(|(_, value)| value);
        let Some(value) = values.next() else {
            return Ok(None);
        };
        if values.next().is_some() {
            return Err(KeyRejection::new(
                "the request has several Idempotency-Key fields; send exactly one",
            ));
        }
        let target = match &self.scope {
            Some(scope) => scope(parts),
            None => authorization_scope(parts),
        };
        let action = action(&parts.method, parts.uri.path());
        // Room after the signal for the rest of the storage key, so the
        // layer writes it there without another allocation.
        let room = storage_key_rest_len(&action, &target, false);
        let signal = parse_key_with_room(value.as_bytes(), room)?;
        Ok(Some(KeyParts {
            signal,
            action,
            target,
            params_in_key: false,
        }))
    }
}

/// `METHOD /path`, the action of a header key.
fn action(method: &http::Method, path: &str) -> String {
    let method = method.as_str();
    let mut action = String::with_capacity(method.len() + 1 + path.len());
    action.push_str(method);
    action.push(' ');
    action.push_str(path);
    action
}

/// The first 16 hex characters of the SHA-256 of the `Authorization` field(s);
/// empty when there is none.
fn authorization_scope(parts: &Parts) -> String {
    let mut values = parts.headers.get_all(AUTHORIZATION).iter().peekable();
    if values.peek().is_none() {
        return String::new();
    }
    let mut hasher = Sha256::new();
    for value in values {
        hasher.update(value.as_bytes());
        // NUL cannot appear in a field value: values cannot run together.
        hasher.update([0]);
    }
    hex_lower(&hasher.finalize()[..8])
}

/// Parses one `Idempotency-Key` field value into the key it names.
///
/// # Errors
///
/// A [`KeyRejection`] saying what is wrong, for anything but a Structured
/// Field string or a bare value of 1 to 255 characters.
#[cfg(test)]
pub(crate) fn parse_key(value: &[u8]) -> Result<String, KeyRejection> {
    parse_key_with_room(value, 0)
}

/// `parse_key`, in a string with capacity for `room` bytes more.
fn parse_key_with_room(value: &[u8], room: usize) -> Result<String, KeyRejection> {
    // HTTP trims optional whitespace around a field value; so does RFC 9651.
    let value = value.trim_ascii();
    let key = if value.first() == Some(&b'"') {
        let item = sfv::Parser::new(value)
            .parse::<sfv::Item>()
            .map_err(|error| {
                KeyRejection::new(format!(
                    "the Idempotency-Key is not a valid Structured Field string: {error}"
                ))
            })?;
        match item.bare_item.as_string() {
            Some(string) => with_room(string.as_str(), room),
            None => {
                return Err(KeyRejection::new(
                    "the Idempotency-Key must be a string, such as \"8e03978e-40d5\"",
                ))
            }
        }
    } else {
        if let Some(bad) = value.iter().find(|&&b| !is_bare_char(b)) {
            return Err(KeyRejection::new(format!(
                "the Idempotency-Key holds {}; an unquoted key is visible ASCII without '\"', '\\' or ','",
                describe_byte(*bad)
            )));
        }
        // Only ASCII bytes passed the check above.
        with_room(&String::from_utf8_lossy(value), room)
    };
    match key.len() {
        0 => Err(KeyRejection::new("the Idempotency-Key is empty")),
        len if len > MAX_KEY_LEN => Err(KeyRejection::new(format!(
            "the Idempotency-Key is {len} characters long; the limit is {MAX_KEY_LEN}"
        ))),
        _ => Ok(key),
    }
}

fn with_room(key: &str, room: usize) -> String {
    let mut text = String::with_capacity(key.len() + room);
    text.push_str(key);
    text
}

fn is_bare_char(b: u8) -> bool {
    (0x21..=0x7e).contains(&b) && !matches!(b, b'"' | b'\\' | b',')
}

fn describe_byte(b: u8) -> String {
    match b {
        b' ' => "a space".to_owned(),
        b'"' | b'\\' | b',' => format!("'{}'", b as char),
        _ if b.is_ascii_control() => format!("the control character 0x{b:02x}"),
        _ => format!("the non-ASCII byte 0x{b:02x}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn extract(builder: http::request::Builder) -> Result<Option<KeyParts>, KeyRejection> {
        let (parts, ()) = builder.body(()).unwrap().into_parts();
        HeaderKey::new().extract(&parts)
    }

    #[test]
    fn parse_key_reads_the_two_forms_and_refuses_the_rest() {
        assert_eq!(parse_key(b"\"abc\"").unwrap(), "abc");
        assert_eq!(parse_key(b"abc").unwrap(), "abc");
        assert_eq!(parse_key(br#""say \"hi\"""#).unwrap(), r#"say "hi""#);
        assert!(parse_key(b"").is_err());
        assert!(parse_key(b"a,b").is_err());
        assert!(parse_key(b"\"open").is_err());
    }

    #[test]
    fn quoted_and_bare_are_the_same_key() {
        let uuid = "8e03978e-40d5-43e8-bc93-6894a57f9324";
        assert_eq!(parse_key(uuid.as_bytes()).unwrap(), uuid);
        assert_eq!(parse_key(format!("\"{uuid}\"").as_bytes()).unwrap(), uuid);
        assert_eq!(parse_key(b"  abc\t").unwrap(), "abc");
        assert_eq!(parse_key(b"\"a b\";x=1").unwrap(), "a b");
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            &b""[..],
            b"\"\"",
            b"a b",
            b"a,b",
            b"a\\b",
            b"a\"b",
            b"\"abc",
            b"\"a\"b",
            b"\"a\"\"b\"",
            b"\"tab\there\"",
            b"1",
            b"?1",
            b":YWJj:",
            b"\"caf\xc3\xa9\"",
            b"caf\xc3\xa9",
            b"\"a\", \"b\"",
        ] {
            if bad == b"1" || bad == b"?1" || bad == b":YWJj:" {
                // Bare values are read as they are, whatever sf type they resemble.
                assert!(parse_key(bad).is_ok(), "{:?}", String::from_utf8_lossy(bad));
                continue;
            }
            assert!(
                parse_key(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn length_bounds() {
        let max = "k".repeat(MAX_KEY_LEN);
        assert_eq!(parse_key(max.as_bytes()).unwrap(), max);
        assert_eq!(parse_key(format!("\"{max}\"").as_bytes()).unwrap(), max);
        let over = "k".repeat(MAX_KEY_LEN + 1);
        assert!(parse_key(over.as_bytes()).is_err());
        assert!(parse_key(format!("\"{over}\"").as_bytes()).is_err());
    }

    #[test]
    fn scope_and_action() {
        let parts = extract(
            http::Request::patch("/orders/7?x=1")
                .header("idempotency-key", "k")
                .header("authorization", "Bearer a"),
        )
        .unwrap()
        .unwrap();
        assert_eq!(parts.action, "PATCH /orders/7");
        assert_eq!(parts.target.len(), 16);
        let other = extract(
            http::Request::patch("/orders/7")
                .header("idempotency-key", "k")
                .header("authorization", "Bearer b"),
        )
        .unwrap()
        .unwrap();
        assert_ne!(parts.target, other.target);
        assert!(!parts.params_in_key);
    }

    #[test]
    fn absent_and_repeated() {
        assert_eq!(extract(http::Request::post("/")), Ok(None));
        assert!(extract(
            http::Request::post("/")
                .header("idempotency-key", "a")
                .header("idempotency-key", "a")
        )
        .is_err());
    }
}
