//! [`StoredResponse`]: a response kept as one buffer.
//!
//! A memory store holds one of these per completed request for the record
//! TTL, so it is laid out for size: status, header fields, trailer fields and
//! body in one `Bytes`, with lengths as LEB128 varints, rather than a
//! `HeaderMap` (whose tables, entries and shared-buffer handles more than
//! doubled the heap a small response took). Fields are read back from the
//! buffer when the response is replayed; header values and the body are
//! slices of it, not copies.
//!
//! ```text
//! status u16 | flags u8 | field count varint | (name len varint, name, value len varint, value)*
//!            | trailer count varint | (name len varint, name, value len varint, value)* | body
//! ```
//!
//! `flags` bit 0: the body was not kept (it was larger than what is stored);
//! the body part is then empty. Other bits are reserved: a buffer with one
//! set was written by a newer build and is refused.
//!
//! The buffer is only ever built by [`StoredResponse`]'s constructors and
//! [`StoredHead`], or checked by [`StoredResponse::from_buffer`], so reading
//! it back cannot fail.

use std::fmt;

use bytes::Bytes;
use http::header::CONTENT_LENGTH;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

use super::DecodeError;

/// Fields that a header map always holds, whatever their names: far more
/// than any server sends (hyper reads 100).
const FEW_FIELDS: u64 = 16_384;

/// The flag of a response recorded without its body.
const BODY_OMITTED: u8 = 1;
/// The flags this build knows.
const KNOWN_FLAGS: u8 = BODY_OMITTED;
/// Where the header fields start: after the status and the flags.
const FIELDS_AT: usize = 3;

/// An HTTP response as it is stored and replayed: status, headers (hop-by-hop
/// headers and `Date` already removed), trailers and the whole body, in one
/// buffer; or, for a response larger than what is stored, everything but the
/// body ([`head_only`](Self::head_only)).
///
/// # Example
///
/// ```
/// use bytes::Bytes;
/// use http::{header, HeaderMap, HeaderValue, StatusCode};
/// use tower_idempotency::StoredResponse;
///
/// let mut headers = HeaderMap::new();
/// headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
/// let stored = StoredResponse::new(StatusCode::CREATED, &headers, b"{\"id\":1}");
/// assert_eq!(stored.status(), StatusCode::CREATED);
/// assert_eq!(stored.headers(), headers);
/// assert_eq!(stored.body(), Bytes::from_static(b"{\"id\":1}"));
/// assert!(stored.trailers().is_empty());
/// assert!(!stored.is_body_omitted());
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct StoredResponse {
    buffer: Bytes,
}

impl StoredResponse {
    /// A stored response of `status`, `headers` and `body`, copied into one
    /// buffer of exactly their size and framing.
    pub fn new(status: StatusCode, headers: &HeaderMap, body: &[u8]) -> Self {
        StoredHead::filtered(status, headers, |_| true, body.len()).finish(None, body)
    }

    /// A stored response of `status`, `headers`, `body` and the `trailers`
    /// that followed it (gRPC's `grpc-status`, say).
    ///
    /// ```
    /// use http::{HeaderMap, HeaderValue, StatusCode};
    /// use tower_idempotency::StoredResponse;
    ///
    /// let mut trailers = HeaderMap::new();
    /// trailers.insert("grpc-status", HeaderValue::from_static("0"));
    /// let stored = StoredResponse::with_trailers(StatusCode::OK, &HeaderMap::new(), b"msg", &trailers);
    /// assert_eq!(stored.trailers(), trailers);
    /// assert_eq!(stored.body(), "msg");
    /// ```
    pub fn with_trailers(
        status: StatusCode,
        headers: &HeaderMap,
        body: &[u8],
        trailers: &HeaderMap,
    ) -> Self {
        StoredHead::filtered(status, headers, |_| true, body.len()).finish(Some(trailers), body)
    }

