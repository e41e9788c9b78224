//! Writes acknowledged by replicas: the script and a `WAIT` in one pipeline.
//!
//! Redis replicates asynchronously: a primary answers a write before any
//! replica holds it, so a primary that dies right after `begin` or `complete`
//! answered can take the marker or the record with it, and the replica
//! promoted in its place never saw them. A retry then finds nothing and runs
//! the action again. With [`RedisStoreBuilder::replica_ack`], the script that
//! writes is followed by `WAIT replicas timeout` on the same connection, so
//! the answer says how many replicas hold the write.
//!
//! `WAIT` counts the writes of the connection that sends it, so it must follow
//! the script on the same connection to the same node: the two go as one
//! pipeline, which the cluster client routes to the primary of the key's slot
//! (and re-sends whole to the new primary after a `MOVED`).
//!
//! [`RedisStoreBuilder::replica_ack`]: super::RedisStoreBuilder::replica_ack

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use redis::{ErrorKind, RedisResult, Script, ServerErrorKind, Value};

use super::RedisStore;
use crate::store::StoreError;

/// How many replicas must hold a write, and how long to wait for them.
#[derive(Debug)]
pub(super) struct ReplicaAck {
    pub(super) replicas: u32,
    pub(super) timeout: Duration,
    /// Writes that fewer replicas acknowledged in time.
    pub(super) shortfalls: AtomicU64,
}

impl ReplicaAck {
    pub(super) fn new(replicas: u32, timeout: Duration) -> Result<Self, StoreError> {
        if replicas == 0 {
            return Err(StoreError::backend(
                "replica_ack needs at least one replica (leave it unset for none)",
            ));
        }
        // WAIT with a timeout of 0 blocks forever.
        if timeout.as_millis() == 0 {
            return Err(StoreError::backend(
                "the replica acknowledgement timeout must be at least 1 ms",
            ));
        }
        Ok(Self {
            replicas,
            timeout,
            shortfalls: AtomicU64::new(0),
        })
    }
}

impl RedisStore {
    /// Runs a script that writes (`begin`, `complete`) on `key`, then, with a
    /// replica acknowledgement set, waits for the replicas. Both scripts
    /// answer 1 exactly when they wrote; only then does a shortfall count.
    pub(super) async fn write_script(
        &self,
        script: &Script,
        key: &str,
        args: &[&[u8]],
    ) -> Result<Value, StoreError> {
        let Some(ack) = &self.inner.replica_ack else {
            return self.script(script, key, args).await;
        };
        let redis_key = self.redis_key(key);
        let (answer, acknowledged) =
            match self.script_then_wait(script, &redis_key, args, ack).await {
                Err(error) if error.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                    // A node that never saw the script (new, or just promoted).
                    let mut connection = self.connection();
                    self.run(script.load_async(&mut connection)).await?;
                    self.script_then_wait(script, &redis_key, args, ack).await
                }
                other => other,
            }
            .map_err(super::convert::map_error)?;
        if answer == Value::Int(1) && acknowledged < i64::from(ack.replicas) {
            ack.shortfalls.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                key,
                acknowledged,
                wanted = ack.replicas,
                timeout = ?ack.timeout,
                "replicas did not acknowledge the write in time; \
                 a failover now may lose it and a retry run the action again"
            );
        }
        Ok(answer)
    }

    async fn script_then_wait(
        &self,
        script: &Script,
        redis_key: &str,
        args: &[&[u8]],
        ack: &ReplicaAck,
    ) -> RedisResult<(Value, i64)> {
        let mut evalsha = redis::cmd("EVALSHA");
        evalsha.arg(script.get_hash()).arg(1).arg(redis_key);
        for arg in args {
            evalsha.arg(*arg);
        }
        let timeout_ms = u64::try_from(ack.timeout.as_millis()).unwrap_or(u64::MAX);
        let mut pipe = redis::pipe();
        pipe.add_command(evalsha)
            .cmd("WAIT")
            .arg(ack.replicas)
            .arg(timeout_ms);
        let mut connection = self.connection().for_key(redis_key).await;
        match tokio::time::timeout(self.inner.timeout, pipe.query_async(&mut connection)).await {
            Ok(answer) => answer,
            Err(_elapsed) => Err(redis::RedisError::from((
                ErrorKind::Io,
                "redis did not answer within the operation timeout",
            ))),
        }
    }

    /// Writes (markers of `begin`, records of `complete`) that fewer replicas
    /// than [`replica_ack`](super::RedisStoreBuilder::replica_ack) asked for
    /// acknowledged within its timeout, since the store was built. Each was
    /// answered to the caller as written (and logged): it holds on the
    /// primary, but a failover before replication catches up may lose it.
    /// Always 0 without a replica acknowledgement.
    pub fn unacknowledged_writes(&self) -> u64 {
        (self.inner.replica_ack.as_ref()).map_or(0, |ack| ack.shortfalls.load(Ordering::Relaxed))
    }
}
