//! A third party's store that implements only the protocol ([`Store`]'s four
//! required methods, no [`StoreAdmin`](tower_idempotency::store::StoreAdmin))
//! drives the layer end to end: the first request runs, a duplicate in flight
//! gets a 409, a retry replays, and the handle's stats count it all.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::routing::post;
use axum::Router;
use http::{Request, StatusCode};
use tokio::sync::{mpsc, Semaphore};
use tokio::time::timeout;
use tower::ServiceExt;
use tower_idempotency::store::{BeginOutcome, LeaseToken, SharedRecord, Store, StoreError};
use tower_idempotency::{Fingerprint, IdempotencyLayer};

const LIMIT: Duration = Duration::from_secs(20);

/// What one key holds, and until when.
enum Held {
    InFlight {
        fingerprint: Fingerprint,
        lease: LeaseToken,
        until: Instant,
    },
    Completed {
        record: SharedRecord,
        until: Instant,
    },
}

impl Held {
    fn until(&self) -> Instant {
        match self {
            Self::InFlight { until, .. } | Self::Completed { until, .. } => *until,
        }
    }

    fn held_by(&self, token: LeaseToken) -> bool {
        matches!(self, Self::InFlight { lease, .. } if *lease == token)
    }
}

/// A map behind a mutex: a store of one process, with the protocol only.
#[derive(Default)]
struct MapStore(Mutex<HashMap<String, Held>>);

impl MapStore {
    /// The map, without the entries that expired.
    fn live(&self) -> Result<MutexGuard<'_, HashMap<String, Held>>, StoreError> {
        let mut map = self
            .0
            .lock()
            .map_err(|_| StoreError::backend("the map's lock is poisoned"))?;
        let now = Instant::now();
        map.retain(|_, held| held.until() > now);
        Ok(map)
    }
}

impl Store for MapStore {
    async fn begin(
        &self,
        key: &str,
        fingerprint: Fingerprint,
        lease: LeaseToken,
        lease_ttl: Duration,
    ) -> Result<BeginOutcome, StoreError> {
        let mut map = self.live()?;
        let now = Instant::now();
        Ok(match map.get(key) {
            Some(Held::Completed { record, .. }) => BeginOutcome::Completed(record.clone()),
            Some(Held::InFlight {
                fingerprint, until, ..
            }) => BeginOutcome::InFlight {
                fingerprint: *fingerprint,
                expires_in: until.saturating_duration_since(now),
            },
            None => {
                let until = now + lease_ttl;
                let marker = Held::InFlight {
                    fingerprint,
                    lease,
                    until,
                };
                map.insert(key.to_owned(), marker);
                BeginOutcome::Acquired
            }
        })
    }

    async fn renew(
        &self,
        key: &str,
        lease: LeaseToken,
        lease_ttl: Duration,
    ) -> Result<bool, StoreError> {
        let mut map = self.live()?;
        match map.get_mut(key) {
            Some(Held::InFlight {
                lease: held, until, ..
            }) if *held == lease => {
                *until = Instant::now() + lease_ttl;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn complete(
        &self,
        key: &str,
        lease: LeaseToken,
        record: SharedRecord,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let mut map = self.live()?;
        if !map.get(key).is_some_and(|held| held.held_by(lease)) {
            return Ok(false);
        }
        let until = Instant::now() + ttl;
        map.insert(key.to_owned(), Held::Completed { record, until });
        Ok(true)
    }

    async fn release(&self, key: &str, lease: LeaseToken) -> Result<bool, StoreError> {
        let mut map = self.live()?;
        if !map.get(key).is_some_and(|held| held.held_by(lease)) {
            return Ok(false);
        }
        map.remove(key);
        Ok(true)
    }
}

fn keyed_post(key: &str) -> Request<Body> {
    Request::post("/orders")
        .header("idempotency-key", key)
        .body(Body::from("{\"item\":\"book\"}"))
        .unwrap()
}

#[tokio::test]
async fn a_store_with_only_the_protocol_runs_once_replays_and_refuses_duplicates() {
    let layer = IdempotencyLayer::builder()
        .store(MapStore::default())
        .build()
        .unwrap();
    let handle = layer.handle();
    // The handler tells when it runs and waits for a permit to answer, so the
    // duplicate below arrives while the first is surely in flight.
    let (entered_tx, mut entered) = mpsc::unbounded_channel::<()>();
    let gate = Arc::new(Semaphore::new(0));
    let handler_gate = gate.clone();
    let app = Router::new()
        .route(
            "/orders",
            post(move || {
                let (entered_tx, gate) = (entered_tx.clone(), handler_gate.clone());
                async move {
                    let _ = entered_tx.send(());
                    let _permit = gate.acquire().await;
                    (StatusCode::CREATED, "order 1")
                }
            }),
        )
        .layer(layer);

    let first = tokio::spawn(app.clone().oneshot(keyed_post("order-1")));
    timeout(LIMIT, entered.recv()).await.unwrap().unwrap();

    let duplicate = timeout(LIMIT, app.clone().oneshot(keyed_post("order-1")))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(duplicate.status(), StatusCode::CONFLICT);

    gate.add_permits(1);
    let first = timeout(LIMIT, first).await.unwrap().unwrap().unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let body = timeout(LIMIT, axum::body::to_bytes(first.into_body(), 1024))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(body, "order 1");

    let retry = timeout(LIMIT, app.oneshot(keyed_post("order-1")))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(retry.status(), StatusCode::CREATED);
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    let body = timeout(LIMIT, axum::body::to_bytes(retry.into_body(), 1024))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(body, "order 1");

    // The handler ran once: no second `entered`.
    assert!(entered.try_recv().is_err());
    let stats = handle.stats();
    assert_eq!((stats.executed, stats.replayed, stats.conflicts), (1, 1, 1));
}

#[tokio::test]
async fn execute_works_on_a_store_with_only_the_protocol() {
    let engine = tower_idempotency::Idempotency::builder()
        .store(MapStore::default())
        .build()
        .unwrap();
    let key = tower_idempotency::IdempotencyKey::new("signal-1", "create_card", "trello");
    let first: u32 = timeout(
        LIMIT,
        engine.execute(&key, || async { Ok::<_, std::io::Error>(7) }),
    )
    .await
    .unwrap()
    .unwrap();
    let again: u32 = timeout(
        LIMIT,
        engine.execute(&key, || async {
            Err::<u32, _>(std::io::Error::other(
                "not called: the first result replays",
            ))
        }),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!((first, again), (7, 7));
    assert_eq!(engine.stats().executed, 1);
}
