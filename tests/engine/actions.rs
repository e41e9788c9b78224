//! The closure API (`execute`, `check_executed`, `mark_executed`) and the
//! handle's queries over action keys, on each store.

use crate::support::stores;

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use stores::{per_store, TestStore};
use tokio::sync::{Notify, Semaphore};
use tower_idempotency::store::StoreAdmin;
use tower_idempotency::{
    Concurrent, ExecuteError, Fingerprint, Idempotency, IdempotencyKey, Record, StoredResponse,
};

const CALLERS: usize = 500;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Card {
    id: u64,
    title: String,
}

async fn bounded<F: Future>(future: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(30), future)
        .await
        .expect("timed out")
}

/// 500 tasks call `execute` with one key; the first run is held open until
/// every caller has arrived. Returns what each caller got.
async fn race(engine: &Idempotency<TestStore>, executions: &Arc<AtomicU64>) -> Vec<Card> {
    let key = IdempotencyKey::new("signal-123", "create_task", "trello");
    // One permit per caller that has arrived; the running action waits for all.
    let arrived = Arc::new(Semaphore::new(0));
    let mut tasks = Vec::with_capacity(CALLERS);
    for _ in 0..CALLERS {
        let (engine, key, arrived, executions) = (
            engine.clone(),
            key.clone(),
            arrived.clone(),
            executions.clone(),
        );
        tasks.push(tokio::spawn(async move {
            arrived.add_permits(1);
            engine
                .execute(&key, || async move {
                    let n = executions.fetch_add(1, SeqCst) + 1;
                    let _all = arrived.acquire_many(CALLERS as u32).await.unwrap();
                    Ok::<_, Infallible>(Card {
                        id: n,
                        title: format!("card created by run {n}"),
                    })
                })
                .await
        }));
    }
    let mut cards = Vec::with_capacity(CALLERS);
    for task in tasks {
        cards.push(bounded(task).await.unwrap().unwrap());
    }
    cards
}

per_store!(
    five_hundred_concurrent_callers_run_the_action_once,
    flavor = "multi_thread",
    worker_threads = 4
);
async fn five_hundred_concurrent_callers_run_the_action_once(store: TestStore) {
    let engine = Idempotency::builder().store(store).build().unwrap();
    let executions = Arc::new(AtomicU64::new(0));
    let cards = race(&engine, &executions).await;

    assert_eq!(executions.load(SeqCst), 1);
    let first = Card {
        id: 1,
        title: "card created by run 1".into(),
    };
    assert!(cards.iter().all(|card| *card == first));
    let stats = engine.stats();
    assert_eq!(stats.executed, 1);
    assert_eq!(stats.replayed + stats.coalesced, CALLERS as u64 - 1);
}

per_store!(
    duplicates_wait_for_the_running_action,
    flavor = "current_thread"
);
/// On one thread a caller joins the running flight in the same poll in which
/// it arrives, so every duplicate is known to have waited for the first run.
async fn duplicates_wait_for_the_running_action(store: TestStore) {
    let engine = Idempotency::builder().store(store).build().unwrap();
    let executions = Arc::new(AtomicU64::new(0));
    let cards = race(&engine, &executions).await;

    assert_eq!(executions.load(SeqCst), 1);
    assert!(cards.iter().all(|card| card.id == 1));
    let stats = engine.stats();
    assert_eq!(stats.executed, 1);
    assert_eq!(stats.coalesced, CALLERS as u64 - 1);
}

per_store!(errors_are_returned_and_not_stored);
async fn errors_are_returned_and_not_stored(store: TestStore) {
    let engine = Idempotency::builder().store(store).build().unwrap();
    let key = IdempotencyKey::new("signal-7", "send_notification", "slack");
    let runs = AtomicU64::new(0);

    let failed: Result<String, _> = bounded(engine.execute(&key, || async {
        runs.fetch_add(1, SeqCst);
        Err(std::io::Error::other("slack answered 503"))
    }))
    .await;
    match failed {
        Err(ExecuteError::Action(error)) => assert_eq!(error.to_string(), "slack answered 503"),
        other => panic!("expected the action's error, got {other:?}"),
    }
    assert_eq!(
        bounded(engine.check_executed::<String>(&key))
            .await
            .unwrap(),
        None
    );

    let send = || async {
        let n = runs.fetch_add(1, SeqCst) + 1;
        Ok::<_, std::io::Error>(format!("message-{n}"))
    };
    assert_eq!(
        bounded(engine.execute(&key, send)).await.unwrap(),
        "message-2"
    );
    assert_eq!(
        bounded(engine.execute(&key, send)).await.unwrap(),
        "message-2"
    );
    assert_eq!(runs.load(SeqCst), 2);
}

