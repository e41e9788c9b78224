//! Concurrent retries of a key whose result is stored all replay it, under
//! the default `Concurrent::Reject` too: a duplicate conflicts with a run in
//! flight, never with another retry that is only looking the result up.

use std::time::Duration;

use bytes::Bytes;
use tower_idempotency::{Begin, Concurrent, Fingerprint, Idempotency, Record};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_retries_of_a_completed_key_all_replay_under_reject() {
    let engine = Idempotency::new();
    let fingerprint = Fingerprint::of_bytes(b"order 42");
    let Begin::Execute(lease) = engine
        .begin_with("client:create_order:42", fingerprint, Concurrent::Reject)
        .await
        .unwrap()
    else {
        panic!("the first call runs");
    };
    lease
        .complete(Record::value(fingerprint, Bytes::from_static(b"created")))
        .await
        .unwrap();

    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(200));
    let retries: Vec<_> = (0..200)
        .map(|_| {
            let engine = engine.clone();
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                let mut answers = Vec::new();
                for _ in 0..50 {
                    let begun = engine
                        .begin_with("client:create_order:42", fingerprint, Concurrent::Reject)
                        .await
                        .unwrap();
                    answers.push(match begun {
                        Begin::Replay { record, .. } => {
                            assert_eq!(record.as_value().unwrap(), "created");
                            "replay"
                        }
                        Begin::Conflict { .. } => "conflict",
                        Begin::Mismatch => "mismatch",
                        Begin::Execute(_) => "execute",
                    });
                }
                answers
            })
        })
        .collect();

    let mut answers = Vec::new();
    for retry in retries {
        answers.extend(
            tokio::time::timeout(Duration::from_secs(30), retry)
                .await
                .expect("the retries finish")
                .unwrap(),
        );
    }
    assert_eq!(answers.len(), 200 * 50);
    assert!(answers.iter().all(|answer| *answer == "replay"));
    let stats = engine.stats();
    assert_eq!(stats.executed, 1);
    assert_eq!(stats.replayed, 200 * 50);
    assert_eq!(stats.conflicts, 0);
}
