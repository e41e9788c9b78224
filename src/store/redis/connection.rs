//! The store's connection: to one Redis node, or to a Redis Cluster.
//!
//! Every protocol operation is one script on one key, so it runs the same on
//! both: the cluster client sends it to the primary that holds the key's slot
//! and follows `MOVED`/`ASK` when slots move or a replica is promoted. Only
//! listing (`SCAN`) is per node: it walks every primary in turn.

use std::fmt;

use futures_util::FutureExt;
use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, RedisResult, Value};

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
/// # async fn doc(store: tower_idempotency::RedisStore) -> redis::RedisResult<()> {
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
    Cluster(ClusterConnection),
}

impl fmt::Debug for RedisConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            Kind::Node(_) => "node",
            Kind::Cluster(_) => "cluster",
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

impl From<ClusterConnection> for RedisConnection {
    fn from(connection: ClusterConnection) -> Self {
        Self {
            kind: Kind::Cluster(connection),
        }
    }
}

impl RedisConnection {
    /// Whether this is a connection to a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self.kind, Kind::Cluster(_))
    }

    /// Every primary, each as a connection that sends its commands to that
    /// node only: the one node, or each primary the cluster's slot table
    /// names. For a cluster the answer is an error while some slot has no
    /// primary (slots unassigned, or a failed primary not yet replaced), so
    /// that a listing never silently leaves a primary out.
    pub(super) async fn primaries(&self) -> RedisResult<Vec<Primary>> {
        let Kind::Cluster(cluster) = &self.kind else {
            return Ok(vec![Primary {
                connection: self.clone(),
                address: None,
            }]);
        };
        let mut cluster = cluster.clone();
        let table = cluster
            .route_command(
                redis::cmd("CLUSTER").arg("SLOTS").clone(),
                RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
            )
            .await?;
        let addresses = primaries_of(table)?;
        Ok(addresses
            .into_iter()
            .map(|address| Primary {
                connection: self.clone(),
                address: Some(address),
            })
            .collect())
    }
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match &mut self.kind {
            Kind::Node(connection) => connection.req_packed_command(cmd),
            Kind::Cluster(connection) => connection.req_packed_command(cmd),
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
            Kind::Cluster(connection) => connection.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match &self.kind {
            Kind::Node(connection) => connection.get_db(),
            Kind::Cluster(connection) => connection.get_db(),
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
            Kind::Cluster(cluster) => cluster
                .route_command(cmd.clone(), RoutingInfo::SingleNode(route))
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
            Kind::Cluster(cluster) => cluster
                .route_pipeline(pipeline.clone(), offset, count, route)
                .boxed(),
            Kind::Node(node) => node.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        self.connection.get_db()
    }
}

/// The distinct primaries of a `CLUSTER SLOTS` answer (`[[start, end,
/// [host, port, id, ...], replicas...], ...]`), when they cover every slot.
fn primaries_of(table: Value) -> RedisResult<Vec<(String, u16)>> {
    let malformed = || RedisError::from((ErrorKind::Parse, "unexpected CLUSTER SLOTS answer"));
    let Value::Array(ranges) = table else {
        return Err(malformed());
    };
    let mut primaries: Vec<(String, u16)> = Vec::new();
    let mut covered = 0;
    for range in ranges {
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
        let host = String::from_utf8_lossy(host).into_owned();
        let port = u16::try_from(*port).map_err(|_| malformed())?;
        covered += end - start + 1;
        if !primaries.contains(&(host.clone(), port)) {
            primaries.push((host, port));
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
    use redis::Value;

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
            super::primaries_of(table).unwrap(),
            vec![("10.0.0.1".to_owned(), 7000), ("10.0.0.2".to_owned(), 7001)]
        );
    }

    #[test]
    fn a_slot_without_primary_is_cluster_down() {
        let table = Value::Array(vec![range(0, 5000, node("10.0.0.1", 7000))]);
        let error = super::primaries_of(table).unwrap_err();
        assert_eq!(
            error.kind(),
            redis::ErrorKind::Server(redis::ServerErrorKind::ClusterDown)
        );
    }

    #[test]
    fn a_malformed_table_is_an_error_not_a_panic() {
        assert!(super::primaries_of(Value::Int(3)).is_err());
        let table = Value::Array(vec![Value::Array(vec![Value::Int(0)])]);
        assert!(super::primaries_of(table).is_err());
    }
}
