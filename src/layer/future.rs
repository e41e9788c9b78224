//! [`ResponseFuture`]: the response of [`Idempotent`](super::Idempotent).

use std::fmt;
use std::future::{poll_fn, Future};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::header::CONTENT_LENGTH;
use http::{response, Response};
use http_body::Body;
use pin_project_lite::pin_project;
use tracing::Span;

use super::body::{BoxError, Gathered, ResponseBody};
use super::hand_off::{Finish, HandOff};
use super::layer::OutcomeUnknown;
use super::tee::{GiveUp, Left, Pending, Recorder, Tee, TeeBody};
use crate::problem;

/// A body of at most this many bytes, its length known up front, is read
/// whole (and stored) before its head is handed on: head and body then leave
/// in one write, instead of a head that waits alone, under Nagle's
/// algorithm, for the store's round trip.
const HELD_BODY: u64 = 64 * 1024;

/// What the protected path decided: an answer of its own (a replay, a
/// conflict, a refusal), or a request that runs.
pub(crate) enum Decision<F, B, E> {
    Answer(Response<Bytes>),
    Run(Protected<F, B, E>),
}

/// The decision future of a protected request: buffer, fingerprint, begin.
pub(crate) type DecisionFuture<F, B, E> = Pin<Box<dyn Future<Output = Decision<F, B, E>> + Send>>;

pin_project! {
    /// The response future of [`Idempotent`](super::Idempotent).
    ///
    /// Requests the layer does not protect poll the inner future in place (no
    /// allocation); the layer's own answers (400, 413) are ready at once;
    /// protected requests poll one boxed future that buffers and begins, then
    /// the inner service's future, in the client's own task.
    pub struct ResponseFuture<F, B, E> {
        #[pin]
        kind: Kind<F, B, E>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, B, E> {
        Passthrough { #[pin] future: F },
        // Boxed: the layer's own answers are rare, and an unboxed response
        // would make every passthrough future as large as one.
        Answered { response: Option<Box<Response<ResponseBody<B>>>> },
        Deciding { future: DecisionFuture<F, B, E> },
        Running { protected: Protected<F, B, E> },
    }
}

impl<F, B, E> ResponseFuture<F, B, E> {
    pub(crate) fn passthrough(future: F) -> Self {
        Self {
            kind: Kind::Passthrough { future },
        }
    }

    pub(crate) fn answered(response: Response<Bytes>) -> Self {
        Self {
            kind: Kind::Answered {
                response: Some(Box::new(ResponseBody::answer(response))),
            },
        }
    }

    pub(crate) fn deciding(future: DecisionFuture<F, B, E>) -> Self {
        Self {
            kind: Kind::Deciding { future },
        }
    }
}

impl<F, B, E> fmt::Debug for ResponseFuture<F, B, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            Kind::Passthrough { .. } => "Passthrough",
            Kind::Answered { .. } => "Answered",
            Kind::Deciding { .. } => "Deciding",
            Kind::Running { .. } => "Running",
        };
        f.debug_struct("ResponseFuture")
            .field("kind", &kind)
            .finish()
    }
}

impl<F, B, E> Future for ResponseFuture<F, B, E>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Output = Result<Response<ResponseBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut kind = self.project().kind;
        loop {
            let decision = match kind.as_mut().project() {
                KindProj::Passthrough { future } => {
                    let response = ready!(future.poll(cx))?;
                    return Poll::Ready(Ok(response.map(ResponseBody::passthrough)));
                }
                KindProj::Answered { response } => {
                    return Poll::Ready(Ok(*response
                        .take()
                        .expect("ResponseFuture polled after completion")))
                }
                KindProj::Deciding { future } => ready!(future.as_mut().poll(cx)),
                KindProj::Running { protected } => return protected.poll(cx),
            };
            match decision {
                Decision::Answer(response) => {
                    return Poll::Ready(Ok(ResponseBody::answer(response)));
                }
                Decision::Run(protected) => kind.set(Kind::Running { protected }),
            }
        }
    }
}

/// A protected request from the inner service's call to the response head
/// handed on. Its state is boxed (one pointer in the response future), so
/// that a client going away can hand it to a task.
pub(crate) struct Protected<F, B, E> {
    // `None` once handed to a task.
    run: Option<Pin<Box<Run<F, B, E>>>>,
}

