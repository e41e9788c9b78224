//! Listing and deleting the keys under the prefix: `SCAN`, never `KEYS`, so
//! Redis is never blocked by a long listing, on every primary in turn (a
//! cluster's keys are spread over its primaries, and a `SCAN` cursor belongs
//! to the node that answered it).

use redis::{RedisResult, Value};

use super::codec::{self, PEEK_LEN};
use super::connection::Primary;
use super::convert::{expires_in, map_error};
use super::RedisStore;
use crate::record::DecodeError;
use crate::store::{KeyFilter, KeyPage, ScanEntry, StoreError};

/// Keys asked for per `SCAN` call, and per pipeline of per-key commands.
const BATCH: usize = 500;

/// Most `SCAN` calls one page makes: with a filter that few keys match, a
/// page may end short (or empty) with a cursor, rather than walk on.
const PAGE_SCANS: usize = 16;

/// Where a page starts: the primary (in address order), its `SCAN` cursor,
/// how many keys of that call's answer (sorted) earlier pages took, and the
/// `COUNT` the call was made with (the same call answers the same keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PageCursor {
    primary: usize,
    scan: u64,
    skip: usize,
    count: usize,
}

impl PageCursor {
    fn parse(text: &str) -> Result<Self, StoreError> {
        let mut parts = text.split('.').map(|part| part.parse::<u64>().ok());
        let mut next = || parts.next().flatten().ok_or(StoreError::InvalidCursor);
        let cursor = Self {
            primary: usize::try_from(next()?).map_err(|_| StoreError::InvalidCursor)?,
            scan: next()?,
            skip: usize::try_from(next()?).map_err(|_| StoreError::InvalidCursor)?,
            count: usize::try_from(next()?).map_err(|_| StoreError::InvalidCursor)?,
        };
        if parts.next().is_some() || cursor.count == 0 {
            return Err(StoreError::InvalidCursor);
        }
        Ok(cursor)
    }
}

impl std::fmt::Display for PageCursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}.{}.{}.{}",
            self.primary, self.scan, self.skip, self.count
        )
    }
}

/// The keys under the prefix that one primary holds.
pub(super) struct PrimaryKeys {
    primary: Primary,
    pub(super) keys: Vec<Vec<u8>>,
}

impl RedisStore {
    /// Every primary: the one node, or each primary of a cluster, which must
    /// then serve every slot.
    pub(super) async fn primaries(&self) -> Result<Vec<Primary>, StoreError> {
        let connection = self.connection();
        self.run(connection.primaries()).await
    }

    /// Every Redis key under the prefix, each once, by the primary that
    /// holds it.
    pub(super) async fn scan_keys(&self) -> Result<Vec<PrimaryKeys>, StoreError> {
        let mut all = Vec::new();
        for primary in self.primaries().await? {
            let keys = self.scan_primary(primary.clone()).await?;
            all.push(PrimaryKeys { primary, keys });
        }
        Ok(all)
    }

    async fn scan_primary(&self, mut primary: Primary) -> Result<Vec<Vec<u8>>, StoreError> {
        let pattern = format!("{}*", glob_escape(&self.inner.prefix));
        let mut keys = Vec::new();
        let mut cursor = 0u64;
        loop {
            let mut command = redis::cmd("SCAN");
            command
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(BATCH);
            let (next, batch): (u64, Vec<Vec<u8>>) =
                self.run(command.query_async(&mut primary)).await?;
            keys.extend(batch);
            if next == 0 {
                break;
            }
            cursor = next;
        }
        // SCAN may answer a key more than once.
        keys.sort_unstable();
        keys.dedup();
        Ok(keys)
    }

