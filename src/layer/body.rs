//! The request body the service sees, and the response body the client gets.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use pin_project_lite::pin_project;
use tracing::Span;

use super::tee::{FrameResult, Left, Recorded, Tee};

pub use super::tee::BoxError;

pin_project! {
    /// The request body handed to the inner service: the client's body,
    /// untouched, for requests the layer does not protect; the buffered bytes
    /// for protected ones (the layer read them to fingerprint the request).
    #[derive(Debug)]
    pub struct RequestBody<B> {
        #[pin]
        kind: RequestKind<B>,
    }
}

pin_project! {
    #[project = RequestProj]
    #[derive(Debug)]
    enum RequestKind<B> {
        Passthrough { #[pin] body: B },
        Buffered { #[pin] body: Full<Bytes> },
    }
}

impl<B> RequestBody<B> {
    pub(crate) fn passthrough(body: B) -> Self {
        Self {
            kind: RequestKind::Passthrough { body },
        }
    }

    pub(crate) fn buffered(data: Bytes) -> Self {
        Self {
            kind: RequestKind::Buffered {
                body: Full::new(data),
            },
        }
    }
}

impl<B> Body for RequestBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project().kind.project() {
            RequestProj::Passthrough { body } => body.poll_frame(cx).map_err(Into::into),
            RequestProj::Buffered { body } => body.poll_frame(cx).map_err(|never| match never {}),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            RequestKind::Passthrough { body } => body.is_end_stream(),
            RequestKind::Buffered { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            RequestKind::Passthrough { body } => body.size_hint(),
            RequestKind::Buffered { body } => body.size_hint(),
        }
    }
}

/// The data frames of a body, gathered into one `Bytes`, in about the
/// heap its bytes need whatever their framing. A body of one frame (most
/// are) is handed on as it came, without a copy. From a second frame on,
/// every frame is copied into one growing buffer and dropped at once: a
/// frame kept as it came would cost a handle per frame and keep alive the
/// whole read buffer it was cut from, so a body sent one byte per chunk
/// would hold tens of times its size. The buffer grows by doubling, so it
/// holds at most twice the bytes gathered, and is trimmed to their size when
/// the body ends (a stored record keeps it).
#[derive(Debug, Default)]
pub(crate) struct Gathered {
    /// The only frame so far, uncopied.
    single: Option<Bytes>,
    /// Every frame, copied, once there were two.
    joined: Vec<u8>,
}

impl Gathered {
    /// Bytes gathered so far.
    pub(crate) fn len(&self) -> usize {
        self.single.as_ref().map_or(self.joined.len(), Bytes::len)
    }

    pub(crate) fn push(&mut self, data: Bytes) {
        if data.is_empty() {
            return;
        }
        match self.single.take() {
            None if self.joined.is_empty() => self.single = Some(data),
            None => self.joined.extend_from_slice(&data),
            Some(first) => {
                self.joined.reserve_exact(first.len() + data.len());
                self.joined.extend_from_slice(&first);
                self.joined.extend_from_slice(&data);
            }
        }
    }

    pub(crate) fn into_bytes(self) -> Bytes {
        if let Some(single) = self.single {
            return single;
        }
        let mut joined = self.joined;
        // In place for a large buffer (the allocator shrinks its mapping),
        // and `Bytes` then takes the vector without a copy.
        joined.shrink_to_fit();
        Bytes::from(joined)
    }
}

pin_project! {
    /// The response body the client gets: the inner body untouched (requests
    /// the layer does not protect, responses it does not store), the whole
    /// body of a replay or of the layer's own problem responses, or the
    /// inner body of a first response, recorded as it passes.
    #[derive(Debug)]
    pub struct ResponseBody<B> {
        #[pin]
        kind: ResponseKind<B>,
    }
}

pin_project! {
    #[project = ResponseProj]
    #[derive(Debug)]
    enum ResponseKind<B> {
        Passthrough { #[pin] body: B },
        Full { #[pin] body: Full<Bytes> },
        Recorded { recorded: Recorded<B> },
        // A first response gathered whole before its head was handed on:
        // its data, then the trailers or the error that ended it.
        Held { data: Option<Bytes>, last: Option<FrameResult> },
    }
}

impl<B> ResponseBody<B> {
    pub(crate) fn passthrough(body: B) -> Self {
        Self {
            kind: ResponseKind::Passthrough { body },
        }
    }

    pub(crate) fn full(data: Bytes) -> Self {
        Self {
            kind: ResponseKind::Full {
                body: Full::new(data),
            },
        }
    }

    /// A body already read to its end: `data`, then `last` (trailers or
    /// the error that ended it), if any.
    pub(crate) fn held(data: Bytes, last: Option<FrameResult>) -> Self {
        if last.is_none() {
            return Self::full(data);
        }
        Self {
            kind: ResponseKind::Held {
                data: Some(data).filter(|data| !data.is_empty()),
                last,
            },
        }
    }

    /// A layer's own answer: a replay's body, followed by the trailers the
    /// replay carries ([`ReplayTrailers`]), if any.
    pub(crate) fn answer(response: http::Response<Bytes>) -> http::Response<Self> {
        let (mut head, data) = response.into_parts();
        match head.extensions.remove::<ReplayTrailers>() {
            Some(ReplayTrailers(trailers)) => {
                let body = Self::held(data, Some(Ok(Frame::trailers(trailers))));
                http::Response::from_parts(head, body)
            }
            None => http::Response::from_parts(head, Self::full(data)),
        }
    }

    /// `body`, recorded by `tee` as the client reads it. `left` says what
    /// happens to the rest when the client drops the body before its end.
    pub(crate) fn recorded(body: B, tee: Tee, span: Span, left: Left) -> Self
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        Self {
            kind: ResponseKind::Recorded {
                recorded: Recorded::new(body, tee, span, left),
            },
        }
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project().kind.project() {
            ResponseProj::Passthrough { body } => body.poll_frame(cx).map_err(Into::into),
            ResponseProj::Full { body } => body.poll_frame(cx).map_err(|never| match never {}),
            ResponseProj::Recorded { recorded } => recorded.poll_frame(cx),
            ResponseProj::Held { data, last } => Poll::Ready(match data.take() {
                Some(data) => Some(Ok(Frame::data(data))),
                None => last.take(),
            }),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            ResponseKind::Passthrough { body } => body.is_end_stream(),
            ResponseKind::Full { body } => body.is_end_stream(),
            ResponseKind::Recorded { recorded } => recorded.is_end_stream(),
            ResponseKind::Held { data, last } => data.is_none() && last.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            ResponseKind::Passthrough { body } => body.size_hint(),
            ResponseKind::Full { body } => body.size_hint(),
            ResponseKind::Recorded { recorded } => recorded.size_hint(),
            ResponseKind::Held { data, .. } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}

/// The trailers a replay ends with, carried to the response body in the
/// replay's extensions (a layer's answer is a `Response<Bytes>` until then).
#[derive(Clone)]
pub(crate) struct ReplayTrailers(pub(crate) http::HeaderMap);

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    /// Heap the gathered bytes hold: the uncopied frame, or the buffer.
    fn held(gathered: &Gathered) -> usize {
        gathered
            .single
            .as_ref()
            .map_or(gathered.joined.capacity(), Bytes::len)
    }

    #[test]
    fn one_byte_frames_cost_at_most_twice_their_size() {
        let mut gathered = Gathered::default();
        let mut most = 0;
        for i in 0..MIB {
            gathered.push(Bytes::copy_from_slice(&[i as u8]));
            most = most.max(held(&gathered));
            // (A vector holds at least 8 bytes once it holds any.)
            assert!(held(&gathered) <= 2 * gathered.len().max(8), "at {i}");
        }
        assert_eq!(gathered.len(), MIB);
        assert!(most <= 2 * MIB, "{most} bytes held for 1 MiB");
        let whole = gathered.into_bytes();
        assert_eq!(whole.len(), MIB);
        assert!(whole.iter().enumerate().all(|(i, &b)| b == i as u8));
    }

    #[test]
    fn many_small_frames_and_a_big_one_cost_at_most_twice_their_size() {
        let mut gathered = Gathered::default();
        gathered.push(Bytes::from(vec![1u8; MIB / 2]));
        for _ in 0..(MIB / 2) / 100 {
            gathered.push(Bytes::from(vec![2u8; 100]));
            assert!(held(&gathered) <= 2 * gathered.len());
        }
        let len = gathered.len();
        let whole = gathered.into_bytes();
        assert_eq!(whole.len(), len);
        assert_eq!(whole[0], 1);
        assert_eq!(whole[len - 1], 2);
    }

    #[test]
    fn a_single_frame_is_not_copied_and_empty_frames_are_nothing() {
        let frame = Bytes::from(vec![7u8; MIB]);
        let mut gathered = Gathered::default();
        gathered.push(Bytes::new());
        gathered.push(frame.clone());
        gathered.push(Bytes::new());
        assert_eq!(held(&gathered), MIB);
        let whole = gathered.into_bytes();
        assert_eq!(whole.as_ptr(), frame.as_ptr(), "the frame itself");
        assert!(Gathered::default().into_bytes().is_empty());
    }

    #[test]
    fn a_response_body_is_send_and_sync_when_its_inner_body_is() {
        // Boxed bodies (`BoxBody`, `axum::body::Body`) need both.
        fn send_and_sync<T: Send + Sync>() {}
        send_and_sync::<ResponseBody<http_body_util::Full<Bytes>>>();
    }
}
