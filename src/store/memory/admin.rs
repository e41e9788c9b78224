//! The memory store's [`StoreAdmin`]: listing, paging, removal and counts.

use std::time::{Duration, Instant};

use super::markers::sweep;
use super::records::Slot;
use super::MemoryStore;
use crate::record::SharedRecord;
use crate::stats::CacheInfo;
use crate::store::{
    decode_cursor, encode_cursor, Entry, EntryKind, KeyFilter, KeyPage, Removal, ScanEntry,
    StoreAdmin, StoreError,
};

impl StoreAdmin for MemoryStore {
    async fn put(&self, key: &str, record: SharedRecord, ttl: Duration) -> Result<(), StoreError> {
        let query = self.stripes.query(key);
        let mut markers = self.stripes.lock(query);
        if let Some(marker) = markers.remove(key) {
            // A live marker is replaced, as a write replaces what a key holds.
            self.counters
                .expired(usize::from(!marker.is_live(Instant::now())));
        }
        self.cache
            .insert(query.record_key(key.to_owned()), Slot::new(record, ttl));
        drop(markers);
        self.written();
        Ok(())
    }

    async fn get(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        let query = self.stripes.query(key);
        let mut markers = self.stripes.lock(query);
        let now = Instant::now();
        if let Some(marker) = markers.get(key) {
            if marker.is_live(now) {
                return Ok(Some(Entry {
                    state: marker.state(),
                    expires_in: marker.expires_in(now),
                }));
            }
            markers.remove(key);
            self.counters.expired(1);
        }
        Ok(self.live(query, now).map(|slot| slot.to_entry(now)))
    }

    async fn remove(&self, key: &str) -> Result<bool, StoreError> {
        let query = self.stripes.query(key);
        let mut markers = self.stripes.lock(query);
        let now = Instant::now();
        let marker = markers.remove(key).map(|marker| marker.is_live(now));
        self.counters.expired(usize::from(marker == Some(false)));
        let record = self.cache.remove(&query).map(|slot| slot.is_live(now));
        Ok(marker == Some(true) || record == Some(true))
    }

    async fn remove_unless_in_flight(&self, key: &str) -> Result<Removal, StoreError> {
        let query = self.stripes.query(key);
        // Under the key's stripe lock, as `begin`: no marker appears meanwhile.
        let mut markers = self.stripes.lock(query);
        let now = Instant::now();
        if let Some(marker) = markers.get(key) {
            if marker.is_live(now) {
                return Ok(Removal::InFlight);
            }
            markers.remove(key);
            self.counters.expired(1);
        }
        let record = self.cache.remove(&query).map(|slot| slot.is_live(now));
        Ok(if record == Some(true) {
            Removal::Removed
        } else {
            Removal::Absent
        })
    }

