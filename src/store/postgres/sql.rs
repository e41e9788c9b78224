//! The SQL of the store: one statement per operation, each
//! written once per table when the store is built.
//!
//! Every time is the database's clock (`clock_timestamp()`, not `now()`,
//! which inside a transaction is the transaction's start), so instances whose
//! clocks disagree still agree on what has expired. TTLs travel as whole
//! milliseconds (`$n::bigint * interval '1 millisecond'`).

/// The quoted names of the store's table and of its expiry index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Table {
    pub(super) name: String,
    pub(super) index: String,
}

impl Table {
    /// `table`, or `schema.table`, quoted as Postgres identifiers, so any
    /// name is safe in the statements. `None` for an empty part.
    pub(super) fn parse(table: &str) -> Option<Self> {
        let (schema, bare) = match table.split_once('.') {
            Some((schema, bare)) => (Some(schema), bare),
            None => (None, table),
        };
        if bare.is_empty() || schema.is_some_and(str::is_empty) {
            return None;
        }
        let qualify = |name: &str| match schema {
            Some(schema) => format!("{}.{}", quote(schema), quote(name)),
            None => quote(name),
        };
        Some(Self {
            name: qualify(bare),
            // An index lives in its table's schema: only its own name is given.
            index: quote(&format!("{bare}_expires_at")),
        })
    }
}

fn quote(identifier: &str) -> String {
    format!("\"{}\"", identifier.replace('"', "\"\""))
}

/// The columns a read answers, in this order, decoded by `convert::held`.
const HELD: &str = "state, lease_token, fingerprint, record, created_at_ms, \
     GREATEST(0, (EXTRACT(EPOCH FROM expires_at - clock_timestamp()) * 1000)::bigint) AS expires_in_ms";

/// The columns `scan` answers besides the key: no payload.
const LISTED: &str = "state, created_at_ms, \
     GREATEST(0, (EXTRACT(EPOCH FROM expires_at - clock_timestamp()) * 1000)::bigint) AS expires_in_ms";

/// A live row: expired rows are ignored by every read.
const LIVE: &str = "expires_at > clock_timestamp()";

/// Every statement of the store, for one table.
#[derive(Debug)]
pub(super) struct Statements {
    /// `$1` key, `$2` lease, `$3` fingerprint, `$4` created_at_ms, `$5` lease
    /// TTL: the whole of `begin` in one statement. When the statement's
    /// snapshot holds a live row under the key, it answers that row
    /// (`acquired` false, then the columns of `HELD`) and writes nothing: the
    /// insert's `SELECT` yields no row, so no row is inserted, updated or
    /// locked. Otherwise it writes the marker (`acquired` true), into a free
    /// key or over an expired row (takeover, fenced as ever by the expiry
    /// that the `ON CONFLICT` update re-checks on the newest version of the
    /// row). No row at all: another caller's row won the key after the
    /// snapshot was taken (a concurrent insert, or a takeover of the same
    /// expired row); a second statement, with a newer snapshot, reads it.
    pub(super) begin: String,
    /// `$1` key: the live row.
    pub(super) get: String,
    /// `$1` key, `$2` lease, `$3` lease TTL.
    pub(super) renew: String,
    /// `$1` keys, `$2` leases (`text[]` each, pairwise), `$3` lease TTL:
    /// `renew` for every pair in one statement; answers the key and lease
    /// of each row it renewed.
    pub(super) renew_many: String,
    /// `$1` key, `$2` lease, `$3` fingerprint, `$4` record, `$5`
    /// created_at_ms, `$6` TTL: the marker becomes the record, fenced.
    pub(super) complete: String,
    /// `$1` key, `$2` lease.
    pub(super) release: String,
    /// `$1` key, `$2` fingerprint, `$3` record, `$4` created_at_ms, `$5` TTL.
    pub(super) put: String,
    /// `$1` key: answers whether the deleted row was live.
    pub(super) remove: String,
    /// `$1` key: deletes the row unless it is a live marker; answers
    /// whether it deleted a live row, and whether the key holds a live
    /// marker (one statement: the check and the delete are one step).
    pub(super) remove_unless_in_flight: String,
    /// `$1` pattern (LIKE) or NULL, `$2` limit: the first page, keyset
    /// paging on the primary key's index.
    pub(super) page_first: String,
    /// `$1` pattern (LIKE) or NULL, `$2` limit, `$3` the last key of the
    /// page before.
    pub(super) page_after: String,
    pub(super) clear: String,
    pub(super) scan: String,
    pub(super) len: String,
    pub(super) stored_bytes: String,
    pub(super) cleanup: String,
}

