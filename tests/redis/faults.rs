//! The engine on a Redis that fails for a moment (the test's own
//! `redis-server`, paused with SIGSTOP and resumed with SIGCONT, or made to
//! refuse writes as a full Redis does): a result the process holds is not
//! dropped on one failed write, and a `begin` whose answer was lost does not
//! wedge its key.
#![cfg(feature = "redis")]

use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::timeout;
use tower_idempotency::store::redis::RedisStore;
use tower_idempotency::store::StoreError;
use tower_idempotency::{Begin, Concurrent, Fingerprint, Idempotency, Lease, LeaseExpiry};

use crate::support::redis as support;

use support::{free_port, prefix, value, Logs, OwnRedis, LIMIT};

/// A store on `redis` that gives up on an answer after 300 ms.
async fn impatient_store(redis: &OwnRedis) -> RedisStore {
    RedisStore::builder(redis.url())
        .prefix(prefix())
        .connection_timeout(Duration::from_millis(300))
        .response_timeout(Duration::from_millis(300))
        .build()
        .await
        .unwrap()
}

/// Waits (within [`LIMIT`]) until `condition` holds.
async fn until(mut condition: impl FnMut() -> bool) {
    timeout(LIMIT, async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the condition never came true");
}

/// Runs every script once, so that a command sent to the paused server is
/// the script itself and not a `NOSCRIPT` round trip first.
async fn load_scripts(engine: &Idempotency<RedisStore>) {
    let fp = Fingerprint::of_bytes(b"warm-up");
    for key in ["warm:up:release", "warm:up:complete"] {
        let Ok(Begin::Execute(lease)) = engine.begin_with(key, fp, Concurrent::Reject).await else {
            panic!("the warm-up runs");
        };
        if key.ends_with("release") {
            lease.release().await.unwrap();
        } else {
            assert!(lease.complete(value(fp, "warm")).await.unwrap());
        }
    }
}

/// An engine on `store` with `lease_ttl`, its scripts loaded and its stats
/// at zero.
async fn warm_engine(store: RedisStore, lease_ttl: Duration) -> Idempotency<RedisStore> {
    let engine = Idempotency::builder()
        .store(store)
        .lease_ttl(lease_ttl)
        .build()
        .unwrap();
    load_scripts(&engine).await;
    engine.reset_stats();
    engine
}

/// The lease of the first call for `key`, which runs.
async fn first_runs(
    engine: &Idempotency<RedisStore>,
    key: &str,
    fp: Fingerprint,
) -> Lease<RedisStore> {
    match engine.begin_with(key, fp, Concurrent::Reject).await {
        Ok(Begin::Execute(lease)) => lease,
        other => panic!("the first call for {key} got {other:?}"),
    }
}

/// A duplicate of `key` in this process, begun under `concurrent`.
fn duplicate(
    engine: &Idempotency<RedisStore>,
    key: &'static str,
    fp: Fingerprint,
    concurrent: Concurrent,
) -> JoinHandle<Result<Begin<RedisStore>, StoreError>> {
    let engine = engine.clone();
    tokio::spawn(async move { engine.begin_with(key, fp, concurrent).await })
}

/// The value `begun` replays, and whether it waited for it (coalesced).
fn replayed(begun: Begin<RedisStore>) -> (String, bool) {
    match begun {
        Begin::Replay { record, coalesced } => {
            let value = record.as_value().expect("a value was stored");
            (String::from_utf8_lossy(value).into_owned(), coalesced)
        }
        other => panic!("expected a replay, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_whose_write_failed_is_stored_once_redis_answers_again() {
    let redis = OwnRedis::start(free_port()).await;
    let store = impatient_store(&redis).await;
    let prefix = store.prefix().to_owned();
    let engine = warm_engine(store, Duration::from_secs(60)).await;
    let fp = Fingerprint::of_bytes(b"order 7");
    let lease = first_runs(&engine, "s:a:paused", fp).await;
    // A duplicate in this process waits for the first's result.
    let follower = duplicate(&engine, "s:a:paused", fp, Concurrent::wait());

    redis.pause();
    let completing = tokio::spawn(lease.complete(value(fp, "charged once")));
    until(|| engine.stats().store_errors >= 2).await;
    // Two writes failed; the result is still held, not dropped, and the
    // follower has been handed nothing yet.
    assert!(!completing.is_finished());
    assert!(!follower.is_finished());

    redis.resume();
    let stored = timeout(LIMIT, completing).await.unwrap().unwrap();
    assert!(matches!(stored, Ok(true)), "{stored:?}");
    let followed = timeout(LIMIT, follower).await.unwrap().unwrap().unwrap();
    assert_eq!(replayed(followed), ("charged once".to_owned(), true));
    // A retry, on this instance or another, replays it from Redis.
    let other_instance = Idempotency::builder()
        .store(
            RedisStore::builder(redis.url())
                .prefix(&prefix)
                .build()
                .await
                .unwrap(),
        )
        .build()
        .unwrap();
    for instance in [&engine, &other_instance] {
        let retry = timeout(
            LIMIT,
            instance.begin_with("s:a:paused", fp, Concurrent::Reject),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(replayed(retry).0, "charged once");
    }
    assert_eq!(engine.stats().executed, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_whose_write_redis_refused_is_stored_once_it_accepts_writes() {
    let redis = OwnRedis::start(free_port()).await;
    let engine = warm_engine(impatient_store(&redis).await, Duration::from_secs(60)).await;
    let fp = Fingerprint::of_bytes(b"order 10");
    let lease = first_runs(&engine, "s:a:refused", fp).await;
    let follower = duplicate(&engine, "s:a:refused", fp, Concurrent::wait());

    // Unlike a pause, the refused write is gone: only a retry stores it.
    redis.refuse_writes().await;
    let completing = tokio::spawn(lease.complete(value(fp, "sent once")));
    until(|| engine.stats().store_errors >= 2).await;
    assert!(!completing.is_finished());
    assert!(!follower.is_finished());

    redis.accept_writes().await;
    let stored = timeout(LIMIT, completing).await.unwrap().unwrap();
    assert!(matches!(stored, Ok(true)), "{stored:?}");
    let followed = timeout(LIMIT, follower).await.unwrap().unwrap().unwrap();
    assert_eq!(replayed(followed), ("sent once".to_owned(), true));
    let retry = engine
        .begin_with("s:a:refused", fp, Concurrent::Reject)
        .await
        .unwrap();
    assert_eq!(replayed(retry).0, "sent once");
    assert_eq!(engine.stats().executed, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_fails_past_the_lease_ttl_gives_up_and_hands_followers_nothing() {
    let redis = OwnRedis::start(free_port()).await;
    let engine = warm_engine(impatient_store(&redis).await, Duration::from_secs(1)).await;
    let fp = Fingerprint::of_bytes(b"order 8");
    let lease = first_runs(&engine, "s:a:lost", fp).await;
    let wait = Concurrent::Wait {
        timeout: Duration::from_secs(5),
    };
    let follower = duplicate(&engine, "s:a:lost", fp, wait);

    redis.pause();
    let logs = Logs::default();
    let stored = {
        // `complete` runs on this thread: its log lines are captured.
        let _capture = logs.capture_on_this_thread();
        timeout(LIMIT, lease.complete(value(fp, "unrecorded")))
            .await
            .unwrap()
    };
    // Retried until the lease would have expired, then given up, and said so.
    assert!(
        matches!(stored, Err(StoreError::Unavailable(_))),
        "{stored:?}"
    );
    assert!(engine.stats().store_errors >= 2, "{:?}", engine.stats());
    let logs = logs.text();
    assert!(
        logs.lines()
            .any(|line| line.contains("ERROR") && line.contains("s:a:lost")),
        "{logs}"
    );
    // The follower was not handed a result that was never stored: it started
    // over, and found the store still unreachable.
    let followed = timeout(LIMIT, follower).await.unwrap().unwrap();
    assert!(
        !matches!(followed, Ok(Begin::Replay { .. })),
        "the follower got {followed:?}"
    );
    redis.resume();
}

/// Under `expiry`: two `begin`s whose answers Redis never sent in time (one
/// timed out, one was dropped by its caller) leave no marker behind once
/// Redis answers again, so the retries run, instead of a 409 for the lease
/// TTL (or, under `Block`, the record TTL).
async fn unanswered_begins_do_not_wedge_their_keys(expiry: LeaseExpiry) {
    let redis = OwnRedis::start(free_port()).await;
    let store = impatient_store(&redis).await;
    // The caller that gives up does so on an engine whose store waits for
    // Redis longer than the test runs: with the impatient store's own 300 ms
    // timeout, a stalled machine could see that timeout answer before the
    // caller's 150 ms ran out.
    let patient = RedisStore::builder(redis.url())
        .prefix(store.prefix())
        .response_timeout(LIMIT * 2)
        .build()
        .await
        .unwrap();
    let build = |store| {
        Idempotency::builder()
            .store(store)
            // Both longer than the test's limit: a marker left behind would
            // refuse every retry until the test fails.
            .lease_ttl(Duration::from_secs(120))
            .ttl(Duration::from_secs(3600))
            .lease_expiry(expiry)
            .build()
            .unwrap()
    };
    let (engine, giving_up) = (build(store), build(patient));
    // The scripts are loaded once for the server, both connections use them.
    load_scripts(&engine).await;
    let fp = Fingerprint::of_bytes(b"order 9");

    redis.pause();
    let timed_out = timeout(
        LIMIT,
        engine.begin_with("s:a:timed-out", fp, Concurrent::Reject),
    )
    .await
    .unwrap();
    assert!(
        matches!(timed_out, Err(StoreError::Unavailable(_))),
        "{timed_out:?}"
    );
    // This caller gives up before the store's own timeout (an HTTP client
    // that disconnects): its future is dropped with the command sent.
    let dropped = timeout(
        Duration::from_millis(150),
        giving_up.begin_with("s:a:dropped", fp, Concurrent::Reject),
    )
    .await;
    assert!(dropped.is_err(), "the paused Redis answered: {dropped:?}");
    engine.reset_stats();
    // Redis now runs both begins (their markers are written), then the
    // engine's releases of their tokens.
    redis.resume();

    for key in ["s:a:timed-out", "s:a:dropped"] {
        let lease = timeout(LIMIT, async {
            loop {
                match engine.begin_with(key, fp, Concurrent::Reject).await {
                    Ok(Begin::Execute(lease)) => return lease,
                    // The release may not have reached Redis yet.
                    Ok(Begin::Conflict { .. }) | Err(_) => {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Ok(other) => panic!("{key}: got {other:?}, but nothing ran before"),
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{key} stayed wedged under {expiry:?}"));
        assert!(lease.complete(value(fp, "ran once")).await.unwrap());
        let retry = engine
            .begin_with(key, fp, Concurrent::Reject)
            .await
            .unwrap();
        assert_eq!(replayed(retry).0, "ran once", "{key}");
    }
    assert_eq!(engine.stats().executed, 2);
    drop(giving_up);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unanswered_begins_do_not_wedge_their_keys_under_takeover() {
    unanswered_begins_do_not_wedge_their_keys(LeaseExpiry::Takeover).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unanswered_begins_do_not_wedge_their_keys_under_block() {
    unanswered_begins_do_not_wedge_their_keys(LeaseExpiry::Block).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_complete_dropped_while_it_retries_goes_on_in_the_background() {
    let redis = OwnRedis::start(free_port()).await;
    let engine = warm_engine(impatient_store(&redis).await, Duration::from_secs(60)).await;
    let fp = Fingerprint::of_bytes(b"order 12");
    let lease = first_runs(&engine, "s:a:handed-off", fp).await;

    redis.refuse_writes().await;
    let completing = tokio::spawn(lease.complete(value(fp, "kept")));
    until(|| engine.stats().store_errors >= 1).await;
    // The caller goes away mid-retry (a client that disconnected): the
    // result must not be dropped with it, nor the key released.
    completing.abort();
    assert!(timeout(LIMIT, completing).await.unwrap().is_err());
    redis.accept_writes().await;

    let replayed = timeout(LIMIT, async {
        loop {
            match engine
                .begin_with("s:a:handed-off", fp, Concurrent::Reject)
                .await
            {
                Ok(Begin::Replay { record, .. }) => return record,
                // Still being stored in the background.
                Ok(Begin::Conflict { .. }) => tokio::time::sleep(Duration::from_millis(20)).await,
                other => panic!("the retry got {other:?}: the result was dropped"),
            }
        }
    })
    .await
    .expect("the result is stored in the background");
    assert_eq!(replayed.as_value().unwrap(), "kept");
    assert_eq!(engine.stats().executed, 1);
}
