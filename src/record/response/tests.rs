use super::*;
use http::HeaderValue;

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
