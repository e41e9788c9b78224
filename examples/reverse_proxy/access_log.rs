//! The access log: one line per request, written the way nginx writes its
//! own (`access_log ... buffer= flush=`), off the request path.
//!
//! A request formats its line straight into a shared buffer, under a lock
//! held for the formatting alone, and goes on: no allocation, no channel,
//! no thread woken. A writer thread takes the whole buffer every
//! [`FLUSH_INTERVAL`], or as soon as it holds [`BATCH`] bytes, and writes it
//! in one `write`. Waking a sleeping thread for every line cost about a
//! third of the proxy's throughput under load (a futex wake and a context
//! switch per request). When the writer falls behind (a slow disk, a
//! blocked stderr) and the buffer reaches [`MAX_PENDING`] bytes, new lines
//! are dropped and counted (`access_log_dropped` in `/stats` and
//! `/metrics`): the log never slows the proxy down. A line reaches its
//! target at most [`FLUSH_INTERVAL`] after its response head.
//!
//! `--access-log off|stderr|PATH` chooses where the lines go; `RUST_LOG`
//! governs every other log line.

use std::fs::OpenOptions;
use std::future::Future;
use std::io::{self, Write};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http::{HeaderName, HeaderValue, Method, Request, Response, Uri};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

/// The longest a line waits in the buffer (nginx's `flush=` is 1 s).
const FLUSH_INTERVAL: Duration = Duration::from_millis(100);
/// A buffer this full is written at once (nginx's `buffer=`).
const BATCH: usize = 64 * 1024;
/// Past this many bytes waiting, new lines are dropped (and counted).
const MAX_PENDING: usize = 8 << 20;

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

/// The lines waiting for the writer, and the writer's progress.
#[derive(Default)]
struct Pending {
    lines: Vec<u8>,
    /// The writer was woken early and has not taken the buffer yet.
    woken: bool,
    /// Flushes asked for, and how many of them the writer has done.
    flushes_asked: u64,
    flushes_done: u64,
    /// The target failed: lines are dropped from now on.
    closed: bool,
}

struct Shared {
    pending: Mutex<Pending>,
    /// Wakes the writer before its interval: a full batch, or a flush.
    wake: Condvar,
    /// Wakes those waiting in [`AccessLog::flush`].
    flushed: Condvar,
    dropped: Arc<AtomicU64>,
}

impl Shared {
    fn pending(&self) -> MutexGuard<'_, Pending> {
        crate::lock(&self.pending)
    }
}

/// The sending side of the access log; cheap to clone. `None` inside when
/// the log is off.
#[derive(Clone)]
pub(crate) struct AccessLog {
    shared: Option<Arc<Shared>>,
}

impl AccessLog {
    /// Opens `target` and starts its writer thread; `dropped` counts the
    /// lines the writer could not take in time.
    pub(crate) fn start(target: &Target, dropped: Arc<AtomicU64>) -> io::Result<Self> {
        let out: Box<dyn Write + Send> = match target {
            Target::Off => return Ok(Self { shared: None }),
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
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending::default()),
            wake: Condvar::new(),
            flushed: Condvar::new(),
            dropped,
        });
        let writer = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_lines(&writer, out))?;
        Ok(Self {
            shared: Some(shared),
        })
    }

    fn enabled(&self) -> bool {
        self.shared.is_some()
    }

    /// Appends one line, made by `format`; drops (and counts) it when the
    /// writer is behind.
    fn append(&self, format: impl FnOnce(&mut Vec<u8>)) {
        let Some(shared) = &self.shared else { return };
        let mut pending = shared.pending();
        if pending.closed || pending.lines.len() >= MAX_PENDING {
            drop(pending);
            shared.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        format(&mut pending.lines);
        if pending.lines.len() >= BATCH && !pending.woken {
            pending.woken = true;
            shared.wake.notify_one();
        }
    }

    /// Waits (at most `timeout`) until the lines appended so far are
    /// written and flushed.
    pub(crate) fn flush(&self, timeout: Duration) {
        let Some(shared) = &self.shared else { return };
        let mut pending = shared.pending();
        pending.flushes_asked += 1;
        let asked = pending.flushes_asked;
        shared.wake.notify_one();
        let _ = shared
            .flushed
            .wait_timeout_while(pending, timeout, |pending| {
                pending.flushes_done < asked && !pending.closed
            });
    }
}

/// The writer thread: every interval, or when woken, takes the buffer and
/// writes it.
fn write_lines(shared: &Shared, mut out: Box<dyn Write + Send>) {
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        let (mut pending, _) = shared
            .wake
            .wait_timeout_while(shared.pending(), FLUSH_INTERVAL, |pending| {
                !pending.woken && pending.flushes_asked == pending.flushes_done
            })
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        std::mem::swap(&mut pending.lines, &mut batch);
        pending.woken = false;
        let asked = pending.flushes_asked;
        drop(pending);
        let written = batch.is_empty() || out.write_all(&batch).and_then(|()| out.flush()).is_ok();
        batch.clear();
        let mut pending = shared.pending();
        pending.flushes_done = asked;
        pending.closed = !written;
        shared.flushed.notify_all();
        if !written {
            return;
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
            this.log.append(|out| write_line(out, &started, response));
        }
        Poll::Ready(answer)
    }
}

/// `2026-12-07T15:48:46.123Z POST /orders 201 0.412ms replayed=false id=...`
fn write_line<B>(out: &mut Vec<u8>, started: &Started, response: &Response<B>) {
    let latency = started.at.elapsed();
    let replayed = response.headers().contains_key(&started.replay_header);
    let id = started
        .request_id
        .as_ref()
        .and_then(|id| id.to_str().ok())
        .unwrap_or("-");
    write_timestamp(out, SystemTime::now());
    // Writing to a Vec cannot fail.
    let _ = writeln!(
        out,
        " {} {} {} {:.3}ms replayed={replayed} id={id}",
        started.method,
        started.uri,
        response.status().as_u16(),
        latency.as_secs_f64() * 1000.0,
    );
}

/// RFC 3339 in UTC with milliseconds (days to civil date: H. Hinnant's
/// algorithm), without a date crate.
fn write_timestamp(out: &mut Vec<u8>, now: SystemTime) {
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
        let mut out = Vec::new();
        write_timestamp(
            &mut out,
            UNIX_EPOCH + Duration::from_millis(1_796_658_526_123),
        );
        assert_eq!(out, b"2026-12-07T15:48:46.123Z");
        out.clear();
        write_timestamp(&mut out, UNIX_EPOCH + Duration::from_secs(951_782_400));
        assert_eq!(out, b"2000-02-29T00:00:00.000Z");
    }
}
