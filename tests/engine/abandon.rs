//! Abandoned leases: not released, no longer renewed, left to their marker's
//! TTL, after which `LeaseExpiry` decides.

use crate::support::stores;

use std::time::Duration;

use bytes::Bytes;
use stores::{per_store, TestStore};
use tokio::time::timeout;
use tower_idempotency::{Begin, Fingerprint, Idempotency, LeaseExpiry, Record};

const LIMIT: Duration = Duration::from_secs(20);

async fn within<F: std::future::Future>(future: F) -> F::Output {
    timeout(LIMIT, future).await.expect("timed out")
}

fn fp() -> Fingerprint {
    Fingerprint::of_bytes(b"charge")
}

/// Begins `key` on `engine` until it runs there (the marker has gone),
/// polling; answers how many conflicts it met first.
async fn begin_until_it_runs(engine: &Idempotency<TestStore>, key: &str) -> usize {
    within(async {
        let mut conflicts = 0;
        loop {
            match engine.begin(key, fp()).await.unwrap() {
                Begin::Execute(lease) => {
                    lease
                        .complete(Record::value(fp(), Bytes::from_static(b"second")))
                        .await
                        .unwrap();
                    return conflicts;
                }
                Begin::Conflict { .. } => conflicts += 1,
                other => panic!("unexpected {other:?}"),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

per_store!(an_abandoned_lease_is_neither_released_nor_renewed);
async fn an_abandoned_lease_is_neither_released_nor_renewed(store: TestStore) {
    let other = store.another_instance().await;
    let lease_ttl = Duration::from_millis(600);
    let engine = Idempotency::builder()
        .lease_ttl(lease_ttl)
        .store(store)
        .build()
        .unwrap();
    let rival = Idempotency::builder()
        .lease_ttl(lease_ttl)
        .store(other)
        .build()
        .unwrap();
    let key = "s:abandon:one";
    let Begin::Execute(lease) = within(engine.begin(key, fp())).await.unwrap() else {
        panic!("the first call runs");
    };
    lease.abandon();
    assert_eq!(engine.stats().ambiguous, 1);
    // Not released: a retry at once, here or elsewhere, meets the marker.
    assert!(matches!(
        within(engine.begin(key, fp())).await.unwrap(),
        Begin::Conflict { .. }
    ));
    assert!(matches!(
        within(rival.begin(key, fp())).await.unwrap(),
        Begin::Conflict { .. }
    ));
    // Not renewed: under `Takeover` the marker runs out with its lease TTL
    // and a retry may run again.
    begin_until_it_runs(&rival, key).await;
}

per_store!(leases_abandoned_at_shutdown_are_not_released_when_dropped);
async fn leases_abandoned_at_shutdown_are_not_released_when_dropped(store: TestStore) {
    let engine = Idempotency::builder()
        .lease_expiry(LeaseExpiry::Block)
        .store(store)
        .build()
        .unwrap();
    let mut leases = Vec::new();
    for i in 0..20 {
        let Begin::Execute(lease) = within(engine.begin(format!("s:shutdown:{i}"), fp()))
            .await
            .unwrap()
        else {
            panic!("{i} runs");
        };
        leases.push(lease);
    }
    engine.abandon_leases();
    assert_eq!(engine.stats().ambiguous, 20);
    // A lease dropped unabandoned would release in the background, and a
    // begin here would wait for that release (its flight) and then run.
    drop(leases);
    for i in 0..20 {
        assert!(
            matches!(
                within(engine.begin(format!("s:shutdown:{i}"), fp()))
                    .await
                    .unwrap(),
                Begin::Conflict { .. }
            ),
            "key {i} must stay held"
        );
    }
}
