//! Shared helpers of the Redis tests: where Redis is, and a Redis server of
//! the test's own that it can kill and restart.
#![allow(dead_code)]

use std::future::Future;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

/// The limit on any one wait on the network or on another task.
pub(crate) const LIMIT: Duration = Duration::from_secs(20);

/// `REDIS_URL`, or the Redis on 127.0.0.1:6379.
pub(crate) fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
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

/// A `redis-server` this test started on its own port, without persistence.
pub(crate) struct OwnRedis {
    port: u16,
    child: Option<Child>,
}

impl OwnRedis {
    /// Starts `redis-server` on `port` and waits until it answers.
    pub(crate) async fn start(port: u16) -> Self {
        let mut redis = Self { port, child: None };
        redis.restart().await;
        redis
    }

    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts the server again (after [`kill`](Self::kill)) and waits until it answers.
    pub(crate) async fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
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

    /// Kills the server (SIGKILL) and waits until it is gone.
    pub(crate) async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.unwrap();
        }
    }
}
