//! What is stored of a response, and how it is replayed.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::Response;

use super::layer::Settings;
use crate::record::StoredResponse;

/// The header that marks a replayed response.
pub(crate) const REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

pub(crate) fn storable(head: &http::response::Parts, settings: &Settings) -> bool {
    (settings.store_status)(head.status) && !no_store(&head.headers)
}

/// Whether `Cache-Control` carries the `no-store` directive.
fn no_store(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|directive| directive.trim().eq_ignore_ascii_case("no-store"))
}

const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// The headers a replay may carry: no hop-by-hop headers (those named by
/// `Connection` included), no `Date` (the server writes a fresh one), no
/// `Set-Cookie` unless asked, and no stale replay mark; with `room` for as
/// many more fields.
pub(crate) fn stored_headers(headers: &HeaderMap, settings: &Settings, room: usize) -> HeaderMap {
    let listed: Vec<HeaderName> = headers
        .iter()
        .filter(|(name, _)| *name == header::CONNECTION)
        .filter_map(|(_, v)| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    let mut kept = HeaderMap::with_capacity(headers.len() + room);
    for (name, value) in headers {
        let dropped = HOP_BY_HOP.contains(name)
            || listed.contains(name)
            || name == header::DATE
            || name == REPLAYED
            || (name == header::SET_COOKIE && !settings.replay_set_cookie);
        if !dropped {
            kept.append(name.clone(), value.clone());
        }
    }
    kept
}

pub(crate) fn replay(stored: &StoredResponse, settings: &Settings) -> Response<Bytes> {
    let mut response = Response::new(stored.body.clone());
    *response.status_mut() = stored.status;
    // Filter again: the record may come from another writer or configuration.
    // With room for the replay mark, so adding it never grows the map.
    *response.headers_mut() = stored_headers(&stored.headers, settings, 1);
    response
        .headers_mut()
        .insert(REPLAYED, HeaderValue::from_static("true"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_store_directive() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("private, No-Store"),
        );
        assert!(no_store(&headers));
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        assert!(!no_store(&headers));
    }
}
