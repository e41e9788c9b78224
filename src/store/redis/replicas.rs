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
#[cfg(doc)]
use crate::store::StoreAdmin;
use crate::store::{LeaseToken, Store, StoreError};

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

/// What a write and its replica wait answered.
pub(super) struct Written {
    /// The script's answer: 1 exactly when it wrote.
    pub(super) answer: Value,
    /// The `WAIT`'s failure, when it answered an error (the write holds on
    /// the primary all the same). A `WAIT` that merely fell short is not
    /// one: it is counted and logged.
    pub(super) wait_failed: Option<StoreError>,
}

impl Written {
    /// Whether the script wrote.
    pub(super) fn wrote(&self) -> bool {
        self.answer == Value::Int(1)
    }
}

impl RedisStore {
    /// Runs a script that writes (`begin`, `complete`) on `key`, then, with a
    /// replica acknowledgement set, waits for the replicas. Both scripts
    /// answer 1 exactly when they wrote; only then does a shortfall count.
    ///
    /// The script and the `WAIT` answer apart: a `WAIT` that fails with an
    /// error of its own (refused by an ACL, say) comes back as
    /// [`Written::wait_failed`] beside the script's answer, so the caller
    /// can undo what the script wrote.
    pub(super) async fn write_script(
        &self,
        script: &Script,
        key: &str,
        args: &[&[u8]],
    ) -> Result<Written, StoreError> {
        let Some(ack) = &self.inner.replica_ack else {
            let answer = self.script(script, key, args).await?;
            return Ok(Written {
                answer,
                wait_failed: None,
            });
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
        let wrote = answer == Value::Int(1);
        let acknowledged = match acknowledged {
            Ok(acknowledged) => acknowledged,
            Err(error) => {
                return Ok(Written {
                    answer,
                    wait_failed: Some(super::convert::map_error(error)),
                })
            }
        };
        if wrote && acknowledged < i64::from(ack.replicas) {
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
        Ok(Written {
            answer,
            wait_failed: None,
        })
    }

    /// The script's answer (or the pipeline's failure, or the script's
    /// error) and the `WAIT`'s, each on its own.
    async fn script_then_wait(
        &self,
        script: &Script,
        redis_key: &str,
        args: &[&[u8]],
        ack: &ReplicaAck,
    ) -> RedisResult<(Value, RedisResult<i64>)> {
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
            .arg(timeout_ms)
            // Each answer on its own: a failed `WAIT` must not hide that
            // the script wrote.
            .ignore_errors();
        let mut connection = self.connection().for_key(redis_key).await;
        let answers: Vec<RedisResult<Value>> =
            match tokio::time::timeout(self.inner.timeout, pipe.query_async(&mut connection)).await
            {
                Ok(answers) => answers?,
                Err(_elapsed) => {
                    return Err(redis::RedisError::from((
                        ErrorKind::Io,
                        "redis did not answer within the operation timeout",
                    )))
                }
            };
        let mut answers = answers.into_iter();
        let (Some(answer), Some(waited)) = (answers.next(), answers.next()) else {
            return Err(redis::RedisError::from((
                ErrorKind::Parse,
                "the script and WAIT pipeline answered fewer than two replies",
            )));
        };
        let waited = waited.and_then(|waited| match waited {
            Value::Int(acknowledged) => Ok(acknowledged),
            other => Err(redis::RedisError::from((
                ErrorKind::Parse,
                "unexpected WAIT answer",
                format!("{other:?}"),
            ))),
        });
        Ok((answer?, waited))
    }

    /// Deletes the marker a `begin` wrote before its `WAIT` failed (fenced
    /// by its lease: nothing ran under it), so that the key is free when the
    /// error is answered. A release that fails too is logged; the marker then
    /// expires with its lease TTL.
    pub(super) async fn release_failed_begin(&self, key: &str, lease: LeaseToken) {
        if let Err(error) = self.release(key, lease).await {
            tracing::warn!(
                %error,
                key,
                "the replica wait of a begin failed and its marker could not be released; \
                 the key stays refused until the marker expires"
            );
        }
    }

    /// Writes (markers of `begin`, records of `complete`) that fewer replicas
    /// than [`replica_ack`](super::RedisStoreBuilder::replica_ack) asked for
    /// acknowledged within its timeout, since the store was built. Each was
    /// answered to the caller as written (and logged): it holds on the
    /// primary, but a failover before replication catches up may lose it.
    /// Always 0 without a replica acknowledgement. The same count as
    /// [`StoreAdmin::unacknowledged_writes`], which the handle
    /// ([`Idempotency::unacknowledged_writes`](crate::Idempotency::unacknowledged_writes))
    /// reads whatever the store.
    pub fn unacknowledged_writes(&self) -> u64 {
        (self.inner.replica_ack.as_ref()).map_or(0, |ack| ack.shortfalls.load(Ordering::Relaxed))
    }
}
