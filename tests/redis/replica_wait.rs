//! A `begin` whose replica `WAIT` fails with an error of its own releases
//! the marker it wrote before answering, and the count of writes no replica
//! acknowledged is read through the handle, whatever the store.

use std::time::Duration;

use tokio::time::timeout;
use tower_idempotency::store::redis::RedisStore;
use tower_idempotency::store::{BeginOutcome, LeaseToken, Store, StoreAdmin};
use tower_idempotency::{Begin, Concurrent, Fingerprint, Idempotency, Record};

#[cfg(feature = "cluster-tests")]
use crate::support::stores::cluster;
use crate::support::stores::{redis_url, Cleanup};

const LIMIT: Duration = Duration::from_secs(20);

fn prefix() -> String {
    format!("test:replica-wait:{:x}:", rand::random::<u64>())
}

/// A Redis user that may run everything but `WAIT`, on the nodes at
/// `urls`, deleted from them when dropped.
struct UserWithoutWait {
    name: String,
    urls: Vec<String>,
}

impl UserWithoutWait {
    fn create(urls: &[String]) -> Self {
        let name = format!("idem_nowait_{:x}", rand::random::<u64>());
        for url in urls {
            let client = redis::Client::open(url.as_str()).unwrap();
            let mut connection = client
                .get_connection_with_timeout(Duration::from_secs(5))
                .unwrap();
            connection
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            redis::cmd("ACL")
                .arg("SETUSER")
                .arg(&name)
                .arg("on")
                .arg(">secret")
                .arg("~*")
                .arg("&*")
                .arg("+@all")
                .arg("-wait")
                .query::<()>(&mut connection)
                .unwrap();
        }
        Self {
            name,
            urls: urls.to_vec(),
        }
    }

    /// `url` with this user's credentials.
    fn url(&self, url: &str) -> String {
        url.replacen("redis://", &format!("redis://{}:secret@", self.name), 1)
    }
}

impl Drop for UserWithoutWait {
    fn drop(&mut self) {
        for url in &self.urls {
            let deleted = redis::Client::open(url.as_str()).and_then(|client| {
                let mut connection = client.get_connection_with_timeout(Duration::from_secs(5))?;
                connection.set_read_timeout(Some(Duration::from_secs(5)))?;
                redis::cmd("ACL")
                    .arg("DELUSER")
                    .arg(&self.name)
                    .query::<()>(&mut connection)
            });
            if let Err(error) = deleted {
                eprintln!("could not delete the Redis user {}: {error}", self.name);
            }
        }
    }
}

/// `begin` through a store whose `WAIT` is refused: an error, and the key is
/// left free (a store without the replica wait acquires it at once).
async fn failed_wait_leaves_the_key_free(waiting: RedisStore, plain: RedisStore) {
    let fingerprint = Fingerprint::of_bytes(b"wait");
    let begun = timeout(
        LIMIT,
        waiting.begin("s:a:t", fingerprint, LeaseToken::random(), LIMIT),
    )
    .await
    .expect("begin answers");
    let error = begun.expect_err("a refused WAIT is an error");
    assert!(!error.is_unavailable(), "a refusal, not an outage: {error}");
    let held = timeout(LIMIT, plain.get("s:a:t")).await.unwrap().unwrap();
    assert!(held.is_none(), "the marker was left behind: {held:?}");
    let retried = timeout(
        LIMIT,
        plain.begin("s:a:t", fingerprint, LeaseToken::random(), LIMIT),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(matches!(retried, BeginOutcome::Acquired), "{retried:?}");
    // Nothing was written that a replica failed to acknowledge.
    assert_eq!(waiting.unacknowledged_writes(), 0);
}

#[tokio::test]
async fn a_begin_whose_wait_fails_releases_its_marker() {
    let url = redis_url();
    let user = UserWithoutWait::create(std::slice::from_ref(&url));
    let prefix = prefix();
    let _cleanup = Cleanup::new(url.clone(), prefix.clone());
    let waiting = RedisStore::builder(user.url(&url))
        .prefix(&prefix)
        .replica_ack(1, Duration::from_millis(100))
        .build();
    let waiting = timeout(LIMIT, waiting).await.unwrap().unwrap();
    let plain = RedisStore::builder(&url).prefix(&prefix).build();
    let plain = timeout(LIMIT, plain).await.unwrap().unwrap();
    failed_wait_leaves_the_key_free(waiting, plain).await;
}

#[cfg(feature = "cluster-tests")]
#[tokio::test]
async fn on_a_cluster_a_begin_whose_wait_fails_releases_its_marker() {
    let urls = cluster::shared_cluster_urls();
    // Every node the seeds name (127.0.0.1:7000-7005 by default, replicas included).
    let user = UserWithoutWait::create(&urls);
    let prefix = prefix();
    let _cleanup = cluster::ClusterCleanup {
        urls: urls.clone(),
        prefix: prefix.clone(),
    };
    let waiting = RedisStore::cluster_builder(urls.iter().map(|url| user.url(url)))
        .prefix(&prefix)
        .replica_ack(1, Duration::from_millis(500))
        .build();
    let waiting = timeout(LIMIT, waiting).await.unwrap().unwrap();
    let plain = cluster::cluster_store(&urls, &prefix, false).await;
    failed_wait_leaves_the_key_free(waiting, plain).await;
}

/// Writes no replica acknowledged are counted where the handle (and so the
/// proxy's `/stats` and `/metrics`) reads them, through `StoreAdmin`.
#[tokio::test]
async fn unacknowledged_writes_are_read_through_the_handle() {
    let url = redis_url();
    let prefix = prefix();
    let _cleanup = Cleanup::new(url.clone(), prefix.clone());
    // The shared Redis has no replica: every write falls short.
    let store = RedisStore::builder(&url)
        .prefix(&prefix)
        .replica_ack(1, Duration::from_millis(20))
        .build();
    let store = timeout(LIMIT, store).await.unwrap().unwrap();
    let engine = Idempotency::builder().store(store).build().unwrap();
    assert_eq!(engine.unacknowledged_writes(), 0);
    let fingerprint = Fingerprint::of_bytes(b"x");
    let begun = engine.begin_with("s:a:t", fingerprint, Concurrent::Reject);
    let Begin::Execute(lease) = timeout(LIMIT, begun).await.unwrap().unwrap() else {
        panic!("a new key runs");
    };
    let record = Record::value(fingerprint, bytes::Bytes::from_static(b"\"done\""));
    assert!(timeout(LIMIT, lease.complete(record))
        .await
        .unwrap()
        .unwrap());
    assert_eq!(engine.unacknowledged_writes(), 2, "begin and complete");
}
