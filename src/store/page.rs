//! Listing a store a page at a time, and the admin's conditional delete:
//! what [`StoreAdmin::page`](super::StoreAdmin::page) and
//! [`StoreAdmin::remove_unless_in_flight`](super::StoreAdmin::remove_unless_in_flight)
//! take and answer.

use std::time::Duration;

use super::ScanEntry;
use crate::key::IdempotencyKey;

/// The most keys one page may hold.
pub const MAX_PAGE_LIMIT: usize = 1_000;

/// Which keys a listing answers. Components match the parts of an
/// [`IdempotencyKey`]; a key that is not in that form matches only a filter
/// on nothing but expiry.
///
/// ```
/// use std::time::Duration;
/// use tower_idempotency::KeyFilter;
///
/// let filter = KeyFilter::new().action("create_task").expiring_within(Duration::from_secs(60));
/// # drop(filter);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyFilter {
    signal: Option<String>,
    action: Option<String>,
    target: Option<String>,
    expiring_within: Option<Duration>,
}

impl KeyFilter {
    /// A filter that matches every key.
    pub fn new() -> Self {
        Self::default()
    }

    /// Only keys with this signal.
    pub fn signal(mut self, signal: impl Into<String>) -> Self {
        self.signal = Some(signal.into());
        self
    }

    /// Only keys with this action.
    pub fn action(mut self, action: impl Into<String>) -> Self {
        self.action = Some(action.into());
        self
    }

    /// Only keys with this target.
    pub fn target(mut self, target: impl Into<String>) -> Self {
        self.target = Some(target.into());
        self
    }

    /// Only keys that expire within `within`.
    pub fn expiring_within(mut self, within: Duration) -> Self {
        self.expiring_within = Some(within);
        self
    }

    /// Whether `entry` passes the filter.
    pub fn matches(&self, entry: &ScanEntry) -> bool {
        if self
            .expiring_within
            .is_some_and(|within| entry.expires_in > within)
        {
            return false;
        }
        self.matches_key(&entry.key)
    }

    /// Whether the key text passes the component filters (expiry aside).
    pub(crate) fn matches_key(&self, key: &str) -> bool {
        if !self.filters_components() {
            return true;
        }
        let Ok(key) = IdempotencyKey::parse(key) else {
            return false;
        };
        let component = |wanted: &Option<String>, actual: &str| {
            wanted.as_deref().is_none_or(|wanted| wanted == actual)
        };
        component(&self.signal, key.signal())
            && component(&self.action, key.action())
            && component(&self.target, key.target())
    }

    fn filters_components(&self) -> bool {
        self.signal.is_some() || self.action.is_some() || self.target.is_some()
    }

    /// The key texts that can match, as a glob: each wanted component
    /// escaped as the key's text form escapes it and passed through
    /// `literal` (the backend's own escaping of its wildcards), `any` for the
    /// others and for the optional params hash. `None` when the filter names
    /// no component (every key can match). Components of a key's text form
    /// hold no raw `:`, so the pattern lets through few keys that the exact
    /// [`matches`](Self::matches), applied after it, then drops.
    #[cfg(any(feature = "redis", feature = "postgres"))]
    pub(crate) fn pattern(&self, any: &str, literal: impl Fn(&str) -> String) -> Option<String> {
        if !self.filters_components() {
            return None;
        }
        let part = |wanted: &Option<String>| match wanted {
            Some(wanted) => literal(&crate::key::escaped(wanted)),
            None => any.to_owned(),
        };
        Some(format!(
            "{}:{}:{}{any}",
            part(&self.signal),
            part(&self.action),
            part(&self.target)
        ))
    }
}

/// One page of keys: at most the limit asked for (a page may hold fewer,
/// even none, and still have a next one), and where the next page starts.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct KeyPage {
    /// The entries of this page, without their payload.
    pub keys: Vec<ScanEntry>,
    /// The opaque cursor of the next page; `None` once the listing is done.
    pub next_cursor: Option<String>,
}

/// What [`StoreAdmin::remove_unless_in_flight`](super::StoreAdmin::remove_unless_in_flight)
/// did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Removal {
    /// The key held a completed record, and it is deleted.
    Removed,
    /// The key holds an in-flight marker, left in place: deleting it would
    /// let a duplicate run while the first is still running.
    InFlight,
    /// The key held nothing (or only an expired entry).
    Absent,
}

/// A cursor the store did not write, or that no longer fits it.
pub(crate) fn bad_cursor() -> super::StoreError {
    super::StoreError::InvalidCursor
}

/// `bytes` as a cursor: lowercase hex, safe in a URL as it is.
pub(crate) fn encode_cursor(bytes: &[u8]) -> String {
    crate::key::hex_lower(bytes)
}

/// The bytes of a cursor written by [`encode_cursor`].
pub(crate) fn decode_cursor(cursor: &str) -> Result<Vec<u8>, super::StoreError> {
    if !cursor.len().is_multiple_of(2) {
        return Err(bad_cursor());
    }
    (0..cursor.len())
        .step_by(2)
        .map(|at| {
            cursor
                .get(at..at + 2)
                .and_then(|pair| u8::from_str_radix(pair, 16).ok())
                .ok_or_else(bad_cursor)
        })
        .collect()
}

/// A page out of a full listing, for a store with no cheaper way: entries
/// in key order, the cursor the last key of the page. O(n) in the entries
/// (and their memory), on every page: the default of
/// [`StoreAdmin::page`](super::StoreAdmin::page) for stores that do not
/// override it.
pub(crate) fn page_of(
    mut entries: Vec<ScanEntry>,
    filter: &KeyFilter,
    cursor: Option<&str>,
    limit: usize,
) -> Result<KeyPage, super::StoreError> {
    let after = cursor.map(decode_cursor).transpose()?;
    entries.retain(|entry| {
        filter.matches(entry)
            && after
                .as_deref()
                .is_none_or(|after| entry.key.as_bytes() > after)
    });
    entries.sort_unstable_by(|a, b| a.key.cmp(&b.key));
    let more = entries.len() > limit;
    entries.truncate(limit);
    let next_cursor = more
        .then(|| {
            entries
                .last()
                .map(|last| encode_cursor(last.key.as_bytes()))
        })
        .flatten();
    Ok(KeyPage {
        keys: entries,
        next_cursor,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_bad_ones_are_refused() {
        let bytes = b"\x00\xffa:b%3Ac".to_vec();
        assert_eq!(decode_cursor(&encode_cursor(&bytes)).unwrap(), bytes);
        for bad in ["a", "zz", "0g", "é1"] {
            assert!(decode_cursor(bad).is_err(), "{bad}");
        }
    }

    #[test]
    #[cfg(any(feature = "redis", feature = "postgres"))]
    fn patterns_escape_components_and_leave_the_rest_open() {
        let star = |text: &str| text.replace('*', "\\*");
        assert_eq!(KeyFilter::new().pattern("*", star), None);
        assert_eq!(
            KeyFilter::new().action("a:b*").pattern("*", star).unwrap(),
            "*:a%3Ab\\*:**"
        );
    }
}
