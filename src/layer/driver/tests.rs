use http_body::Frame;
use http_body_util::StreamBody;

use super::*;

type Frames = futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, BoxError>>>;

fn frames(frames: Vec<Result<Frame<Bytes>, BoxError>>) -> StreamBody<Frames> {
    StreamBody::new(futures_util::stream::iter(frames))
}

fn data(text: &'static str) -> Result<Frame<Bytes>, BoxError> {
    Ok(Frame::data(Bytes::from_static(text.as_bytes())))
}

#[tokio::test]
async fn frames_are_joined_in_order_and_trailers_left_out() {
    let mut trailers = http::HeaderMap::new();
    trailers.insert("x-sum", http::HeaderValue::from_static("1"));
    let body = frames(vec![
        data(""),
        data("ab"),
        data(""),
        data("cd"),
        Ok(Frame::trailers(trailers)),
    ]);
    let Ok(bytes) = buffer(body, 4).await else {
        panic!("four bytes fit a limit of four");
    };
    assert_eq!(bytes, "abcd");
}

#[tokio::test]
async fn a_single_frame_is_handed_on_as_it_came() {
    let sent = Bytes::from(vec![b'x'; 100]);
    let Ok(bytes) = buffer(http_body_util::Full::new(sent.clone()), 100).await else {
        panic!("a body at the limit is read");
    };
    assert_eq!(bytes.as_ptr(), sent.as_ptr(), "no copy of a single frame");
    let Ok(empty) = buffer(http_body_util::Empty::<Bytes>::new(), 0).await else {
        panic!("an empty body is read");
    };
    assert!(empty.is_empty());
}

#[tokio::test]
async fn a_body_past_the_limit_or_failing_is_refused() {
    let over = buffer(frames(vec![data("abc"), data("de")]), 4).await;
    assert!(matches!(over, Err(Unbuffered::TooLarge)));
    let failing = buffer(frames(vec![data("ab"), Err("reset".into())]), 4).await;
    assert!(matches!(failing, Err(Unbuffered::Unreadable(e)) if e.to_string() == "reset"));
}
