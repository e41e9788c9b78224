//! A TCP forwarder in front of Postgres that counts what Postgres answers:
//! one `CommandComplete` message per statement it carried out, one
//! `ReadyForQuery` per round trip (a statement, a ping, a prepare, a
//! connection's start). The counts are Postgres's own answers on the wire,
//! not timings. It can also cut a connection just as the answer to a
//! statement that was carried out comes back, as a server dying at that
//! moment does.
//!
//! Used by the round-trip tests and by `benches/stores.rs`.

#![allow(dead_code, unreachable_pub)]
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};

use sqlx::postgres::PgConnectOptions;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

/// What the forwarder counted and what it was asked to do.
#[derive(Debug, Default)]
struct Shared {
    statements: AtomicU64,
    round_trips: AtomicU64,
    /// Cut the next connection whose statement answer comes back.
    cut_armed: AtomicBool,
    /// The command tags of the answers that were cut off.
    cut: Mutex<Vec<String>>,
}

/// The forwarder; stops (and cuts its connections) when dropped.
#[derive(Debug)]
pub struct Wire {
    addr: SocketAddr,
    url: String,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Wire {
    /// Listens on a free port of loopback and forwards to the Postgres of
    /// `database_url`.
    pub async fn start(database_url: &str) -> Self {
        let options: PgConnectOptions = database_url.parse().expect("a Postgres URL");
        let target = tokio::net::lookup_host((options.get_host(), options.get_port()))
            .await
            .expect("the Postgres host resolves")
            .next()
            .expect("the Postgres host has an address");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared::default());
        let task = tokio::spawn(accept(listener, target, shared.clone()));
        Self {
            addr,
            url: through(database_url, addr),
            shared,
            task,
        }
    }

    /// `database_url` with the forwarder in place of the server, and no TLS
    /// (the counts read the messages). `extra` (`name=value&...`) is added
    /// to its parameters.
    pub fn url(&self, extra: &str) -> String {
        if extra.is_empty() {
            self.url.clone()
        } else {
            format!("{}&{extra}", self.url)
        }
    }

    /// Statements Postgres carried out (`CommandComplete` messages).
    pub fn statements(&self) -> u64 {
        self.shared.statements.load(SeqCst)
    }

    /// Round trips Postgres answered (`ReadyForQuery` messages).
    pub fn round_trips(&self) -> u64 {
        self.shared.round_trips.load(SeqCst)
    }

    /// Cuts the connection whose next statement answer comes back: the
    /// statement was carried out (and, outside a transaction, committed),
    /// and the client never hears so.
    pub fn cut_next_answer(&self) {
        self.shared.cut_armed.store(true, SeqCst);
    }

    /// The command tags (`SELECT 1`, `UPDATE 1`...) of the answers cut off.
    pub fn cut(&self) -> Vec<String> {
        self.shared.cut.lock().unwrap().clone()
    }
}

impl Drop for Wire {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `url` with `addr` as its host and port, and `sslmode=disable`.
fn through(url: &str, addr: SocketAddr) -> String {
    let (scheme, rest) = url.split_once("://").expect("a URL");
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    let user = authority
        .rsplit_once('@')
        .map(|(user, _)| format!("{user}@"))
        .unwrap_or_default();
    let separator = if path.contains('?') { '&' } else { '?' };
    format!("{scheme}://{user}{addr}{path}{separator}sslmode=disable")
}

async fn accept(listener: TcpListener, target: SocketAddr, shared: Arc<Shared>) {
    // Dropped with the task: every connection is cut.
    let mut connections = JoinSet::new();
    while let Ok((client, _)) = listener.accept().await {
        let shared = shared.clone();
        connections.spawn(async move {
            let Ok(server) = TcpStream::connect(target).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (mut client_read, client_write) = client.into_split();
            let (server_read, mut server_write) = server.into_split();
            // Either way ending drops both sockets.
            tokio::select! {
                _ = tokio::io::copy(&mut client_read, &mut server_write) => {}
                () = answers(server_read, client_write, &shared) => {}
            }
        });
        // Reap the connections that ended.
        while connections.try_join_next().is_some() {}
    }
}

/// Forwards what the server answers, counting its messages; ends on a cut.
async fn answers(
    mut server: tokio::net::tcp::OwnedReadHalf,
    mut client: tokio::net::tcp::OwnedWriteHalf,
    shared: &Shared,
) {
    let mut messages = Messages::default();
    let mut completed = false;
    let mut buffer = vec![0_u8; 64 * 1024];
    loop {
        let read = match server.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(read) => read,
        };
        let mut cut = false;
        messages.feed(&buffer[..read], |kind, body| match kind {
            b'C' => {
                shared.statements.fetch_add(1, SeqCst);
                completed = true;
                let tag = String::from_utf8_lossy(body.strip_suffix(&[0]).unwrap_or(body));
                if shared.cut_armed.load(SeqCst) {
                    shared.cut.lock().unwrap().push(tag.into_owned());
                }
            }
            b'Z' => {
                shared.round_trips.fetch_add(1, SeqCst);
                if completed && shared.cut_armed.swap(false, SeqCst) {
                    cut = true;
                }
                completed = false;
            }
            _ => {}
        });
        if cut {
            return;
        }
        if client.write_all(&buffer[..read]).await.is_err() {
            return;
        }
    }
}

/// Splits the server's byte stream into messages (a type byte, a length
/// that counts itself, a body); keeps the body of `CommandComplete` only.
#[derive(Debug, Default)]
struct Messages {
    header: [u8; 5],
    have: usize,
    left: usize,
    body: Vec<u8>,
}

impl Messages {
    fn feed(&mut self, mut data: &[u8], mut on: impl FnMut(u8, &[u8])) {
        while !data.is_empty() {
            if self.have < 5 {
                let take = (5 - self.have).min(data.len());
                self.header[self.have..self.have + take].copy_from_slice(&data[..take]);
                self.have += take;
                data = &data[take..];
                if self.have == 5 {
                    let length = i32::from_be_bytes(self.header[1..5].try_into().unwrap());
                    self.left = usize::try_from(length).unwrap_or(4).saturating_sub(4);
                    self.body.clear();
                    if self.left == 0 {
                        on(self.header[0], &self.body);
                        self.have = 0;
                    }
                }
                continue;
            }
            let take = self.left.min(data.len());
            if self.header[0] == b'C' {
                self.body.extend_from_slice(&data[..take]);
            }
            self.left -= take;
            data = &data[take..];
            if self.left == 0 {
                on(self.header[0], &self.body);
                self.have = 0;
            }
        }
    }
}

#[test]
fn urls_go_through_the_forwarder() {
    let addr: SocketAddr = "127.0.0.1:4000".parse().unwrap();
    assert_eq!(
        through("postgres://postgres@127.0.0.1:5432/test", addr),
        "postgres://postgres@127.0.0.1:4000/test?sslmode=disable"
    );
    assert_eq!(
        through("postgres://u:p@db/x?application_name=a", addr),
        "postgres://u:p@127.0.0.1:4000/x?application_name=a&sslmode=disable"
    );
}
