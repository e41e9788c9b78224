//! The request body the service sees, and the response body the client gets.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use pin_project_lite::pin_project;
use tokio::sync::mpsc;

/// The error type of the bodies of this module.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

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

pub(crate) type FrameResult = Result<Frame<Bytes>, BoxError>;

pin_project! {
    /// The response body the client gets: the inner body untouched (requests
    /// the layer does not protect), the whole body of a replay or of the
    /// layer's own problem responses, or the frames of a first response,
    /// forwarded by the driver task as it records them.
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
        Channel { frames: mpsc::Receiver<FrameResult>, ended: Arc<AtomicBool>, hint: SizeHint },
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

    /// A body fed by the driver through the returned sender.
    pub(crate) fn channel(capacity: usize, hint: SizeHint) -> (FrameSender, Self) {
        let (frames, receiver) = mpsc::channel(capacity);
        let ended = Arc::new(AtomicBool::new(false));
        let sender = FrameSender {
            frames,
            ended: ended.clone(),
        };
        let body = Self {
            kind: ResponseKind::Channel {
                frames: receiver,
                ended,
                hint,
            },
        };
        (sender, body)
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
            ResponseProj::Channel {
                frames,
                ended,
                hint,
            } => {
                let frame = ready!(frames.poll_recv(cx));
                if frame.is_none() && !ended.swap(true, Ordering::Acquire) {
                    // The driver stopped without ending the body (its task
                    // was cancelled): a clean end would pass a truncated
                    // response off as complete.
                    return Poll::Ready(Some(Err("the response was cut short".into())));
                }
                if let Some(Ok(data)) = frame.as_ref().map(|f| f.as_ref().map(Frame::data_ref)) {
                    let len = data.map_or(0, |d| d.remaining() as u64);
                    *hint = shrink(hint, len);
                }
                Poll::Ready(frame)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            ResponseKind::Passthrough { body } => body.is_end_stream(),
            ResponseKind::Full { body } => body.is_end_stream(),
            // The driver closes the channel once the record is stored; until
            // then the end is not known.
            ResponseKind::Channel { .. } => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            ResponseKind::Passthrough { body } => body.size_hint(),
            ResponseKind::Full { body } => body.size_hint(),
            ResponseKind::Channel { hint, .. } => *hint,
        }
    }
}

/// The driver's end of a [`ResponseBody`] channel.
#[derive(Debug)]
pub(crate) struct FrameSender {
    frames: mpsc::Sender<FrameResult>,
    ended: Arc<AtomicBool>,
}

impl FrameSender {
    /// Sends a frame; answers whether the client's body is still there.
    pub(crate) async fn send(&self, frame: FrameResult) -> bool {
        self.frames.send(frame).await.is_ok()
    }

    /// Resolves when the client's body is dropped.
    pub(crate) async fn closed(&self) {
        self.frames.closed().await;
    }

    /// Ends the body cleanly.
    pub(crate) fn end(self) {
        // Stored before the sender drops: the receiver sees the flag once it
        // sees the channel closed.
        self.ended.store(true, Ordering::Release);
    }
}

fn shrink(hint: &SizeHint, by: u64) -> SizeHint {
    let mut next = SizeHint::new();
    next.set_lower(hint.lower().saturating_sub(by));
    if let Some(upper) = hint.upper() {
        next.set_upper(upper.saturating_sub(by));
    }
    next
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    #[tokio::test]
    async fn a_channel_dropped_without_end_is_an_error() {
        let (sender, body) =
            ResponseBody::<http_body_util::Empty<Bytes>>::channel(1, SizeHint::new());
        assert!(sender.send(Ok(Frame::data(Bytes::from("part")))).await);
        drop(sender);
        assert!(body.collect().await.is_err());

        let (sender, body) =
            ResponseBody::<http_body_util::Empty<Bytes>>::channel(1, SizeHint::new());
        let send = tokio::spawn(async move {
            assert!(sender.send(Ok(Frame::data(Bytes::from("whole")))).await);
            sender.end();
        });
        assert_eq!(body.collect().await.unwrap().to_bytes(), "whole");
        send.await.unwrap();
    }
}
