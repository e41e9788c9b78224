//! The cases of the store contract, each panicking with the rule it checks:
//! here those of the lease protocol, in `entries` those of stored entries.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Barrier;

use crate::key::Fingerprint;
use crate::record::{Record, SharedRecord};
use crate::store::{BeginOutcome, Entry, EntryState, LeaseToken, StoreAdmin};

const LONG: Duration = Duration::from_secs(60);

/// Unwraps a store result, or panics naming the case and the operation.
macro_rules! ok {
    ($case:literal, $op:expr) => {
        match $op.await {
            Ok(value) => value,
            Err(error) => panic!(
                "store conformance `{}`: `{}` failed: {error}",
                $case,
                stringify!($op)
            ),
        }
    };
}

/// Asserts, naming the case.
macro_rules! check {
    ($case:literal, $cond:expr, $($msg:tt)+) => {
        assert!($cond, "store conformance `{}`: {}", $case, format!($($msg)+))
    };
}

fn fingerprint(n: u8) -> Fingerprint {
    Fingerprint::of_bytes(&[n])
}

fn record(n: u8, body: &'static str) -> SharedRecord {
    Arc::new(Record::value(
        fingerprint(n),
        Bytes::from_static(body.as_bytes()),
    ))
}

fn lease_of(entry: Option<Entry>) -> Option<LeaseToken> {
    match entry?.state {
        EntryState::InFlight { lease, .. } => Some(lease),
        EntryState::Completed(_) => None,
    }
}

fn record_of(entry: Option<Entry>) -> Option<SharedRecord> {
    match entry?.state {
        EntryState::Completed(record) => Some(record),
        EntryState::InFlight { .. } => None,
    }
}

/// Waits out a TTL of `short`, then polls `gone` until it holds. The store's
/// clock is its own (moka's, a server's): an entry must be gone once its TTL
/// has run out, but when exactly a loaded machine sees it go is not part of
/// the contract, so the poll has a generous deadline (the TTL and 30 s), and
/// answers whether `gone` held by then.
async fn until_gone<F, Fut>(short: Duration, mut gone: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + short + Duration::from_secs(30);
    tokio::time::sleep(short).await;
    let pause = (short / 10).max(Duration::from_millis(5));
    loop {
        if gone().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(pause).await;
    }
}

pub(super) async fn cleanup<S: StoreAdmin>(store: &S) {
    ok!("cleanup", store.clear());
}

pub(super) async fn begin_acquires_a_free_key<S: StoreAdmin>(store: Arc<S>) {
    let lease = LeaseToken::random();
    let begun = ok!(
        "begin acquires",
        store.begin("s:a:free", fingerprint(1), lease, LONG)
    );
    check!(
        "begin acquires",
        matches!(begun, BeginOutcome::Acquired),
        "a free key gave {begun:?}"
    );
    let entry = ok!("begin acquires", store.get("s:a:free"));
    check!(
        "begin acquires",
        entry.is_some(),
        "no marker after Acquired"
    );
    let entry = entry.unwrap_or_else(|| unreachable!());
    check!(
        "begin acquires",
        matches!(entry.state, EntryState::InFlight { fingerprint: f, lease: l } if f == fingerprint(1) && l == lease),
        "the marker does not hold the fingerprint and lease: {entry:?}"
    );
    check!(
        "begin acquires",
        !entry.expires_in.is_zero() && entry.expires_in <= LONG,
        "marker expires in {:?}, lease TTL {LONG:?}",
        entry.expires_in
    );
}

pub(super) async fn begin_answers_in_flight<S: StoreAdmin>(store: Arc<S>) {
    let first = LeaseToken::random();
    ok!(
        "begin in flight",
        store.begin("s:a:busy", fingerprint(1), first, LONG)
    );
    let second = ok!(
        "begin in flight",
        store.begin("s:a:busy", fingerprint(2), LeaseToken::random(), LONG)
    );
    check!(
        "begin in flight",
        matches!(second, BeginOutcome::InFlight { fingerprint: f, expires_in } if f == fingerprint(1) && !expires_in.is_zero() && expires_in <= LONG),
        "a held key must answer InFlight with the holder's fingerprint, got {second:?}"
    );
    let lease = lease_of(ok!("begin in flight", store.get("s:a:busy")));
    check!(
        "begin in flight",
        lease == Some(first),
        "a second begin replaced the marker"
    );
}

