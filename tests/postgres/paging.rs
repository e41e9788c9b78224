//! Listing and counting at scale: one page of `/keys` and one `/stats`
//! estimate cost about the same at 100 and at 100,000 rows, counted in the
//! bytes the store and Postgres exchange (through a counting relay).

use std::sync::Arc;
use std::time::Duration;

use sqlx::Connection;
use tokio::time::timeout;
use tower_idempotency::store::postgres::PostgresStore;
use tower_idempotency::store::StoreAdmin;
use tower_idempotency::{Fingerprint, KeyFilter, Record};

use crate::support::relay::Relay;
use crate::support::stores::postgres::{database_url, random_table, store, DropTables};

const LIMIT: Duration = Duration::from_secs(60);

/// `n` rows copied from one the store wrote, in one statement.
async fn fill(table: &str, n: usize) {
    let seeded = store(table).await;
    let seed = Record::value(
        Fingerprint::of_bytes(b"seed"),
        bytes::Bytes::from_static(b"r"),
    );
    seeded
        .put("seed:a:t", Arc::new(seed), Duration::from_secs(600))
        .await
        .unwrap();
    let mut connection = sqlx::PgConnection::connect(&database_url()).await.unwrap();
    let sql = format!(
        "INSERT INTO \"{table}\" (key, state, lease_token, fingerprint, record, created_at_ms, \
         expires_at) SELECT 's:a:t' || i, state, lease_token, fingerprint, record, \
         created_at_ms, expires_at FROM \"{table}\", generate_series(1, {n}) AS i \
         WHERE key = 'seed:a:t'"
    );
    timeout(LIMIT, sqlx::query(&sql).execute(&mut connection))
        .await
        .unwrap()
        .unwrap();
    timeout(
        LIMIT,
        sqlx::query(&format!("DELETE FROM \"{table}\" WHERE key = 'seed:a:t'"))
            .execute(&mut connection),
    )
    .await
    .unwrap()
    .unwrap();
    // Fresh planner statistics, as autovacuum would have them.
    timeout(
        LIMIT,
        sqlx::query(&format!("ANALYZE \"{table}\"")).execute(&mut connection),
    )
    .await
    .unwrap()
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_and_an_estimate_cost_the_same_at_100_and_100_000_rows() {
    let postgres: std::net::SocketAddr = "127.0.0.1:5432".parse().unwrap();
    let relay = Relay::start(postgres).await;
    let url = database_url().replace("127.0.0.1:5432", &relay.addr.to_string());
    let mut page_bytes = Vec::new();
    for n in [100, 100_000] {
        let table = random_table("paging");
        let _cleanup = DropTables::new(&table);
        store(&table).await;
        fill(&table, n).await;
        let store = PostgresStore::builder(url.clone())
            .table(table.as_str())
            .max_connections(1)
            .timeout(Duration::from_secs(30))
            .build()
            .await
            .unwrap();
        timeout(LIMIT, store.ping()).await.unwrap().unwrap();
        // Once, so the page's statement is prepared on the connection.
        timeout(LIMIT, store.page(&KeyFilter::new(), None, 100))
            .await
            .unwrap()
            .unwrap();

        let before = relay.bytes();
        let page = timeout(LIMIT, store.page(&KeyFilter::new(), None, 100))
            .await
            .unwrap()
            .unwrap();
        page_bytes.push(relay.bytes() - before);
        assert_eq!(page.keys.len(), 100, "{n} rows");
        assert_eq!(page.next_cursor.is_some(), n > 100);
        if let Some(cursor) = &page.next_cursor {
            let next = timeout(LIMIT, store.page(&KeyFilter::new(), Some(cursor), 100))
                .await
                .unwrap()
                .unwrap();
            // Key order is the database's collation: the next page holds
            // 100 other keys.
            assert_eq!(next.keys.len(), 100);
            assert!(next
                .keys
                .iter()
                .all(|entry| page.keys.iter().all(|seen| seen.key != entry.key)));
        }

        // The first estimate counts; the next ones answer it and send nothing.
        let first = timeout(LIMIT, store.info_estimate())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(first.entries, n as u64);
        let before = relay.bytes();
        for _ in 0..10 {
            let info = timeout(LIMIT, store.info_estimate())
                .await
                .unwrap()
                .unwrap();
            assert_eq!(info.entries, n as u64);
        }
        // No statement goes out (the shortest, a `SELECT count(*)` of the
        // table, is over 40 bytes); the pool's own housekeeping may (a
        // Terminate closing an idle connection is 5 bytes).
        let sent = relay.bytes() - before;
        assert!(sent < 32, "{sent} bytes for ten estimates at {n} rows");
    }
    let [at_100, at_100_000] = page_bytes[..] else {
        unreachable!()
    };
    // The same 100 rows each time; only the keys' digits are longer.
    assert!(
        at_100_000 <= at_100 + at_100 / 4,
        "bytes for one page: {at_100} at 100 rows, {at_100_000} at 100,000"
    );
}
