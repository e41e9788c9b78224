//! The closure API: run an action at most once per key, off the HTTP path.
//!
//! [`Idempotency::execute`] wraps one call to a third-party API (create a
//! Trello card, post a Slack message) so that a retry of the same
//! [`IdempotencyKey`] gets the first call's result instead of running it
//! again. Results are stored as JSON inside a value [`Record`], so the same
//! code works on every store, the shared Redis one included.
//!
//! The guarantee is the engine's (see [`engine`](crate::engine)): the closure
//! runs at most once per key within the record TTL while its caller lives.

mod transaction;

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::engine::{Begin, Concurrent, Idempotency, Lease, DEFAULT_WAIT_TIMEOUT};
use crate::key::{Fingerprint, IdempotencyKey};
use crate::record::Record;
use crate::store::{EntryState, Store, StoreAdmin, StoreError};

/// Why [`Idempotency::execute`], [`check_executed`](Idempotency::check_executed)
/// or [`mark_executed`](Idempotency::mark_executed) gave no value.
///
/// `E` is the action's own error; it defaults to [`Infallible`] for the
/// calls that run no action.
#[derive(Debug)]
#[non_exhaustive]
pub enum ExecuteError<E = Infallible> {
    /// The action ran and failed. Nothing was stored: the next call runs it
    /// again.
    Action(E),
    /// The store failed (before the action ran, or while reading or writing a
    /// marked value).
    Store(StoreError),
    /// The key holds the result of another request (another fingerprint:
    /// typically an HTTP request made with the same key).
    Mismatch,
    /// The first call for the key was still running when the wait budget ran
    /// out.
    Timeout,
    /// The key holds an HTTP response, not a value stored by this API.
    NotAValue,
    /// The stored value does not decode as the requested type.
    Decode(serde_json::Error),
    /// The value could not be encoded as JSON. When the action produced it,
    /// the action ran but nothing was stored.
    Encode(serde_json::Error),
}

impl<E: fmt::Display> fmt::Display for ExecuteError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Action(error) => write!(f, "the action failed: {error}"),
            Self::Store(error) => write!(f, "idempotency store failed: {error}"),
            Self::Mismatch => f.write_str("the key was used for another request"),
            Self::Timeout => {
                f.write_str("the first call for the key was still running when the wait timed out")
            }
            Self::NotAValue => f.write_str("the key holds an HTTP response, not a value"),
            Self::Decode(error) => write!(f, "the stored value does not decode: {error}"),
            Self::Encode(error) => write!(f, "the value does not encode as JSON: {error}"),
        }
    }
}

impl<E: std::error::Error + 'static> std::error::Error for ExecuteError<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Action(error) => Some(error),
            Self::Store(error) => Some(error),
            Self::Decode(error) | Self::Encode(error) => Some(error),
            Self::Mismatch | Self::Timeout | Self::NotAValue => None,
        }
    }
}

impl<E> From<StoreError> for ExecuteError<E> {
    fn from(error: StoreError) -> Self {
        Self::Store(error)
    }
}

/// The fingerprint every call of this API uses for `key`, so `execute`,
/// `mark_executed` and retries agree: the key already names the params.
fn fingerprint(key: &IdempotencyKey, text: &str) -> Fingerprint {
    match key.params_hash() {
        Some(hash) => Fingerprint::of_bytes(hash.as_bytes()),
        None => Fingerprint::of_bytes(text.as_bytes()),
    }
}

fn decode<T: DeserializeOwned, E>(record: &Record) -> Result<T, ExecuteError<E>> {
    let value = record.as_value().ok_or(ExecuteError::NotAValue)?;
    serde_json::from_slice(value).map_err(ExecuteError::Decode)
}

/// Frees the key now rather than by the lease's drop guard, so that it is
/// free by the time the caller sees `error`; a failed release is logged (the
/// engine retries it in the background).
async fn release<S: Store, E>(lease: Lease<S>, error: ExecuteError<E>) -> ExecuteError<E> {
    if let Err(release) = lease.release().await {
        tracing::warn!(error = %release, "idempotency lease release failed");
    }
    error
}

/// How a call of the closure API starts: run the action under the lease (its
/// value recorded with the fingerprint), or answer the stored value.
pub(crate) enum Started<S: Store, T> {
    Run(Lease<S>, Fingerprint),
    Replayed(T),
}