pub(super) async fn begin_answers_completed<S: StoreAdmin>(store: Arc<S>) {
    let lease = LeaseToken::random();
    ok!(
        "begin completed",
        store.begin("s:a:done", fingerprint(1), lease, LONG)
    );
    let done = record(1, "result");
    let completed = ok!(
        "begin completed",
        store.complete("s:a:done", lease, done.clone(), LONG)
    );
    check!(
        "begin completed",
        completed,
        "complete with the holder's lease answered false"
    );
    let again = ok!(
        "begin completed",
        store.begin("s:a:done", fingerprint(1), LeaseToken::random(), LONG)
    );
    check!(
        "begin completed",
        matches!(&again, BeginOutcome::Completed(r) if **r == *done),
        "a completed key must answer Completed with the same record, got {again:?}"
    );
}

/// `local_record` may answer `None` (a store with no copy in process), but
/// when it answers, it answers the completed record: never a marker, never
/// a removed record.
pub(super) async fn local_record_is_only_a_completed_record<S: StoreAdmin>(store: Arc<S>) {
    let key = "s:a:local";
    let lease = LeaseToken::random();
    ok!(
        "local record",
        store.begin(key, fingerprint(1), lease, LONG)
    );
    let in_flight = store.local_record(key);
    check!(
        "local record",
        in_flight.is_none(),
        "a key in flight answered a local record: {in_flight:?}"
    );
    let done = record(1, "result");
    ok!(
        "local record",
        store.complete(key, lease, done.clone(), LONG)
    );
    if let Some(local) = store.local_record(key) {
        check!(
            "local record",
            *local == *done,
            "the local record {local:?} is not the stored one"
        );
    }
    ok!("local record", store.remove(key));
    let removed = store.local_record(key);
    check!(
        "local record",
        removed.is_none(),
        "a removed key answered a local record: {removed:?}"
    );
}

pub(super) async fn begin_is_atomic<S: StoreAdmin>(store: Arc<S>, tasks: usize) {
    let barrier = Arc::new(Barrier::new(tasks));
    let racers: Vec<_> = (0..tasks)
        .map(|i| {
            let (store, barrier) = (store.clone(), barrier.clone());
            tokio::spawn(async move {
                let lease = LeaseToken::random();
                barrier.wait().await;
                let outcome = store
                    .begin("s:a:race", fingerprint((i % 7) as u8), lease, LONG)
                    .await;
                (lease, outcome)
            })
        })
        .collect();
    let mut winners = Vec::new();
    for racer in racers {
        let (lease, outcome) = racer
            .await
            .unwrap_or_else(|e| panic!("store conformance `begin is atomic`: task failed: {e}"));
        match outcome {
            Ok(BeginOutcome::Acquired) => winners.push(lease),
            Ok(BeginOutcome::InFlight { .. }) => {}
            other => panic!("store conformance `begin is atomic`: a racer got {other:?}"),
        }
    }
    check!(
        "begin is atomic",
        winners.len() == 1,
        "{} of {tasks} concurrent begins acquired one key",
        winners.len()
    );
    let lease = lease_of(ok!("begin is atomic", store.get("s:a:race")));
    check!(
        "begin is atomic",
        lease == winners.first().copied(),
        "the marker is not the winner's"
    );

    // Distinct keys do not contend: every one is acquired.
    let barrier = Arc::new(Barrier::new(tasks));
    let racers: Vec<_> = (0..tasks)
        .map(|i| {
            let (store, barrier) = (store.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                store
                    .begin(
                        &format!("s:a:key{i}"),
                        fingerprint(1),
                        LeaseToken::random(),
                        LONG,
                    )
                    .await
            })
        })
        .collect();
    for racer in racers {
        let outcome = racer
            .await
            .unwrap_or_else(|e| panic!("store conformance `begin is atomic`: task failed: {e}"));
        check!(
            "begin is atomic",
            matches!(outcome, Ok(BeginOutcome::Acquired)),
            "a free key among many gave {outcome:?}"
        );
    }
}

