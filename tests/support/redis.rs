//! Shared helpers of the Redis tests: where Redis is, and a Redis server of
//! the test's own that it can kill and restart.
#![allow(dead_code)]

use std::future::Future;
use std::io;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::process::{Child, Command};
use tokio::sync::Barrier;
use tower_idempotency::store::redis::RedisStore;
use tower_idempotency::store::Store;
use tower_idempotency::{Begin, Concurrent, Fingerprint, Idempotency, Record};

/// The limit on any one wait on the network or on another task.
pub(crate) const LIMIT: Duration = Duration::from_secs(20);

/// `REDIS_URL`, or the Redis on 127.0.0.1:6379.
pub(crate) fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// A store on the shared Redis under `prefix`.
pub(crate) async fn store(prefix: &str) -> RedisStore {
    RedisStore::builder(redis_url())
        .prefix(prefix)
        .build()
        .await
        .expect("Redis answers on REDIS_URL or 127.0.0.1:6379")
}

/// A fresh random prefix, so tests do not see each other.
pub(crate) fn prefix() -> String {
    format!("test:redis:{:x}:", rand::random::<u64>())
}

/// A fresh random prefix, and the guard that deletes its keys on the shared
/// Redis (`REDIS_URL`) when the test ends, pass or fail.
pub(crate) fn cleaned_prefix() -> (String, crate::support::stores::Cleanup) {
    let prefix = prefix();
    let cleanup = crate::support::stores::Cleanup::new(redis_url(), prefix.clone());
    (prefix, cleanup)
}

/// An engine on `store` with `concurrent` as its policy.
pub(crate) fn engine(store: RedisStore, concurrent: Concurrent) -> Idempotency<RedisStore> {
    Idempotency::builder()
        .store(store)
        .concurrent(concurrent)
        .build()
        .unwrap()
}

/// A value record.
pub(crate) fn value(fp: Fingerprint, body: &'static str) -> Record {
    Record::value(fp, Bytes::from_static(body.as_bytes()))
}

/// `duplicates` concurrent begins of one key, split over two instances of a
/// service that share a store, all let go at once under `wait`: the action
/// runs once, every caller gets its result, and the instances' counters say
/// one execution and `duplicates - 1` answers from it.
pub(crate) async fn duplicates_over_two_instances_run_once<S: Store>(
    instances: [Idempotency<S>; 2],
    wait: Concurrent,
    duplicates: usize,
) {
    let fp = Fingerprint::of_bytes(b"charge 42");
    let runs = Arc::new(AtomicUsize::new(0));
    let barrier = Arc::new(Barrier::new(duplicates));
    let tasks: Vec<_> = (0..duplicates)
        .map(|i| {
            let engine = instances[i % 2].clone();
            let (runs, barrier) = (runs.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                match engine
                    .begin_with("sig:charge:acct-1", fp, wait)
                    .await
                    .unwrap()
                {
                    Begin::Execute(lease) => {
                        let run = runs.fetch_add(1, Ordering::SeqCst);
                        // Hold the lease a little so duplicates pile up on
                        // both instances; the assertions do not depend on it.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        let body = if run == 0 { "charged" } else { "charged again" };
                        assert!(lease.complete(value(fp, body)).await.unwrap());
                        Bytes::from_static(body.as_bytes())
                    }
                    Begin::Replay { record, .. } => record.as_value().unwrap().clone(),
                    other => panic!("a duplicate got {other:?}"),
                }
            })
        })
        .collect();
    for task in tasks {
        let body = tokio::time::timeout(LIMIT, task).await.unwrap().unwrap();
        assert_eq!(body, "charged");
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the action ran once");
    let [a, b] = [instances[0].stats(), instances[1].stats()];
    assert_eq!(a.executed + b.executed, 1);
    assert_eq!(
        a.coalesced + a.replayed + b.coalesced + b.replayed,
        duplicates as u64 - 1
    );
}