per_store!(a_dropped_execute_releases_the_key);
/// A caller that gives up (its `execute` future dropped while the action
/// runs) frees the key: the next call runs the action.
async fn a_dropped_execute_releases_the_key(store: TestStore) {
    let engine = Idempotency::builder().store(store).build().unwrap();
    let key = IdempotencyKey::new("signal-10", "create_card", "trello");
    let runs = AtomicU64::new(0);
    let started = Notify::new();

    let first = engine.execute(&key, || async {
        runs.fetch_add(1, SeqCst);
        started.notify_one();
        std::future::pending::<Result<String, Infallible>>().await
    });
    // Polled until its action runs, then dropped.
    bounded(async {
        tokio::select! {
            _ = first => unreachable!("the first action never ends"),
            () = started.notified() => {}
        }
    })
    .await;
    assert_eq!(runs.load(SeqCst), 1);

    let second = bounded(engine.execute(&key, || async {
        runs.fetch_add(1, SeqCst);
        Ok::<_, Infallible>("card-2".to_owned())
    }))
    .await
    .unwrap();
    assert_eq!(second, "card-2");
    assert_eq!(runs.load(SeqCst), 2, "the next call ran the action");
    assert_eq!(
        bounded(engine.check_executed::<String>(&key))
            .await
            .unwrap()
            .as_deref(),
        Some("card-2")
    );
}

/// What an action that panics half-way returns.
fn panics() -> Result<String, Infallible> {
    panic!("the action panics")
}

per_store!(a_panicking_action_releases_the_key);
/// A panic in the closure (when it is called, or in the future it returns)
/// frees the key: the next call runs the action.
async fn a_panicking_action_releases_the_key(store: TestStore) {
    let engine = Idempotency::builder().store(store).build().unwrap();
    let key = IdempotencyKey::new("signal-11", "post_message", "slack");
    let runs = Arc::new(AtomicU64::new(0));

    let in_the_closure = tokio::spawn({
        let (engine, key, runs) = (engine.clone(), key.clone(), runs.clone());
        async move {
            engine
                .execute(
                    &key,
                    || -> std::future::Ready<Result<String, Infallible>> {
                        runs.fetch_add(1, SeqCst);
                        panic!("the closure panics");
                    },
                )
                .await
        }
    });
    assert!(bounded(in_the_closure).await.unwrap_err().is_panic());

    let in_the_future = tokio::spawn({
        let (engine, key, runs) = (engine.clone(), key.clone(), runs.clone());
        async move {
            engine
                .execute(&key, || async move {
                    runs.fetch_add(1, SeqCst);
                    tokio::task::yield_now().await;
                    panics()
                })
                .await
        }
    });
    assert!(bounded(in_the_future).await.unwrap_err().is_panic());
    assert_eq!(runs.load(SeqCst), 2, "each call after a panic ran");

    let third = bounded(engine.execute(&key, || {
        let runs = runs.clone();
        async move {
            runs.fetch_add(1, SeqCst);
            Ok::<_, Infallible>("message-3".to_owned())
        }
    }))
    .await
    .unwrap();
    assert_eq!(third, "message-3");
    assert_eq!(runs.load(SeqCst), 3);
}

per_store!(a_waiter_runs_its_own_action_when_the_first_fails);
/// A duplicate waiting on a run that fails starts over and runs its own action.
async fn a_waiter_runs_its_own_action_when_the_first_fails(store: TestStore) {
    let engine = Idempotency::builder().store(store).build().unwrap();
    let key = IdempotencyKey::new("signal-8", "upload_file", "drive");
    let started = Arc::new(Notify::new());
    let fail_now = Arc::new(Notify::new());

    let first = tokio::spawn({
        let (engine, key, started, fail_now) = (
            engine.clone(),
            key.clone(),
            started.clone(),
            fail_now.clone(),
        );
        async move {
            engine
                .execute(&key, || async move {
                    started.notify_one();
                    fail_now.notified().await;
                    Err::<String, _>("drive answered 500")
                })
                .await
        }
    });
    bounded(started.notified()).await;
    let second = tokio::spawn({
        let (engine, key) = (engine.clone(), key.clone());
        async move {
            engine
                .execute(&key, || async { Ok::<_, &str>("file-2".to_owned()) })
                .await
        }
    });
    // The second caller joins the flight when it first runs; let it, then fail.
    tokio::task::yield_now().await;
    fail_now.notify_one();

    assert!(matches!(
        bounded(first).await.unwrap(),
        Err(ExecuteError::Action("drive answered 500"))
    ));
    assert_eq!(bounded(second).await.unwrap().unwrap(), "file-2");
    assert_eq!(
        bounded(engine.check_executed::<String>(&key))
            .await
            .unwrap(),
        Some("file-2".to_owned())
    );
}