impl<S: Store> Idempotency<S> {
    /// Begins `key` under the closure API's policy; a mismatch or a wait that
    /// ran out is the caller's error. Shared by `execute` and the
    /// transactional forms, so they answer duplicates alike.
    pub(crate) async fn begin_execute<T: DeserializeOwned, E>(
        &self,
        key: &IdempotencyKey,
    ) -> Result<Started<S, T>, ExecuteError<E>> {
        let text = key.to_text();
        let fingerprint = fingerprint(key, &text);
        match self
            .begin_with(text, fingerprint, self.execute_policy())
            .await?
        {
            Begin::Execute(lease) => Ok(Started::Run(lease, fingerprint)),
            Begin::Replay { record, .. } => decode(&record).map(Started::Replayed),
            Begin::Mismatch => Err(ExecuteError::Mismatch),
            Begin::Conflict { .. } => Err(ExecuteError::Timeout),
        }
    }
}

impl<S: Store> Idempotency<S> {
    /// How the closure API treats a duplicate of a call in flight: it waits,
    /// whatever the engine's policy, for the engine's `Wait` budget or, under
    /// [`Concurrent::Reject`], for [`DEFAULT_WAIT_TIMEOUT`]. `Reject` is an
    /// HTTP answer (409, come back later); a caller of `execute` has no such
    /// answer to pass on, and its retry is the duplicate itself.
    pub(crate) fn execute_policy(&self) -> Concurrent {
        match self.config().concurrent {
            wait @ Concurrent::Wait { .. } => wait,
            Concurrent::Reject => Concurrent::Wait {
                timeout: DEFAULT_WAIT_TIMEOUT,
            },
        }
    }

    /// Runs `action` unless a call with the same `key` already succeeded
    /// within the TTL, and returns the first successful result.
    ///
    /// * A duplicate that arrives while the first call runs waits for it and
    ///   gets its result, under either policy: for the engine's
    ///   [`Concurrent::Wait`] budget, or, when the engine's policy is
    ///   `Reject`, for [`DEFAULT_WAIT_TIMEOUT`] (30 s). `Reject` is the HTTP
    ///   layer's answer (409, retry later); here the duplicate *is* the
    ///   retry, and a conflict error would only make its caller retry again.
    ///   Past the budget: [`ExecuteError::Timeout`].
    /// * An `Err` from `action` is returned as [`ExecuteError::Action`] and
    ///   not stored: the key is freed and the next call runs the action again
    ///   (a duplicate that was waiting starts over and runs its own).
    /// * A panic, or dropping the returned future, frees the key too.
    /// * If the result cannot be stored once the action succeeded, the result
    ///   is still returned (the action did happen; an error would invite the
    ///   caller to run it again) and the failure is logged and counted in
    ///   `store_errors`.
    ///
    /// The result is stored as JSON, so `T` must decode from what it encodes
    /// to; a stored value that does not decode as `T` is
    /// [`ExecuteError::Decode`].
    ///
    /// # Errors
    ///
    /// See [`ExecuteError`].
    ///
    /// # Example
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use std::sync::atomic::{AtomicU32, Ordering};
    /// use tower_idempotency::{Idempotency, IdempotencyKey};
    ///
    /// let engine = Idempotency::new();
    /// let cards_created = AtomicU32::new(0);
    /// let key = IdempotencyKey::new("signal-123", "create_task", "trello");
    ///
    /// for _attempt in 0..3 {
    ///     let card_id: String = engine
    ///         .execute(&key, || async {
    ///             let n = cards_created.fetch_add(1, Ordering::SeqCst) + 1;
    ///             Ok::<_, std::io::Error>(format!("card-{n}"))
    ///         })
    ///         .await?;
    ///     assert_eq!(card_id, "card-1");
    /// }
    /// assert_eq!(cards_created.load(Ordering::SeqCst), 1);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn execute<T, E, F, Fut>(
        &self,
        key: &IdempotencyKey,
        action: F,
    ) -> Result<T, ExecuteError<E>>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let (lease, fingerprint) = match self.begin_execute(key).await? {
            Started::Run(lease, fingerprint) => (lease, fingerprint),
            Started::Replayed(value) => return Ok(value),
        };

        let value = match action().await {
            Ok(value) => value,
            Err(error) => return Err(release(lease, ExecuteError::Action(error)).await),
        };
        // An encoding failure drops the lease: the key is released.
        let encoded = serde_json::to_vec(&value).map_err(ExecuteError::Encode)?;
        let key_text = lease.key().to_owned();
        match lease
            .complete(Record::value(fingerprint, Bytes::from(encoded)))
            .await
        {
            Ok(true) => {}
            Ok(false) => tracing::warn!(
                key = key_text,
                "idempotency lease was lost while the action ran; its result is not stored"
            ),
            Err(error) => tracing::warn!(
                %error,
                key = key_text,
                "the action ran but its result could not be stored"
            ),
        }
        Ok(value)
    }
}

