//! The request body the service sees, and the response body the client gets.

use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use pin_project_lite::pin_project;
use tracing::Span;

use super::tee::{hand_off, GiveUp, Pending, Tee};

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
        let on_drop = match left {
            Left::Finish => OnDrop::Finish(finish::<B>),
            Left::StoreOnly => OnDrop::StoreOnly,
            Left::Nothing => OnDrop::Nothing,
        };
        Self {
            kind: ResponseKind::Recorded {
                recorded: Recorded {
                    state: Some(Box::pin(TeeBody::new(body, tee))),
                    span,
                    on_drop,
                },
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
            ResponseProj::Recorded { recorded } => match recorded.state.as_mut() {
                Some(state) => state.as_mut().poll_frame(cx),
                None => Poll::Ready(None),
            },
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
            ResponseKind::Recorded { recorded } => recorded
                .state
                .as_ref()
                .is_none_or(|state| state.is_end_stream()),
            ResponseKind::Held { data, last } => data.is_none() && last.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            ResponseKind::Passthrough { body } => body.size_hint(),
            ResponseKind::Full { body } => body.size_hint(),
            ResponseKind::Recorded { recorded } => recorded
                .state
                .as_ref()
                .map_or_else(|| SizeHint::with_exact(0), |state| state.size_hint()),
            ResponseKind::Held { data, .. } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}

/// What happens to a recorded body its client dropped before the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Left {
    /// Read on to the end on a task of its own, and stored
    /// (`Disconnect::Complete`).
    Finish,
    /// Dropped, but a store operation already under way is finished
    /// (`Disconnect::Cancel`).
    StoreOnly,
    /// Dropped (the body is already on the task that finishes it).
    Nothing,
}

/// A recorded body's state, boxed so that a client going away can hand it
/// to a task (a pinned body cannot move; its box can).
pub(crate) struct Recorded<B> {
    state: Option<Pin<Box<TeeBody<B>>>>,
    span: Span,
    on_drop: OnDrop<B>,
}

enum OnDrop<B> {
    // A function pointer, made where `B: Send + 'static` is known: `Drop`
    // cannot ask for more bounds than the type has.
    Finish(fn(Pin<Box<TeeBody<B>>>, Span)),
    StoreOnly,
    Nothing,
}

impl<B> fmt::Debug for Recorded<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Recorded")
            .field("ended", &self.state.as_ref().is_none_or(|s| s.ended))
            .finish_non_exhaustive()
    }
}

impl<B> Drop for Recorded<B> {
    fn drop(&mut self) {
        let Some(mut state) = self.state.take() else {
            return;
        };
        let span = std::mem::replace(&mut self.span, Span::none());
        match self.on_drop {
            OnDrop::Finish(finish) => finish(state, span),
            OnDrop::StoreOnly => {
                if let Some(pending) = state.as_mut().project().pending.take() {
                    hand_off(span, pending);
                }
            }
            OnDrop::Nothing => {}
        }
    }
}

/// Reads what is left of a body whose client went away, on a task, so its
/// record is stored (or its key released) as if the client were there.
fn finish<B>(mut state: Pin<Box<TeeBody<B>>>, span: Span)
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    if !state.tee.is_recording() && state.pending.is_none() {
        return; // nothing to store, nobody to answer
    }
    hand_off(span, async move {
        while std::future::poll_fn(|cx| state.as_mut().poll_frame(cx))
            .await
            .is_some()
        {}
    });
}

pin_project! {
    /// The inner body of a first response, and its tee. A frame that must
    /// wait for the store (the last one, while the record is stored) is held
    /// until the store operation is done.
    pub(crate) struct TeeBody<B> {
        #[pin]
        body: B,
        tee: Tee,
        held: Option<FrameResult>,
        pending: Option<Pending>,
        ended: bool,
    }
}

impl<B> TeeBody<B> {
    pub(crate) fn new(body: B, tee: Tee) -> Self {
        Self {
            body,
            tee,
            held: None,
            pending: None,
            ended: false,
        }
    }
}

impl<B> TeeBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    pub(crate) fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<FrameResult>> {
        let mut this = self.project();
        loop {
            if let Some(pending) = this.pending.as_mut() {
                ready!(pending.as_mut().poll(cx));
                *this.pending = None;
            }
            if let Some(frame) = this.held.take() {
                return Poll::Ready(Some(frame));
            }
            if *this.ended {
                return Poll::Ready(None);
            }
            // A panic in the body must not leave the key held and the client
            // waiting: it ends the body in an error and releases the key.
            let polled = catch_unwind(AssertUnwindSafe(|| this.body.as_mut().poll_frame(cx)));
            let (held, pending) = match polled {
                Ok(Poll::Pending) => return Poll::Pending,
                Ok(Poll::Ready(None)) => (None, this.tee.on_end()),
                Ok(Poll::Ready(Some(Ok(frame)))) => {
                    let (last, pending) = match frame.data_ref() {
                        Some(data) => {
                            let pending = this.tee.on_data(data);
                            let last =
                                this.body.is_end_stream() || this.tee.reached_declared_length();
                            (last, pending)
                        }
                        // Trailers end a body; they are forwarded, not stored.
                        None => (true, None),
                    };
                    if !last {
                        *this.pending = pending;
                        *this.held = Some(Ok(frame));
                        continue;
                    }
                    (Some(Ok(frame)), pending.or_else(|| this.tee.on_end()))
                }
                Ok(Poll::Ready(Some(Err(error)))) => {
                    (Some(Err(error.into())), this.tee.on_error(GiveUp::Failed))
                }
                Err(_panic) => {
                    let error = "the response body panicked".into();
                    (Some(Err(error)), this.tee.on_error(GiveUp::Panicked))
                }
            };
            *this.ended = true;
            *this.held = held;
            *this.pending = pending;
        }
    }

    pub(crate) fn is_end_stream(&self) -> bool {
        self.ended && self.held.is_none() && self.pending.is_none()
    }
}

impl<B: Body> TeeBody<B> {
    fn size_hint(&self) -> SizeHint {
        let held = match &self.held {
            Some(Ok(frame)) => frame.data_ref().map_or(0, |d| d.remaining() as u64),
            _ => 0,
        };
        let mut hint = if self.ended {
            SizeHint::with_exact(0)
        } else {
            self.body.size_hint()
        };
        hint.set_lower(hint.lower().saturating_add(held));
        if let Some(upper) = hint.upper() {
            hint.set_upper(upper.saturating_add(held));
        }
        hint
    }
}