/// A duplicate waits no longer than the engine's wait budget. Memory store
/// only: under the paused clock a network round trip would see its own
/// timeouts fire at once.
#[tokio::test(start_paused = true)]
async fn a_duplicate_that_waits_too_long_gets_a_timeout() {
    let engine = Idempotency::builder()
        .concurrent(Concurrent::Wait {
            timeout: Duration::from_secs(2),
        })
        .build()
        .unwrap();
    let key = IdempotencyKey::new("signal-9", "create_task", "trello");
    let started = Arc::new(Notify::new());
    let finish = Arc::new(Notify::new());
    let first = tokio::spawn({
        let (engine, key, started, finish) =
            (engine.clone(), key.clone(), started.clone(), finish.clone());
        async move {
            engine
                .execute(&key, || async move {
                    started.notify_one();
                    finish.notified().await;
                    Ok::<_, Infallible>("card-1".to_owned())
                })
                .await
        }
    });
    bounded(started.notified()).await;

    // The paused clock jumps to the end of the budget while the first runs on.
    let waited =
        bounded(engine.execute(&key, || async { Ok::<_, Infallible>("card-2".to_owned()) })).await;
    assert!(matches!(waited, Err(ExecuteError::Timeout)), "{waited:?}");

    finish.notify_one();
    assert_eq!(bounded(first).await.unwrap().unwrap(), "card-1");
}

per_store!(mark_then_check_and_execute_replay_the_marked_value);
async fn mark_then_check_and_execute_replay_the_marked_value(store: TestStore) {
    let engine = Idempotency::builder().store(store).build().unwrap();
    let key = IdempotencyKey::new("signal-1", "create_task", "trello")
        .params_json(&serde_json::json!({"title": "Ship it"}))
        .unwrap();
    assert_eq!(
        bounded(engine.check_executed::<Card>(&key)).await.unwrap(),
        None
    );

    let card = Card {
        id: 77,
        title: "Ship it".into(),
    };
    bounded(engine.mark_executed(&key, &card, Duration::from_secs(60)))
        .await
        .unwrap();
    assert_eq!(
        bounded(engine.check_executed::<Card>(&key)).await.unwrap(),
        Some(card.clone())
    );
    let replayed: Card = bounded(engine.execute(&key, || async {
        Err::<Card, _>("must not run: the action was marked executed")
    }))
    .await
    .unwrap();
    assert_eq!(replayed, card);

    // Same action, same params in another key order: the same key.
    let reordered = IdempotencyKey::new("signal-1", "create_task", "trello")
        .params_json(&serde_json::json!({ "title": "Ship it" }))
        .unwrap();
    assert_eq!(
        bounded(engine.check_executed::<Card>(&reordered))
            .await
            .unwrap(),
        Some(card)
    );
}

per_store!(a_value_of_another_type_is_a_decode_error);
async fn a_value_of_another_type_is_a_decode_error(store: TestStore) {
    let engine = Idempotency::builder().store(store).build().unwrap();
    let key = IdempotencyKey::new("s", "a", "t");
    bounded(engine.mark_executed(&key, &"not a card", Duration::from_secs(60)))
        .await
        .unwrap();
    assert!(matches!(
        bounded(engine.check_executed::<Card>(&key)).await,
        Err(ExecuteError::Decode(_))
    ));
    assert!(matches!(
        bounded(engine.execute(&key, || async {
            Ok::<_, Infallible>(Card {
                id: 1,
                title: String::new(),
            })
        }))
        .await,
        Err(ExecuteError::Decode(_))
    ));
}

