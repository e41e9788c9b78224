//! What a first request cannot cost less than while the memory store is what
//! the crate docs describe (`src/store/memory/`): a moka cache bounded by entries, evicting the least
//! recently used record, with an expiry per entry and an eviction listener
//! (the source of the `expired` and `evicted` counters), and a SHA-256
//! fingerprint of the body.
//!
//! Each part runs alone here, on as many threads as the concurrent run has
//! workers, as the store drives it: a new key per write into a cache already
//! at its bound (so every write evicts one record), moka's pending work run
//! every 4 writes by a writer that skips its turn while another runs it.
//! Its CPU time per operation, set beside the first
//! request's and the peer's from the same run, shows how far the issue's
//! first-request target is below what these parts cost together.
//!
//! The cache mirrors `MemoryStore`'s (`src/store/memory/`): keys that carry
//! their aHash, hashed as that `u64`; values a shared record and an expiry
//! instant; the same builder calls. Only the record behind the value is
//! shared by every write, so that its allocation is not counted here (it is
//! the layer's own cost).

use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use moka::notification::RemovalCause;
use moka::policy::EvictionPolicy;
use moka::sync::Cache;
use moka::Expiry;
use sha2::{Digest, Sha256};
use tower_idempotency::store::DEFAULT_MAX_ENTRIES;

/// As `MemoryStore` runs moka's pending work (its `written`).
const MAINTAIN_EVERY: u64 = 4;

/// A key that carries its hash, as the store's `RecordKey`.
#[derive(Clone, PartialEq, Eq)]
struct Key {
    hash: u64,
    text: Box<str>,
}

impl Hash for Key {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

/// A stored record and when it expires, as the store's `Slot`.
#[derive(Clone)]
struct Slot {
    _record: Arc<[u8]>,
    expires_at: Instant,
}

struct SlotExpiry;

impl Expiry<Key, Slot> for SlotExpiry {
    fn expire_after_create(&self, _key: &Key, slot: &Slot, at: Instant) -> Option<Duration> {
        Some(slot.expires_at.saturating_duration_since(at))
    }
}

/// One part of a first request, measured alone.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Part {
    /// A bounded LRU cache, nothing more.
    Lru,
    /// ... with an expiry per entry.
    LruExpiry,
    /// ... and an eviction listener: the memory store's setup.
    StoreSetup,
    /// SHA-256 of a 1 KiB body, the fingerprint.
    Sha256,
    /// A read that hits, on the memory store's setup: what a replay asks
    /// of the store.
    Get,
}

impl Part {
    pub(crate) const ALL: [Part; 5] = [
        Part::Lru,
        Part::LruExpiry,
        Part::StoreSetup,
        Part::Sha256,
        Part::Get,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Part::Lru => "moka insert at the bound: LRU only",
            Part::LruExpiry => "moka insert at the bound: LRU, expiry per entry",
            Part::StoreSetup => {
                "moka insert at the bound: LRU, expiry per entry, eviction listener (the memory store's setup)"
            }
            Part::Sha256 => "SHA-256 of 1 KiB (the fingerprint)",
            Part::Get => "moka get that hits (the memory store's setup; a replay's store read)",
        }
    }
}

type KeyHasher = ahash::RandomState;

fn cache(part: Part, counted: Arc<AtomicU64>) -> Cache<Key, Slot, KeyHasher> {
    let mut builder = Cache::builder()
        .max_capacity(DEFAULT_MAX_ENTRIES)
        .initial_capacity(DEFAULT_MAX_ENTRIES as usize)
        .eviction_policy(EvictionPolicy::lru());
    if part != Part::Lru {
        builder = builder.expire_after(SlotExpiry);
    }
    if matches!(part, Part::StoreSetup | Part::Get) {
        builder = builder.eviction_listener(move |_key, _slot, cause| {
            if matches!(cause, RemovalCause::Expired | RemovalCause::Size) {
                counted.fetch_add(1, Relaxed);
            }
        });
    }
    builder.build_with_hasher(KeyHasher::new())
}

/// Operations per second (over every thread) and the process's CPU time per
/// operation, in µs, of `threads` threads doing `part` for `length`.
pub(crate) fn measure(
    part: Part,
    threads: usize,
    length: Duration,
    cpu_time: fn() -> Option<Duration>,
) -> (f64, f64) {
    let evictions = Arc::new(AtomicU64::new(0));
    let cache = cache(part, evictions.clone());
    let hasher = KeyHasher::new();
    let key = |tag: &str, n: u64| {
        let text = format!("idem:{tag}:{n:016}:POST /orders:");
        Key {
            hash: hasher.hash_one(&text),
            text: text.into_boxed_str(),
        }
    };
    let record: Arc<[u8]> = vec![b'x'; 1200].into();
    let far = Instant::now() + Duration::from_secs(86_400);
    // At the bound before the clock starts: every measured write evicts.
    for n in 0..DEFAULT_MAX_ENTRIES {
        let slot = Slot {
            _record: record.clone(),
            expires_at: far,
        };
        cache.insert(key("fill", n), slot);
    }
    cache.run_pending_tasks();
    let body = vec![b'x'; 1024];
    let stop = AtomicBool::new(false);
    let writes = AtomicU64::new(0);
    let maintaining = Mutex::new(());
    let ready = Barrier::new(threads + 1);
    let mut cpu_start = None;
    let mut started = Instant::now();
    let done: u64 = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|thread| {
                let (cache, stop, writes, record) = (&cache, &stop, &writes, &record);
                let maintaining = &maintaining;
                let (key, body, ready) = (&key, &body, &ready);
                scope.spawn(move || {
                    let tag = format!("t{thread}");
                    // A replay reads its client's own key, again and again.
                    let own = key("fill", thread as u64);
                    ready.wait();
                    let mut n = 0u64;
                    while !stop.load(Relaxed) {
                        if part == Part::Sha256 {
                            std::hint::black_box(Sha256::digest(std::hint::black_box(body)));
                        } else if part == Part::Get {
                            assert!(std::hint::black_box(cache.get(&own)).is_some());
                        } else {
                            let slot = Slot {
                                _record: record.clone(),
                                expires_at: far,
                            };
                            cache.insert(key(&tag, n), slot);
                            if writes.fetch_add(1, Relaxed) % MAINTAIN_EVERY == MAINTAIN_EVERY - 1 {
                                if let Ok(_turn) = maintaining.try_lock() {
                                    cache.run_pending_tasks();
                                }
                            }
                        }
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        cpu_start = cpu_time();
        started = Instant::now();
        ready.wait();
        std::thread::sleep(length);
        stop.store(true, Relaxed);
        workers
            .into_iter()
            .map(|worker| worker.join().expect("floor thread"))
            .sum()
    });
    let elapsed = started.elapsed();
    let cpu = cpu_time()
        .zip(cpu_start)
        .map(|(end, start)| end.saturating_sub(start));
    if part == Part::StoreSetup {
        cache.run_pending_tasks();
        // Every write past the bound evicted one record, and the listener
        // heard of it: the setup measured is the one that feeds a counter.
        assert!(
            evictions.load(Relaxed) > 0,
            "the listener heard no eviction"
        );
    }
    (
        done as f64 / elapsed.as_secs_f64(),
        cpu.map_or(f64::NAN, |cpu| cpu.as_secs_f64() * 1e6 / done as f64),
    )
}
