//! The record of a first response, kept as its body passes to the client,
//! and the hand-off of what is left when the client goes away.
//!
//! [`Tee`] sees every event of the response body (a data frame, the end, an
//! error) and answers the store operation, if any, that must finish before
//! the event reaches the client: storing the record before the last frame,
//! releasing the key before a frame past the size limit or an error. What a
//! record holds and how it is stored belongs to a [`Recorder`], which keeps
//! the store's type out of the body and the future.
//!
//! [`TeeBody`] is the inner body with its tee: it holds back a frame while
//! the store operation it waits for runs. [`Recorded`] boxes it, so that a
//! client that drops the body early can hand the rest to a task
//! ([`HandOff`]), which reads it to the end inside the request's span.

use std::fmt;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use sync_wrapper::SyncWrapper;
use tracing::Span;

use super::hand_off::{spawn_in, Finish, HandOff};
/// The error type of the layer's bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A frame of a body, or the error that ended it.
pub(crate) type FrameResult = Result<Frame<Bytes>, BoxError>;

/// A store operation the client's next frame waits for.
pub(crate) type Pending = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Why a recording is given up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GiveUp {
    /// The service answered `Err`: the retry runs again.
    Failed,
    /// The action may have run but no definite answer came: the body failed
    /// after the head, or the service marked its response
    /// [`OutcomeUnknown`](super::OutcomeUnknown).
    Unclear,
    /// The service, its future or its body panicked.
    Panicked,
    /// The response is not to be stored (its status, `no-store`, its size).
    NotStored,
}

/// Holds the lease of a first request and what is recorded of its response.
pub(crate) trait Recorder: Send + Sync {
    /// Whether a response with this head is stored; if so, keeps its head,
    /// with room for a body of `declared` bytes when its length is known.
    fn keep_head(&mut self, head: &http::response::Parts, declared: Option<u64>) -> bool;

    /// Keeps a data frame of the body; answers `false` when the body has
    /// grown past what is stored and nothing is to be recorded.
    fn keep_data(&mut self, data: &Bytes) -> bool;

    /// Keeps the trailers that end the body.
    fn keep_trailers(&mut self, trailers: &http::HeaderMap);

    /// Stores the record, ending the lease.
    fn store(self: Box<Self>) -> Pending;

    /// Releases the key, so the next retry runs the action.
    fn give_up(self: Box<Self>, why: GiveUp) -> Pending;
}

/// The recording side of a first response's body: one method per event.
pub(crate) struct Tee {
    recorder: Option<Box<dyn Recorder>>,
    /// Data bytes seen, and the length the response declared: the frame that
    /// reaches it ends the response even before the body says so.
    received: u64,
    declared: Option<u64>,
}

impl Tee {
    pub(crate) fn new(recorder: Box<dyn Recorder>, declared: Option<u64>) -> Self {
        Self {
            recorder: Some(recorder),
            received: 0,
            declared,
        }
    }

    /// Whether the record is still to be stored.
    pub(crate) fn is_recording(&self) -> bool {
        self.recorder.is_some()
    }

    /// Whether the data seen so far is all the response declared.
    pub(crate) fn reached_declared_length(&self) -> bool {
        self.declared == Some(self.received)
    }

    /// A data frame: kept, or, past the size limit, the recording given up.
    pub(crate) fn on_data(&mut self, data: &Bytes) -> Option<Pending> {
        self.received += data.len() as u64;
        let recorder = self.recorder.as_mut()?;
        if recorder.keep_data(data) {
            return None;
        }
        self.give_up(GiveUp::NotStored)
    }

    /// Trailers: kept, then the record stored (they end the body).
    pub(crate) fn on_trailers(&mut self, trailers: &http::HeaderMap) -> Option<Pending> {
        if let Some(recorder) = self.recorder.as_mut() {
            recorder.keep_trailers(trailers);
        }
        self.on_end()
    }

    /// The body ended: the record is stored.
    pub(crate) fn on_end(&mut self) -> Option<Pending> {
        self.recorder.take().map(Recorder::store)
    }

    /// The body failed (the outcome is unclear) or panicked.
    pub(crate) fn on_error(&mut self, why: GiveUp) -> Option<Pending> {
        self.give_up(why)
    }

