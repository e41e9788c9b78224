//! Redis Clusters for the tests: the shared one (ports 7000-7005, or
//! `REDIS_CLUSTER_URLS`), and private ones that a destructive test starts on
//! free ports, kills nodes of, and stops when it ends, pass or fail. Both are
//! started by the project's own `.ci/redis-cluster.sh`.
#![allow(dead_code, unreachable_pub)]

use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use tower_idempotency::store::redis::RedisStore;

/// The shared cluster's first port when `REDIS_CLUSTER_URLS` is not set.
const SHARED_BASE_PORT: u16 = 7000;

/// The cluster start script, from the crate root.
fn script_path() -> String {
    format!("{}/.ci/redis-cluster.sh", env!("CARGO_MANIFEST_DIR"))
}

fn urls_from(base: u16) -> Vec<String> {
    (0..6)
        .map(|offset| format!("redis://127.0.0.1:{}", base + offset))
        .collect()
}

/// The seed nodes of the shared cluster: `REDIS_CLUSTER_URLS` (comma
/// separated), or 127.0.0.1:7000-7005, which this starts through
/// `.ci/redis-cluster.sh` (once per test binary; nothing happens when the
/// cluster already answers). Panics with the script's output when it fails.
pub fn shared_cluster_urls() -> Vec<String> {
    if let Ok(urls) = std::env::var("REDIS_CLUSTER_URLS") {
        return urls.split(',').map(str::trim).map(str::to_owned).collect();
    }
    static STARTED: OnceLock<Result<(), String>> = OnceLock::new();
    let started = STARTED.get_or_init(|| run_script("start", SHARED_BASE_PORT, None));
    if let Err(output) = started {
        panic!("the shared Redis Cluster on 127.0.0.1:7000-7005 did not start: {output}");
    }
    urls_from(SHARED_BASE_PORT)
}

/// Runs `.ci/redis-cluster.sh command base` (its waits are bounded).
fn run_script(command: &str, base: u16, node_timeout_ms: Option<u64>) -> Result<(), String> {
    let mut script = Command::new("bash");
    script.arg(script_path()).arg(command).arg(base.to_string());
    if let Some(ms) = node_timeout_ms {
        script.env("REDIS_CLUSTER_NODE_TIMEOUT", ms.to_string());
    }
    match script.output() {
        Ok(output) if output.status.success() => Ok(()),
        Ok(output) => Err(format!(
            "{} {command} {base} failed ({}): {}{}",
            script_path().rsplit('/').next().unwrap_or_default(),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )),
        Err(error) => Err(format!("could not run bash: {error}")),
    }
}

/// A store on the cluster at `urls` under `prefix`.
pub async fn cluster_store(urls: &[String], prefix: &str, local_tier: bool) -> RedisStore {
    let mut builder = RedisStore::cluster_builder(urls.iter().cloned()).prefix(prefix);
    if local_tier {
        builder = builder.local_cache(1_000);
    }
    match tokio::time::timeout(Duration::from_secs(20), builder.build()).await {
        Ok(Ok(store)) => store,
        Ok(Err(error)) => panic!("Redis Cluster not reachable on {urls:?}: {error}"),
        Err(_) => panic!("Redis Cluster not reachable on {urls:?}: no answer within 20 s"),
    }
}

/// Deletes every key under a test's prefix on every primary of a cluster
/// when dropped, also when the test panicked. Synchronous: `Drop` cannot
/// await.
pub struct ClusterCleanup {
    pub(crate) urls: Vec<String>,
    pub(crate) prefix: String,
}

