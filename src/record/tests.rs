use super::*;

fn sample() -> Record {
    let mut headers = HeaderMap::new();
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    headers.append("x-multi", HeaderValue::from_static("a"));
    headers.append("x-multi", HeaderValue::from_static("b"));
    Record::response(
        Fingerprint::of_bytes(b"fp"),
        StoredResponse::new(StatusCode::CREATED, &headers, b"{\"id\":1}"),
    )
}

/// What version 1 wrote for a response record.
fn encode_v1(record: &Record) -> Vec<u8> {
    let response = record.as_response().unwrap();
    let mut out = BytesMut::new();
    out.put_slice(MAGIC);
    out.put_u8(VERSION_1);
    out.put_u8(KIND_RESPONSE);
    out.put_slice(record.fingerprint.as_bytes());
    out.put_u64(record.created_at_ms);
    out.put_u16(response.status().as_u16());
    out.put_u32(response.fields_len() as u32);
    for (name, value) in response.fields() {
        out.put_u16(name.as_str().len() as u16);
        out.put_slice(name.as_str().as_bytes());
        out.put_u32(value.len() as u32);
        out.put_slice(value.as_bytes());
    }
    let body = response.body();
    out.put_u64(body.len() as u64);
    out.put_slice(&body);
    out.to_vec()
}

#[test]
fn response_round_trips() {
    let record = sample();
    assert_eq!(Record::decode(&record.encode()), Ok(record));
}

#[test]
fn value_round_trips() {
    let record = Record::value(Fingerprint::of_bytes(b"fp"), Bytes::from_static(b"42"));
    assert_eq!(Record::decode(&record.encode()), Ok(record));
}

#[test]
fn version_1_still_decodes() {
    let record = sample();
    let v1 = encode_v1(&record);
    assert_eq!(Record::decode(&v1), Ok(record.clone()));
    for len in 0..v1.len() {
        assert!(Record::decode(&v1[..len]).is_err(), "prefix of {len} bytes");
    }
    // Re-encoded, it is written in the current version, and smaller.
    let current = record.encode();
    assert_eq!(current[3], ENCODING_VERSION);
    assert!(current.len() < v1.len());
}

/// What version 2 wrote for a response record: no flags, no trailers.
fn encode_v2(record: &Record) -> Vec<u8> {
    let response = record.as_response().unwrap();
    let mut buffer = BytesMut::new();
    buffer.put_u16(response.status().as_u16());
    buffer.put_u8(response.fields_len() as u8);
    for (name, value) in response.fields() {
        buffer.put_u8(name.as_str().len() as u8);
        buffer.put_slice(name.as_str().as_bytes());
        buffer.put_u8(value.len() as u8);
        buffer.put_slice(value.as_bytes());
    }
    buffer.put_slice(&response.body());
    let mut out = BytesMut::new();
    out.put_slice(MAGIC);
    out.put_u8(VERSION_2);
    out.put_u8(KIND_RESPONSE);
    out.put_slice(record.fingerprint.as_bytes());
    out.put_u64(record.created_at_ms);
    out.put_u64(buffer.len() as u64);
    out.put_slice(&buffer);
    out.to_vec()
}

#[test]
fn version_2_still_decodes() {
    let record = sample();
    let v2 = encode_v2(&record);
    assert_eq!(Record::decode(&v2), Ok(record.clone()));
    for len in 0..v2.len() {
        assert!(Record::decode(&v2[..len]).is_err(), "prefix of {len} bytes");
    }
    assert_eq!(record.encode()[3], ENCODING_VERSION);
}

#[test]
fn trailers_and_omitted_bodies_round_trip() {
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    let fp = Fingerprint::of_bytes(b"fp");
    let headers = sample().as_response().unwrap().headers();
    for response in [
        StoredResponse::with_trailers(StatusCode::OK, &headers, b"msg", &trailers),
        StoredResponse::head_only(StatusCode::CREATED, &headers, &HeaderMap::new()),
    ] {
        let record = Record::response(fp, response);
        assert_eq!(Record::decode(&record.encode()), Ok(record));
    }
}

#[test]
fn unknown_version_is_a_typed_error() {
    let mut bytes = sample().encode().to_vec();
    bytes[3] = 9;
    assert_eq!(Record::decode(&bytes), Err(DecodeError::UnknownVersion(9)));
}

#[test]
fn every_truncation_is_an_error_not_a_panic() {
    let bytes = sample().encode();
    for len in 0..bytes.len() {
        assert!(
            Record::decode(&bytes[..len]).is_err(),
            "prefix of {len} bytes"
        );
    }
}

#[test]
fn foreign_value_is_not_a_record() {
    assert_eq!(Record::decode(b"hello"), Err(DecodeError::NotARecord));
}
