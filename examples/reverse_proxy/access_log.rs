//! The access log: one line per request, written the way nginx writes its
//! own, off the request path.
//!
//! A request formats its line and hands it to a bounded channel
//! ([`AccessLog::send`] never blocks); one writer thread drains the channel
//! into a buffered writer and flushes whenever the channel runs dry, so a
//! burst costs one `write` per batch, not one per line. When the writer
//! cannot keep up and the channel is full, the line is dropped and counted
//! (`access_log_dropped` in `/stats` and `/metrics`): a slow disk or a
//! blocked stderr never slows the proxy down.
//!
//! `--access-log off|stderr|PATH` chooses where the lines go; `RUST_LOG`
//! governs every other log line.

use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::future::Future;
use std::io::{self, BufWriter, Write};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http::{HeaderName, HeaderValue, Method, Request, Response, Uri};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

/// Lines the channel holds before new ones are dropped.
const CAPACITY: usize = 65_536;
/// The writer's buffer: one `write` per this many bytes at most.
const BUFFER: usize = 64 * 1024;

/// Where `--access-log` sends the request lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Target {
    Off,
    Stderr,
    File(PathBuf),
}

impl std::str::FromStr for Target {
    type Err = std::convert::Infallible;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Ok(match text {
            "off" => Self::Off,
            "stderr" => Self::Stderr,
            path => Self::File(PathBuf::from(path)),
        })
    }
}

enum Message {
    Line(String),
    /// Answered once every line sent before it is written and flushed.
    Flush(mpsc::Sender<()>),
}

/// The sending side of the access log; cheap to clone. `None` inside when
/// the log is off.
#[derive(Clone)]
pub(crate) struct AccessLog {
    sender: Option<SyncSender<Message>>,
    dropped: Arc<AtomicU64>,
}

impl AccessLog {
    /// Opens `target` and starts its writer thread; `dropped` counts the
    /// lines the writer could not take in time.
    pub(crate) fn start(target: &Target, dropped: Arc<AtomicU64>) -> io::Result<Self> {
        let writer: Box<dyn Write + Send> = match target {
            Target::Off => {
                return Ok(Self {
                    sender: None,
                    dropped,
                })
            }
            Target::Stderr => Box::new(io::stderr()),
            Target::File(path) => Box::new(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| {
                        io::Error::new(e.kind(), format!("--access-log {}: {e}", path.display()))
                    })?,
            ),
        };
        let (sender, receiver) = mpsc::sync_channel(CAPACITY);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_lines(&receiver, BufWriter::with_capacity(BUFFER, writer)))?;
        Ok(Self {
            sender: Some(sender),
            dropped,
        })
    }

    fn enabled(&self) -> bool {
        self.sender.is_some()
    }

    /// Queues one line; drops (and counts) it when the writer is behind.
    fn send(&self, line: String) {
        let Some(sender) = &self.sender else { return };
        match sender.try_send(Message::Line(line)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
            // The writer thread is gone (its output failed): nothing to do.
            Err(TrySendError::Disconnected(_)) => {}
        }
    }

    /// Waits (at most `timeout`) until the lines sent so far are written.
    pub(crate) fn flush(&self, timeout: Duration) {
        let Some(sender) = &self.sender else { return };
        let (done, written) = mpsc::channel();
        if sender.send(Message::Flush(done)).is_ok() {
            let _ = written.recv_timeout(timeout);
        }
    }
}

/// The writer thread: blocks for a line, takes every line already queued,
/// then flushes.
fn write_lines(receiver: &Receiver<Message>, mut out: BufWriter<Box<dyn Write + Send>>) {
    while let Ok(message) = receiver.recv() {
        let mut flushed = Vec::new();
        let mut next = Some(message);
        while let Some(message) = next {
            match message {
                Message::Line(line) => {
                    if out.write_all(line.as_bytes()).is_err() {
                        return;
                    }
                }
                Message::Flush(done) => flushed.push(done),
            }
            next = receiver.try_recv().ok();
        }
        if out.flush().is_err() {
            return;
        }
        for done in flushed {
            let _ = done.send(());
        }
    }
}