impl ClusterCleanup {
    fn run(&self) -> redis::RedisResult<()> {
        for url in &self.urls {
            let client = redis::Client::open(url.as_str())?;
            let Ok(mut connection) = client.get_connection_with_timeout(Duration::from_secs(5))
            else {
                continue; // a node that is down holds nothing to delete
            };
            connection.set_read_timeout(Some(Duration::from_secs(5)))?;
            let role: Vec<redis::Value> = redis::cmd("ROLE").query(&mut connection)?;
            if !matches!(role.first(), Some(redis::Value::BulkString(role)) if role == b"master") {
                continue;
            }
            let pattern = format!("{}*", self.prefix);
            let mut cursor = 0_u64;
            loop {
                let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(1000)
                    .query(&mut connection)?;
                // One key each: keys of different slots cannot share a DEL.
                for key in keys {
                    redis::cmd("DEL").arg(key).query::<()>(&mut connection)?;
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        Ok(())
    }
}

impl Drop for ClusterCleanup {
    fn drop(&mut self) {
        if let Err(error) = self.run() {
            eprintln!("could not delete the keys under {}: {error}", self.prefix);
        }
    }
}

/// A cluster of the test's own on six free ports, started through
/// `.ci/redis-cluster.sh` with a short node timeout (1 s), and stopped (nodes
/// shut down, data deleted) when dropped, also when the test failed.
pub struct PrivateCluster {
    base: u16,
}

impl PrivateCluster {
    /// Starts a new cluster; blocking (the script waits, bounded, until the
    /// cluster is ok and every replica is linked).
    pub fn start() -> Self {
        let base = free_base_port();
        let cluster = Self { base };
        if let Err(output) = run_script("start", base, Some(1_000)) {
            panic!(
                "a private Redis Cluster on {base}..{} did not start: {output}",
                base + 5
            );
        }
        cluster
    }

    pub fn urls(&self) -> Vec<String> {
        urls_from(self.base)
    }

    pub fn ports(&self) -> Vec<u16> {
        (0..6).map(|offset| self.base + offset).collect()
    }

    /// A blocking connection to the node on `port`.
    pub fn node(&self, port: u16) -> redis::RedisResult<redis::Connection> {
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))?;
        let connection = client.get_connection_with_timeout(Duration::from_secs(2))?;
        connection.set_read_timeout(Some(Duration::from_secs(2)))?;
        Ok(connection)
    }

    /// The port of the primary that serves `slot` in the view of the node
    /// on `ask` (`CLUSTER NODES`): `None` while no primary it does not
    /// consider failed serves it.
    pub fn primary_of_slot(&self, ask: u16, slot: u16) -> redis::RedisResult<Option<u16>> {
        let nodes: String = redis::cmd("CLUSTER")
            .arg("NODES")
            .query(&mut self.node(ask)?)?;
        // <id> <ip:port@bus> <flags> <master> <ping> <pong> <epoch> <link> <slots>...
        for line in nodes.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [_, address, flags, _, _, _, _, _, slots @ ..] = fields.as_slice() else {
                continue;
            };
            if !flags.contains("master") || flags.contains("fail") {
                continue;
            }
            let serves = slots.iter().any(|range| {
                let mut bounds = range.splitn(2, '-').map(str::parse::<u16>);
                match (bounds.next(), bounds.next()) {
                    (Some(Ok(start)), Some(Ok(end))) => (start..=end).contains(&slot),
                    (Some(Ok(single)), None) => single == slot,
                    _ => false,
                }
            });
            let port = address
                .split('@')
                .next()
                .and_then(|host_port| host_port.rsplit(':').next())
                .and_then(|port| port.parse().ok());
            if serves {
                return Ok(port);
            }
        }
        Ok(None)
    }

    /// The slot of `key` (`CLUSTER KEYSLOT`).
    pub fn slot_of(&self, key: &str) -> redis::RedisResult<u16> {
        let mut connection = self.node(self.base)?;
        redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query(&mut connection)
    }

    /// The ports of the nodes that are primaries now.
    pub fn primaries(&self) -> Vec<u16> {
        self.ports()
            .into_iter()
            .filter(|port| {
                self.node(*port)
                    .and_then(|mut c| redis::cmd("ROLE").query::<Vec<redis::Value>>(&mut c))
                    .is_ok_and(|role| {
                        matches!(role.first(), Some(redis::Value::BulkString(r)) if r == b"master")
                    })
            })
            .collect()
    }

    /// Kills the node on `port` with SIGKILL (no shutdown, no goodbye to the
    /// cluster): a primary that crashes.
    pub fn kill(&self, port: u16) {
        let mut connection = self
            .node(port)
            .expect("the node answers before it is killed");
        let info: String = redis::cmd("INFO")
            .arg("server")
            .query(&mut connection)
            .expect("INFO server");
        let pid = info
            .lines()
            .find_map(|line| line.strip_prefix("process_id:"))
            .map(|pid| pid.trim().to_owned())
            .expect("INFO names the process id");
        let status = Command::new("kill")
            .args(["-KILL", &pid])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -KILL {pid} failed");
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        if let Err(output) = run_script("stop", self.base, None) {
            eprintln!(
                "could not stop the private cluster on {}: {output}",
                self.base
            );
        }
    }
}

/// A base port whose six ports and their cluster bus ports (+10000) are free.
fn free_base_port() -> u16 {
    for _ in 0..200 {
        let base = 20_000 + (rand::random::<u16>() % 1_900) * 10;
        let ports = (0..6).flat_map(|offset| [base + offset, base + offset + 10_000]);
        let free = ports
            .map(|port| std::net::TcpListener::bind(("127.0.0.1", port)))
            .collect::<Result<Vec<_>, _>>()
            .is_ok();
        if free {
            return base;
        }
    }
    panic!("no free range of ports for a private cluster");
}
