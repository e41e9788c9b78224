//! The hand-off on drop: what a client left of its request when it went away
//! (the service's answer, the rest of the body, a store operation under way)
//! finishes on a task of its own, inside the request's span, so that its
//! record is stored (or its key released) as if the client were there.
//!
//! The response future and the recorded body each hold their state boxed (a
//! pinned state cannot move; its box can) and hand it on with [`HandOff`].

use std::future::Future;
use std::pin::Pin;

use tokio::runtime::Handle;
use tracing::{Instrument, Span};

/// A request's state that can finish without its client.
pub(crate) trait Finish: Send + Sized + 'static {
    /// The request's span, if anything is left to finish; `None` when
    /// nothing is. Asked once, as the state is handed on: it then marks
    /// itself as on the task, so that dropped there (the runtime shutting
    /// down) it is dropped for good.
    fn left(self: Pin<&mut Self>) -> Option<Span>;

    /// Runs what is left to its end.
    fn finish(self: Pin<Box<Self>>) -> impl Future<Output = ()> + Send + 'static;
}

/// Hands a boxed state to a task when its owner is dropped. A function
/// pointer, made where the state's bounds (`Send + 'static`) are known:
/// `Drop` cannot ask for more bounds than the type has.
pub(crate) struct HandOff<T>(fn(Pin<Box<T>>));

impl<T> Clone for HandOff<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for HandOff<T> {}

impl<T: Finish> HandOff<T> {
    pub(crate) fn new() -> Self {
        Self(hand_off::<T>)
    }
}

impl<T> HandOff<T> {
    /// Hands `state` to a task, if anything is left of it.
    pub(crate) fn run(self, state: Pin<Box<T>>) {
        (self.0)(state);
    }
}

fn hand_off<T: Finish>(mut state: Pin<Box<T>>) {
    if let Some(span) = state.as_mut().left() {
        spawn_in(span, state.finish());
    }
}

/// Runs `work` on a task of its own, inside `span` (the request's), so
/// what a client left behind finishes without it. Without a runtime `work`
/// is dropped, which releases any lease it holds.
pub(crate) fn spawn_in(span: Span, work: impl Future<Output = ()> + Send + 'static) {
    match Handle::try_current() {
        Ok(runtime) => drop(runtime.spawn(work.instrument(span))),
        Err(_) => tracing::warn!(
            parent: &span,
            "no Tokio runtime to finish a request whose client went away: its key is released"
        ),
    }
}