    /// Pages in the order of the keys' stored hashes, and each page walks
    /// every marker and record once (O(n), n at most the entry bound plus
    /// the markers), keeping only the `limit` next ones: an ordered index
    /// would cost every write, to make a listing cheaper. The cursor is the
    /// last key's hash and text.
    async fn page(
        &self,
        filter: &KeyFilter,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<KeyPage, StoreError> {
        let after = cursor.map(parse_cursor).transpose()?;
        let mut walk = PageWalk::new(after, limit);
        let now = Instant::now();
        for markers in self.stripes.each() {
            for (key, marker) in markers.iter() {
                self.visited();
                if !marker.is_live(now) || !filter.matches_key(key) {
                    continue;
                }
                walk.offer(self.stripes.query(key).hash, key, || ScanEntry {
                    key: key.clone(),
                    kind: EntryKind::InFlight,
                    expires_in: marker.expires_in(now),
                    created_at_ms: marker.created_at_ms,
                });
            }
        }
        for (key, slot) in self.cache.iter() {
            self.visited();
            if !slot.is_live(now) || !filter.matches_key(&key.text) {
                continue;
            }
            walk.offer(key.hash, &key.text, || ScanEntry {
                key: key.text.to_string(),
                kind: EntryKind::Completed,
                expires_in: slot.expires_in(now),
                created_at_ms: slot.record.created_at_ms,
            });
        }
        Ok(walk.finish(filter))
    }

    async fn clear(&self) -> Result<(), StoreError> {
        let now = Instant::now();
        for mut markers in self.stripes.each() {
            self.counters.expired(sweep(&mut markers, now));
            markers.clear();
        }
        self.cache.invalidate_all();
        self.cache.run_pending_tasks();
        Ok(())
    }

    async fn scan(&self) -> Result<Vec<ScanEntry>, StoreError> {
        let now = Instant::now();
        let mut entries = Vec::new();
        for markers in self.stripes.each() {
            entries.extend(
                markers
                    .iter()
                    .filter(|(_, marker)| marker.is_live(now))
                    .map(|(key, marker)| ScanEntry {
                        key: key.clone(),
                        kind: EntryKind::InFlight,
                        expires_in: marker.expires_in(now),
                        created_at_ms: marker.created_at_ms,
                    }),
            );
        }
        entries.extend(self.cache.iter().filter(|(_, slot)| slot.is_live(now)).map(
            |(key, slot)| ScanEntry {
                key: key.text.to_string(),
                kind: EntryKind::Completed,
                expires_in: slot.expires_in(now),
                created_at_ms: slot.record.created_at_ms,
            },
        ));
        Ok(entries)
    }

    async fn len(&self) -> Result<u64, StoreError> {
        Ok(self.maintain())
    }

    async fn info(&self) -> Result<CacheInfo, StoreError> {
        Ok(CacheInfo {
            entries: self.maintain(),
            max_entries: Some(self.max_entries),
            // Without a byte bound every record weighs 1: that is no byte count.
            weighted_bytes: if self.max_bytes.is_some() {
                self.cache.weighted_size()
            } else {
                0
            },
        })
    }

    /// From moka's entry count (after its pending work, which is bounded)
    /// and the markers' maps: no walk. Records whose TTL ran out may count
    /// until moka drops them, about a second late.
    async fn info_estimate(&self) -> Result<CacheInfo, StoreError> {
        self.cache.run_pending_tasks();
        let markers: usize = self.stripes.each().map(|markers| markers.len()).sum();
        Ok(CacheInfo {
            entries: self.cache.entry_count() + markers as u64,
            max_entries: Some(self.max_entries),
            weighted_bytes: if self.max_bytes.is_some() {
                self.cache.weighted_size()
            } else {
                0
            },
        })
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// A page cursor's hash and key text.
fn parse_cursor(cursor: &str) -> Result<(u64, Vec<u8>), StoreError> {
    let bytes = decode_cursor(cursor)?;
    let (hash, key) = bytes.split_at_checked(8).ok_or(StoreError::InvalidCursor)?;
    let hash = u64::from_be_bytes(hash.try_into().map_err(|_| StoreError::InvalidCursor)?);
    Ok((hash, key.to_vec()))
}

/// The entries of one page, in (hash, key) order: the `limit + 1` smallest
/// past the cursor (the last one only tells that there is a next page).
struct PageWalk {
    after: Option<(u64, Vec<u8>)>,
    limit: usize,
    /// A max-heap: its top is the first to give up its place.
    best: std::collections::BinaryHeap<Candidate>,
}

struct Candidate {
    hash: u64,
    entry: ScanEntry,
}

impl Candidate {
    fn order(&self) -> (u64, &[u8]) {
        (self.hash, self.entry.key.as_bytes())
    }
}

impl PartialEq for Candidate {
    fn eq(&self, other: &Self) -> bool {
        self.order() == other.order()
    }
}

impl Eq for Candidate {}

impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.order().cmp(&other.order())
    }
}

impl PageWalk {
    fn new(after: Option<(u64, Vec<u8>)>, limit: usize) -> Self {
        Self {
            after,
            limit,
            best: std::collections::BinaryHeap::with_capacity(limit.saturating_add(1).min(1 << 12)),
        }
    }

    /// Keeps the entry `make` builds when `(hash, key)` is past the cursor
    /// and among the smallest yet; builds nothing otherwise.
    fn offer(&mut self, hash: u64, key: &str, make: impl FnOnce() -> ScanEntry) {
        let at = (hash, key.as_bytes());
        if self
            .after
            .as_ref()
            .is_some_and(|(h, k)| at <= (*h, k.as_slice()))
        {
            return;
        }
        if self.best.len() > self.limit {
            match self.best.peek() {
                Some(top) if at < top.order() => {
                    self.best.pop();
                }
                _ => return,
            }
        }
        self.best.push(Candidate {
            hash,
            entry: make(),
        });
    }

    fn finish(self, filter: &KeyFilter) -> KeyPage {
        let mut best = self.best.into_sorted_vec();
        let more = best.len() > self.limit;
        best.truncate(self.limit);
        let next_cursor = more
            .then(|| {
                best.last().map(|last| {
                    let mut bytes = last.hash.to_be_bytes().to_vec();
                    bytes.extend_from_slice(last.entry.key.as_bytes());
                    encode_cursor(&bytes)
                })
            })
            .flatten();
        KeyPage {
            keys: best
                .into_iter()
                .map(|candidate| candidate.entry)
                .filter(|entry| filter.matches(entry))
                .collect(),
            next_cursor,
        }
    }
}
