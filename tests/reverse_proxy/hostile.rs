//! Raw-TCP upstreams that break an exchange after it reached them, counting
//! every request they read whole.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Mutex, Semaphore};
use tokio::time::timeout;

use super::harness::QUICK;

/// What the upstream does once it has read a request whole.
#[derive(Clone, Copy)]
pub(crate) enum Break {
    /// Resets the connection (RST) without a byte of answer.
    Reset,
    /// Sends a `201` head declaring [`Break::DECLARED`] bytes and half of
    /// them, waits for [`Hostile::release`], then closes the connection.
    CutBody,
}

impl Break {
    /// The body length a [`Break::CutBody`] head declares: above what the
    /// layer holds back to store before the head goes, so the head streams.
    pub(crate) const DECLARED: usize = 256 * 1024;
}

/// A hostile upstream on loopback.
pub(crate) struct Hostile {
    pub(crate) url: String,
    requests: Arc<AtomicU64>,
    gate: Arc<Semaphore>,
    finished: Mutex<mpsc::UnboundedReceiver<()>>,
}

impl Hostile {
    pub(crate) async fn start(how: Break) -> Hostile {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let requests = Arc::new(AtomicU64::new(0));
        let gate = Arc::new(Semaphore::new(0));
        let (done, finished) = mpsc::unbounded_channel();
        let (counter, held) = (requests.clone(), gate.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (counter, held, done) = (counter.clone(), held.clone(), done.clone());
                tokio::spawn(async move {
                    if serve(stream, how, &counter, &held).await.is_some() {
                        let _ = done.send(());
                    }
                });
            }
        });
        Hostile {
            url,
            requests,
            gate,
            finished: Mutex::new(finished),
        }
    }

    /// How many requests reached the upstream whole.
    pub(crate) fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }

    /// Lets one held [`Break::CutBody`] answer close its connection.
    pub(crate) fn release(&self) {
        self.gate.add_permits(1);
    }

    /// Waits until the upstream has broken one more exchange.
    pub(crate) async fn finished(&self) {
        let mut finished = self.finished.lock().await;
        timeout(QUICK, finished.recv())
            .await
            .expect("the upstream breaks the exchange in time")
            .expect("the upstream is alive");
    }
}

/// Reads one request, counts it, and breaks the exchange; `None` when the
/// connection ended before a whole request came.
async fn serve(
    mut stream: TcpStream,
    how: Break,
    requests: &AtomicU64,
    gate: &Semaphore,
) -> Option<()> {
    read_request(&mut stream).await?;
    requests.fetch_add(1, Ordering::SeqCst);
    match how {
        Break::Reset => {
            stream.set_zero_linger().ok()?;
            drop(stream);
        }
        Break::CutBody => {
            let head = format!(
                "HTTP/1.1 201 Created\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n",
                Break::DECLARED
            );
            stream.write_all(head.as_bytes()).await.ok()?;
            stream
                .write_all(&vec![b'x'; Break::DECLARED / 2])
                .await
                .ok()?;
            stream.flush().await.ok()?;
            gate.acquire().await.ok()?.forget();
            stream.shutdown().await.ok()?;
            drop(stream);
        }
    }
    Some(())
}

/// Reads a request head and its `content-length` body.
async fn read_request(stream: &mut TcpStream) -> Option<()> {
    let mut seen = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        seen.extend_from_slice(&chunk[..n]);
        if let Some(at) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
    };
    let head = String::from_utf8_lossy(&seen[..head_end]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length:"))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0);
    let mut body = seen.len() - head_end;
    while body < length {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        body += n;
    }
    Some(())
}