/// A port nothing listens on (the OS picked it free a moment ago).
pub(crate) fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// Retries `attempt` until it succeeds, within [`LIMIT`].
pub(crate) async fn until_ok<T, E: std::fmt::Debug, F: Future<Output = Result<T, E>>>(
    mut attempt: impl FnMut() -> F,
) -> T {
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        match tokio::time::timeout_at(deadline, attempt()).await {
            Ok(Ok(value)) => return value,
            Ok(Err(error)) if tokio::time::Instant::now() >= deadline => {
                panic!("still failing after {LIMIT:?}: {error:?}")
            }
            Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(_) => panic!("no answer within {LIMIT:?}"),
        }
    }
}

/// A `redis-server` this test started on its own port, without persistence,
/// killed when dropped. A test may pause it ([`pause`](Self::pause)) without
/// disturbing the shared Redis other tests use.
pub(crate) struct OwnRedis {
    port: u16,
    args: Vec<String>,
    child: Option<Child>,
}

impl OwnRedis {
    /// Starts `redis-server` on `port` and waits until it answers.
    pub(crate) async fn start(port: u16) -> Self {
        Self::start_with(port, &[]).await
    }

    /// Starts `redis-server` on `port` with extra arguments (`"--maxmemory-policy",
    /// "allkeys-lru"`) and waits until it answers.
    pub(crate) async fn start_with(port: u16, args: &[&str]) -> Self {
        let args = args.iter().map(|arg| (*arg).to_owned()).collect();
        let mut redis = Self {
            port,
            args,
            child: None,
        };
        redis.restart().await;
        redis
    }

    /// Stops the server (SIGSTOP): connections stay open, commands sent are
    /// neither answered nor lost, as with a server stalled by a long command.
    pub(crate) fn pause(&self) {
        self.signal("-STOP");
    }

    /// Lets a paused server go on (SIGCONT): it runs what was sent meanwhile.
    pub(crate) fn resume(&self) {
        self.signal("-CONT");
    }

    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts the server again (after [`kill`](Self::kill)) and waits until it answers.
    pub(crate) async fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server is installed");
        self.child = Some(child);
        let client = redis::Client::open(self.url()).unwrap();
        until_ok(|| async {
            let mut connection = client.get_multiplexed_async_connection().await?;
            redis::cmd("PING")
                .query_async::<String>(&mut connection)
                .await
        })
        .await;
    }

    /// Sends `signal` (`"-STOP"`, `"-CONT"`) to the server.
    pub(crate) fn signal(&self, signal: &str) {
        let pid = self
            .child
            .as_ref()
            .and_then(Child::id)
            .expect("the server runs");
        let status = std::process::Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill {signal} {pid} failed");
    }

    /// Makes the server refuse every write with an `OOM` error (as a full
    /// Redis under `noeviction` does) until [`accept_writes`](Self::accept_writes).
    pub(crate) async fn refuse_writes(&self) {
        self.set_maxmemory("1").await;
    }

    /// Lets the server accept writes again.
    pub(crate) async fn accept_writes(&self) {
        self.set_maxmemory("0").await;
    }

    async fn set_maxmemory(&self, bytes: &str) {
        let client = redis::Client::open(self.url()).unwrap();
        until_ok(|| async {
            let mut connection = client.get_multiplexed_async_connection().await?;
            redis::cmd("CONFIG")
                .arg("SET")
                .arg("maxmemory")
                .arg(bytes)
                .query_async::<()>(&mut connection)
                .await
        })
        .await;
    }

    /// Kills the server (SIGKILL) and waits until it is gone.
    pub(crate) async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.unwrap();
        }
    }
}

/// A `tracing` writer into a shared buffer.
#[derive(Clone, Default)]
pub(crate) struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    /// Captures everything logged on this thread at debug level and above
    /// until the guard is dropped.
    pub(crate) fn capture_on_this_thread(&self) -> tracing::subscriber::DefaultGuard {
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(self.clone())
            .finish();
        tracing::subscriber::set_default(subscriber)
    }

    /// What was logged so far.
    pub(crate) fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl io::Write for Logs {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Logs {
    type Writer = Self;

    fn make_writer(&'a self) -> Self {
        self.clone()
    }
}