    /// The record of a response whose body was too large to keep: its
    /// status, its headers less `Content-Length` (the replay's body is
    /// empty) and its trailers, marked [omitted](Self::is_body_omitted).
    ///
    /// ```
    /// use http::{header, HeaderMap, HeaderValue, StatusCode};
    /// use tower_idempotency::StoredResponse;
    ///
    /// let mut headers = HeaderMap::new();
    /// headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("2097152"));
    /// headers.insert(header::LOCATION, HeaderValue::from_static("/orders/7"));
    /// let stored = StoredResponse::head_only(StatusCode::CREATED, &headers, &HeaderMap::new());
    /// assert!(stored.is_body_omitted());
    /// assert!(stored.body().is_empty());
    /// assert_eq!(stored.headers().len(), 1, "Content-Length is not kept");
    /// ```
    pub fn head_only(status: StatusCode, headers: &HeaderMap, trailers: &HeaderMap) -> Self {
        StoredHead::filtered(status, headers, |_| true, 0).finish_omitted(Some(trailers))
    }

    /// A stored response from a buffer laid out as [`new`](Self::new) lays it
    /// out (as a record's encoding carries it), checked field by field.
    ///
    /// # Errors
    ///
    /// A [`DecodeError`] for a short buffer, an invalid status, unknown
    /// flags or an invalid header field.
    pub fn from_buffer(buffer: Bytes) -> Result<Self, DecodeError> {
        let mut rest = &buffer[..];
        let status = read_u16(&mut rest).ok_or(DecodeError::Truncated)?;
        StatusCode::from_u16(status).map_err(|_| DecodeError::InvalidStatus(status))?;
        let (&flags, tail) = rest.split_first().ok_or(DecodeError::Truncated)?;
        rest = tail;
        if flags & !KNOWN_FLAGS != 0 {
            return Err(DecodeError::UnknownFlags(flags));
        }
        check_fields(&mut rest)?;
        check_fields(&mut rest)?;
        if flags & BODY_OMITTED != 0 && !rest.is_empty() {
            return Err(DecodeError::TrailingBytes(rest.len()));
        }
        Ok(Self { buffer })
    }

    /// A stored response from a buffer in the layout of encoding version 2
    /// (no flags, no trailers), laid out anew.
    pub(crate) fn from_buffer_v2(buffer: &[u8]) -> Result<Self, DecodeError> {
        let mut rest = buffer;
        let status = read_u16(&mut rest).ok_or(DecodeError::Truncated)?;
        let fields_start = buffer.len() - rest.len();
        check_fields(&mut rest)?;
        let fields_end = buffer.len() - rest.len();
        let mut laid = Vec::with_capacity(buffer.len() + 2);
        laid.extend_from_slice(&status.to_be_bytes());
        laid.push(0);
        laid.extend_from_slice(&buffer[fields_start..fields_end]);
        put_varint(&mut laid, 0);
        laid.extend_from_slice(rest);
        Self::from_buffer(laid.into())
    }

    /// The buffer: what a record's encoding carries.
    pub(crate) fn buffer(&self) -> &Bytes {
        &self.buffer
    }

    /// The response status.
    pub fn status(&self) -> StatusCode {
        let code = u16::from_be_bytes([self.buffer[0], self.buffer[1]]);
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    /// Whether the body was left out because it was larger than what is
    /// stored: a replay then answers the status and headers with an empty
    /// body.
    pub fn is_body_omitted(&self) -> bool {
        self.buffer[2] & BODY_OMITTED != 0
    }

    /// How many header fields are stored.
    pub fn fields_len(&self) -> usize {
        let mut rest = &self.buffer[FIELDS_AT..];
        read_varint(&mut rest).map_or(0, |count| count as usize)
    }

    /// The stored header fields, in order, read from the buffer (values are
    /// slices of it, not copies).
    pub(crate) fn fields(&self) -> Fields<'_> {
        Fields::at(&self.buffer, FIELDS_AT)
    }

