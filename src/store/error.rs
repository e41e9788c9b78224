//! How a store fails.

use crate::record::DecodeError;

/// A store operation that failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The backend could not be reached or did not answer.
    #[error("store unavailable: {0}")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A stored value could not be decoded.
    #[error("corrupt value under key {key:?}: {source}")]
    Corrupt {
        /// The key whose value is corrupt.
        key: String,
        /// What is wrong with it.
        #[source]
        source: DecodeError,
    },
    /// A listing's cursor that this store did not answer.
    #[error("the cursor is not one this store answered")]
    InvalidCursor,
    /// Any other backend failure.
    #[error("store error: {0}")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A write the database refused because it conflicted with a concurrent
    /// transaction (Postgres SQLSTATE `40001`, serialization failure, or
    /// `40P01`, deadlock), in a transaction at `REPEATABLE READ` or
    /// `SERIALIZABLE`: the transaction rolled back and nothing of it was
    /// kept. Calling again is safe and may succeed
    /// ([`is_retryable`](Self::is_retryable)).
    #[error("store write conflicted with a concurrent transaction: {0}")]
    SerializationFailure(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl StoreError {
    /// A backend that could not be reached, from any error.
    pub fn unavailable(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::Unavailable(error.into())
    }

    /// Any other backend failure, from any error.
    pub fn backend(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::Backend(error.into())
    }

    /// Whether the store could not be reached or did not answer in time
    /// ([`Unavailable`](Self::Unavailable)): the only failure on which
    /// [`FailMode::Open`](crate::FailMode::Open) lets a request through
    /// unprotected. Anything else means the store answered, with a value it
    /// cannot read (corrupt, foreign, of an unknown version) or an error: it
    /// cannot say whether the action already ran, so running it unprotected
    /// could run it twice. Such a request gets a 500 whatever the fail mode.
    ///
    /// ```
    /// use tower_idempotency::store::StoreError;
    ///
    /// assert!(StoreError::unavailable("connection refused").is_unavailable());
    /// assert!(!StoreError::backend("WRONGTYPE").is_unavailable());
    /// ```
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }

    /// Whether the operation failed only because it conflicted with a
    /// concurrent transaction ([`SerializationFailure`](Self::SerializationFailure)):
    /// nothing was committed, and the same call made again may succeed.
    ///
    /// ```
    /// use tower_idempotency::store::StoreError;
    ///
    /// assert!(StoreError::SerializationFailure("40001".into()).is_retryable());
    /// assert!(!StoreError::backend("WRONGTYPE").is_retryable());
    /// ```
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::SerializationFailure(_))
    }

    /// The same failure again, for each lease of a batch that one error
    /// failed ([`Store::renew_many`](super::Store::renew_many)): same kind, the source kept as text.
    #[cfg(any(feature = "redis", feature = "postgres"))]
    pub(crate) fn again(&self) -> Self {
        let text = self.to_string();
        match self {
            Self::Unavailable(_) => Self::Unavailable(text.into()),
            Self::SerializationFailure(_) => Self::SerializationFailure(text.into()),
            _ => Self::Backend(text.into()),
        }
    }
}

/// `error` as the answer of each of `leases` leases of a batch it failed
/// whole (the backend could not be asked at all).
#[cfg(any(feature = "redis", feature = "postgres"))]
pub(crate) fn each_failed(error: StoreError, leases: usize) -> Vec<Result<bool, StoreError>> {
    let mut failed: Vec<_> = (1..leases).map(|_| Err(error.again())).collect();
    if leases > 0 {
        failed.push(Err(error));
    }
    failed
}
