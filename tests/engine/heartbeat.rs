//! The heartbeat keeps every held lease alive, however many: thousands of
//! leases renewed in batches (`Store::renew_many`) each third of the lease
//! TTL, on each store.

use std::time::Duration;

use futures_util::stream::{self, StreamExt};
use tower_idempotency::{Begin, Fingerprint, Idempotency, Lease};

use crate::stores::{per_store, TestStore};

/// Leases held at once: several of the heartbeat's batches.
const HELD: usize = 3_000;

/// Short enough that the test outlives it several times, long enough that
/// a round of renewals on a busy machine ends well within a third of it.
const LEASE_TTL: Duration = Duration::from_secs(5);

/// How long the leases are held: more than three lease TTLs, so a marker
/// still there at the end was renewed at least three times.
const HOLD: Duration = Duration::from_secs(16);

/// Every network step of the test, thousands of operations each, must end
/// within this.
const BUDGET: Duration = Duration::from_secs(60);

fn key(n: usize) -> String {
    format!("heartbeat:many:{n}")
}

per_store!(
    thousands_of_held_leases_outlive_their_ttl,
    flavor = "multi_thread",
    worker_threads = 2
);
/// 3,000 leases held on one engine for more than three lease TTLs: a second
/// engine on the same backend can take none of the keys over, and no
/// renewal failed.
async fn thousands_of_held_leases_outlive_their_ttl(store: TestStore) {
    let other_store = store.another_instance().await;
    let holder = Idempotency::builder()
        .store(store)
        .lease_ttl(LEASE_TTL)
        .build()
        .unwrap();
    let fingerprint = Fingerprint::of_bytes(b"held");

    let begun: Vec<Lease<TestStore>> = tokio::time::timeout(
        BUDGET,
        stream::iter(0..HELD)
            .map(|n| {
                let holder = holder.clone();
                async move {
                    match holder.begin(key(n), fingerprint).await {
                        Ok(Begin::Execute(lease)) => lease,
                        other => panic!("key {n} was not free: {other:?}"),
                    }
                }
            })
            .buffer_unordered(32)
            .collect(),
    )
    .await
    .expect("the begins did not finish");
    assert_eq!(begun.len(), HELD);

    tokio::time::sleep(HOLD).await;

    let taker = Idempotency::builder()
        .store(other_store)
        .lease_ttl(LEASE_TTL)
        .build()
        .unwrap();
    let taken: Vec<usize> = tokio::time::timeout(
        BUDGET,
        stream::iter(0..HELD)
            .map(|n| {
                let taker = taker.clone();
                async move {
                    match taker.begin(key(n), fingerprint).await {
                        Ok(Begin::Conflict { .. }) => None,
                        Ok(Begin::Execute(lease)) => {
                            // Released when dropped: the key was lost anyway.
                            drop(lease);
                            Some(n)
                        }
                        other => panic!("key {n}: unexpected answer {other:?}"),
                    }
                }
            })
            .buffer_unordered(32)
            .filter_map(|taken| async move { taken })
            .collect(),
    )
    .await
    .expect("the takeover attempts did not finish");
    assert!(
        taken.is_empty(),
        "{} of {HELD} held leases expired and were taken over (first: {:?})",
        taken.len(),
        taken.iter().min()
    );
    assert_eq!(
        holder.stats().store_errors,
        0,
        "some renewals failed while the leases were held"
    );
    drop(begun);
}