    fn give_up(&mut self, why: GiveUp) -> Option<Pending> {
        self.recorder.take().map(|recorder| recorder.give_up(why))
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

/// A first response's body as the client reads it: the inner body and its
/// tee. Its state is boxed (one pointer in the response body) so that a
/// client going away can hand it to a task (a pinned body cannot move; its
/// box can).
pub(crate) struct Recorded<B> {
    state: Option<Pin<Box<RecordedState<B>>>>,
}

pin_project! {
    struct RecordedState<B> {
        // The request's span, for what runs on after its client went away.
        span: Span,
        on_drop: OnDrop<B>,
        #[pin]
        body: TeeBody<B>,
    }
}

enum OnDrop<B> {
    Finish(HandOff<RecordedState<B>>),
    StoreOnly,
    Nothing,
}

impl<B> Recorded<B> {
    /// `body`, recorded by `tee` as the client reads it. `left` says what
    /// happens to the rest when the client drops it before its end.
    pub(crate) fn new(body: B, tee: Tee, span: Span, left: Left) -> Self
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let on_drop = match left {
            Left::Finish => OnDrop::Finish(HandOff::new()),
            Left::StoreOnly => OnDrop::StoreOnly,
            Left::Nothing => OnDrop::Nothing,
        };
        let state = RecordedState {
            span,
            on_drop,
            body: TeeBody::new(body, tee),
        };
        Self {
            state: Some(Box::pin(state)),
        }
    }

    pub(crate) fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<FrameResult>>
    where
        B: Body<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        match self.state.as_mut() {
            Some(state) => state.as_mut().project().body.poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    pub(crate) fn is_end_stream(&self) -> bool
    where
        B: Body<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        self.state
            .as_ref()
            .is_none_or(|state| state.body.is_end_stream())
    }

    pub(crate) fn size_hint(&self) -> SizeHint
    where
        B: Body,
    {
        self.state
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), |state| state.body.size_hint())
    }
}

impl<B> fmt::Debug for Recorded<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ended = self.state.as_ref().is_none_or(|s| s.body.ended);
        f.debug_struct("Recorded")
            .field("ended", &ended)
            .finish_non_exhaustive()
    }
}

impl<B> Drop for Recorded<B> {
    fn drop(&mut self) {
        let Some(mut state) = self.state.take() else {
            return;
        };
        match state.on_drop {
            OnDrop::Finish(hand_off) => hand_off.run(state),
            OnDrop::StoreOnly => {
                let state = state.as_mut().project();
                if let Some(pending) = state.body.project().pending.take() {
                    spawn_in(state.span.clone(), pending.into_inner());
                }
            }
            OnDrop::Nothing => {}
        }
    }
}

impl<B> Finish for RecordedState<B>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    fn left(self: Pin<&mut Self>) -> Option<Span> {
        // Nothing to store, nobody to answer: nothing is left.
        (self.body.tee.is_recording() || self.body.pending.is_some()).then(|| self.span.clone())
    }

    /// Reads what is left of the body, so its record is stored (or its key
    /// released) as if the client were there.
    async fn finish(mut self: Pin<Box<Self>>) {
        let mut body = self.as_mut().project().body;
        while std::future::poll_fn(|cx| body.as_mut().poll_frame(cx))
            .await
            .is_some()
        {}
    }
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
        // A store future need not be `Sync`; the body must be (boxed bodies
        // are), and it only ever polls the future through `&mut`.
        pending: Option<SyncWrapper<Pending>>,
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
                ready!(pending.get_mut().as_mut().poll(cx));
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
                        // Trailers end a body, and are stored with it.
                        None => match frame.trailers_ref() {
                            Some(trailers) => (true, this.tee.on_trailers(trailers)),
                            None => (true, None),
                        },
                    };
                    if !last {
                        *this.pending = pending.map(SyncWrapper::new);
                        *this.held = Some(Ok(frame));
                        continue;
                    }
                    (Some(Ok(frame)), pending.or_else(|| this.tee.on_end()))
                }
                // The head is out and part of the body maybe: the action ran,
                // or may have, and its answer is cut off.
                Ok(Poll::Ready(Some(Err(error)))) => {
                    (Some(Err(error.into())), this.tee.on_error(GiveUp::Unclear))
                }
                Err(_panic) => {
                    let error = "the response body panicked".into();
                    (Some(Err(error)), this.tee.on_error(GiveUp::Panicked))
                }
            };
            *this.ended = true;
            *this.held = held;
            *this.pending = pending.map(SyncWrapper::new);
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
