//! What is stored of a response, and how it is replayed.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::Response;

use super::body::ReplayTrailers;
use super::grpc;
use super::layer::{Settings, REPLAYED};
use crate::record::{StoredHead, StoredResponse};

/// The header that marks the replay of a response recorded without its body
/// (it was larger than what is stored): `Idempotency-Replay: omitted`.
pub(crate) const REPLAY_KIND: HeaderName = HeaderName::from_static("idempotency-replay");

/// Whether a response with this head may be stored. A gRPC answer is
/// judged by its `grpc-status` when the head carries it (Trailers-Only);
/// otherwise by its trailers, at the end of its stream.
pub(crate) fn storable(head: &http::response::Parts, settings: &Settings) -> bool {
    let by_status = match grpc::status_in(&head.headers).filter(|_| grpc::is_grpc(&head.headers)) {
        Some(Some(code)) => (settings.grpc_store_status)(code),
        Some(None) => false,
        None => (settings.store_status)(head.status),
    };
    by_status && !no_store(&head.headers)
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

/// Whether a replay may carry a field named `name`: no hop-by-hop field
/// (those `listed` by `Connection` included), no `Date` (the server writes a
/// fresh one), no `Set-Cookie` unless asked, and no stale replay mark.
fn replayable(name: &HeaderName, listed: &[HeaderName], settings: &Settings) -> bool {
    !(HOP_BY_HOP.contains(name)
        || listed.contains(name)
        || name == header::DATE
        || name == REPLAYED
        || name == settings.replay_header
        || name == REPLAY_KIND
        || (name == header::SET_COOKIE && !settings.replay_set_cookie))
}

/// The field names a `Connection` field lists (hop-by-hop by that listing).
fn connection_listed<'a>(values: impl Iterator<Item = &'a HeaderValue>) -> Vec<HeaderName> {
    values
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect()
}

/// What is stored of a response's head: its status and the fields a replay
/// may carry (see [`replayable`]).
pub(crate) fn stored_head(
    head: &http::response::Parts,
    settings: &Settings,
    room: usize,
) -> StoredHead {
    let listed = connection_listed(head.headers.get_all(header::CONNECTION).iter());
    let keep = |name: &HeaderName| replayable(name, &listed, settings);
    StoredHead::filtered(head.status, &head.headers, keep, room)
}

/// The replay of a stored response: its status, its fields as read from the
/// record (values are slices of it, not copies) and its body, marked replayed.
pub(crate) fn replay(stored: &StoredResponse, settings: &Settings) -> Response<Bytes> {
    // With room for the replay mark, so adding it never grows the map (up
    // to a size any response has: past it the map grows as fields come).
    let mut headers = HeaderMap::with_capacity(stored.fields_len().min(64) + 1);
    let mut fields = stored.fields();
    let mut connection = false;
    // Filter again: the record may come from another writer or configuration.
    for (name, value) in fields.by_ref() {
        connection |= name == header::CONNECTION;
        if replayable(&name, &[], settings) {
            // Never fails: a stored response holds at most as many fields as
            // a header map (decoding refuses more).
            let _ = headers.try_append(name, value);
        }
    }
    if connection {
        // Only a record stored by another writer holds one: drop what it lists.
        let values: Vec<HeaderValue> = stored
            .fields()
            .filter(|(name, _)| name == header::CONNECTION)
            .map(|(_, value)| value)
            .collect();
        for name in &connection_listed(values.iter()) {
            headers.remove(name);
        }
    }
    // Fails only for a response of 32,768 distinct names, which a header
    // map holds without room for one more: it goes unmarked.
    let _ = headers.try_insert(
        settings.replay_header.clone(),
        HeaderValue::from_static("true"),
    );
    if stored.is_body_omitted() {
        // The body the first client got is not kept: say so, and say that
        // this empty one is all there is.
        headers.remove(header::CONTENT_LENGTH);
        let _ = headers.try_insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
        let _ = headers.try_insert(REPLAY_KIND, HeaderValue::from_static("omitted"));
    }
    let mut trailer_fields = fields.trailers();
    let trailers = (trailer_fields.size_hint().1 != Some(0)).then(|| {
        let mut trailers = HeaderMap::new();
        for (name, value) in trailer_fields.by_ref() {
            let _ = trailers.try_append(name, value);
        }
        if stored.is_body_omitted() {
            grpc::say_response_not_kept(&mut trailers);
        }
        trailers
    });
    let mut response = Response::new(trailer_fields.rest_after_fields());
    *response.status_mut() = stored.status();
    *response.headers_mut() = headers;
    if let Some(trailers) = trailers {
        response.extensions_mut().insert(ReplayTrailers(trailers));
    }
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

    /// A record written by another writer may hold what a replay must not
    /// carry; the replay filters it out and marks itself.
    #[test]
    fn replay_filters_a_foreign_record() {
        let settings = super::super::layer::Settings::default();
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        headers.insert(header::CONNECTION, HeaderValue::from_static("x-hop, close"));
        headers.insert("x-hop", HeaderValue::from_static("1"));
        headers.insert(header::DATE, HeaderValue::from_static("yesterday"));
        headers.insert(header::SET_COOKIE, HeaderValue::from_static("a=b"));
        headers.insert(REPLAYED, HeaderValue::from_static("false"));
        headers.append("x-kept", HeaderValue::from_static("1"));
        headers.append("x-kept", HeaderValue::from_static("2"));
        let stored = StoredResponse::new(http::StatusCode::CREATED, &headers, b"done");
        let replayed = replay(&stored, &settings);
        assert_eq!(replayed.status(), http::StatusCode::CREATED);
        assert_eq!(replayed.body(), "done");
        let names: Vec<_> = replayed.headers().keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["content-type", "x-kept", "idempotent-replayed"]);
        let kept: Vec<_> = replayed.headers().get_all("x-kept").iter().collect();
        assert_eq!(kept, ["1", "2"]);
        assert_eq!(replayed.headers()[REPLAYED], "true");
    }
}