    /// The stored trailer fields, in order.
    pub(crate) fn trailer_fields(&self) -> Fields<'_> {
        let mut fields = self.fields();
        while fields.next_raw().is_some() {}
        Fields::at(&self.buffer, fields.offset)
    }

    /// The stored headers, as a map.
    pub fn headers(&self) -> HeaderMap {
        to_map(self.fields_len(), self.fields())
    }

    /// The stored trailers, as a map (empty when the response had none).
    pub fn trailers(&self) -> HeaderMap {
        let fields = self.trailer_fields();
        to_map(usize::try_from(fields.remaining).unwrap_or(64), fields)
    }

    /// The whole body: a slice of the buffer, not a copy (empty when it was
    /// [omitted](Self::is_body_omitted)).
    pub fn body(&self) -> Bytes {
        self.trailer_fields().rest_after_fields()
    }

    /// Bytes this response holds: body, header and trailer names and values
    /// (the buffer's framing, a few bytes, not counted).
    pub fn stored_size(&self) -> usize {
        let mut framing = FIELDS_AT;
        let mut fields = self.fields();
        framing += varint_len(fields.remaining);
        while let Some((name, value)) = fields.next_raw() {
            framing += varint_len(name.len() as u64) + varint_len(value.len() as u64);
        }
        let mut trailers = Fields::at(&self.buffer, fields.offset);
        framing += varint_len(trailers.remaining);
        while let Some((name, value)) = trailers.next_raw() {
            framing += varint_len(name.len() as u64) + varint_len(value.len() as u64);
        }
        self.buffer.len() - framing
    }
}

/// Checks a field count and its fields, leaving `rest` past them.
fn check_fields(rest: &mut &[u8]) -> Result<(), DecodeError> {
    let count = read_varint(rest).ok_or(DecodeError::Truncated)?;
    let too_many = || DecodeError::TooManyHeaders(usize::try_from(count).unwrap_or(usize::MAX));
    // A replay builds a header map of these fields, and a header map
    // holds 32,768 distinct names at most: past `FEW_FIELDS` fields, the
    // names are counted in a map of their own (as version 1 decoding
    // does). Many values of one name are fine.
    let mut names = (count > FEW_FIELDS).then(|| HeaderMap::<()>::with_capacity(64));
    for _ in 0..count {
        let name = read_framed(rest).ok_or(DecodeError::Truncated)?;
        let name = HeaderName::from_bytes(name).map_err(|_| DecodeError::InvalidHeader)?;
        let value = read_framed(rest).ok_or(DecodeError::Truncated)?;
        HeaderValue::from_bytes(value).map_err(|_| DecodeError::InvalidHeader)?;
        if let Some(names) = &mut names {
            names.try_append(name, ()).map_err(|_| too_many())?;
        }
    }
    Ok(())
}

fn to_map(len: usize, fields: Fields<'_>) -> HeaderMap {
    let mut map = HeaderMap::with_capacity(len.min(64));
    for (name, value) in fields {
        // Never fails: the fields came from a header map, or decoding
        // checked that one holds them.
        let _ = map.try_append(name, value);
    }
    map
}

impl fmt::Debug for StoredResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoredResponse")
            .field("status", &self.status())
            .field("headers", &self.headers())
            .field("trailers", &self.trailers())
            .field("body_omitted", &self.is_body_omitted())
            .field("body", &self.body())
            .finish()
    }
}

/// The status and header fields of a response whose body is still on its
/// way, laid out as the [`StoredResponse`] it becomes: what the layer keeps
/// of a first response while the response streams, instead of a copy of its
/// header map.
#[derive(Debug, Clone)]
pub(crate) struct StoredHead {
    buffer: Vec<u8>,
}

impl StoredHead {
    /// The head of a response of `status` with `headers`.
    #[cfg(test)]
    pub(crate) fn new(status: StatusCode, headers: &HeaderMap) -> Self {
        Self::filtered(status, headers, |_| true, 0)
    }

    /// The head of a response of `status` with the fields of `headers` that
    /// `keep` keeps, in a buffer with room for `room` bytes of body.
    pub(crate) fn filtered(
        status: StatusCode,
        headers: &HeaderMap,
        keep: impl Fn(&HeaderName) -> bool,
        room: usize,
    ) -> Self {
        let fields = || headers.iter().filter(|(name, _)| keep(name));
        let (count, fields_len) = fields().fold((0u64, 0), |(count, len), (name, value)| {
            let len = len + framed_len(name.as_str().len()) + framed_len(value.len());
            (count + 1, len)
        });
        // The trailer count of a response with none is one byte.
        let mut buffer = Vec::with_capacity(FIELDS_AT + varint_len(count) + fields_len + 1 + room);
        buffer.extend_from_slice(&status.as_u16().to_be_bytes());
        buffer.push(0);
        put_varint(&mut buffer, count);
        for (name, value) in fields() {
            put_framed(&mut buffer, name.as_str().as_bytes());
            put_framed(&mut buffer, value.as_bytes());
        }
        Self { buffer }
    }

