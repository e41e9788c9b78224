//! Keys and fingerprints: what identifies an action, and what identifies the
//! request that asked for it.
//!
//! * [`IdempotencyKey`] names one action: `signal:action:target[:paramsHash]`.
//!   Every storage key is one, including those the HTTP layer derives from an
//!   `Idempotency-Key` header, so the handle's queries (`find_by_signal`, ...)
//!   work on every key.
//! * [`Fingerprint`] is the SHA-256 of what was asked (method, path and query,
//!   body). A retry with the same key but another fingerprint is a mismatch.
//! * [`KeyExtractor`] is how the HTTP layer finds a key in a request;
//!   [`HeaderKey`] (the `Idempotency-Key` header) is the default.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};

mod action;
mod header;
mod params;

pub use action::{fixed, from_header, from_path_segment, from_query, ActionKey, MAX_COMPONENT_LEN};
pub use header::{HeaderKey, IDEMPOTENCY_KEY, MAX_KEY_LEN};
pub(crate) use params::canonical_json;

/// Identifies one action: `signal:action:target`, optionally followed by
/// `:paramsHash` (the first 16 hex characters of the SHA-256 of the params).
///
/// The text form escapes `%` as `%25` and `:` as `%3A` inside components, so
/// [`Display`](fmt::Display) and [`parse`](IdempotencyKey::parse) round-trip
/// whatever the components hold.
///
/// # Example
///
/// ```
/// use tower_idempotency::IdempotencyKey;
///
/// let key = IdempotencyKey::new("signal-123", "create_task", "trello:board/1")
///     .params(br#"{"title":"Ship it"}"#);
/// let text = key.to_string();
/// assert!(text.starts_with("signal-123:create_task:trello%3Aboard/1:"));
/// assert_eq!(IdempotencyKey::parse(&text).unwrap(), key);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey {
    signal: String,
    action: String,
    target: String,
    params_hash: Option<String>,
}

impl IdempotencyKey {
    /// A key for `action` on `target`, caused by `signal`, without params.
    pub fn new(
        signal: impl Into<String>,
        action: impl Into<String>,
        target: impl Into<String>,
    ) -> Self {
        Self {
            signal: signal.into(),
            action: action.into(),
            target: target.into(),
            params_hash: None,
        }
    }

    /// Adds the params hash of `params` (their exact bytes) to the key.
    pub fn params(mut self, params: impl AsRef<[u8]>) -> Self {
        self.params_hash = Some(params_hash(params.as_ref()));
        self
    }

    /// Sets the params hash directly (16 lowercase hex characters), as read
    /// from a stored key.
    pub fn with_params_hash(mut self, hash: impl Into<String>) -> Self {
        self.params_hash = Some(hash.into());
        self
    }

    /// What caused the action (an incoming event, a client's idempotency key).
    pub fn signal(&self) -> &str {
        &self.signal
    }

    /// The action (`create_task`, or `POST /orders` for HTTP keys).
    pub fn action(&self) -> &str {
        &self.action
    }

    /// What the action acts on (`trello`, or the client scope for HTTP keys).
    pub fn target(&self) -> &str {
        &self.target
    }

    /// The params hash, when params are part of the key.
    pub fn params_hash(&self) -> Option<&str> {
        self.params_hash.as_deref()
    }

    /// Parses the text form written by [`Display`](fmt::Display).
    ///
    /// # Errors
    ///
    /// [`KeyParseError`] when the text has not three or four components, a
    /// component holds a `%` that is not `%25` or `%3A`, or the params hash is
    /// not 16 lowercase hex characters.
    pub fn parse(text: &str) -> Result<Self, KeyParseError> {
        let mut parts = text.split(':');
        let (Some(signal), Some(action), Some(target)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(KeyParseError::Components);
        };
        let params_hash = parts.next();
        if parts.next().is_some() {
            return Err(KeyParseError::Components);
        }
        if let Some(hash) = params_hash {
            let valid = hash.len() == 16
                && hash
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
            if !valid {
                return Err(KeyParseError::ParamsHash);
            }
        }
        Ok(Self {
            signal: unescape(signal)?,
            action: unescape(action)?,
            target: unescape(target)?,
            params_hash: params_hash.map(str::to_owned),
        })
    }
}

