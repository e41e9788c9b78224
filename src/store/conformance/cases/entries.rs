//! Cases on stored entries: expiry, put/get/remove, scan, clear, corrupt values.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::{fingerprint, record, record_of, until_gone, LONG};
use crate::record::now_ms;
use crate::store::conformance::WriteRaw;
use crate::store::{BeginOutcome, EntryKind, LeaseToken, StoreAdmin, StoreError};

pub(in crate::store::conformance) async fn record_expires<S: StoreAdmin>(
    store: Arc<S>,
    short: Duration,
) {
    let written = Instant::now();
    ok!(
        "record expiry",
        store.put("s:a:ttl", record(1, "brief"), short)
    );
    let fresh = ok!("record expiry", store.get("s:a:ttl"));
    // Missing is a fault only when the read came within the TTL: on a loaded
    // machine the TTL may have run out by then.
    check!(
        "record expiry",
        fresh.is_some() || written.elapsed() >= short,
        "a fresh record is missing"
    );
    let gone = until_gone(short, || async {
        ok!("record expiry", store.get("s:a:ttl")).is_none()
    })
    .await;
    check!(
        "record expiry",
        gone,
        "a record outlived its TTL of {short:?} by 30 s"
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

pub(in crate::store::conformance) async fn put_get_remove<S: StoreAdmin>(store: Arc<S>) {
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

pub(in crate::store::conformance) async fn scan_lists_live_entries<S: StoreAdmin>(
    store: Arc<S>,
    short: Duration,
) {
    let before = now_ms();
    ok!(
        "scan",
        store.begin("s:a:marker", fingerprint(1), LeaseToken::random(), LONG)
    );
    ok!("scan", store.put("s:a:record", record(1, "r"), LONG * 2));
    ok!("scan", store.put("s:a:gone", record(1, "g"), short));
    let gone = until_gone(short, || async {
        let entries = ok!("scan", store.scan());
        !entries.iter().any(|entry| entry.key == "s:a:gone")
    })
    .await;
    check!(
        "scan",
        gone,
        "scan listed an entry 30 s past its TTL of {short:?}"
    );
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

pub(in crate::store::conformance) async fn clear_removes_everything<S: StoreAdmin>(store: Arc<S>) {
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

pub(in crate::store::conformance) async fn ping_answers<S: StoreAdmin>(store: Arc<S>) {
    ok!("ping", store.ping());
}

fn is_corrupt<T>(result: &Result<T, StoreError>, key: &str) -> bool {
    matches!(result, Err(StoreError::Corrupt { key: k, .. }) if k == key)
}

pub(in crate::store::conformance) async fn corrupt_values<S: StoreAdmin>(
    store: &S,
    write_raw: &WriteRaw<S>,
) {
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

pub(in crate::store::conformance) async fn admin_removal_and_pages<S: StoreAdmin>(store: Arc<S>) {
    use crate::store::{KeyFilter, Removal};
    ok!(
        "admin",
        store.begin("pg:a:held", fingerprint(1), LeaseToken::random(), LONG)
    );
    for i in 0..25 {
        let key = format!("pg:a:t{i}");
        ok!("admin", store.put(&key, record(1, "p"), LONG));
    }
    let refused = ok!("admin", store.remove_unless_in_flight("pg:a:held"));
    check!(
        "admin",
        refused == Removal::InFlight && ok!("admin", store.get("pg:a:held")).is_some(),
        "remove_unless_in_flight answered {refused:?} for a live marker, or deleted it"
    );
    let removed = ok!("admin", store.remove_unless_in_flight("pg:a:t24"));
    let again = ok!("admin", store.remove_unless_in_flight("pg:a:t24"));
    check!(
        "admin",
        (removed, again) == (Removal::Removed, Removal::Absent),
        "a record's removal answered {removed:?} then {again:?}"
    );

    // Every page holds at most its limit, and the pages together hold every
    // matching key.
    let filter = KeyFilter::new().signal("pg");
    let mut seen = std::collections::BTreeSet::new();
    let mut cursor: Option<String> = None;
    for _ in 0..100 {
        let page = ok!("pages", store.page(&filter, cursor.as_deref(), 7));
        check!(
            "pages",
            page.keys.len() <= 7,
            "a page of limit 7 held {}",
            page.keys.len()
        );
        seen.extend(page.keys.into_iter().map(|entry| entry.key));
        cursor = page.next_cursor;
        if cursor.is_none() {
            break;
        }
    }
    check!(
        "pages",
        cursor.is_none() && seen.len() == 25 && seen.contains("pg:a:held"),
        "the pages listed {} keys (expected 24 records and the marker)",
        seen.len()
    );
    let one = KeyFilter::new().signal("pg").target("t3");
    let page = ok!("pages", store.page(&one, None, 100));
    let keys: Vec<_> = page.keys.iter().map(|entry| entry.key.as_str()).collect();
    check!(
        "pages",
        keys == ["pg:a:t3"],
        "a filter on one key listed {keys:?}"
    );
    let bad = store.page(&filter, Some("not a cursor!"), 7).await;
    check!(
        "pages",
        matches!(bad, Err(StoreError::InvalidCursor)),
        "a foreign cursor answered {bad:?}"
    );
    ok!("admin", store.remove("pg:a:held"));
}
