//! The store contract as one test run: prove a [`Store`](super::Store) keeps it with one
//! call (feature `test-util`).
//!
//! The suite reads what the protocol left through [`StoreAdmin`], so it runs
//! on stores that implement both traits (every store of this crate does).
//!
//! [`Suite::run`] checks, each case on a fresh store from your factory:
//! `begin` is atomic under hundreds of concurrent tasks; it answers
//! `Acquired`, `InFlight` and `Completed` as the key holds; `local_record`
//! answers nothing but a completed record; `complete`,
//! `renew`, `renew_many` (lease by lease, in order) and `release` are fenced
//! by the lease token; markers expire after
//! their lease TTL and can then be taken over (the old lease can no longer
//! act); records expire after their TTL; `put`, `get`, `remove`, `clear`,
//! `scan` (kinds, creation times, expiries, no expired entries), `len`,
//! `info` and `ping` behave; and, given a hook that writes raw bytes under a
//! key, that a corrupt value is a [`StoreError::Corrupt`], never a panic.
//!
//! It panics with a message naming the case and the broken rule, so it fits
//! in a `#[tokio::test]`. Run it on a multi-thread runtime, so the concurrent
//! `begin`s really race. It sleeps past short TTLs to observe expiry (about
//! two seconds in all), and calls `clear` on each store it made.
//!
//! # Example
//!
//! ```
//! use tower_idempotency::store::{conformance::Suite, MemoryStore};
//!
//! # fn main() {
//! # let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
//! # runtime.block_on(async {
//! // In a #[tokio::test(flavor = "multi_thread")]:
//! Suite::new(|| async { MemoryStore::new() }).run().await;
//! # });
//! # }
//! ```
//!
//! A store that keeps bytes adds a hook that writes raw bytes under a key, so
//! the suite can check how it reads a corrupt value:
//!
//! ```no_run
//! # #[cfg(feature = "redis")]
//! # async fn doc() {
//! use tower_idempotency::store::conformance::Suite;
//! use tower_idempotency::store::redis::RedisStore;
//!
//! Suite::new(|| async {
//!     let prefix = format!("conformance:{}:", rand::random::<u64>());
//!     RedisStore::builder("redis://127.0.0.1:6379").prefix(prefix).build().await.unwrap()
//! })
//! .corrupt_with(|store: &RedisStore, key: &str, bytes: bytes::Bytes| {
//!     let (mut connection, key) = (store.connection(), store.redis_key(key));
//!     async move {
//!         redis::cmd("SET").arg(key).arg(bytes.as_ref()).query_async::<()>(&mut connection)
//!             .await
//!             .unwrap();
//!     }
//! })
//! .run()
//! .await;
//! # }
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::StoreAdmin;
#[cfg(doc)]
use super::StoreError;

mod cases;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T>>>;
type Make<S> = Box<dyn Fn() -> BoxFuture<S>>;
type WriteRaw<S> = Box<dyn Fn(&S, &str, Bytes) -> BoxFuture<()>>;

/// The store contract, ready to run against stores made by a factory.
#[must_use = "a suite does nothing until it is run"]
pub struct Suite<S> {
    make: Make<S>,
    write_raw: Option<WriteRaw<S>>,
    concurrency: usize,
    short_ttl: Duration,
}

impl<S> std::fmt::Debug for Suite<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Suite")
            .field("corrupt_hook", &self.write_raw.is_some())
            .field("concurrency", &self.concurrency)
            .field("short_ttl", &self.short_ttl)
            .finish_non_exhaustive()
    }
}

impl<S: StoreAdmin> Suite<S> {
    /// A suite that runs each case on a fresh, empty store from `make`.
    ///
    /// Stores on a shared backend should isolate each store made (a random
    /// key prefix, say): cases count and clear entries.
    pub fn new<M, F>(make: M) -> Self
    where
        M: Fn() -> F + 'static,
        F: Future<Output = S> + 'static,
    {
        Self {
            make: Box::new(move || Box::pin(make())),
            write_raw: None,
            concurrency: 200,
            short_ttl: Duration::from_millis(300),
        }
    }

    /// Adds the corrupt-value cases: `write_raw(store, key, bytes)` must
    /// store `bytes` as the raw value under `key`, bypassing the encoding.
    pub fn corrupt_with<C, F>(mut self, write_raw: C) -> Self
    where
        C: Fn(&S, &str, Bytes) -> F + 'static,
        F: Future<Output = ()> + 'static,
    {
        self.write_raw = Some(Box::new(move |store, key, bytes| {
            Box::pin(write_raw(store, key, bytes))
        }));
        self
    }

    /// How many tasks race in the atomicity case (default 200).
    pub fn concurrency(mut self, tasks: usize) -> Self {
        self.concurrency = tasks.max(2);
        self
    }

    /// The TTL of entries the expiry cases wait out (default 300 ms). Raise
    /// it for a store whose round trips are slow.
    pub fn short_ttl(mut self, ttl: Duration) -> Self {
        self.short_ttl = ttl.max(Duration::from_millis(10));
        self
    }

    /// Runs every case.
    ///
    /// # Panics
    ///
    /// On the first broken rule, naming the case, or when a store operation
    /// fails where it must not.
    pub async fn run(self) {
        let short = self.short_ttl;
        let tasks = self.concurrency;
        self.case(cases::begin_acquires_a_free_key).await;
        self.case(cases::begin_answers_in_flight).await;
        self.case(cases::begin_answers_completed).await;
        self.case(cases::local_record_is_only_a_completed_record)
            .await;
        self.case(move |store| cases::begin_is_atomic(store, tasks))
            .await;
        self.case(cases::complete_is_fenced).await;
        self.case(cases::renew_extends_the_lease).await;
        self.case(cases::renew_many_is_fenced).await;
        self.case(cases::release_frees_the_key).await;
        self.case(move |store| cases::marker_expires_and_is_taken_over(store, short))
            .await;
        self.case(move |store| cases::record_expires(store, short))
            .await;
        self.case(cases::put_get_remove).await;
        self.case(cases::admin_removal_and_pages).await;
        self.case(move |store| cases::scan_lists_live_entries(store, short))
            .await;
        self.case(cases::clear_removes_everything).await;
        self.case(cases::ping_answers).await;
        if let Some(write_raw) = &self.write_raw {
            let store = (self.make)().await;
            cases::corrupt_values(&store, write_raw).await;
            cases::cleanup(&store).await;
        }
    }

    async fn case<C, F>(&self, case: C)
    where
        C: FnOnce(Arc<S>) -> F,
        F: Future<Output = ()>,
    {
        let store = Arc::new((self.make)().await);
        case(store.clone()).await;
        cases::cleanup(&*store).await;
    }
}

/// Runs the whole contract against stores made by `make`: shorthand for
/// [`Suite::new(make).run()`](Suite::run).
///
/// # Panics
///
/// On the first broken rule.
pub async fn run<S, M, F>(make: M)
where
    S: StoreAdmin,
    M: Fn() -> F + 'static,
    F: Future<Output = S> + 'static,
{
    Suite::new(make).run().await;
}
