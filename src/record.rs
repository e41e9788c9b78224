//! What a completed action leaves behind, and its versioned binary encoding.
//!
//! A [`Record`] is the result that every retry of a key is handed: a stored
//! HTTP response for the layer, or an encoded value for the closure API. The
//! embedded store keeps records as they are (behind an `Arc`); stores that
//! cross a process boundary use [`Record::encode`] and [`Record::decode`].
//!
//! # Encoding, version 3 (written)
//!
//! ```text
//! magic "TIR" | version u8 = 3 | kind u8 (1 response, 2 value)
//! fingerprint [u8; 32] | created_at_ms u64
//! kind 1: buffer len u64, the stored response's buffer (see StoredResponse):
//!         status u16 | flags u8 | field count varint | (name len varint, name, value len varint, value)*
//!                    | trailer count varint | (name len varint, name, value len varint, value)* | body
//! kind 2: value len u64, value
//! ```
//!
//! `flags` bit 0 marks a response recorded without its body (it was larger
//! than what is stored); other bits are reserved, and a record with one set
//! is refused as written by a newer build.
//!
//! # Versions 2 and 1 (still read)
//!
//! Version 2 is version 3 without the flags and the trailers (a response's
//! buffer is `status | field count | fields | body`). Version 1 has the same
//! header, then for kind 1: status u16 | header count u32 | (name len u16,
//! name, value len u32, value)* | body len u64, body; kind 2 as in version 3.
//!
//! # Rolling deploys
//!
//! A build reads its own version and every earlier one, never a later one:
//! a record it cannot read is a typed [`DecodeError`], which the layer
//! answers with 500 (whatever the fail mode), never by running the action
//! again. So when instances of two builds share a store, the older one
//! answers 500 to a retry of a key the newer one recorded, until it too is
//! upgraded. To avoid even that, ship the reader before the writer: deploy
//! a build that reads version 3 everywhere first (this one), then the one
//! that writes it. (This build does both; an older build of this crate reads
//! versions 1 and 2 only.)
//!
//! Fixed-size integers are big-endian; varints are LEB128. Decoding never
//! panics: a short, foreign or newer value is a [`DecodeError`].

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

use crate::key::Fingerprint;

mod response;

pub(crate) use response::StoredHead;
pub use response::StoredResponse;

const MAGIC: &[u8; 3] = b"TIR";
/// The encoding version this crate writes. It reads this one and every
/// earlier one.
pub(crate) const ENCODING_VERSION: u8 = 3;
/// The version whose responses carry no flags and no trailers.
const VERSION_2: u8 = 2;
/// The first version, whose responses carry fixed-size lengths.
const VERSION_1: u8 = 1;
const KIND_RESPONSE: u8 = 1;
const KIND_VALUE: u8 = 2;

/// The stored result of one completed action.
///
/// # Example
///
/// ```
/// use bytes::Bytes;
/// use tower_idempotency::{Fingerprint, Record};
///
/// let record = Record::value(Fingerprint::of_bytes(b"params"), Bytes::from_static(b"42"));
/// let decoded = Record::decode(&record.encode()).unwrap();
/// assert_eq!(decoded, record);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Fingerprint of the request that produced the result; a retry with
    /// another fingerprint is a mismatch, not a replay.
    pub fingerprint: Fingerprint,
    /// When the result was recorded, in milliseconds since the Unix epoch.
    pub created_at_ms: u64,
    /// The result itself.
    pub payload: Payload,
}

/// The result kept in a [`Record`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// An HTTP response, kept by the layer.
    Response(StoredResponse),
    /// An encoded value, kept by the closure API.
    Value(Bytes),
}

impl Record {
    /// A record of an HTTP response, stamped now.
    pub fn response(fingerprint: Fingerprint, response: StoredResponse) -> Self {
        Self {
            fingerprint,
            created_at_ms: now_ms(),
            payload: Payload::Response(response),
        }
    }

