//! A buffered body costs about its size in heap, whatever its framing: a
//! 1 MiB request body and a 1 MiB recorded response, each sent one byte per
//! frame, hold at most about twice that while the layer reads them. Heap
//! bytes are counted exactly by a counting global allocator, so this file
//! holds one test: another running beside it would be counted too.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicIsize, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use stats_alloc::{StatsAlloc, INSTRUMENTED_SYSTEM};
use std::alloc::System;
use tower::{Layer, ServiceExt};
use tower_idempotency::{IdempotencyLayer, RequestBody};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const MIB: usize = 1 << 20;
/// What hyper reads from a socket at once, and cuts a chunked body's frames
/// from: every frame keeps its read buffer alive.
const READ_BUFFER: usize = 64 * 1024;
/// Room beside the gathered bytes for everything else one request holds:
/// the current read buffer, frames in flight, the request's parts.
const SLACK: isize = 256 * 1024;
const LIMIT: Duration = Duration::from_secs(60);

/// Heap bytes live now, by the counting allocator.
fn live_heap() -> isize {
    let stats = GLOBAL.stats();
    stats.bytes_allocated as isize - stats.bytes_deallocated as isize
}

/// The most heap seen live above a baseline, sampled by the bodies below.
#[derive(Default)]
struct Peak {
    baseline: AtomicIsize,
    most: AtomicIsize,
}

impl Peak {
    fn start(&self) {
        self.baseline.store(live_heap(), Relaxed);
        self.most.store(0, Relaxed);
    }

    fn sample(&self) {
        let above = live_heap() - self.baseline.load(Relaxed);
        self.most.fetch_max(above, Relaxed);
    }

    fn most(&self) -> isize {
        self.most.load(Relaxed)
    }
}

/// A body of `len` bytes `b'x'`, one byte per frame, each frame cut from a
/// read buffer as hyper cuts the chunks of a chunked body. Samples the heap
/// at every frame.
struct OneByteFrames {
    left: usize,
    buffer: Bytes,
    peak: Arc<Peak>,
}

impl OneByteFrames {
    fn new(len: usize, peak: Arc<Peak>) -> Self {
        Self {
            left: len,
            buffer: Bytes::new(),
            peak,
        }
    }
}

impl Body for OneByteFrames {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.peak.sample();
        if self.left == 0 {
            return Poll::Ready(None);
        }
        if self.buffer.is_empty() {
            self.buffer = Bytes::from(vec![b'x'; READ_BUFFER.min(self.left)]);
        }
        self.left -= 1;
        let frame = self.buffer.split_to(1);
        Poll::Ready(Some(Ok(Frame::data(frame))))
    }
}

/// Reads a body to its end, dropping each frame as it comes (as a client
/// that writes it out would); answers its length.
async fn drain<B: Body<Data = Bytes>>(body: B) -> usize
where
    B::Error: std::fmt::Debug,
{
    let mut body = std::pin::pin!(body);
    let mut len = 0;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            len += data.len();
        }
    }
    len
}

#[tokio::test(flavor = "current_thread")]
async fn one_mebibyte_in_one_byte_frames_costs_at_most_twice_its_size() {
    let request_peak = Arc::new(Peak::default());
    let response_peak = Arc::new(Peak::default());
    let responded = response_peak.clone();
    let handler = tower::service_fn(move |request: Request<RequestBody<OneByteFrames>>| {
        let peak = responded.clone();
        async move {
            let body = request.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body.len(), MIB);
            drop(body);
            // The response is recorded as it streams: from here on, the
            // heap is the response's.
            peak.start();
            Ok::<_, Infallible>(Response::new(OneByteFrames::new(MIB, peak)))
        }
    });
    // The default limits: 1 MiB, both ways.
    let layer = IdempotencyLayer::builder().build().unwrap();
    let handle = layer.handle();
    let service = layer.layer(handler);

    let request = Request::post("/orders")
        .header("idempotency-key", "big-one")
        .body(OneByteFrames::new(MIB, request_peak.clone()))
        .unwrap();
    request_peak.start();
    let response = tokio::time::timeout(LIMIT, service.clone().oneshot(request))
        .await
        .expect("answered")
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let len = tokio::time::timeout(LIMIT, drain(response.into_body()))
        .await
        .expect("the response ends");
    assert_eq!(len, MIB);

    let (request_most, response_most) = (request_peak.most(), response_peak.most());
    let bound = 2 * MIB as isize + SLACK;
    assert!(
        request_most <= bound,
        "the request body held {request_most} bytes of heap for 1 MiB"
    );
    assert!(
        response_most <= bound,
        "the recorded response held {response_most} bytes of heap for 1 MiB"
    );

    // The response was recorded whole: its retry replays all of it.
    let retry = Request::post("/orders")
        .header("idempotency-key", "big-one")
        .body(OneByteFrames::new(MIB, Arc::new(Peak::default())))
        .unwrap();
    let replay = tokio::time::timeout(LIMIT, service.oneshot(retry))
        .await
        .expect("answered")
        .unwrap();
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    let body = tokio::time::timeout(LIMIT, replay.into_body().collect())
        .await
        .expect("the replay ends")
        .unwrap()
        .to_bytes();
    assert_eq!(body.len(), MIB);
    assert!(body.iter().all(|&b| b == b'x'));
    assert_eq!(handle.stats().executed, 1);
}
