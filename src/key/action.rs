//! [`ActionKey`]: a key built from what the request is about rather than from
//! an `Idempotency-Key` header.

use std::fmt;
use std::sync::Arc;

use http::request::Parts;

use super::{KeyExtractor, KeyParts, KeyRejection};

/// The longest component an [`ActionKey`] accepts, in bytes: the same bound as
/// an `Idempotency-Key` header, so a storage key stays small.
pub const MAX_COMPONENT_LEN: usize = 255;

type Component = Arc<dyn Fn(&Parts) -> Option<String> + Send + Sync>;

/// A [`KeyExtractor`] that takes the signal, the action and the target of the
/// key each from the request head, with a closure
/// (`Fn(&http::request::Parts) -> Option<String>`) per component. Ready-made
/// closures: [`from_header`], [`from_path_segment`], [`from_query`] and
/// [`fixed`].
///
/// The storage key is `signal:action:target:paramsHash`, where paramsHash is
/// the hash of the request body; with
/// [`include_params_in_key(false)`](ActionKey::include_params_in_key) it is
/// `signal:action:target` and a retry with another body is a mismatch (422).
///
/// # Missing components
///
/// * No signal (the closure answered `None` or an empty string): the request
///   has **no key**. The layer passes it through, or answers 400 under
///   `require_key(true)`. The signal is what makes a request a retry of an
///   earlier one; action and target are often [`fixed`], so they cannot be
///   what decides.
/// * A signal but no action or no target: **400**, the request claims to be
///   idempotent but cannot be told apart from other actions.
/// * A component over [`MAX_COMPONENT_LEN`] bytes: **400**.
///
/// # Example
///
/// ```
/// use tower_idempotency::extract::{fixed, from_header, from_path_segment, ActionKey, KeyExtractor};
///
/// // POST /boards/{board}/cards with an `X-Signal-Id` header.
/// let extractor = ActionKey::new(
///     from_header("x-signal-id"),
///     fixed("create_task"),
///     from_path_segment(1),
/// );
///
/// let (parts, _body) = http::Request::post("/boards/b-42/cards")
///     .header("x-signal-id", "signal-123")
///     .body(())
///     .unwrap()
///     .into_parts();
/// let key = extractor.extract(&parts).unwrap().unwrap();
/// assert_eq!(
///     (key.signal.as_str(), key.action.as_str(), key.target.as_str()),
///     ("signal-123", "create_task", "b-42"),
/// );
/// assert!(key.params_in_key);
///
/// // No signal: no key, the request is not protected.
/// let (parts, _body) = http::Request::post("/boards/b-42/cards").body(()).unwrap().into_parts();
/// assert_eq!(extractor.extract(&parts), Ok(None));
/// ```
#[derive(Clone)]
pub struct ActionKey {
    signal: Component,
    action: Component,
    target: Component,
    params_in_key: bool,
}

impl fmt::Debug for ActionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ActionKey")
            .field("params_in_key", &self.params_in_key)
            .finish_non_exhaustive()
    }
}

impl ActionKey {
    /// An extractor taking each component with its closure. Params are in
    /// the key.
    pub fn new<Sig, Act, Tgt>(signal: Sig, action: Act, target: Tgt) -> Self
    where
        Sig: Fn(&Parts) -> Option<String> + Send + Sync + 'static,
        Act: Fn(&Parts) -> Option<String> + Send + Sync + 'static,
        Tgt: Fn(&Parts) -> Option<String> + Send + Sync + 'static,
    {
        Self {
            signal: Arc::new(signal),
            action: Arc::new(action),
            target: Arc::new(target),
            params_in_key: true,
        }
    }

    /// Whether the params hash of the body is part of the key (default
    /// `true`: another body is another action). With `false` the key is
    /// `signal:action:target` and a retry with another body is a mismatch.
    pub fn include_params_in_key(mut self, include: bool) -> Self {
        self.params_in_key = include;
        self
    }
}