impl Statements {
    pub(super) fn new(table: &Table) -> Self {
        let t = &table.name;
        let until =
            |param: u8| format!("clock_timestamp() + ${param}::bigint * interval '1 millisecond'");
        Self {
            begin: format!(
                "WITH live AS (SELECT {HELD} FROM {t} WHERE key = $1 AND {LIVE}), \
                 acquired AS (INSERT INTO {t} AS held \
                 (key, state, lease_token, fingerprint, record, created_at_ms, expires_at) \
                 SELECT $1, 'in_flight', $2, $3, NULL, $4, {until5} \
                 WHERE NOT EXISTS (SELECT FROM live) \
                 ON CONFLICT (key) DO UPDATE SET state = 'in_flight', \
                 lease_token = EXCLUDED.lease_token, fingerprint = EXCLUDED.fingerprint, \
                 record = NULL, created_at_ms = EXCLUDED.created_at_ms, \
                 expires_at = EXCLUDED.expires_at \
                 WHERE held.expires_at <= clock_timestamp() \
                 RETURNING {HELD}) \
                 SELECT true AS acquired, * FROM acquired \
                 UNION ALL SELECT false AS acquired, * FROM live",
                until5 = until(5)
            ),
            get: format!("SELECT {HELD} FROM {t} WHERE key = $1 AND {LIVE}"),
            renew: format!(
                "UPDATE {t} SET expires_at = {until3} \
                 WHERE key = $1 AND state = 'in_flight' AND lease_token = $2 AND {LIVE}",
                until3 = until(3)
            ),
            renew_many: format!(
                "UPDATE {t} AS held SET expires_at = {until3} \
                 FROM unnest($1::text[], $2::text[]) AS asked(key, lease_token) \
                 WHERE held.key = asked.key AND held.state = 'in_flight' \
                 AND held.lease_token = asked.lease_token \
                 AND held.expires_at > clock_timestamp() \
                 RETURNING held.key, held.lease_token",
                until3 = until(3)
            ),
            complete: format!(
                "UPDATE {t} SET state = 'completed', lease_token = NULL, fingerprint = $3, \
                 record = $4, created_at_ms = $5, expires_at = {until6} \
                 WHERE key = $1 AND state = 'in_flight' AND lease_token = $2 AND {LIVE}",
                until6 = until(6)
            ),
            release: format!(
                "DELETE FROM {t} \
                 WHERE key = $1 AND state = 'in_flight' AND lease_token = $2 AND {LIVE}"
            ),
            put: format!(
                "INSERT INTO {t} \
                 (key, state, lease_token, fingerprint, record, created_at_ms, expires_at) \
                 VALUES ($1, 'completed', NULL, $2, $3, $4, {until5}) \
                 ON CONFLICT (key) DO UPDATE SET state = 'completed', lease_token = NULL, \
                 fingerprint = EXCLUDED.fingerprint, record = EXCLUDED.record, \
                 created_at_ms = EXCLUDED.created_at_ms, expires_at = EXCLUDED.expires_at",
                until5 = until(5)
            ),
            remove: format!("DELETE FROM {t} WHERE key = $1 RETURNING {LIVE} AS live"),
            remove_unless_in_flight: format!(
                "WITH gone AS (DELETE FROM {t} WHERE key = $1 \
                 AND NOT (state = 'in_flight' AND {LIVE}) RETURNING {LIVE} AS live) \
                 SELECT COALESCE((SELECT live FROM gone), false) AS removed, \
                 EXISTS (SELECT 1 FROM {t} WHERE key = $1 AND state = 'in_flight' AND {LIVE}) \
                 AND NOT EXISTS (SELECT 1 FROM gone) AS in_flight"
            ),
            page_first: format!(
                "SELECT key, {LISTED} FROM {t} WHERE {LIVE} \
                 AND ($1::text IS NULL OR key LIKE $1) ORDER BY key LIMIT $2"
            ),
            page_after: format!(
                "SELECT key, {LISTED} FROM {t} WHERE key > $3 AND {LIVE} \
                 AND ($1::text IS NULL OR key LIKE $1) ORDER BY key LIMIT $2"
            ),
            clear: format!("DELETE FROM {t}"),
            scan: format!("SELECT key, {LISTED} FROM {t} WHERE {LIVE}"),
            len: format!("SELECT count(*) FROM {t} WHERE {LIVE}"),
            stored_bytes: format!(
                "SELECT COALESCE(sum(octet_length(record)), 0)::bigint FROM {t} WHERE {LIVE}"
            ),
            cleanup: format!("DELETE FROM {t} WHERE expires_at <= clock_timestamp()"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Table;

    #[test]
    fn table_names_are_quoted_and_may_carry_a_schema() {
        let plain = Table::parse("idempotency").unwrap();
        assert_eq!(plain.name, "\"idempotency\"");
        assert_eq!(plain.index, "\"idempotency_expires_at\"");
        let qualified = Table::parse("app.idem\"x").unwrap();
        assert_eq!(qualified.name, "\"app\".\"idem\"\"x\"");
        assert_eq!(qualified.index, "\"idem\"\"x_expires_at\"");
        assert_eq!(Table::parse(""), None);
        assert_eq!(Table::parse("app."), None);
        assert_eq!(Table::parse(".t"), None);
    }
}
