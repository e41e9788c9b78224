use super::records::{KeyQuery, MAINTAIN_EVERY};
use super::*;

fn marker_count(store: &MemoryStore) -> usize {
    store.stripes.each().map(|markers| markers.len()).sum()
}

/// The cache finds records by the stored hash, but a key is its text: two
/// texts whose hashes collide are two records, each found by its own text.
#[tokio::test]
async fn keys_whose_hashes_collide_stay_apart() {
    let store = MemoryStore::new();
    let record = |body: &'static str| {
        Arc::new(crate::record::Record::value(
            Fingerprint::of_bytes(body.as_bytes()),
            bytes::Bytes::from_static(body.as_bytes()),
        ))
    };
    let colliding = |text: &'static str| KeyQuery { hash: 42, text };
    for (text, body) in [("alice:pay:1", "alice's"), ("bob:pay:1", "bob's")] {
        store.cache.insert(
            colliding(text).record_key(text.to_owned()),
            Slot::new(record(body), Duration::from_secs(60)),
        );
    }
    for (text, body) in [("alice:pay:1", "alice's"), ("bob:pay:1", "bob's")] {
        let found = store.cache.get(&colliding(text)).map(|slot| slot.record);
        assert_eq!(found.and_then(|r| r.as_value().cloned()), Some(body.into()));
    }
    assert!(store.cache.get(&colliding("carol:pay:1")).is_none());
    // And by text through the store's own hash, as the engine looks.
    store
        .put("carol:pay:1", record("carol's"), Duration::from_secs(60))
        .await
        .unwrap();
    let carol = store.local_record("carol:pay:1").unwrap();
    assert_eq!(carol.as_value().unwrap(), "carol's");
    assert!(store.local_record("carol:pay:2").is_none());
}

/// Markers abandoned past their lease, whose keys nobody touches again,
/// are dropped when their stripe next needs room, without a cleanup.
#[tokio::test]
async fn abandoned_markers_make_room_for_new_ones() {
    let store = MemoryStore::new();
    let brief = Duration::from_millis(5);
    for i in 0..1_000 {
        let key = format!("s{i}:a:gone");
        store
            .begin(
                &key,
                Fingerprint::of_bytes(b"x"),
                LeaseToken::random(),
                brief,
            )
            .await
            .unwrap();
    }
    tokio::time::sleep(brief * 4).await;
    let long = Duration::from_secs(60);
    for i in 0..10_000 {
        let key = format!("s{i}:a:held");
        let begun = store
            .begin(
                &key,
                Fingerprint::of_bytes(b"x"),
                LeaseToken::random(),
                long,
            )
            .await
            .unwrap();
        assert!(matches!(begun, BeginOutcome::Acquired), "{begun:?}");
    }
    // Ten thousand new markers over 64 stripes outgrow what the first
    // thousand left free in every one of them.
    assert_eq!(store.removal_counts().expired, 1_000);
    assert_eq!(marker_count(&store), 10_000);
    assert_eq!(store.len().await.unwrap(), 10_000);
}

/// A writer whose turn to run moka's pending work comes while another
/// writer runs it goes on without waiting, and a later turn does the
/// work the skipped ones left: the bound holds, on the newest records.
#[test]
fn a_writer_skips_its_maintenance_turn_while_another_runs_it() {
    const BOUND: u64 = 8;
    let store = MemoryStore::builder().max_entries(BOUND).build().unwrap();
    let record: SharedRecord = Arc::new(crate::record::Record::value(
        Fingerprint::of_bytes(b"x"),
        bytes::Bytes::from_static(b"r"),
    ));
    let write = |store: &MemoryStore, from: u64, to: u64| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        for i in from..to {
            let key = format!("k{i}");
            let put = store.put(&key, record.clone(), Duration::from_secs(60));
            runtime.block_on(put).unwrap();
        }
    };
    let turn = store.maintaining.lock().unwrap();
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::scope(|scope| {
        let store = &store;
        scope.spawn(move || {
            // Four turns come while the turn is held here.
            write(store, 0, 4 * MAINTAIN_EVERY);
            done.send(()).unwrap();
        });
        let waited = finished.recv_timeout(Duration::from_secs(30)).is_err();
        // Let a writer that waits finish before the scope joins it.
        drop(turn);
        assert!(!waited, "a writer waited for another's maintenance");
    });
    write(&store, 4 * MAINTAIN_EVERY, 5 * MAINTAIN_EVERY);
    assert_eq!(store.cache.entry_count(), BOUND);
    let written = 5 * MAINTAIN_EVERY;
    for i in 0..written {
        let kept = store.local_record(&format!("k{i}")).is_some();
        assert_eq!(kept, i >= written - BOUND, "record k{i}");
    }
}

/// A marker and a record never share a key: `put` replaces a marker,
/// `remove` removes either, and neither leaves the other behind.
#[tokio::test]
async fn a_key_holds_a_marker_or_a_record() {
    let store = MemoryStore::new();
    let long = Duration::from_secs(60);
    let lease = LeaseToken::random();
    let record: SharedRecord = Arc::new(crate::record::Record::value(
        Fingerprint::of_bytes(b"x"),
        bytes::Bytes::from_static(b"r"),
    ));
    store
        .begin("k", Fingerprint::of_bytes(b"x"), lease, long)
        .await
        .unwrap();
    assert!(store.local_record("k").is_none());
    store.put("k", record.clone(), long).await.unwrap();
    assert_eq!(marker_count(&store), 0);
    assert!(store.local_record("k").is_some());
    assert!(!store
        .complete("k", lease, record.clone(), long)
        .await
        .unwrap());
    assert!(store.remove("k").await.unwrap());
    assert!(store.get("k").await.unwrap().is_none());
    store
        .begin("k", Fingerprint::of_bytes(b"x"), lease, long)
        .await
        .unwrap();
    assert!(store.complete("k", lease, record, long).await.unwrap());
    assert_eq!(marker_count(&store), 0);
    assert_eq!(store.len().await.unwrap(), 1);
}

mod paging {
    use std::sync::atomic::Ordering::Relaxed;

    use super::super::*;
    use crate::record::Record;
    use crate::store::KeyFilter;

    /// A store of `n` records, built for them, and `limit` keys a page.
    async fn filled(n: usize) -> MemoryStore {
        let store = MemoryStore::builder()
            .max_entries(n as u64 + 10)
            .build()
            .unwrap();
        let record: SharedRecord = Arc::new(Record::value(
            Fingerprint::of_bytes(b"r"),
            bytes::Bytes::from_static(b"r"),
        ));
        for i in 0..n {
            store
                .put(
                    &format!("s:a:t{i}"),
                    record.clone(),
                    Duration::from_secs(600),
                )
                .await
                .unwrap();
        }
        store
    }

    /// What one `/stats` and one page cost, in entries walked, at 100 and at
    /// 100,000 records: the estimate walks none; a page walks each entry
    /// once (the documented O(n), bounded by the entry bound) and answers
    /// its limit.
    #[tokio::test]
    async fn a_page_and_an_estimate_at_100_and_100_000_keys() {
        for n in [100, 100_000] {
            let store = filled(n).await;
            store.walked.store(0, Relaxed);
            let info = store.info_estimate().await.unwrap();
            assert_eq!(info.entries, n as u64);
            assert_eq!(store.walked.load(Relaxed), 0, "the estimate walked entries");
            let page = store.page(&KeyFilter::new(), None, 100).await.unwrap();
            assert_eq!(page.keys.len(), 100);
            assert_eq!(page.next_cursor.is_some(), n > 100);
            assert_eq!(store.walked.load(Relaxed), n as u64);
        }
    }
}