pin_project! {
    struct Run<F, B, E> {
        // The request's span, for what runs on after its client went away.
        span: Span,
        left: Left,
        // Made where `F: Send + 'static` is known (as `recorded` is):
        // `Drop` cannot ask for more bounds than the type has.
        on_drop: Option<HandOff<Run<F, B, E>>>,
        recorded: RecordedBody<B>,
        #[pin]
        stage: Stage<F, B, E>,
    }
}

/// Makes a recorded body (its hand-off needs `B: Send + 'static`).
type RecordedBody<B> = fn(B, Tee, Span, Left) -> ResponseBody<B>;

impl<F, B, E> Protected<F, B, E>
where
    F: Future<Output = Result<Response<B>, E>> + Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
    E: Send + 'static,
{
    /// The inner service's `future`, recorded by `recorder` (or, without
    /// one, run unprotected). `left` says what happens when the client goes
    /// away before the end.
    pub(crate) fn new(
        future: F,
        recorder: Option<Box<dyn Recorder>>,
        span: Span,
        left: Left,
    ) -> Self {
        let run = Run {
            span,
            left,
            on_drop: (left == Left::Finish).then(HandOff::new),
            recorded: ResponseBody::recorded,
            stage: Stage::Running { future, recorder },
        };
        Self {
            run: Some(Box::pin(run)),
        }
    }
}

impl<F, B, E> Protected<F, B, E>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Result<Response<ResponseBody<B>>, E>> {
        let run = self
            .run
            .as_mut()
            .expect("a request is polled until handed off")
            .as_mut()
            .project();
        let (span, left, recorded) = (&*run.span, *run.left, *run.recorded);
        run.stage
            .poll(cx, |body, tee| recorded(body, tee, span.clone(), left))
    }
}

impl<F, B, E> Drop for Protected<F, B, E> {
    fn drop(&mut self) {
        if let Some(run) = self.run.take() {
            if let Some(hand_off) = run.on_drop {
                hand_off.run(run);
            }
        }
    }
}

impl<F, B, E> Finish for Run<F, B, E>
where
    F: Future<Output = Result<Response<B>, E>> + Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
    E: Send + 'static,
{
    fn left(self: Pin<&mut Self>) -> Option<Span> {
        if !matches!(self.stage, Stage::Running { .. } | Stage::Gathering { .. }) {
            return None; // answered, or releasing: nothing runs on
        }
        // Already on the task: dropped there (the runtime shutting down), it
        // is dropped for good.
        let this = self.project();
        *this.on_drop = None;
        *this.left = Left::Nothing;
        Some(this.span.clone())
    }

    /// Runs what a client left of its request: the service to its answer,
    /// then the body to its end, so the record is stored.
    async fn finish(self: Pin<Box<Self>>) {
        let mut left = Protected { run: Some(self) };
        if let Ok(response) = poll_fn(|cx| left.poll(cx)).await {
            let mut body = std::pin::pin!(response.into_body());
            while poll_fn(|cx| body.as_mut().poll_frame(cx)).await.is_some() {}
        }
    }
}

pin_project! {
    #[project = StageProj]
    enum Stage<F, B, E> {
        // The inner service's future; without a recorder the request runs
        // unprotected (the store failed, `FailMode::Open`).
        Running { #[pin] future: F, recorder: Option<Box<dyn Recorder>> },
        // A small body, read whole (its record stored) before the head goes.
        Gathering { head: Option<response::Parts>, #[pin] body: TeeBody<B>, data: Gathered },
        // The key is released before the client sees the answer.
        Releasing { release: Pending, output: Option<Result<Response<ResponseBody<B>>, E>> },
        Done,
    }
}

impl<F, B, E> Stage<F, B, E>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        recorded: impl FnOnce(B, Tee) -> ResponseBody<B>,
    ) -> Poll<Result<Response<ResponseBody<B>>, E>> {
        let mut recorded = Some(recorded);
        loop {
            let next = match self.as_mut().project() {
                StageProj::Running { future, recorder } => {
                    // A panic in the service's future must not leave the key
                    // held: it is released and the client gets a 500.
                    let polled = catch_unwind(AssertUnwindSafe(|| future.poll(cx)));
                    let outcome = match polled {
                        Ok(Poll::Pending) => return Poll::Pending,
                        Ok(Poll::Ready(outcome)) => Ok(outcome),
                        Err(_panic) => Err(()),
                    };
                    let recorded = recorded.take().expect("the service answers once");
                    answered(outcome, recorder.take(), recorded)
                }
                StageProj::Gathering {
                    head,
                    mut body,
                    data,
                } => {
                    let last = loop {
                        match ready!(body.as_mut().poll_frame(cx)) {
                            Some(Ok(frame)) => match frame.into_data() {
                                Ok(chunk) => data.push(chunk),
                                Err(trailers) => break Some(Ok(trailers)),
                            },
                            Some(Err(error)) => break Some(Err(error)),
                            None => break None,
                        }
                        if body.is_end_stream() {
                            break None;
                        }
                    };
                    let head = head.take().expect("a gathered head is handed on once");
                    let data = std::mem::take(data).into_bytes();
                    Next::Ready(Ok(Response::from_parts(
                        head,
                        ResponseBody::held(data, last),
                    )))
                }
                StageProj::Releasing { release, output } => {
                    ready!(release.as_mut().poll(cx));
                    Next::Ready(output.take().expect("a released answer is handed on once"))
                }
                StageProj::Done => panic!("ResponseFuture polled after completion"),
            };
            match next {
                Next::Ready(output) => {
                    self.set(Stage::Done);
                    return Poll::Ready(output);
                }
                Next::Stage(stage) => self.set(stage),
            }
        }
    }
}