    /// The stored response of this head, its `trailers` and `body`, in a
    /// buffer of exactly their size (kept for the record's TTL, so no
    /// slack).
    pub(crate) fn finish(mut self, trailers: Option<&HeaderMap>, body: &[u8]) -> StoredResponse {
        put_fields(&mut self.buffer, trailers);
        self.buffer.reserve_exact(body.len());
        self.buffer.extend_from_slice(body);
        // Room made for a body that came shorter than it said is given back.
        self.buffer.shrink_to_fit();
        StoredResponse {
            buffer: Bytes::from(self.buffer),
        }
    }

    /// The stored response of this head and its `trailers`, its body
    /// omitted: marked so, and without the `Content-Length` of the body it
    /// no longer holds.
    pub(crate) fn finish_omitted(self, trailers: Option<&HeaderMap>) -> StoredResponse {
        let head = Bytes::from(self.buffer);
        let fields = || Fields::at(&head, FIELDS_AT).filter(|(name, _)| name != CONTENT_LENGTH);
        let mut buffer = Vec::with_capacity(head.len() + 1);
        buffer.extend_from_slice(&head[..2]);
        buffer.push(BODY_OMITTED);
        put_varint(&mut buffer, fields().count() as u64);
        for (name, value) in fields() {
            put_framed(&mut buffer, name.as_str().as_bytes());
            put_framed(&mut buffer, value.as_bytes());
        }
        put_fields(&mut buffer, trailers);
        buffer.shrink_to_fit();
        StoredResponse {
            buffer: Bytes::from(buffer),
        }
    }
}

/// Appends a field count and the fields of `map` (none for `None`).
fn put_fields(buffer: &mut Vec<u8>, map: Option<&HeaderMap>) {
    let Some(map) = map else {
        put_varint(buffer, 0);
        return;
    };
    put_varint(buffer, map.len() as u64);
    for (name, value) in map {
        put_framed(buffer, name.as_str().as_bytes());
        put_framed(buffer, value.as_bytes());
    }
}

/// The header fields of a [`StoredResponse`], in the order they were stored.
#[derive(Debug, Clone)]
pub(crate) struct Fields<'a> {
    buffer: &'a Bytes,
    offset: usize,
    remaining: u64,
}

impl<'a> Fields<'a> {
    /// The fields whose count is at `offset` in `buffer`.
    fn at(buffer: &'a Bytes, offset: usize) -> Self {
        let mut rest = &buffer[offset..];
        let remaining = read_varint(&mut rest).unwrap_or(0);
        Fields {
            buffer,
            offset: buffer.len() - rest.len(),
            remaining,
        }
    }

    /// The trailer fields, once every header field has been read.
    pub(crate) fn trailers(&self) -> Fields<'a> {
        debug_assert_eq!(self.remaining, 0, "the trailers follow the last field");
        Fields::at(self.buffer, self.offset)
    }

    /// What follows the fields (after the trailers: the body), once every
    /// field has been read.
    pub(crate) fn rest(&self) -> Bytes {
        debug_assert_eq!(self.remaining, 0, "the body follows the last field");
        self.buffer.slice(self.offset..)
    }

    /// What follows these fields, reading past those not yet read.
    pub(crate) fn rest_after_fields(mut self) -> Bytes {
        while self.next_raw().is_some() {}
        self.rest()
    }

    /// The next field's name and value, as bytes.
    fn next_raw(&mut self) -> Option<(&[u8], std::ops::Range<usize>)> {
        if self.remaining == 0 {
            return None;
        }
        let mut rest = &self.buffer[self.offset..];
        let name = read_framed(&mut rest)?;
        let value_len = read_varint(&mut rest)? as usize;
        let start = self.buffer.len() - rest.len();
        let end = start
            .checked_add(value_len)
            .filter(|&end| end <= self.buffer.len())?;
        self.offset = end;
        self.remaining -= 1;
        Some((name, start..end))
    }
}

