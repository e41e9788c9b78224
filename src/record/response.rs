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
use http::{HeaderMap, HeaderName, StatusCode};

use super::DecodeError;

mod fields;

use fields::Fields;
use fields::{
    check_fields, framed_len, put_fields, put_framed, put_varint, read_u16, read_varint, to_map,
    varint_len,
};

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

#[cfg(test)]
mod tests;