impl IdempotencyKey {
    /// The text form, as `to_string` writes it, in a string sized for it at
    /// once (escapes aside): the storage key, which the layer and the
    /// closure API write for every call.
    pub(crate) fn to_text(&self) -> String {
        let len = self.signal.len()
            + self.action.len()
            + self.target.len()
            + self.params_hash.as_ref().map_or(0, |hash| hash.len() + 1)
            + 2;
        let mut text = String::with_capacity(len);
        push_escaped(&mut text, &self.signal);
        text.push(':');
        push_escaped(&mut text, &self.action);
        text.push(':');
        push_escaped(&mut text, &self.target);
        if let Some(hash) = &self.params_hash {
            text.push(':');
            text.push_str(hash);
        }
        text
    }
}

impl fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_escaped(f, &self.signal)?;
        f.write_str(":")?;
        write_escaped(f, &self.action)?;
        f.write_str(":")?;
        write_escaped(f, &self.target)?;
        if let Some(hash) = &self.params_hash {
            f.write_str(":")?;
            f.write_str(hash)?;
        }
        Ok(())
    }
}

impl FromStr for IdempotencyKey {
    type Err = KeyParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// The first 16 hex characters of the SHA-256 of `params`: what
/// [`IdempotencyKey::params`] keeps.
pub(crate) fn params_hash(params: &[u8]) -> String {
    let digest = Sha256::digest(params);
    hex_lower(&digest[..8])
}

/// Whether a key component escapes `b` (`:` separates components, `%` starts
/// an escape).
fn needs_escape(b: u8) -> bool {
    b == b':' || b == b'%'
}

/// `component` with `:` and `%` escaped, piece by piece to `out`.
fn escape_into(component: &str, mut out: impl FnMut(&str)) {
    let mut rest = component;
    // A byte search: `:` and `%` are ASCII, so never inside a wider char.
    while let Some(pos) = rest.bytes().position(needs_escape) {
        out(&rest[..pos]);
        out(if rest.as_bytes()[pos] == b':' {
            "%3A"
        } else {
            "%25"
        });
        rest = &rest[pos + 1..];
    }
    out(rest);
}

fn write_escaped(f: &mut fmt::Formatter<'_>, component: &str) -> fmt::Result {
    let mut result = Ok(());
    escape_into(component, |piece| {
        if result.is_ok() {
            result = f.write_str(piece);
        }
    });
    result
}

/// `component` as a key's text form holds it (`:` and `%` escaped).
#[cfg(any(feature = "redis", feature = "postgres"))]
pub(crate) fn escaped(component: &str) -> String {
    let mut text = String::with_capacity(component.len());
    push_escaped(&mut text, component);
    text
}

fn push_escaped(text: &mut String, component: &str) {
    escape_into(component, |piece| text.push_str(piece));
}

fn unescape(component: &str) -> Result<String, KeyParseError> {
    let mut out = String::with_capacity(component.len());
    let mut rest = component;
    while let Some(pos) = rest.find('%') {
        out.push_str(&rest[..pos]);
        let escape = rest.get(pos..pos + 3).ok_or(KeyParseError::Escape)?;
        match escape {
            "%3A" => out.push(':'),
            "%25" => out.push('%'),
            _ => return Err(KeyParseError::Escape),
        }
        rest = &rest[pos + 3..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Why a text is not an [`IdempotencyKey`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyParseError {
    /// Not three or four `:`-separated components.
    #[error("an idempotency key has the form signal:action:target[:paramsHash]")]
    Components,
    /// A `%` that does not start `%25` or `%3A`.
    #[error("an idempotency key component holds a '%' that is not '%25' or '%3A'")]
    Escape,
    /// The fourth component is not 16 lowercase hex characters.
    #[error("the params hash of an idempotency key is 16 lowercase hex characters")]
    ParamsHash,
}

/// How the HTTP layer finds the key of a request.
///
/// An extractor looks at the request head only; the layer buffers the body
/// afterwards, and only for requests that carry a key. `Ok(None)` means the
/// request has no key (passed through, or 400 under `require_key`);
/// `Err` is a malformed key (400).
pub trait KeyExtractor: Clone + Send + Sync + 'static {
    /// Finds the key parts of a request.
    fn extract(&self, parts: &http::request::Parts) -> Result<Option<KeyParts>, KeyRejection>;
}

/// What an extractor found: the components of the storage key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyParts {
    /// What caused the action (the header's key, or the signal of an action key).
    pub signal: String,
    /// The action (`POST /orders` for header keys).
    pub action: String,
    /// What the action acts on (the client scope for header keys).
    pub target: String,
    /// Whether the params hash of the body is part of the key. When it is not,
    /// a changed body is a fingerprint mismatch (422).
    pub params_in_key: bool,
}

impl KeyParts {
    /// The storage key, with the params hash of `body` when params are in the key.
    pub fn into_key(self, body: &[u8]) -> IdempotencyKey {
        let key = IdempotencyKey::new(self.signal, self.action, self.target);
        if self.params_in_key {
            key.params(body)
        } else {
            key
        }
    }

    /// The storage key's text, as `into_key(body).to_text()` writes it, but
    /// written on after the signal in the signal's own buffer: with no
    /// allocation when the extractor left room there for the rest (as
    /// [`HeaderKey`] does) and the signal needs no escape.
    pub(crate) fn into_storage_key(self, body: &[u8]) -> String {
        if self.signal.bytes().any(needs_escape) {
            return self.into_key(body).to_text();
        }
        let Self {
            signal: mut text,
            action,
            target,
            params_in_key,
        } = self;
        text.reserve(storage_key_rest_len(&action, &target, params_in_key));
        text.push(':');
        push_escaped(&mut text, &action);
        text.push(':');
        push_escaped(&mut text, &target);
        if params_in_key {
            text.push(':');
            push_hex_lower(&mut text, &Sha256::digest(body)[..8]);
        }
        text
    }
}

/// What a storage key holds after its signal: the separators, the escaped
/// action and target, and the params hash when params are in the key.
pub(crate) fn storage_key_rest_len(action: &str, target: &str, params_in_key: bool) -> usize {
    let escaped = |component: &str| {
        component.len() + 2 * component.bytes().filter(|&b| needs_escape(b)).count()
    };
    2 + escaped(action) + escaped(target) + if params_in_key { 17 } else { 0 }
}

/// A request whose key is present but malformed; the layer answers 400 with
/// this text as the problem `detail`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{detail}")]
pub struct KeyRejection {
    detail: String,
}

impl KeyRejection {
    /// A rejection explained by `detail`.
    pub fn new(detail: impl Into<String>) -> Self {
        Self {
            detail: detail.into(),
        }
    }

    /// What is wrong with the key.
    pub fn detail(&self) -> &str {
        &self.detail
    }
}

/// SHA-256 of what a request asked for. Two requests with the same key and
/// different fingerprints are a mismatch (HTTP 422), never a replay.
///
/// ```
/// use http::Method;
/// use tower_idempotency::Fingerprint;
///
/// let a = Fingerprint::of_request(&Method::POST, "/orders?x=1", b"{}");
/// let b = Fingerprint::of_request(&Method::POST, "/orders?x=2", b"{}");
/// assert_ne!(a, b);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// The SHA-256 of `bytes`.
    pub fn of_bytes(bytes: &[u8]) -> Self {
        Self(Sha256::digest(bytes).into())
    }

    /// The SHA-256 of a request's method, path and query, and body.
    pub fn of_request(method: &http::Method, path_and_query: &str, body: &[u8]) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(method.as_str().as_bytes());
        // NUL cannot appear in a method or a URI, so the parts cannot run together.
        hasher.update([0]);
        hasher.update(path_and_query.as_bytes());
        hasher.update([0]);
        hasher.update(body);
        Self(hasher.finalize().into())
    }

    /// A fingerprint from its 32 bytes, as read from a store.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The 32 bytes of the digest.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({})", hex_lower(&self.0[..8]))
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex_lower(&self.0))
    }
}

/// How the HTTP layer fingerprints a request body.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FingerprintMode {
    /// The body's exact bytes (the default).
    #[default]
    Exact,
    /// A JSON body canonicalised first (RFC 8785: sorted object keys, no
    /// insignificant whitespace), so `{"a":1,"b":2}` and `{ "b": 2, "a": 1 }`
    /// are the same request. A body that is not JSON is hashed as it is.
    JsonCanonical,
}

pub(crate) fn hex_lower(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    push_hex_lower(&mut out, bytes);
    out
}

fn push_hex_lower(out: &mut String, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(HEX[(b >> 4) as usize] as char);
        out.push(HEX[(b & 0xf) as usize] as char);
    }
}

#[cfg(test)]
mod tests;
