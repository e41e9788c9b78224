//! The field lists of a [`StoredResponse`](super::StoredResponse)'s
//! buffer (headers, then trailers): a count, then each name and value
//! framed by its length as a LEB128 varint; written, checked and read back
//! here.

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};

use crate::record::DecodeError;

/// Fields that a header map always holds, whatever their names: far more
/// than any server sends (hyper reads 100).
const FEW_FIELDS: u64 = 16_384;

/// Appends a field count and the fields of `map` (none for `None`).
pub(super) fn put_fields(buffer: &mut Vec<u8>, map: Option<&HeaderMap>) {
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
    pub(super) offset: usize,
    pub(super) remaining: u64,
}

impl<'a> Fields<'a> {
    /// The fields whose count is at `offset` in `buffer`.
    pub(super) fn at(buffer: &'a Bytes, offset: usize) -> Self {
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
    pub(super) fn next_raw(&mut self) -> Option<(&[u8], std::ops::Range<usize>)> {
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

pub(super) fn varint_len(mut n: u64) -> usize {
    let mut len = 1;
    while n >= 0x80 {
        n >>= 7;
        len += 1;
    }
    len
}

pub(super) fn framed_len(len: usize) -> usize {
    varint_len(len as u64) + len
}

pub(super) fn put_varint(buffer: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        buffer.push((n as u8 & 0x7f) | 0x80);
        n >>= 7;
    }
    buffer.push(n as u8);
}

pub(super) fn put_framed(buffer: &mut Vec<u8>, bytes: &[u8]) {
    put_varint(buffer, bytes.len() as u64);
    buffer.extend_from_slice(bytes);
}

pub(super) fn read_u16(rest: &mut &[u8]) -> Option<u16> {
    let (head, tail) = rest.split_first_chunk::<2>()?;
    *rest = tail;
    Some(u16::from_be_bytes(*head))
}

/// Reads a LEB128 varint of at most ten bytes.
pub(super) fn read_varint(rest: &mut &[u8]) -> Option<u64> {
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

pub(super) fn read_framed<'a>(rest: &mut &'a [u8]) -> Option<&'a [u8]> {
    let len = usize::try_from(read_varint(rest)?).ok()?;
    if rest.len() < len {
        return None;
    }
    let (head, tail) = rest.split_at(len);
    *rest = tail;
    Some(head)
}

/// Checks a field count and its fields, leaving `rest` past them.
pub(super) fn check_fields(rest: &mut &[u8]) -> Result<(), DecodeError> {
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

pub(super) fn to_map(len: usize, fields: Fields<'_>) -> HeaderMap {
    let mut map = HeaderMap::with_capacity(len.min(64));
    for (name, value) in fields {
        // Never fails: the fields came from a header map, or decoding
        // checked that one holds them.
        let _ = map.try_append(name, value);
    }
    map
}