    /// A record of an encoded value, stamped now.
    pub fn value(fingerprint: Fingerprint, value: Bytes) -> Self {
        Self {
            fingerprint,
            created_at_ms: now_ms(),
            payload: Payload::Value(value),
        }
    }

    /// Bytes the payload occupies once stored (what a byte bound weighs).
    pub fn stored_size(&self) -> usize {
        match &self.payload {
            Payload::Response(response) => response.stored_size(),
            Payload::Value(value) => value.len(),
        }
    }

    /// The stored response, if this record holds one.
    pub fn as_response(&self) -> Option<&StoredResponse> {
        match &self.payload {
            Payload::Response(response) => Some(response),
            Payload::Value(_) => None,
        }
    }

    /// The encoded value, if this record holds one.
    pub fn as_value(&self) -> Option<&Bytes> {
        match &self.payload {
            Payload::Value(value) => Some(value),
            Payload::Response(_) => None,
        }
    }

    /// Encodes the record in the current versioned binary format.
    pub fn encode(&self) -> Bytes {
        let payload_len = match &self.payload {
            Payload::Response(response) => 8 + response.buffer().len(),
            Payload::Value(value) => 8 + value.len(),
        };
        let mut out = BytesMut::with_capacity(HEADER_LEN + payload_len);
        out.put_slice(MAGIC);
        out.put_u8(ENCODING_VERSION);
        match &self.payload {
            Payload::Response(_) => out.put_u8(KIND_RESPONSE),
            Payload::Value(_) => out.put_u8(KIND_VALUE),
        }
        out.put_slice(self.fingerprint.as_bytes());
        out.put_u64(self.created_at_ms);
        match &self.payload {
            Payload::Response(response) => {
                out.put_u64(response.buffer().len() as u64);
                out.put_slice(response.buffer());
            }
            Payload::Value(value) => {
                out.put_u64(value.len() as u64);
                out.put_slice(value);
            }
        }
        out.freeze()
    }

    /// Decodes a record written by [`Record::encode`].
    ///
    /// # Errors
    ///
    /// A [`DecodeError`] for a value that is short, not a record, of an unknown
    /// version or kind, or that holds an invalid status or header.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut buf = bytes;
        if buf.len() < MAGIC.len() + 2 || &buf[..MAGIC.len()] != MAGIC {
            return Err(DecodeError::NotARecord);
        }
        buf.advance(MAGIC.len());
        let version = buf.get_u8();
        if !is_known_version(version) {
            return Err(DecodeError::UnknownVersion(version));
        }
        let kind = buf.get_u8();
        let fingerprint = Fingerprint::from_bytes(take::<32>(&mut buf)?);
        let created_at_ms = u64::from_be_bytes(take::<8>(&mut buf)?);
        let payload = match kind {
            KIND_RESPONSE if version == VERSION_1 => {
                let response = decode_response_v1(&mut buf)?;
                Payload::Response(response)
            }
            KIND_RESPONSE => {
                let len = u64::from_be_bytes(take::<8>(&mut buf)?);
                let buffer = take_slice(&mut buf, usize::try_from(len).unwrap_or(usize::MAX))?;
                if version == VERSION_2 {
                    Payload::Response(StoredResponse::from_buffer_v2(buffer)?)
                } else {
                    let buffer = Bytes::copy_from_slice(buffer);
                    Payload::Response(StoredResponse::from_buffer(buffer)?)
                }
            }
            KIND_VALUE => {
                let len = u64::from_be_bytes(take::<8>(&mut buf)?);
                let value = take_slice(&mut buf, usize::try_from(len).unwrap_or(usize::MAX))?;
                Payload::Value(Bytes::copy_from_slice(value))
            }
            other => return Err(DecodeError::UnknownKind(other)),
        };
        if !buf.is_empty() {
            return Err(DecodeError::TrailingBytes(buf.len()));
        }
        Ok(Self {
            fingerprint,
            created_at_ms,
            payload,
        })
    }
}