enum Next<F, B, E> {
    Ready(Result<Response<ResponseBody<B>>, E>),
    Stage(Stage<F, B, E>),
}

/// What follows the service's answer (`Err(())`: it panicked).
fn answered<F, B, E>(
    outcome: Result<Result<Response<B>, E>, ()>,
    recorder: Option<Box<dyn Recorder>>,
    recorded: impl FnOnce(B, Tee) -> ResponseBody<B>,
) -> Next<F, B, E>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let Some(mut recorder) = recorder else {
        // Unprotected: nothing to record, nothing to release.
        return Next::Ready(match outcome {
            Ok(outcome) => outcome.map(|response| response.map(ResponseBody::passthrough)),
            Err(()) => Ok(internal_error()),
        });
    };
    let response = match outcome {
        Ok(Ok(response)) => response,
        Ok(Err(error)) => return releasing(recorder, GiveUp::Failed, Err(error)),
        Err(()) => return releasing(recorder, GiveUp::Panicked, Ok(internal_error())),
    };
    let (head, body) = response.into_parts();
    if head.extensions.get::<OutcomeUnknown>().is_some() {
        // The service could not tell whether the action ran: nothing to
        // record, and the key is not freed for a retry to run it again.
        let response = Response::from_parts(head, ResponseBody::passthrough(body));
        return releasing(recorder, GiveUp::Unclear, Ok(response));
    }
    if !recorder.keep_head(&head, body.size_hint().exact()) {
        // Not stored: the key is freed before the client can see the answer,
        // so its retry runs the action again instead of meeting a marker.
        let response = Response::from_parts(head, ResponseBody::passthrough(body));
        return releasing(recorder, GiveUp::NotStored, Ok(response));
    }
    // The record is stored when the declared length has come, unless
    // trailers may follow it: then at the end of the stream, after them.
    let declared = body
        .size_hint()
        .exact()
        .or_else(|| {
            head.headers
                .get(CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok()?.parse().ok())
        })
        .filter(|_| !trailers_may_follow(&head.headers));
    let complete =
        body.is_end_stream() || body.size_hint().exact().is_some_and(|len| len <= HELD_BODY);
    let tee = Tee::new(recorder, declared);
    if complete {
        return Next::Stage(Stage::Gathering {
            head: Some(head),
            body: TeeBody::new(body, tee),
            data: Gathered::default(),
        });
    }
    Next::Ready(Ok(Response::from_parts(head, recorded(body, tee))))
}

/// Whether a response with these headers may end in trailers: it announces
/// them (`Trailer`), or it is a gRPC answer, whose status comes in them.
fn trailers_may_follow(headers: &http::HeaderMap) -> bool {
    headers.contains_key(http::header::TRAILER)
        || headers
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// Gives up recording (`why`) before the client sees `output`: a release
/// runs first, so the client's retry never meets a stale marker.
fn releasing<F, B, E>(
    recorder: Box<dyn Recorder>,
    why: GiveUp,
    output: Result<Response<ResponseBody<B>>, E>,
) -> Next<F, B, E> {
    Next::Stage(Stage::Releasing {
        release: recorder.give_up(why),
        output: Some(output),
    })
}

fn internal_error<B>() -> Response<ResponseBody<B>> {
    problem::internal_error().map(ResponseBody::full)
}

#[cfg(test)]
mod tests;
