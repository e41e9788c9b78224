//! Streaming a first response to its client while recording it.

use std::future::poll_fn;
use std::panic::AssertUnwindSafe;
use std::pin::pin;

use bytes::Bytes;
use futures_util::FutureExt;
use http::header;
use http::Response;
use http_body::Body;

use super::body::{BoxError, FrameResult, FrameSender, Gathered, ResponseBody};
use super::driver::{release, send, Sender};
use super::layer::{Disconnect, Settings};
use super::replay::{storable, stored_head};
use crate::engine::{Idempotency, Lease};
use crate::key::Fingerprint;
use crate::record::{Record, StoredHead};
use crate::stats::Stats;
use crate::store::Store;

/// Frames buffered between the driver and a slow client.
const FRAMES_IN_FLIGHT: usize = 8;

/// What a first response is recorded as, while it streams.
struct Recording<S: Store> {
    lease: Lease<S>,
    fingerprint: Fingerprint,
    head: StoredHead,
    body: Gathered,
}

impl<S: Store> Recording<S> {
    async fn complete(self, engine: &Idempotency<S>) {
        let response = self.head.finish(&self.body.into_bytes());
        match self
            .lease
            .complete(Record::response(self.fingerprint, response))
            .await
        {
            Ok(true) => {}
            Ok(false) => {
                Stats::incr(&engine.counters().not_stored);
                tracing::warn!("idempotency lease was lost before the response was stored");
            }
            Err(error) => tracing::warn!(%error, "storing the idempotent response failed"),
        }
    }
}

pub(crate) async fn stream<S, ResBody, E>(
    response: Response<ResBody>,
    lease: Lease<S>,
    fingerprint: Fingerprint,
    engine: &Idempotency<S>,
    settings: &Settings,
    reply: Sender<ResBody, E>,
) where
    S: Store,
    ResBody: Body<Data = Bytes>,
    ResBody::Error: Into<BoxError>,
{
    let cancel = settings.disconnect == Disconnect::Cancel;
    let not_stored = &engine.counters().not_stored;
    let (head, body) = response.into_parts();
    let mut recording = if storable(&head, settings) {
        Some(Recording {
            lease,
            fingerprint,
            head: stored_head(&head, settings),
            body: Gathered::default(),
        })
    } else {
        // Not stored: free the key before the client can see the answer, so
        // its retry runs the action again instead of meeting a stale marker.
        Stats::incr(not_stored);
        release(lease).await;
        None
    };
    let mut body = pin!(body);
    // The frame that reaches the declared length ends the response for the
    // client even before the body says so.
    let known_len = body.size_hint().exact().or_else(|| {
        head.headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse().ok())
    });
    if body.is_end_stream() || known_len == Some(0) {
        // Nothing to stream: the head ends the response, so store first.
        finish(&mut recording, engine).await;
        send(
            reply,
            Ok(Response::from_parts(head, ResponseBody::full(Bytes::new()))),
        );
        return;
    }
    let (frames, client_body) = ResponseBody::channel(FRAMES_IN_FLIGHT, body.size_hint());
    let mut client = Some(frames);
    let response = Response::from_parts(head, client_body);
    if reply.send(Ok(response)).is_err() {
        if cancel {
            return; // the recording drops with its lease: released
        }
        client = None;
    }
    let mut received: u64 = 0;
    loop {
        if client.is_none() && recording.is_none() {
            return; // nobody to answer and nothing to store
        }
        // Errors become `BoxError` inside the poll, so no `ResBody::Error` (which
        // need not be `Send`) is held across an await.
        let next = AssertUnwindSafe(poll_fn(|cx| {
            body.as_mut()
                .poll_frame(cx)
                .map(|frame| frame.map(|f| f.map_err(Into::<BoxError>::into)))
        }))
        .catch_unwind();
        let next = match (&client, cancel) {
            (Some(frames), true) => tokio::select! {
                next = next => next,
                () = frames.closed() => return,
            },
            _ => next.await,
        };
        let frame = match next {
            Ok(None) => {
                finish(&mut recording, engine).await;
                return end(client);
            }
            Ok(Some(Ok(frame))) => frame,
            Ok(Some(Err(error))) => {
                abandon(&mut recording).await;
                forward(&mut client, Err(error)).await;
                return end(client);
            }
            Err(_panic) => {
                tracing::error!("the response body panicked: lease released");
                abandon(&mut recording).await;
                forward(&mut client, Err("the response body panicked".into())).await;
                return end(client);
            }
        };
        let last = match frame.data_ref() {
            Some(data) => {
                received += data.len() as u64;
                if let Some(rec) = recording.as_mut() {
                    if rec.body.len() + data.len() > settings.max_response_body {
                        Stats::incr(not_stored);
                        abandon(&mut recording).await;
                    } else {
                        rec.body.push(data.clone());
                    }
                }
                body.is_end_stream() || known_len == Some(received)
            }
            // Trailers end a body; they are forwarded but not stored.
            None => true,
        };
        if last {
            finish(&mut recording, engine).await;
        }
        if !forward(&mut client, Ok(frame)).await && cancel {
            abandon(&mut recording).await;
            return;
        }
        if body.is_end_stream() {
            return end(client);
        }
    }
}

/// Stores the recording, if it is still kept.
async fn finish<S: Store>(recording: &mut Option<Recording<S>>, engine: &Idempotency<S>) {
    if let Some(recording) = recording.take() {
        recording.complete(engine).await;
    }
}

/// Gives the recording up, if it is still kept: its lease is released, so a
/// retry runs the action again.
async fn abandon<S: Store>(recording: &mut Option<Recording<S>>) {
    if let Some(recording) = recording.take() {
        release(recording.lease).await;
    }
}

/// Ends the client's body cleanly (dropping the sender without this is an
/// error for the client: a cut-short response).
fn end(client: Option<FrameSender>) {
    if let Some(frames) = client {
        frames.end();
    }
}

/// Sends a frame to the client; answers whether the client is still there.
async fn forward(client: &mut Option<FrameSender>, frame: FrameResult) -> bool {
    let Some(frames) = client else {
        return false;
    };
    if !frames.send(frame).await {
        *client = None;
        return false;
    }
    true
}