/// Reading and writing results outside `execute`: these need a store that
/// implements [`StoreAdmin`] as well as [`Store`] (every store of this crate
/// does).
impl<S: StoreAdmin> Idempotency<S> {
    /// The stored result of a successful [`execute`](Self::execute) (or
    /// [`mark_executed`](Self::mark_executed)) for `key`, if any. A call still
    /// running is not a result yet: `None`.
    ///
    /// # Errors
    ///
    /// [`ExecuteError::Store`] when the store fails, [`ExecuteError::NotAValue`]
    /// when the key holds an HTTP response, [`ExecuteError::Decode`] when the
    /// value does not decode as `T`.
    ///
    /// # Example
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use tower_idempotency::{Idempotency, IdempotencyKey};
    ///
    /// let engine = Idempotency::new();
    /// let key = IdempotencyKey::new("signal-9", "send_notification", "slack");
    /// assert_eq!(engine.check_executed::<String>(&key).await?, None);
    ///
    /// engine.execute(&key, || async { Ok::<_, std::io::Error>("ts-1".to_owned()) }).await?;
    /// assert_eq!(engine.check_executed::<String>(&key).await?, Some("ts-1".to_owned()));
    /// # Ok(())
    /// # }
    /// ```
    pub async fn check_executed<T: DeserializeOwned>(
        &self,
        key: &IdempotencyKey,
    ) -> Result<Option<T>, ExecuteError> {
        let Some(entry) = self.record(&key.to_text()).await? else {
            return Ok(None);
        };
        match entry.state {
            EntryState::InFlight { .. } => Ok(None),
            EntryState::Completed(record) => decode(&record).map(Some),
        }
    }

    /// Records `value` as the result of `key` for `ttl`, whatever the key
    /// held: for actions known to be done elsewhere (a result imported from
    /// another system, or confirmed by reading the third party back). Later
    /// [`execute`](Self::execute) calls for `key` return `value` without
    /// running. A zero `ttl` stores nothing.
    ///
    /// # Errors
    ///
    /// [`ExecuteError::Encode`] when `value` does not encode as JSON,
    /// [`ExecuteError::Store`] when the store fails.
    ///
    /// # Example
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use std::time::Duration;
    /// use tower_idempotency::{Idempotency, IdempotencyKey};
    ///
    /// let engine = Idempotency::new();
    /// let key = IdempotencyKey::new("signal-5", "upload_file", "drive");
    /// engine.mark_executed(&key, &"file-77", Duration::from_secs(3600)).await?;
    ///
    /// let file_id: String = engine
    ///     .execute(&key, || async { Err::<String, _>(std::io::Error::other("not called")) })
    ///     .await?;
    /// assert_eq!(file_id, "file-77");
    /// # Ok(())
    /// # }
    /// ```
    pub async fn mark_executed<T: Serialize + ?Sized>(
        &self,
        key: &IdempotencyKey,
        value: &T,
        ttl: Duration,
    ) -> Result<(), ExecuteError> {
        let text = key.to_text();
        let encoded = serde_json::to_vec(value).map_err(ExecuteError::Encode)?;
        let record = Record::value(fingerprint(key, &text), Bytes::from(encoded));
        self.put(&text, record, ttl).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn encoding_failure_releases_the_key() {
        let engine = Idempotency::new();
        let key = IdempotencyKey::new("s", "a", "t");
        // A map with non-string keys does not encode as JSON.
        let unencodable = || async {
            let mut map = std::collections::HashMap::new();
            map.insert(vec![1u8], 1);
            Ok::<_, Infallible>(map)
        };
        let result =
            tokio::time::timeout(Duration::from_secs(5), engine.execute(&key, unencodable))
                .await
                .unwrap();
        assert!(matches!(result, Err(ExecuteError::Encode(_))));
        let again = tokio::time::timeout(
            Duration::from_secs(5),
            engine.execute(&key, || async { Ok::<_, Infallible>(7u32) }),
        )
        .await
        .unwrap();
        assert_eq!(again.unwrap(), 7);
    }

    #[test]
    fn errors_display_and_chain() {
        let error: ExecuteError<std::io::Error> =
            ExecuteError::Action(std::io::Error::other("trello said no"));
        assert_eq!(error.to_string(), "the action failed: trello said no");
        assert!(std::error::Error::source(&error).is_some());
        assert!(std::error::Error::source(&ExecuteError::<Infallible>::Mismatch).is_none());
    }
}
