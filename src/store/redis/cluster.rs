//! The cluster client's connection, replaced when it stops answering.
//!
//! The `redis` crate's cluster connection follows redirections, refreshes its
//! slot table and reconnects to nodes by itself. But when a primary dies
//! while many commands are in flight, the connection (redis 1.8) can stop
//! answering altogether, for the keys of every primary and after the failover
//! too: its slot refresh waits for a lock that a request it no longer polls
//! holds. A single-node connection manager has no such state. So the store
//! keeps the cluster client beside its connection, and when a command gets
//! no answer within the operation's time limit, it opens a new connection
//! (at most once per time limit), which learns the topology afresh from the
//! seed nodes. Commands on the old connection fail as they would have; the
//! next ones go to the new one.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::cluster::{ClusterClient, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{ErrorKind, RedisError, RedisResult, Value};
use tokio::sync::OnceCell;

/// A cluster connection and, when the store made it, how to make another.
pub(super) struct ClusterHandle {
    renew: Option<(ClusterClient, ClusterConfig)>,
    /// How long a command may go unanswered before the connection counts as
    /// stuck.
    limit: Duration,
    current: Mutex<Current>,
}

struct Current {
    connection: ClusterConnection,
    generation: u64,
    opened_at: Instant,
}

impl ClusterHandle {
    /// A connection the store opened from `client`, renewed when stuck.
    pub(super) fn open(client: ClusterClient, config: ClusterConfig, limit: Duration) -> Self {
        let connection = client.get_pending_async_connection_with_config(config.clone());
        Self::with(connection, Some((client, config)), limit)
    }

    /// A connection made by the caller: used as it is, never renewed.
    pub(super) fn fixed(connection: ClusterConnection, limit: Duration) -> Self {
        Self::with(connection, None, limit)
    }

    fn with(
        connection: ClusterConnection,
        renew: Option<(ClusterClient, ClusterConfig)>,
        limit: Duration,
    ) -> Self {
        Self {
            renew,
            limit,
            current: Mutex::new(Current {
                connection,
                generation: 0,
                opened_at: Instant::now(),
            }),
        }
    }

    fn current(&self) -> (ClusterConnection, u64) {
        let current = lock(&self.current);
        (current.connection.clone(), current.generation)
    }

