//! The cases of the store contract. Each panics with the rule it checks.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Barrier;

use super::WriteRaw;
use crate::key::Fingerprint;
use crate::record::{now_ms, Record, SharedRecord};
use crate::store::{BeginOutcome, Entry, EntryKind, EntryState, LeaseToken, Store, StoreError};

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

pub(super) async fn cleanup<S: Store>(store: &S) {
    ok!("cleanup", store.clear());
}

pub(super) async fn begin_acquires_a_free_key<S: Store>(store: Arc<S>) {
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

pub(super) async fn begin_answers_in_flight<S: Store>(store: Arc<S>) {
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

pub(super) async fn begin_answers_completed<S: Store>(store: Arc<S>) {
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

pub(super) async fn begin_is_atomic<S: Store>(store: Arc<S>, tasks: usize) {
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

pub(super) async fn complete_is_fenced<S: Store>(store: Arc<S>) {
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

pub(super) async fn renew_extends_the_lease<S: Store>(store: Arc<S>) {
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

pub(super) async fn release_frees_the_key<S: Store>(store: Arc<S>) {
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

pub(super) async fn marker_expires_and_is_taken_over<S: Store>(store: Arc<S>, short: Duration) {
    let (key, old, new) = ("s:a:takeover", LeaseToken::random(), LeaseToken::random());
    ok!("takeover", store.begin(key, fingerprint(1), old, short));
    tokio::time::sleep(short * 2).await;
    check!(
        "takeover",
        ok!("takeover", store.get(key)).is_none(),
        "a marker outlived its lease TTL of {short:?}"
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

pub(super) async fn record_expires<S: Store>(store: Arc<S>, short: Duration) {
    ok!(
        "record expiry",
        store.put("s:a:ttl", record(1, "brief"), short)
    );
    check!(
        "record expiry",
        ok!("record expiry", store.get("s:a:ttl")).is_some(),
        "a fresh record is missing"
    );
    tokio::time::sleep(short * 2).await;
    check!(
        "record expiry",
        ok!("record expiry", store.get("s:a:ttl")).is_none(),
        "a record outlived its TTL of {short:?}"
    );
    let begun = ok!(
        "record expiry",
        store.begin("s:a:ttl", fingerprint(1), LeaseToken::random(), LONG)
    );
    check!(
        "record expiry",
        matches!(begun, BeginOutcome::Acquired),
        "an expired record's key gave {begun:?}"
    );
}

pub(super) async fn put_get_remove<S: Store>(store: Arc<S>) {
    let key = "s:a:put";
    ok!(
        "put/get/remove",
        store.begin(key, fingerprint(1), LeaseToken::random(), LONG)
    );
    let written = record(1, "put");
    ok!("put/get/remove", store.put(key, written.clone(), LONG));
    let entry = ok!("put/get/remove", store.get(key));
    let expires_in = entry.as_ref().map(|e| e.expires_in).unwrap_or_default();
    check!(
        "put/get/remove",
        record_of(entry).is_some_and(|r| *r == *written),
        "put did not replace the marker by the record"
    );
    check!(
        "put/get/remove",
        !expires_in.is_zero() && expires_in <= LONG,
        "record expires in {expires_in:?}, TTL {LONG:?}"
    );
    check!(
        "put/get/remove",
        ok!("put/get/remove", store.remove(key)),
        "remove of a record answered false"
    );
    check!(
        "put/get/remove",
        !ok!("put/get/remove", store.remove(key)),
        "remove of a missing key answered true"
    );
    check!(
        "put/get/remove",
        ok!("put/get/remove", store.get(key)).is_none(),
        "a removed record is still there"
    );
    let begun = ok!(
        "put/get/remove",
        store.begin(key, fingerprint(1), LeaseToken::random(), LONG)
    );
    check!(
        "put/get/remove",
        matches!(begun, BeginOutcome::Acquired),
        "a removed key gave {begun:?}"
    );
}

pub(super) async fn scan_lists_live_entries<S: Store>(store: Arc<S>, short: Duration) {
    let before = now_ms();
    ok!(
        "scan",
        store.begin("s:a:marker", fingerprint(1), LeaseToken::random(), LONG)
    );
    ok!("scan", store.put("s:a:record", record(1, "r"), LONG * 2));
    ok!("scan", store.put("s:a:gone", record(1, "g"), short));
    tokio::time::sleep(short * 2).await;
    let after = now_ms();
    let mut entries = ok!("scan", store.scan());
    entries.sort_by(|a, b| a.key.cmp(&b.key));
    let keys: Vec<_> = entries.iter().map(|e| (e.key.as_str(), e.kind)).collect();
    check!(
        "scan",
        keys == [
            ("s:a:marker", EntryKind::InFlight),
            ("s:a:record", EntryKind::Completed)
        ],
        "scan listed {keys:?}, expected the live marker and record only"
    );
    for (entry, ttl) in entries.iter().zip([LONG, LONG * 2]) {
        check!(
            "scan",
            entry.expires_in <= ttl && entry.expires_in > ttl - Duration::from_secs(10),
            "{} expires in {:?}, TTL {ttl:?}",
            entry.key,
            entry.expires_in
        );
        check!(
            "scan",
            (before..=after).contains(&entry.created_at_ms),
            "{} created at {} ms, written between {before} and {after}",
            entry.key,
            entry.created_at_ms
        );
    }
    check!(
        "scan",
        ok!("scan", store.len()) == 2,
        "len is not the number of live entries (2)"
    );
    check!(
        "scan",
        ok!("scan", store.info()).entries == 2,
        "info().entries is not the number of live entries (2)"
    );
}

pub(super) async fn clear_removes_everything<S: Store>(store: Arc<S>) {
    for key in ["s:a:one", "s:a:two"] {
        ok!("clear", store.put(key, record(1, "x"), LONG));
    }
    ok!(
        "clear",
        store.begin("s:a:three", fingerprint(1), LeaseToken::random(), LONG)
    );
    check!(
        "clear",
        ok!("clear", store.len()) == 3,
        "len is not 3 after writing 3 keys"
    );
    ok!("clear", store.clear());
    check!(
        "clear",
        ok!("clear", store.len()) == 0,
        "len is not 0 after clear"
    );
    check!(
        "clear",
        ok!("clear", store.scan()).is_empty(),
        "scan lists entries after clear"
    );
    check!(
        "clear",
        ok!("clear", store.get("s:a:one")).is_none(),
        "a record survived clear"
    );
    let begun = ok!(
        "clear",
        store.begin("s:a:three", fingerprint(1), LeaseToken::random(), LONG)
    );
    check!(
        "clear",
        matches!(begun, BeginOutcome::Acquired),
        "a cleared key gave {begun:?}"
    );
}

pub(super) async fn ping_answers<S: Store>(store: Arc<S>) {
    ok!("ping", store.ping());
}

fn is_corrupt<T>(result: &Result<T, StoreError>, key: &str) -> bool {
    matches!(result, Err(StoreError::Corrupt { key: k, .. }) if k == key)
}

pub(super) async fn corrupt_values<S: Store>(store: &S, write_raw: &WriteRaw<S>) {
    let mut newer = record(1, "v").encode().to_vec();
    newer[3] = u8::MAX;
    let encoded = record(1, "truncated").encode();
    let garbage: [(&str, Bytes); 3] = [
        ("foreign", Bytes::from_static(b"not an idempotency entry")),
        ("unknown version", Bytes::from(newer)),
        ("truncated", encoded.slice(..encoded.len() - 3)),
    ];
    for (what, bytes) in garbage {
        let key = "s:a:corrupt";
        write_raw(store, key, bytes).await;
        let got = store.get(key).await;
        check!(
            "corrupt",
            is_corrupt(&got, key),
            "get of a {what} value gave {got:?}, not StoreError::Corrupt"
        );
        let begun = store
            .begin(key, fingerprint(1), LeaseToken::random(), LONG)
            .await;
        check!(
            "corrupt",
            is_corrupt(&begun, key),
            "begin on a {what} value gave {begun:?}, not StoreError::Corrupt"
        );
        let completed = store
            .complete(key, LeaseToken::random(), record(1, "x"), LONG)
            .await;
        check!(
            "corrupt",
            matches!(completed, Ok(false)) || is_corrupt(&completed, key),
            "complete over a {what} value gave {completed:?}"
        );
        let released = store.release(key, LeaseToken::random()).await;
        check!(
            "corrupt",
            matches!(released, Ok(false)) || is_corrupt(&released, key),
            "release of a {what} value gave {released:?}"
        );
        let scanned = store.scan().await;
        // Scan may read only a value's header, so it may list a value whose
        // body is corrupt; it must not fail for another reason.
        check!(
            "corrupt",
            matches!(&scanned, Ok(entries) if entries.iter().all(|e| e.key == key))
                || is_corrupt(&scanned, key),
            "scan with a {what} value gave {scanned:?}"
        );
        check!(
            "corrupt",
            ok!("corrupt", store.remove(key)),
            "remove of a {what} value answered false"
        );
        check!(
            "corrupt",
            ok!("corrupt", store.get(key)).is_none(),
            "a {what} value survived remove"
        );
    }
}