/// Whether this build reads records of encoding `version`.
pub(crate) fn is_known_version(version: u8) -> bool {
    matches!(version, ENCODING_VERSION | VERSION_2 | VERSION_1)
}

/// Magic, version, kind, fingerprint and creation time.
const HEADER_LEN: usize = 3 + 1 + 1 + 32 + 8;

/// A response in the version 1 layout.
fn decode_response_v1(buf: &mut &[u8]) -> Result<StoredResponse, DecodeError> {
    let status = u16::from_be_bytes(take::<2>(buf)?);
    let status = StatusCode::from_u16(status).map_err(|_| DecodeError::InvalidStatus(status))?;
    let count = u32::from_be_bytes(take::<4>(buf)?) as usize;
    // Each header takes at least 6 bytes; refuse counts the value cannot hold.
    if count > buf.len() / 6 {
        return Err(DecodeError::Truncated);
    }
    // A header map holds 32,768 distinct names at most and panics past them
    // (`with_capacity`, `append`): a value with more is no record of ours.
    // The map grows as headers come, so a count that lies costs nothing up
    // front.
    let too_many = || DecodeError::TooManyHeaders(count);
    let mut headers = HeaderMap::with_capacity(count.min(64));
    for _ in 0..count {
        let name_len = u16::from_be_bytes(take::<2>(buf)?) as usize;
        let name = take_slice(buf, name_len)?;
        let name = HeaderName::from_bytes(name).map_err(|_| DecodeError::InvalidHeader)?;
        let value_len = u32::from_be_bytes(take::<4>(buf)?) as usize;
        let value = take_slice(buf, value_len)?;
        let value = HeaderValue::from_bytes(value).map_err(|_| DecodeError::InvalidHeader)?;
        headers.try_append(name, value).map_err(|_| too_many())?;
    }
    let body_len = u64::from_be_bytes(take::<8>(buf)?);
    let body = take_slice(buf, usize::try_from(body_len).unwrap_or(usize::MAX))?;
    Ok(StoredResponse::new(status, &headers, body))
}

/// A shared, immutable record: what stores hand out and frontends replay.
pub type SharedRecord = Arc<Record>;

fn take<const N: usize>(buf: &mut &[u8]) -> Result<[u8; N], DecodeError> {
    let slice = take_slice(buf, N)?;
    let mut out = [0u8; N];
    out.copy_from_slice(slice);
    Ok(out)
}

fn take_slice<'a>(buf: &mut &'a [u8], len: usize) -> Result<&'a [u8], DecodeError> {
    if buf.len() < len {
        return Err(DecodeError::Truncated);
    }
    let (head, tail) = buf.split_at(len);
    *buf = tail;
    Ok(head)
}

/// Milliseconds since the Unix epoch, by the system clock.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Why a stored value could not be decoded as a [`Record`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The value does not start with the record magic: it was written by
    /// something else.
    #[error("stored value is not an idempotency record")]
    NotARecord,
    /// The value was written by a version of the encoding this build does not read.
    #[error("stored record has encoding version {0}, this build reads version {ENCODING_VERSION}")]
    UnknownVersion(u8),
    /// The record kind byte is unknown.
    #[error("stored record has unknown kind {0}")]
    UnknownKind(u8),
    /// The value ends before the record does.
    #[error("stored record is truncated")]
    Truncated,
    /// The value has bytes after the record.
    #[error("stored record has {0} trailing bytes")]
    TrailingBytes(usize),
    /// The stored status code is not a valid HTTP status.
    #[error("stored record has invalid status {0}")]
    InvalidStatus(u16),
    /// A stored header name or value is not valid HTTP.
    #[error("stored record has an invalid header")]
    InvalidHeader,
    /// The stored response carries flags this build does not know: it was
    /// written by a newer one.
    #[error("stored record has unknown flags {0:#04x}")]
    UnknownFlags(u8),
    /// The record holds more headers than a header map can.
    #[error("stored record claims {0} headers, more than a header map holds")]
    TooManyHeaders(usize),
}

#[cfg(test)]
mod tests;