pub(super) async fn complete_is_fenced<S: StoreAdmin>(store: Arc<S>) {
    let (key, holder, stranger) = ("s:a:fence", LeaseToken::random(), LeaseToken::random());
    ok!("fencing", store.begin(key, fingerprint(1), holder, LONG));
    let wrong = ok!(
        "fencing",
        store.complete(key, stranger, record(1, "stranger"), LONG)
    );
    check!(
        "fencing",
        !wrong,
        "complete with another lease token answered true"
    );
    check!(
        "fencing",
        !ok!("fencing", store.renew(key, stranger, LONG)),
        "renew with another lease token answered true"
    );
    check!(
        "fencing",
        !ok!("fencing", store.release(key, stranger)),
        "release with another lease token answered true"
    );
    let lease = lease_of(ok!("fencing", store.get(key)));
    check!(
        "fencing",
        lease == Some(holder),
        "a stranger's call changed the holder's marker"
    );

    let first = record(1, "first");
    check!(
        "fencing",
        ok!("fencing", store.complete(key, holder, first.clone(), LONG)),
        "the holder's complete answered false"
    );
    let twice = ok!(
        "fencing",
        store.complete(key, holder, record(1, "second"), LONG)
    );
    check!(
        "fencing",
        !twice,
        "a second complete with the same lease answered true"
    );
    check!(
        "fencing",
        !ok!("fencing", store.renew(key, holder, LONG)),
        "renew of a completed key answered true"
    );
    check!(
        "fencing",
        !ok!("fencing", store.release(key, holder)),
        "release of a completed key answered true"
    );
    let kept = record_of(ok!("fencing", store.get(key)));
    check!(
        "fencing",
        kept.is_some_and(|r| *r == *first),
        "the first record was overwritten or deleted"
    );
}

pub(super) async fn renew_extends_the_lease<S: StoreAdmin>(store: Arc<S>) {
    let lease = LeaseToken::random();
    ok!(
        "renew",
        store.begin("s:a:renew", fingerprint(1), lease, Duration::from_secs(5))
    );
    check!(
        "renew",
        ok!("renew", store.renew("s:a:renew", lease, LONG)),
        "the holder's renew answered false"
    );
    let entry = ok!("renew", store.get("s:a:renew"));
    let expires_in = entry.as_ref().map(|e| e.expires_in).unwrap_or_default();
    check!(
        "renew",
        expires_in > Duration::from_secs(5) && expires_in <= LONG,
        "after renew to {LONG:?} the marker expires in {expires_in:?}"
    );
    check!(
        "renew",
        !ok!("renew", store.renew("s:a:none", lease, LONG)),
        "renew of a missing key answered true"
    );
}

pub(super) async fn release_frees_the_key<S: StoreAdmin>(store: Arc<S>) {
    let lease = LeaseToken::random();
    ok!(
        "release",
        store.begin("s:a:release", fingerprint(1), lease, LONG)
    );
    check!(
        "release",
        ok!("release", store.release("s:a:release", lease)),
        "the holder's release answered false"
    );
    check!(
        "release",
        ok!("release", store.get("s:a:release")).is_none(),
        "the marker survived its release"
    );
    check!(
        "release",
        !ok!("release", store.release("s:a:release", lease)),
        "a second release answered true"
    );
    let again = ok!(
        "release",
        store.begin("s:a:release", fingerprint(2), LeaseToken::random(), LONG)
    );
    check!(
        "release",
        matches!(again, BeginOutcome::Acquired),
        "a released key gave {again:?}"
    );
}

pub(super) async fn marker_expires_and_is_taken_over<S: StoreAdmin>(
    store: Arc<S>,
    short: Duration,
) {
    let (key, old, new) = ("s:a:takeover", LeaseToken::random(), LeaseToken::random());
    ok!("takeover", store.begin(key, fingerprint(1), old, short));
    let gone = until_gone(short, || async {
        ok!("takeover", store.get(key)).is_none()
    })
    .await;
    check!(
        "takeover",
        gone,
        "a marker outlived its lease TTL of {short:?} by 30 s"
    );
    let begun = ok!("takeover", store.begin(key, fingerprint(1), new, LONG));
    check!(
        "takeover",
        matches!(begun, BeginOutcome::Acquired),
        "an expired marker's key gave {begun:?}"
    );
    check!(
        "takeover",
        !ok!(
            "takeover",
            store.complete(key, old, record(1, "stale"), LONG)
        ),
        "the expired lease completed over the new holder"
    );
    check!(
        "takeover",
        !ok!("takeover", store.renew(key, old, LONG)),
        "the expired lease renewed the new holder's marker"
    );
    check!(
        "takeover",
        !ok!("takeover", store.release(key, old)),
        "the expired lease released the new holder's marker"
    );
    check!(
        "takeover",
        lease_of(ok!("takeover", store.get(key))) == Some(new),
        "the new holder lost its marker"
    );
    check!(
        "takeover",
        ok!(
            "takeover",
            store.complete(key, new, record(1, "fresh"), LONG)
        ),
        "the new holder could not complete"
    );
}

mod batch;
mod entries;

pub(super) use batch::renew_many_is_fenced;
pub(super) use entries::{
    admin_removal_and_pages, clear_removes_everything, corrupt_values, ping_answers,
    put_get_remove, record_expires, scan_lists_live_entries,
};