impl KeyExtractor for ActionKey {
    fn extract(&self, parts: &Parts) -> Result<Option<KeyParts>, KeyRejection> {
        let Some(signal) = component(&self.signal, parts, "signal")? else {
            return Ok(None);
        };
        let action = component(&self.action, parts, "action")?
            .ok_or_else(|| KeyRejection::new("the request has a signal but no action"))?;
        let target = component(&self.target, parts, "target")?
            .ok_or_else(|| KeyRejection::new("the request has a signal but no target"))?;
        Ok(Some(KeyParts {
            signal,
            action,
            target,
            params_in_key: self.params_in_key,
        }))
    }
}

fn component(
    extract: &Component,
    parts: &Parts,
    name: &str,
) -> Result<Option<String>, KeyRejection> {
    match extract(parts) {
        Some(value) if value.len() > MAX_COMPONENT_LEN => Err(KeyRejection::new(format!(
            "the {name} of the key is longer than {MAX_COMPONENT_LEN} bytes"
        ))),
        Some(value) if !value.is_empty() => Ok(Some(value)),
        _ => Ok(None),
    }
}

/// A component taken from the header `name` (its first value). A header whose
/// value is not visible ASCII counts as missing.
///
/// ```
/// use tower_idempotency::extract::from_header;
///
/// let (parts, _) = http::Request::get("/").header("x-signal", "s-1").body(()).unwrap().into_parts();
/// assert_eq!(from_header("x-signal")(&parts), Some("s-1".to_owned()));
/// assert_eq!(from_header("x-other")(&parts), None);
/// ```
pub fn from_header(
    name: impl Into<String>,
) -> impl Fn(&Parts) -> Option<String> + Clone + Send + Sync + 'static {
    let name = name.into();
    move |parts: &Parts| {
        let value = parts.headers.get(name.as_str())?.to_str().ok()?;
        Some(value.trim().to_owned())
    }
}

/// A component taken from path segment `index` (0 is the first segment after
/// the leading `/`), as it appears in the URI (still percent-encoded, so
/// `a%2Fb` and `a/b` stay apart).
///
/// ```
/// use tower_idempotency::extract::from_path_segment;
///
/// let (parts, _) = http::Request::post("/hooks/trello/123").body(()).unwrap().into_parts();
/// assert_eq!(from_path_segment(1)(&parts), Some("trello".to_owned()));
/// assert_eq!(from_path_segment(3)(&parts), None);
/// ```
pub fn from_path_segment(
    index: usize,
) -> impl Fn(&Parts) -> Option<String> + Clone + Send + Sync + 'static {
    move |parts: &Parts| {
        let path = parts.uri.path();
        let segment = path
            .strip_prefix('/')
            .unwrap_or(path)
            .split('/')
            .nth(index)?;
        Some(segment.to_owned())
    }
}

/// A component taken from the query parameter `param` (its first
/// occurrence), percent- and `+`-decoded.
///
/// ```
/// use tower_idempotency::extract::from_query;
///
/// let (parts, _) = http::Request::post("/send?to=team%20a&signal=s-1").body(()).unwrap().into_parts();
/// assert_eq!(from_query("to")(&parts), Some("team a".to_owned()));
/// assert_eq!(from_query("missing")(&parts), None);
/// ```
pub fn from_query(
    param: impl Into<String>,
) -> impl Fn(&Parts) -> Option<String> + Clone + Send + Sync + 'static {
    let param = param.into();
    move |parts: &Parts| {
        let query = parts.uri.query()?;
        form_urlencoded::parse(query.as_bytes())
            .find(|(name, _)| *name == param)
            .map(|(_, value)| value.into_owned())
    }
}