/// Writes one access-log line per request once its response head is ready.
#[derive(Clone)]
pub(crate) struct AccessLogLayer {
    log: AccessLog,
    // The replay marker's name (`--replay-header`), for `replayed=`.
    replay_header: HeaderName,
}

impl AccessLogLayer {
    pub(crate) fn new(log: AccessLog, replay_header: HeaderName) -> Self {
        Self { log, replay_header }
    }
}

impl<S> Layer<S> for AccessLogLayer {
    type Service = AccessLogService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AccessLogService {
            inner,
            log: self.log.clone(),
            replay_header: self.replay_header.clone(),
        }
    }
}

/// See [`AccessLogLayer`].
#[derive(Clone)]
pub(crate) struct AccessLogService<S> {
    inner: S,
    log: AccessLog,
    replay_header: HeaderName,
}

/// What a line needs from the request, taken before it moves on.
struct Started {
    method: Method,
    uri: Uri,
    request_id: Option<HeaderValue>,
    at: Instant,
    replay_header: HeaderName,
}

impl<S, B, ResB> Service<Request<B>> for AccessLogService<S>
where
    S: Service<Request<B>, Response = Response<ResB>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        // Clones of a method, a URI and a header value share their bytes.
        let started = self.log.enabled().then(|| Started {
            method: request.method().clone(),
            uri: request.uri().clone(),
            request_id: request.headers().get("x-request-id").cloned(),
            at: Instant::now(),
            replay_header: self.replay_header.clone(),
        });
        ResponseFuture {
            inner: self.inner.call(request),
            started,
            log: self.log.clone(),
        }
    }
}

pin_project! {
    /// The inner service's future; writes the line when it is ready.
    pub(crate) struct ResponseFuture<F> {
        #[pin]
        inner: F,
        started: Option<Started>,
        log: AccessLog,
    }
}

impl<F, ResB, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<ResB>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let answer = std::task::ready!(this.inner.poll(cx));
        if let (Some(started), Ok(response)) = (this.started.take(), &answer) {
            this.log.send(line(&started, response));
        }
        Poll::Ready(answer)
    }
}

/// `2026-12-07T15:48:46.123Z POST /orders 201 0.412ms replayed=false id=...`
fn line<B>(started: &Started, response: &Response<B>) -> String {
    let latency = started.at.elapsed();
    let replayed = response.headers().contains_key(&started.replay_header);
    let id = started
        .request_id
        .as_ref()
        .and_then(|id| id.to_str().ok())
        .unwrap_or("-");
    let mut line = String::with_capacity(128 + started.uri.path().len());
    write_timestamp(&mut line, SystemTime::now());
    let _ = writeln!(
        line,
        " {} {} {} {:.3}ms replayed={replayed} id={id}",
        started.method,
        started.uri,
        response.status().as_u16(),
        latency.as_secs_f64() * 1000.0,
    );
    line
}

/// RFC 3339 in UTC with milliseconds (days to civil date: H. Hinnant's
/// algorithm), without a date crate.
fn write_timestamp(out: &mut String, now: SystemTime) {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let _ = write!(
        out,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rest / 3600,
        rest / 60 % 60,
        rest % 60,
        since.subsec_millis()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        let mut out = String::new();
        write_timestamp(
            &mut out,
            UNIX_EPOCH + Duration::from_millis(1_796_658_526_123),
        );
        assert_eq!(out, "2026-12-07T15:48:46.123Z");
        out.clear();
        write_timestamp(&mut out, UNIX_EPOCH + Duration::from_secs(951_782_400));
        assert_eq!(out, "2000-02-29T00:00:00.000Z");
    }
}
