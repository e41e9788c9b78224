//! Many renewals in one round trip per primary: the heartbeat's batches.
//!
//! Each renewal is still the `renew` script on one key, so each is atomic
//! and fenced by its lease; only the trip is shared. On one node the batch
//! is one pipeline of `EVALSHA`s. On a Cluster one script cannot name keys
//! of several slots, but a pipeline can hold scripts on keys of every slot
//! its node serves: the keys are grouped by the primary the slot table
//! names now and each group goes to its primary as one pipeline, the groups
//! side by side.
//!
//! A renewal the pipeline could not settle (a node that never saw the
//! script answers `NOSCRIPT`; a slot moved since the table was read answers
//! `MOVED`) is asked again on its own, which loads the script and follows
//! redirections. Renewing twice is harmless: it sets the same expiry.

use std::time::Duration;

use futures_util::future::join_all;
use redis::aio::ConnectionLike;
use redis::{ErrorKind, ServerErrorKind, Value};

use super::connection::Primary;
use super::convert::px;
use super::{codec, scripts, RedisStore};
use crate::store::{each_failed, LeaseToken, Store, StoreError};

/// The answers of a group's renewals: lease index and result.
type Answers = Vec<(usize, Result<bool, StoreError>)>;

impl RedisStore {
    /// [`Store::renew_many`]: one pipeline per primary.
    pub(super) async fn renew_batch(
        &self,
        leases: &[(&str, LeaseToken)],
        lease_ttl: Duration,
    ) -> Vec<Result<bool, StoreError>> {
        let keys: Vec<String> = leases.iter().map(|(key, _)| self.redis_key(key)).collect();
        let connection = self.connection();
        let groups = match self.run(connection.by_primary(&keys)).await {
            Ok(groups) => groups,
            Err(error) => return each_failed(error, leases.len()),
        };
        let renewals = groups.into_iter().map(|(primary, members)| {
            let keys = &keys;
            async move {
                match primary {
                    Some(primary) => {
                        self.renew_on(primary, members, leases, keys, lease_ttl)
                            .await
                    }
                    None => self.renew_each(members, leases, lease_ttl).await,
                }
            }
        });
        let mut answers: Vec<Option<Result<bool, StoreError>>> =
            leases.iter().map(|_| None).collect();
        for (index, answer) in join_all(renewals).await.into_iter().flatten() {
            answers[index] = Some(answer);
        }
        answers
            .into_iter()
            .map(|answer| {
                answer.unwrap_or_else(|| Err(StoreError::backend("a renewal went unanswered")))
            })
            .collect()
    }

    /// The renewals of `members` as one pipeline to `primary`; what it
    /// leaves unsettled, one by one.
    async fn renew_on(
        &self,
        mut primary: Primary,
        members: Vec<usize>,
        leases: &[(&str, LeaseToken)],
        keys: &[String],
        lease_ttl: Duration,
    ) -> Answers {
        let ttl = px(lease_ttl);
        let mut pipeline = redis::pipe();
        for &index in &members {
            pipeline
                .cmd("EVALSHA")
                .arg(scripts::RENEW.get_hash())
                .arg(1)
                .arg(&keys[index])
                .arg(codec::lease_prefix(leases[index].1).as_slice())
                .arg(&ttl);
        }
        let count = members.len();
        let mut values = self
            .run(primary.req_packed_commands(&pipeline, 0, count))
            .await;
        if values
            .as_ref()
            .is_ok_and(|values| values.iter().any(no_script))
        {
            // A node that never saw the script (new, or just promoted): load
            // it once and send the whole pipeline again, rather than every
            // renewal on its own.
            let mut connection = self.connection();
            if self
                .run(scripts::RENEW.load_async(&mut connection))
                .await
                .is_ok()
            {
                values = self
                    .run(primary.req_packed_commands(&pipeline, 0, count))
                    .await;
            }
        }
        let values = match values {
            Ok(values) if values.len() == count => values,
            Ok(_) => Vec::new(),
            // The primary cannot be reached: asking each key again would
            // only wait as long once more.
            Err(error) if error.is_unavailable() => {
                return members.into_iter().zip(each_failed(error, count)).collect()
            }
            Err(_) => Vec::new(),
        };
        let mut answers = Vec::with_capacity(count);
        let mut unsettled = Vec::new();
        for (slot, index) in members.into_iter().enumerate() {
            match values.get(slot) {
                Some(Value::Int(1)) => answers.push((index, Ok(true))),
                Some(Value::Int(0)) => answers.push((index, Ok(false))),
                _ => unsettled.push(index),
            }
        }
        if !unsettled.is_empty() {
            answers.extend(self.renew_each(unsettled, leases, lease_ttl).await);
        }
        answers
    }

    /// The renewals of `members`, each on its own (side by side), through
    /// [`Store::renew`], which loads the script and follows redirections.
    async fn renew_each(
        &self,
        members: Vec<usize>,
        leases: &[(&str, LeaseToken)],
        lease_ttl: Duration,
    ) -> Answers {
        let renewals = members.into_iter().map(|index| async move {
            let (key, lease) = leases[index];
            (index, self.renew(key, lease, lease_ttl).await)
        });
        join_all(renewals).await
    }
}

/// Whether a pipeline's answer is a `NOSCRIPT` error.
fn no_script(value: &Value) -> bool {
    match value {
        Value::ServerError(error) => {
            redis::RedisError::from(error.clone()).kind()
                == ErrorKind::Server(ServerErrorKind::NoScript)
        }
        _ => false,
    }
}
