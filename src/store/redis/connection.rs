//! The store's connection: to one Redis node, or to a Redis Cluster.
//!
//! Every protocol operation is one script on one key, so it runs the same on
//! both: the cluster client sends it to the primary that holds the key's slot
//! and follows `MOVED`/`ASK` when slots move or a replica is promoted. Only
//! listing (`SCAN`) is per node: it walks every primary in turn.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, RedisResult, Value};

use super::cluster::{slot_of, Address, ClusterHandle, Shards};

/// The default limit on connecting to Redis: 1 second.
pub const DEFAULT_CONNECTION_TIMEOUT: Duration = Duration::from_secs(1);
/// The default limit on waiting for one answer from Redis: 1 second.
pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Slots of a Redis Cluster: a key's slot is CRC16 of the key modulo 16384.
const CLUSTER_SLOTS: i64 = 16_384;

/// The connection a [`RedisStore`](super::RedisStore) sends its commands on:
/// a reconnecting [`ConnectionManager`] to one Redis node, or the cluster
/// client's [`ClusterConnection`], which routes each command to the primary
/// of its key's slot.
///
/// Cheap to clone: clones share the connections. It implements the `redis`
/// crate's [`ConnectionLike`], so commands of your own run on it as on
/// either connection:
///
/// ```no_run
/// # async fn doc(store: tower_idempotency::store::redis::RedisStore) -> redis::RedisResult<()> {
/// let mut connection = store.connection();
/// let held: Option<Vec<u8>> = redis::cmd("GET")
///     .arg(store.redis_key("k"))
///     .query_async(&mut connection)
///     .await?;
/// # drop(held);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RedisConnection {
    kind: Kind,
}

#[derive(Clone)]
enum Kind {
    Node(ConnectionManager),
    /// A cluster connection, and the per-shard ones for commands on one key
    /// when the store opened them.
    Cluster(Arc<ClusterHandle>, Option<Arc<Shards>>),
}

impl fmt::Debug for RedisConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            Kind::Node(_) => "node",
            Kind::Cluster(..) => "cluster",
        };
        f.debug_struct("RedisConnection")
            .field("kind", &kind)
            .finish_non_exhaustive()
    }
}

impl From<ConnectionManager> for RedisConnection {
    fn from(connection: ConnectionManager) -> Self {
        Self {
            kind: Kind::Node(connection),
        }
    }
}

/// A cluster connection made by the caller; each command waits for its
/// answer at most the default connection and response timeouts together.
impl From<ClusterConnection> for RedisConnection {
    fn from(connection: ClusterConnection) -> Self {
        let limit = DEFAULT_CONNECTION_TIMEOUT + DEFAULT_RESPONSE_TIMEOUT;
        Self::cluster(Arc::new(ClusterHandle::fixed(connection, limit)))
    }
}

impl RedisConnection {
    fn cluster(handle: Arc<ClusterHandle>) -> Self {
        Self {
            kind: Kind::Cluster(handle, None),
        }
    }

    /// A cluster connection that sends the commands on each key through the
    /// connection of the key's shard (see [`Shards`]).
    pub(super) fn sharded(shards: Shards) -> Self {
        Self {
            kind: Kind::Cluster(shards.admin(), Some(Arc::new(shards))),
        }
    }

    /// The connection for commands on the Redis key `key`.
    pub(super) async fn for_key(&self, key: &str) -> Self {
        match &self.kind {
            Kind::Cluster(_, Some(shards)) => Self::cluster(shards.for_key(key.as_bytes()).await),
            _ => self.clone(),
        }
    }

    /// Whether this is a connection to a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self.kind, Kind::Cluster(..))
    }

    /// Every primary, each as a connection that sends its commands to that
    /// node only: the one node, or each primary the cluster's slot table
    /// names. For a cluster the answer is an error while some slot has no
    /// primary (slots unassigned, or a failed primary not yet replaced), so
    /// that a listing never silently leaves a primary out.
    pub(super) async fn primaries(&self) -> RedisResult<Vec<Primary>> {
        let Kind::Cluster(cluster, _) = &self.kind else {
            return Ok(vec![Primary {
                connection: self.clone(),
                address: None,
            }]);
        };
        let addresses = primaries_of(cluster.slot_ranges().await?)?;
        Ok(addresses
            .into_iter()
            .map(|address| Primary {
                connection: self.clone(),
                address: Some(address),
            })
            .collect())
    }
}

impl RedisConnection {
    /// The indices of `keys` (Redis keys) grouped by the primary that serves
    /// them, each group with a connection that sends pipelines to that
    /// primary alone: every key on the one node; on a cluster, by the slot
    /// table a node answers now, each group on the shard connection of its
    /// keys when the store opened them. Keys of a slot that has no primary
    /// now form the group without one.
    ///
    /// A pipeline's commands may name keys of any slots its node serves:
    /// Redis checks slots per command, and the cluster client's own pipeline
    /// routing (by the first key, refusing a second slot) is bypassed by
    /// routing to the node.
    pub(super) async fn by_primary(
        &self,
        keys: &[String],
    ) -> RedisResult<Vec<(Option<Primary>, Vec<usize>)>> {
        let Kind::Cluster(cluster, _) = &self.kind else {
            let node = Primary {
                connection: self.clone(),
                address: None,
            };
            return Ok(vec![(Some(node), (0..keys.len()).collect())]);
        };
        let ranges = cluster.slot_ranges().await?;
        let mut groups: Vec<(Option<&Address>, Vec<usize>)> = Vec::new();
        for (index, key) in keys.iter().enumerate() {
            let slot = slot_of(key.as_bytes());
            let primary = (ranges.iter())
                .find(|(start, end, _)| (*start..=*end).contains(&slot))
                .map(|(_, _, primary)| primary);
            match groups.iter_mut().find(|(known, _)| *known == primary) {
                Some((_, members)) => members.push(index),
                None => groups.push((primary, vec![index])),
            }
        }
        let mut routed = Vec::with_capacity(groups.len());
        for (address, members) in groups {
            let primary = match address {
                Some(address) => Some(Primary {
                    connection: self.for_key(&keys[members[0]]).await,
                    address: Some(address.clone()),
                }),
                None => None,
            };
            routed.push((primary, members));
        }
        Ok(routed)
    }
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match &mut self.kind {
            Kind::Node(connection) => connection.req_packed_command(cmd),
            Kind::Cluster(cluster, _) => cluster
                .run(move |mut connection| async move { connection.req_packed_command(cmd).await })
                .boxed(),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match &mut self.kind {
            Kind::Node(connection) => connection.req_packed_commands(pipeline, offset, count),
            Kind::Cluster(cluster, _) => cluster
                .run(move |mut connection| async move {
                    connection
                        .req_packed_commands(pipeline, offset, count)
                        .await
                })
                .boxed(),
        }
    }