per_store!(http_records_and_other_fingerprints_are_not_values);
async fn http_records_and_other_fingerprints_are_not_values(store: TestStore) {
    let engine = Idempotency::builder().store(store.clone()).build().unwrap();
    let key = IdempotencyKey::new("client-key", "POST /orders", "scope");
    let response = StoredResponse::new(http::StatusCode::CREATED, &http::HeaderMap::new(), b"{}");
    let fingerprint = Fingerprint::of_request(&http::Method::POST, "/orders", b"{}");
    bounded(store.put(
        &key.to_string(),
        Arc::new(Record::response(fingerprint, response)),
        Duration::from_secs(60),
    ))
    .await
    .unwrap();
    assert!(matches!(
        bounded(engine.check_executed::<String>(&key)).await,
        Err(ExecuteError::NotAValue)
    ));
    // execute sees a record made for another request: a mismatch, not a run.
    assert!(matches!(
        bounded(engine.execute(&key, || async { Ok::<_, Infallible>(1u8) })).await,
        Err(ExecuteError::Mismatch)
    ));
}

per_store!(marked_values_expire_with_their_ttl);
async fn marked_values_expire_with_their_ttl(store: TestStore) {
    let engine = Idempotency::builder().store(store).build().unwrap();
    let key = IdempotencyKey::new("signal-2", "send_notification", "slack");
    bounded(engine.mark_executed(&key, &1u32, Duration::from_secs(2)))
        .await
        .unwrap();
    assert_eq!(
        bounded(engine.check_executed::<u32>(&key)).await.unwrap(),
        Some(1)
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        bounded(engine.check_executed::<u32>(&key)).await.unwrap(),
        None
    );
    let ran: u32 = bounded(engine.execute(&key, || async { Ok::<_, Infallible>(2) }))
        .await
        .unwrap();
    assert_eq!(ran, 2);
}

fn names(entries: Vec<tower_idempotency::store::ScanEntry>) -> BTreeSet<String> {
    entries.into_iter().map(|entry| entry.key).collect()
}

per_store!(queries_return_exactly_the_matching_keys);
async fn queries_return_exactly_the_matching_keys(store: TestStore) {
    let engine = Idempotency::builder().store(store).build().unwrap();
    let minute = Duration::from_secs(60);
    let day = Duration::from_secs(24 * 3600);
    let keys = [
        (
            IdempotencyKey::new("sig-1", "create_task", "trello"),
            minute,
        ),
        (
            IdempotencyKey::new("sig-1", "upload_file", "drive").params(b"a.pdf"),
            day,
        ),
        (
            IdempotencyKey::new("sig-2", "create_task", "trello:board"),
            day,
        ),
        (
            IdempotencyKey::new("sig-2", "send_notification", "slack"),
            minute,
        ),
        (IdempotencyKey::new("sig-10", "create_task", "slack"), day),
        // Components that only match after unescaping.
        (
            IdempotencyKey::new("sig:1", "create%task", "trello"),
            minute,
        ),
    ];
    for (key, ttl) in &keys {
        bounded(engine.mark_executed(key, &"done", *ttl))
            .await
            .unwrap();
    }
    // One key by execute, with the engine's 24 h TTL.
    let executed = IdempotencyKey::new("sig-3", "create_task", "trello");
    bounded(engine.execute(&executed, || async {
        Ok::<_, Infallible>("done".to_owned())
    }))
    .await
    .unwrap();

    let text = |i: usize| keys[i].0.to_string();
    let set = |items: &[String]| items.iter().cloned().collect::<BTreeSet<_>>();

    assert_eq!(
        names(bounded(engine.find_by_signal("sig-1")).await.unwrap()),
        set(&[text(0), text(1)])
    );
    assert_eq!(
        names(bounded(engine.find_by_signal("sig:1")).await.unwrap()),
        set(&[text(5)])
    );
    assert_eq!(
        names(bounded(engine.find_by_action("create_task")).await.unwrap()),
        set(&[text(0), text(2), text(4), executed.to_string()])
    );
    assert_eq!(
        names(bounded(engine.find_by_target("trello")).await.unwrap()),
        set(&[text(0), text(5), executed.to_string()])
    );
    assert_eq!(
        names(bounded(engine.find_by_target("slack")).await.unwrap()),
        set(&[text(3), text(4)])
    );
    assert_eq!(
        names(
            bounded(engine.expiring_within(Duration::from_secs(120)))
                .await
                .unwrap()
        ),
        set(&[text(0), text(3), text(5)])
    );
    assert_eq!(
        names(
            bounded(engine.expiring_within(Duration::from_secs(25 * 3600)))
                .await
                .unwrap()
        )
        .len(),
        keys.len() + 1
    );
    assert!(bounded(engine.find_by_signal("sig-4"))
        .await
        .unwrap()
        .is_empty());
}