impl Iterator for Fields<'_> {
    type Item = (HeaderName, HeaderValue);

    fn next(&mut self) -> Option<Self::Item> {
        let buffer = self.buffer;
        let (name, value) = self.next_raw()?;
        // Checked when the buffer was built or decoded: these never fail.
        let name = HeaderName::from_bytes(name).ok()?;
        let value = HeaderValue::from_maybe_shared(buffer.slice(value)).ok()?;
        Some((name, value))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (0, usize::try_from(self.remaining).ok())
    }
}

fn varint_len(mut n: u64) -> usize {
    let mut len = 1;
    while n >= 0x80 {
        n >>= 7;
        len += 1;
    }
    len
}

fn framed_len(len: usize) -> usize {
    varint_len(len as u64) + len
}

fn put_varint(buffer: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        buffer.push((n as u8 & 0x7f) | 0x80);
        n >>= 7;
    }
    buffer.push(n as u8);
}

fn put_framed(buffer: &mut Vec<u8>, bytes: &[u8]) {
    put_varint(buffer, bytes.len() as u64);
    buffer.extend_from_slice(bytes);
}

fn read_u16(rest: &mut &[u8]) -> Option<u16> {
    let (head, tail) = rest.split_first_chunk::<2>()?;
    *rest = tail;
    Some(u16::from_be_bytes(*head))
}

/// Reads a LEB128 varint of at most ten bytes.
fn read_varint(rest: &mut &[u8]) -> Option<u64> {
    let mut n: u64 = 0;
    for (i, &byte) in rest.iter().enumerate().take(10) {
        n |= u64::from(byte & 0x7f) << (7 * i);
        if byte < 0x80 {
            *rest = &rest[i + 1..];
            return Some(n);
        }
    }
    None
}

