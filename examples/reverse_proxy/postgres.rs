//! `--postgres`: the proxy's records in a Postgres table.

use std::time::Duration;

use tower::BoxError;
use tower_idempotency::store::postgres::PostgresStore;
use tower_idempotency::{Concurrent, Idempotency};

use crate::cli::Args;

/// An engine on Postgres. Like the Redis one it starts even when the
/// database is down (requests then get 503, or pass unprotected with
/// --fail-open, and /healthz answers 503 until it answers); the table is
/// created at start when the database answers, and must exist otherwise.
pub(crate) async fn engine(
    url: &str,
    args: &Args,
    concurrent: Concurrent,
) -> Result<Idempotency<PostgresStore>, BoxError> {
    let store = PostgresStore::builder(url)
        .table(args.postgres_table.clone())
        .build_lazy()
        .map_err(|e| format!("--postgres: {e}"))?;
    // The URL may hold a password: it is never logged.
    match tokio::time::timeout(Duration::from_secs(3), store.migrate()).await {
        Ok(Ok(())) => tracing::info!(table = %args.postgres_table, "Postgres answers"),
        Ok(Err(e)) => tracing::warn!(error = %e, "Postgres does not answer yet"),
        Err(_) => tracing::warn!("Postgres does not answer yet (timed out)"),
    }
    Ok(Idempotency::builder()
        .ttl(args.ttl)
        .lease_ttl(args.lease_ttl)
        .concurrent(concurrent)
        .store(store)
        .build()?)
}
