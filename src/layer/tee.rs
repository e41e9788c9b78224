//! The record of a first response, kept as its body passes to the client,
//! and the hand-off of what is left when the client goes away.
//!
//! [`Tee`] sees every event of the response body (a data frame, the end, an
//! error) and answers the store operation, if any, that must finish before
//! the event reaches the client: storing the record before the last frame,
//! releasing the key before a frame past the size limit or an error. What a
//! record holds and how it is stored belongs to a [`Recorder`], which keeps
//! the store's type out of the body and the future.

use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;
use tokio::runtime::Handle;
use tracing::{Instrument, Span};

/// A store operation the client's next frame waits for.
pub(crate) type Pending = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Why a recording is given up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GiveUp {
    /// The service answered `Err`, or its body failed: the retry runs again.
    Failed,
    /// The service, its future or its body panicked.
    Panicked,
    /// The response is not to be stored (its status, `no-store`, its size).
    NotStored,
}

/// Holds the lease of a first request and what is recorded of its response.
pub(crate) trait Recorder: Send {
    /// Whether a response with this head is stored; if so, keeps its head.
    fn keep_head(&mut self, head: &http::response::Parts) -> bool;

    /// Keeps a data frame of the body; answers `false` when the body has
    /// grown past what is stored.
    fn keep_data(&mut self, data: &Bytes) -> bool;

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

    /// The body ended: the record is stored.
    pub(crate) fn on_end(&mut self) -> Option<Pending> {
        self.recorder.take().map(Recorder::store)
    }

    /// The body failed or panicked: the key is released.
    pub(crate) fn on_error(&mut self, why: GiveUp) -> Option<Pending> {
        self.give_up(why)
    }

    fn give_up(&mut self, why: GiveUp) -> Option<Pending> {
        self.recorder.take().map(|recorder| recorder.give_up(why))
    }
}

/// Runs `work` on a task of its own, inside `span` (the request's), so
/// what a client left behind finishes without it. Without a runtime `work`
/// is dropped, which releases any lease it holds.
pub(crate) fn hand_off(span: Span, work: impl Future<Output = ()> + Send + 'static) {
    match Handle::try_current() {
        Ok(runtime) => drop(runtime.spawn(work.instrument(span))),
        Err(_) => tracing::warn!(
            parent: &span,
            "no Tokio runtime to finish a request whose client went away: its key is released"
        ),
    }
}