    fn get_db(&self) -> i64 {
        match &self.kind {
            Kind::Node(connection) => connection.get_db(),
            // A cluster has only database 0.
            Kind::Cluster(..) => 0,
        }
    }
}

/// One primary: commands and pipelines sent on it go to that node, whatever
/// keys they name (a `SCAN` cursor only means something on the node that
/// answered it).
#[derive(Clone)]
pub(super) struct Primary {
    connection: RedisConnection,
    /// Host and port in a cluster; `None` for the one node.
    address: Option<(String, u16)>,
}

impl Primary {
    fn route(&self) -> Option<SingleNodeRoutingInfo> {
        let (host, port) = self.address.clone()?;
        Some(SingleNodeRoutingInfo::ByAddress { host, port })
    }
}

impl fmt::Display for Primary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.address {
            Some((host, port)) => write!(f, "{host}:{port}"),
            None => f.write_str("redis"),
        }
    }
}

impl ConnectionLike for Primary {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        let Some(route) = self.route() else {
            return self.connection.req_packed_command(cmd);
        };
        match &mut self.connection.kind {
            Kind::Cluster(cluster, _) => cluster
                .run(move |mut connection| async move {
                    let route = RoutingInfo::SingleNode(route);
                    connection.route_command(cmd.clone(), route).await
                })
                .boxed(),
            Kind::Node(node) => node.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        let Some(route) = self.route() else {
            return self.connection.req_packed_commands(pipeline, offset, count);
        };
        match &mut self.connection.kind {
            Kind::Cluster(cluster, _) => cluster
                .run(move |mut connection| async move {
                    (connection.route_pipeline(pipeline.clone(), offset, count, route)).await
                })
                .boxed(),
            Kind::Node(node) => node.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        self.connection.get_db()
    }
}

/// The distinct primaries of a `CLUSTER SLOTS` answer, when they cover
/// every slot.
fn primaries_of(ranges: Vec<(u16, u16, Address)>) -> RedisResult<Vec<Address>> {
    let mut primaries: Vec<Address> = Vec::new();
    let mut covered = 0;
    for (start, end, primary) in ranges {
        covered += i64::from(end) - i64::from(start) + 1;
        if !primaries.contains(&primary) {
            primaries.push(primary);
        }
    }
    if covered < CLUSTER_SLOTS {
        return Err(RedisError::from((
            ErrorKind::Server(redis::ServerErrorKind::ClusterDown),
            "some slots have no primary",
            format!("{covered} of {CLUSTER_SLOTS} slots are served"),
        )));
    }
    Ok(primaries)
}

#[cfg(test)]
mod tests {
    use redis::{RedisResult, Value};

    use super::Address;

    /// The distinct primaries of a `CLUSTER SLOTS` answer.
    fn primaries_of(table: Value) -> RedisResult<Vec<Address>> {
        super::super::cluster::slot_ranges(table).and_then(super::primaries_of)
    }

    fn node(host: &str, port: i64) -> Value {
        Value::Array(vec![
            Value::BulkString(host.as_bytes().to_vec()),
            Value::Int(port),
            Value::BulkString(b"id".to_vec()),
        ])
    }

    fn range(start: i64, end: i64, primary: Value) -> Value {
        Value::Array(vec![Value::Int(start), Value::Int(end), primary])
    }

    #[test]
    fn primaries_are_listed_once_each() {
        let table = Value::Array(vec![
            range(0, 5000, node("10.0.0.1", 7000)),
            range(5001, 10000, node("10.0.0.2", 7001)),
            range(10001, 16383, node("10.0.0.1", 7000)),
        ]);
        assert_eq!(
            primaries_of(table).unwrap(),
            vec![("10.0.0.1".to_owned(), 7000), ("10.0.0.2".to_owned(), 7001)]
        );
    }

    #[test]
    fn a_slot_without_primary_is_cluster_down() {
        let table = Value::Array(vec![range(0, 5000, node("10.0.0.1", 7000))]);
        let error = primaries_of(table).unwrap_err();
        assert_eq!(
            error.kind(),
            redis::ErrorKind::Server(redis::ServerErrorKind::ClusterDown)
        );
    }

    #[test]
    fn a_malformed_table_is_an_error_not_a_panic() {
        assert!(primaries_of(Value::Int(3)).is_err());
        let table = Value::Array(vec![Value::Array(vec![Value::Int(0)])]);
        assert!(primaries_of(table).is_err());
    }
}