/// A component that is always `value` (typically the action's name).
///
/// ```
/// use tower_idempotency::extract::fixed;
///
/// let (parts, _) = http::Request::post("/").body(()).unwrap().into_parts();
/// assert_eq!(fixed("send_notification")(&parts), Some("send_notification".to_owned()));
/// ```
pub fn fixed(
    value: impl Into<String>,
) -> impl Fn(&Parts) -> Option<String> + Clone + Send + Sync + 'static {
    let value = value.into();
    move |_: &Parts| Some(value.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(uri: &str, headers: &[(&str, &[u8])]) -> Parts {
        let mut request = http::Request::post(uri);
        for (name, value) in headers {
            request = request.header(*name, http::HeaderValue::from_bytes(value).unwrap());
        }
        request.body(()).unwrap().into_parts().0
    }

    fn extractor() -> ActionKey {
        ActionKey::new(
            from_header("x-signal"),
            from_query("action"),
            from_path_segment(1),
        )
    }

    #[test]
    fn takes_each_component_from_its_place() {
        let parts = parts(
            "/drive/folder-9/upload?action=upload_file&x=1",
            &[("x-signal", b"sig-7")],
        );
        let key = extractor().extract(&parts).unwrap().unwrap();
        assert_eq!(
            key,
            KeyParts {
                signal: "sig-7".into(),
                action: "upload_file".into(),
                target: "folder-9".into(),
                params_in_key: true,
            }
        );
        assert_eq!(
            key.into_key(b"body").to_string(),
            format!(
                "sig-7:upload_file:folder-9:{}",
                crate::key::params_hash(b"body")
            )
        );
    }

    #[test]
    fn params_can_stay_out_of_the_key() {
        let parts = parts("/drive/f/up?action=a", &[("x-signal", b"s")]);
        let key = extractor()
            .include_params_in_key(false)
            .extract(&parts)
            .unwrap()
            .unwrap();
        assert!(!key.params_in_key);
        assert_eq!(key.into_key(b"body").to_string(), "s:a:f");
    }

    #[test]
    fn no_signal_is_no_key() {
        let parts = parts("/drive/f/up?action=a", &[]);
        assert_eq!(extractor().extract(&parts), Ok(None));
        let parts = parts_with_empty_signal();
        assert_eq!(extractor().extract(&parts), Ok(None));
    }

    fn parts_with_empty_signal() -> Parts {
        parts("/drive/f/up?action=a", &[("x-signal", b"")])
    }

    #[test]
    fn signal_without_action_or_target_is_rejected() {
        let no_action = parts("/drive/f/up", &[("x-signal", b"s")]);
        let rejection = extractor().extract(&no_action).unwrap_err();
        assert!(rejection.detail().contains("no action"), "{rejection}");

        let no_target = parts("/drive?action=a", &[("x-signal", b"s")]);
        let rejection = extractor().extract(&no_target).unwrap_err();
        assert!(rejection.detail().contains("no target"), "{rejection}");
    }

    #[test]
    fn overlong_component_is_rejected() {
        let long = "s".repeat(MAX_COMPONENT_LEN + 1);
        let parts = parts("/drive/f/up?action=a", &[("x-signal", long.as_bytes())]);
        assert!(extractor().extract(&parts).is_err());
    }

    #[test]
    fn non_ascii_header_counts_as_missing() {
        let parts = parts("/drive/f/up?action=a", &[("x-signal", b"caf\xe9")]);
        assert_eq!(extractor().extract(&parts), Ok(None));
    }

    #[test]
    fn components_with_separators_survive_the_key_text() {
        let parts = parts("/drive/a%3Ab/up?action=x%3Ay%25", &[("x-signal", b"s:1")]);
        let key = extractor().extract(&parts).unwrap().unwrap().into_key(b"");
        let parsed = crate::IdempotencyKey::parse(&key.to_string()).unwrap();
        assert_eq!(parsed.signal(), "s:1");
        assert_eq!(parsed.action(), "x:y%");
        assert_eq!(parsed.target(), "a%3Ab");
    }

    #[test]
    fn closures_work_as_components() {
        let extractor = ActionKey::new(
            |parts: &Parts| Some(format!("{}-sig", parts.method)),
            fixed("act"),
            fixed("tgt"),
        );
        let key = extractor.extract(&parts("/", &[])).unwrap().unwrap();
        assert_eq!(key.signal, "POST-sig");
    }
}
