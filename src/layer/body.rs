//! The request body the service sees, and the response body the client gets.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
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

/// The data frames of a body, gathered into one `Bytes`: a body of one
/// frame (most are) is handed on as it came, without a copy; several are
/// copied once, into a buffer of their exact size (a stored record keeps it).
#[derive(Debug, Default)]
pub(crate) struct Gathered {
    first: Option<Bytes>,
    more: Vec<Bytes>,
    len: usize,
}

impl Gathered {
    /// Bytes gathered so far.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn push(&mut self, data: Bytes) {
        if data.is_empty() {
            return;
        }
        self.len += data.len();
        if self.first.is_none() {
            self.first = Some(data);
        } else {
            self.more.push(data);
        }
    }

    pub(crate) fn into_bytes(self) -> Bytes {
        let Some(first) = self.first else {
            return Bytes::new();
        };
        if self.more.is_empty() {
            return first;
        }
        let mut whole = BytesMut::with_capacity(self.len);
        whole.extend_from_slice(&first);
        self.more
            .iter()
            .for_each(|data| whole.extend_from_slice(data));
        whole.freeze()
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