    /// Runs `command` on the current connection within the limit; a command
    /// left unanswered renews the connection.
    pub(super) async fn run<T, F, Fut>(&self, command: F) -> RedisResult<T>
    where
        F: FnOnce(ClusterConnection) -> Fut,
        Fut: std::future::Future<Output = RedisResult<T>>,
    {
        let (connection, generation) = self.current();
        let answer = match tokio::time::timeout(self.limit, command(connection)).await {
            Ok(answer) => answer,
            Err(_elapsed) => Err(RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the cluster did not answer within the operation timeout",
            ))),
        };
        if matches!(&answer, Err(error) if error.is_timeout()) {
            self.renew(generation);
        }
        answer
    }

    /// The slot ranges of the cluster and the primary of each, as a node
    /// answers `CLUSTER SLOTS` now.
    pub(super) async fn slot_ranges(&self) -> RedisResult<Vec<(u16, u16, Address)>> {
        self.run(|mut connection| async move {
            let slots = redis::cmd("CLUSTER").arg("SLOTS").clone();
            let random = RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random);
            connection.route_command(slots, random).await
        })
        .await
        .and_then(slot_ranges)
    }

    /// Replaces the connection of `generation` unless it is already replaced
    /// or younger than the limit (a new connection needs a moment to learn the
    /// topology).
    fn renew(&self, generation: u64) {
        let Some((client, config)) = &self.renew else {
            return;
        };
        let mut current = lock(&self.current);
        if current.generation != generation || current.opened_at.elapsed() < self.limit {
            return;
        }
        tracing::warn!(
            generation,
            "the Redis Cluster connection stopped answering; opening a new one"
        );
        current.connection = client.get_pending_async_connection_with_config(config.clone());
        current.generation += 1;
        current.opened_at = Instant::now();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section swaps or clones a handle: the state stays whole.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One cluster connection per primary of the slot table the store first
/// saw, each carrying the commands of that primary's slots, and an admin
/// connection for everything else (listing, `ping`, commands of your own).
///
/// Why several: one connection that stalls (see above) stalls every key,
/// and a connection stalls when commands to a dead primary fail while many
/// others are in flight. Split by shard, the commands of the healthy
/// primaries never share a connection with the failing ones, so only the
/// dead primary's keys get the fail mode. Each connection is still a whole
/// cluster client: it follows `MOVED` after a failover or a resharding, so
/// a stale table costs isolation, never correctness.
pub(super) struct Shards {
    client: ClusterClient,
    config: ClusterConfig,
    limit: Duration,
    admin: Arc<ClusterHandle>,
    table: OnceCell<SlotTable>,
}

/// Slot ranges and the connection of each.
struct SlotTable {
    ranges: Vec<(u16, u16, usize)>,
    connections: Vec<Arc<ClusterHandle>>,
}

impl Shards {
    pub(super) fn new(client: ClusterClient, config: ClusterConfig, limit: Duration) -> Self {
        let admin = ClusterHandle::open(client.clone(), config.clone(), limit);
        Self {
            client,
            config,
            limit,
            admin: Arc::new(admin),
            table: OnceCell::new(),
        }
    }

    /// The connection for commands that are not about one key.
    pub(super) fn admin(&self) -> Arc<ClusterHandle> {
        self.admin.clone()
    }

    /// The connection for commands on `key`: its shard's, or the admin one
    /// while the slot table cannot be read.
    pub(super) async fn for_key(&self, key: &[u8]) -> Arc<ClusterHandle> {
        let Ok(table) = self.table.get_or_try_init(|| self.load()).await else {
            return self.admin.clone();
        };
        let slot = slot_of(key);
        table
            .ranges
            .iter()
            .find(|(start, end, _)| (*start..=*end).contains(&slot))
            .map_or_else(
                || self.admin.clone(),
                |(_, _, shard)| table.connections[*shard].clone(),
            )
    }

    async fn load(&self) -> RedisResult<SlotTable> {
        let primaries = self.admin.slot_ranges().await?;
        let mut addresses: Vec<&Address> = Vec::new();
        let mut ranges = Vec::with_capacity(primaries.len());
        for (start, end, primary) in &primaries {
            let shard = match addresses.iter().position(|known| *known == primary) {
                Some(shard) => shard,
                None => {
                    addresses.push(primary);
                    addresses.len() - 1
                }
            };
            ranges.push((*start, *end, shard));
        }
        let connections = addresses
            .iter()
            .map(|_| {
                let handle =
                    ClusterHandle::open(self.client.clone(), self.config.clone(), self.limit);
                Arc::new(handle)
            })
            .collect();
        Ok(SlotTable {
            ranges,
            connections,
        })
    }
}

/// A node's host and port.
pub(super) type Address = (String, u16);

/// The slot ranges of a `CLUSTER SLOTS` answer and the primary of each.
pub(super) fn slot_ranges(table: Value) -> RedisResult<Vec<(u16, u16, Address)>> {
    let malformed = || RedisError::from((ErrorKind::Parse, "unexpected CLUSTER SLOTS answer"));
    let Value::Array(ranges) = table else {
        return Err(malformed());
    };
    ranges
        .into_iter()
        .map(|range| {
            let Value::Array(range) = range else {
                return Err(malformed());
            };
            let [Value::Int(start), Value::Int(end), Value::Array(primary), ..] = range.as_slice()
            else {
                return Err(malformed());
            };
            let [Value::BulkString(host), Value::Int(port), ..] = primary.as_slice() else {
                return Err(malformed());
            };
            let slot = |n: i64| u16::try_from(n).map_err(|_| malformed());
            let host = String::from_utf8_lossy(host).into_owned();
            Ok((slot(*start)?, slot(*end)?, (host, slot(*port)?)))
        })
        .collect()
}

/// The cluster slot of `key`: CRC16 (XMODEM) of the key, or of its hash tag
/// (the part between the first `{` and the next `}`, when not empty),
/// modulo 16384, as Redis computes it.
pub(super) fn slot_of(key: &[u8]) -> u16 {
    let hashed = key
        .iter()
        .position(|byte| *byte == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            let close = rest.iter().position(|byte| *byte == b'}')?;
            (close > 0).then(|| &rest[..close])
        })
        .unwrap_or(key);
    crc16_xmodem(hashed) % 16_384
}

fn crc16_xmodem(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for byte in bytes {
        crc ^= u16::from(*byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 == 0 {
                crc << 1
            } else {
                (crc << 1) ^ 0x1021
            };
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::slot_of;

    #[test]
    fn slots_are_the_ones_redis_computes() {
        // Values from CLUSTER KEYSLOT.
        assert_eq!(slot_of(b"foo"), 12182);
        assert_eq!(slot_of(b"a"), 15495);
        assert_eq!(slot_of(b"123456789"), 12739);
        assert_eq!(slot_of(b"{user1000}.following"), slot_of(b"user1000"));
        assert_eq!(slot_of(b"foo{}{bar}"), 8363);
    }
}
