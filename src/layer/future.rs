//! [`ResponseFuture`]: the response of [`Idempotent`](super::Idempotent).

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::Response;
use pin_project_lite::pin_project;

use super::body::ResponseBody;

/// What the driver task answers: the response head (its body streams after),
/// or the inner service's error.
pub(crate) type Reply<B, E> = Result<Response<ResponseBody<B>>, E>;

pin_project! {
    /// The response future of [`Idempotent`](super::Idempotent).
    ///
    /// Requests the layer does not protect poll the inner future in place (no
    /// allocation); the layer's own answers (400, 413) are ready at once;
    /// protected requests poll one boxed future that buffers and begins, and
    /// hands the execution, if any, to a task of its own.
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
        Driven { future: Pin<Box<dyn Future<Output = Reply<B, E>> + Send>> },
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
                response: Some(Box::new(response.map(ResponseBody::full))),
            },
        }
    }

    pub(crate) fn driven(future: Pin<Box<dyn Future<Output = Reply<B, E>> + Send>>) -> Self {
        Self {
            kind: Kind::Driven { future },
        }
    }
}

impl<F, B, E> std::fmt::Debug for ResponseFuture<F, B, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.kind {
            Kind::Passthrough { .. } => "Passthrough",
            Kind::Answered { .. } => "Answered",
            Kind::Driven { .. } => "Driven",
        };
        f.debug_struct("ResponseFuture")
            .field("kind", &kind)
            .finish()
    }
}

impl<F, B, E> Future for ResponseFuture<F, B, E>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<ResponseBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Passthrough { future } => {
                let response = ready!(future.poll(cx))?;
                Poll::Ready(Ok(response.map(ResponseBody::passthrough)))
            }
            KindProj::Answered { response } => Poll::Ready(Ok(*response
                .take()
                .expect("ResponseFuture polled after completion"))),
            KindProj::Driven { future } => future.as_mut().poll(cx),
        }
    }
}
