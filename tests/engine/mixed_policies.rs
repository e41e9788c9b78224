//! One engine serving layers with different policies (`with_engine` and
//! `concurrent`): a duplicate under `Reject` is refused as soon as the key is
//! known to be in flight, even while a `Wait` duplicate of this process polls
//! the store for it.

use std::time::Duration;

use bytes::Bytes;
use tokio::time::timeout;
use tower_idempotency::store::MemoryStore;
use tower_idempotency::{Begin, Concurrent, Fingerprint, Idempotency, Record};

const LIMIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn reject_conflicts_at_once_while_a_wait_duplicate_polls_another_instance() {
    let store = MemoryStore::new();
    let (here, elsewhere) = (
        Idempotency::builder().store(store.clone()).build().unwrap(),
        Idempotency::builder().store(store).build().unwrap(),
    );
    let fp = Fingerprint::of_bytes(b"order 11");
    // Another instance runs the key.
    let Begin::Execute(lease) = elsewhere
        .begin_with("s:a:mixed", fp, Concurrent::Reject)
        .await
        .unwrap()
    else {
        panic!("the first call runs");
    };

    // Here, a `Wait` duplicate finds it in flight and polls until it ends.
    let waiter = tokio::spawn({
        let here = here.clone();
        let wait = Concurrent::Wait {
            timeout: Duration::from_secs(60),
        };
        async move { here.begin_with("s:a:mixed", fp, wait).await }
    });
    // On this single thread the waiter runs until it sleeps between polls.
    tokio::task::yield_now().await;
    assert!(!waiter.is_finished());

    let rejected = timeout(LIMIT, here.begin_with("s:a:mixed", fp, Concurrent::Reject))
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(rejected, Begin::Conflict { .. }), "{rejected:?}");
    // Refused while the run and the wait go on, not when the wait ended.
    assert!(!waiter.is_finished());

    lease
        .complete(Record::value(fp, Bytes::from_static(b"done")))
        .await
        .unwrap();
    match timeout(LIMIT, waiter).await.unwrap().unwrap().unwrap() {
        Begin::Replay { record, .. } => assert_eq!(record.as_value().unwrap(), "done"),
        other => panic!("the waiter got {other:?}"),
    }
}