fn read_framed<'a>(rest: &mut &'a [u8]) -> Option<&'a [u8]> {
    let len = usize::try_from(read_varint(rest)?).ok()?;
    if rest.len() < len {
        return None;
    }
    let (head, tail) = rest.split_at(len);
    *rest = tail;
    Some(head)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(body: &[u8]) -> (HeaderMap, StoredResponse) {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        headers.append("x-multi", HeaderValue::from_static("a"));
        headers.append("x-multi", HeaderValue::from_static("b"));
        headers.insert("x-long", HeaderValue::from_str(&"v".repeat(300)).unwrap());
        let stored = StoredResponse::new(StatusCode::ACCEPTED, &headers, body);
        (headers, stored)
    }

    #[test]
    fn reads_back_what_it_was_given() {
        for body in [&b""[..], b"{\"id\":1}", &[7u8; 70_000]] {
            let (headers, stored) = sample(body);
            assert_eq!(stored.status(), StatusCode::ACCEPTED);
            assert_eq!(stored.headers(), headers);
            assert_eq!(stored.fields_len(), 4);
            assert_eq!(stored.body(), body);
            let sizes: usize = headers
                .iter()
                .map(|(n, v)| n.as_str().len() + v.len())
                .sum();
            assert_eq!(stored.stored_size(), body.len() + sizes);
        }
    }

    #[test]
    fn a_head_finished_with_its_body_is_the_response() {
        for body in [&b""[..], b"{\"id\":1}", &[7u8; 70_000]] {
            let (headers, stored) = sample(body);
            let head = StoredHead::new(StatusCode::ACCEPTED, &headers);
            let finished = head.finish(None, body);
            assert_eq!(finished, stored);
            assert_eq!(finished.buffer().len(), stored.buffer().len());
        }
    }

    /// A response of `count` fields with empty values, named `h0`, `h1`...
    /// or all `h`.
    fn many_fields(count: usize, distinct: bool) -> Bytes {
        let mut buffer = vec![0, 200, 0];
        put_varint(&mut buffer, count as u64);
        for i in 0..count {
            let name = if distinct {
                format!("h{i}")
            } else {
                "h".to_owned()
            };
            put_framed(&mut buffer, name.as_bytes());
            put_framed(&mut buffer, b"");
        }
        put_varint(&mut buffer, 0);
        buffer.into()
    }

    #[test]
    fn more_names_than_a_header_map_holds_are_an_error() {
        assert_eq!(
            StoredResponse::from_buffer(many_fields(40_000, true)),
            Err(DecodeError::TooManyHeaders(40_000))
        );
        // Many values of one name are fine, and read back whole.
        let one_name = StoredResponse::from_buffer(many_fields(40_000, false)).unwrap();
        assert_eq!(one_name.headers().len(), 40_000);
        let distinct = StoredResponse::from_buffer(many_fields(20_000, true)).unwrap();
        assert_eq!(distinct.headers().len(), 20_000);
    }

    #[test]
    fn a_checked_buffer_is_the_same_response() {
        let (_, stored) = sample(b"body");
        let again = StoredResponse::from_buffer(stored.buffer().clone()).unwrap();
        assert_eq!(again, stored);
    }

    #[test]
    fn a_bad_buffer_is_a_typed_error() {
        let (_, stored) = sample(b"");
        let buffer = stored.buffer();
        // Every cut inside the fields is short; a cut after them is a
        // shorter body, which is a valid response.
        let fields_end = buffer.len();
        for len in 0..fields_end {
            assert!(
                StoredResponse::from_buffer(buffer.slice(..len)).is_err(),
                "prefix of {len} bytes"
            );
        }
        let mut bad_status = buffer.to_vec();
        bad_status[..2].copy_from_slice(&1000u16.to_be_bytes());
        assert_eq!(
            StoredResponse::from_buffer(bad_status.into()),
            Err(DecodeError::InvalidStatus(1000))
        );
        let mut bad_name = buffer.to_vec();
        // The first name starts after the status, the flags, the count and
        // its length.
        bad_name[5] = b' ';
        assert_eq!(
            StoredResponse::from_buffer(bad_name.into()),
            Err(DecodeError::InvalidHeader)
        );
    }

    #[test]
    fn trailers_and_an_omitted_body_read_back() {
        let (headers, _) = sample(b"");
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("9"));
        trailers.append("x-t", HeaderValue::from_static("1"));
        trailers.append("x-t", HeaderValue::from_static("2"));
        let full = StoredResponse::with_trailers(StatusCode::OK, &headers, b"body", &trailers);
        assert_eq!(full.headers(), headers);
        assert_eq!(full.trailers(), trailers);
        assert_eq!(full.body(), "body");
        assert!(!full.is_body_omitted());
        assert_eq!(
            StoredResponse::from_buffer(full.buffer().clone()),
            Ok(full.clone())
        );
        let sizes: usize = headers
            .iter()
            .chain(trailers.iter())
            .map(|(n, v)| n.as_str().len() + v.len())
            .sum();
        assert_eq!(full.stored_size(), 4 + sizes);

        let mut with_length = headers.clone();
        with_length.insert(CONTENT_LENGTH, HeaderValue::from_static("2097152"));
        let omitted = StoredResponse::head_only(StatusCode::CREATED, &with_length, &trailers);
        assert!(omitted.is_body_omitted());
        assert_eq!(omitted.headers(), headers, "Content-Length is dropped");
        assert_eq!(omitted.trailers(), trailers);
        assert!(omitted.body().is_empty());
        assert_eq!(
            StoredResponse::from_buffer(omitted.buffer().clone()),
            Ok(omitted.clone())
        );
    }

    #[test]
    fn unknown_flags_and_a_body_after_an_omitted_one_are_refused() {
        let (_, stored) = sample(b"");
        let mut newer = stored.buffer().to_vec();
        newer[2] = 0b10;
        assert_eq!(
            StoredResponse::from_buffer(newer.into()),
            Err(DecodeError::UnknownFlags(0b10))
        );
        let mut bodied = stored.buffer().to_vec();
        bodied[2] = BODY_OMITTED;
        bodied.push(b'x');
        assert_eq!(
            StoredResponse::from_buffer(bodied.into()),
            Err(DecodeError::TrailingBytes(1))
        );
    }
}