    /// One page of the keys that `filter` matches; see `StoreAdmin::page`.
    pub(super) async fn page_keys(
        &self,
        filter: &KeyFilter,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<KeyPage, StoreError> {
        let mut primaries = self.primaries().await?;
        primaries.sort_by_cached_key(ToString::to_string);
        let mut at = match cursor {
            Some(text) => PageCursor::parse(text)?,
            None => PageCursor {
                primary: 0,
                scan: 0,
                skip: 0,
                count: limit.max(10),
            },
        };
        if at.primary > primaries.len() {
            return Err(StoreError::InvalidCursor);
        }
        let pattern = format!(
            "{}{}",
            glob_escape(&self.inner.prefix),
            filter.pattern("*", glob_escape).as_deref().unwrap_or("*")
        );
        let mut listed: Vec<PrimaryKeys> = Vec::new();
        let mut found = 0;
        let mut calls = 0;
        while at.primary < primaries.len() && found < limit && calls < PAGE_SCANS {
            let mut primary = primaries[at.primary].clone();
            let mut command = redis::cmd("SCAN");
            command
                .arg(at.scan)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(at.count);
            let (next, mut batch): (u64, Vec<Vec<u8>>) =
                self.run(command.query_async(&mut primary)).await?;
            calls += 1;
            batch.sort_unstable();
            // Keys past those earlier pages took from this same answer.
            let fresh = batch.len().saturating_sub(at.skip);
            let taken: Vec<Vec<u8>> = batch
                .into_iter()
                .skip(at.skip)
                .take(limit - found)
                .collect();
            found += taken.len();
            if taken.len() < fresh {
                // The page is full within this answer: the next page asks
                // the same again and skips what this one took.
                at.skip += taken.len();
            } else {
                at.skip = 0;
                at.count = limit.max(10);
                if next == 0 {
                    at.primary += 1;
                    at.scan = 0;
                } else {
                    at.scan = next;
                }
            }
            listed.push(PrimaryKeys {
                primary,
                keys: taken,
            });
        }
        let mut keys = self.peek_keys(listed).await?;
        keys.retain(|entry| filter.matches(entry));
        Ok(KeyPage {
            keys,
            next_cursor: (at.primary < primaries.len()).then(|| at.to_string()),
        })
    }

    /// Deletes `keys`, one single-key command each, pipelined to the primary
    /// that listed them.
    pub(super) async fn delete_keys(&self, listed: Vec<PrimaryKeys>) -> Result<(), StoreError> {
        for PrimaryKeys { mut primary, keys } in listed {
            for chunk in keys.chunks(BATCH) {
                let mut pipe = redis::pipe();
                for key in chunk {
                    pipe.cmd("DEL").arg(key).ignore();
                }
                self.run(pipe.query_async::<()>(&mut primary)).await?;
            }
        }
        Ok(())
    }

    /// Kind, creation time and time left of each key: the first bytes of its
    /// value and its PTTL. Keys that expired meanwhile and values that are
    /// not this crate's are left out.
    pub(super) async fn peek_keys(
        &self,
        listed: Vec<PrimaryKeys>,
    ) -> Result<Vec<ScanEntry>, StoreError> {
        let mut entries = Vec::new();
        for PrimaryKeys { mut primary, keys } in listed {
            self.peek_primary(&mut primary, &keys, &mut entries).await?;
        }
        Ok(entries)
    }

    async fn peek_primary(
        &self,
        primary: &mut Primary,
        keys: &[Vec<u8>],
        entries: &mut Vec<ScanEntry>,
    ) -> Result<(), StoreError> {
        for chunk in keys.chunks(BATCH) {
            let mut pipe = redis::pipe();
            for key in chunk {
                pipe.cmd("GETRANGE").arg(key).arg(0).arg(PEEK_LEN - 1);
                pipe.cmd("PTTL").arg(key);
            }
            // A key of another Redis type fails its GETRANGE, not the batch.
            pipe.ignore_errors();
            let answers: Vec<RedisResult<Value>> = self.run(pipe.query_async(primary)).await?;
            for (key, answer) in chunk.iter().zip(answers.chunks(2)) {
                let Some(key) = std::str::from_utf8(key)
                    .ok()
                    .and_then(|key| key.strip_prefix(self.prefix()))
                else {
                    continue;
                };
                let (head, pttl) = match answer {
                    [Ok(Value::BulkString(head)), Ok(Value::Int(pttl))] => (head, *pttl),
                    [Err(error), _] | [_, Err(error)] if error.is_io_error() => {
                        return Err(map_error(error.clone()));
                    }
                    _ => {
                        foreign(key);
                        continue;
                    }
                };
                // -2: the key expired (or was deleted) since SCAN listed it.
                if pttl == -2 {
                    continue;
                }
                let Some((kind, created_at_ms)) = codec::peek(head) else {
                    foreign(key);
                    continue;
                };
                entries.push(ScanEntry {
                    key: key.to_owned(),
                    kind,
                    expires_in: expires_in(pttl),
                    created_at_ms,
                });
            }
        }
        Ok(())
    }
}

/// Why a value under this store's prefix was skipped by `scan`.
fn foreign(key: &str) {
    tracing::warn!(
        key,
        error = %DecodeError::NotARecord,
        "skipping a value that is not an idempotency entry"
    );
}

/// `text` as a SCAN pattern that matches it literally.
fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn glob_escape_makes_patterns_literal() {
        assert_eq!(super::glob_escape("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
        assert_eq!(super::glob_escape("idem:"), "idem:");
    }
}
