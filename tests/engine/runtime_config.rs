//! Runtime configuration (`Idempotency::configure`): each setting applies to
//! the calls that begin after the change, `config()` shows it, and a value
//! `build()` would refuse is refused and changes nothing.

use std::sync::Arc;
use std::time::Duration;

use crate::support::stores::{per_store, TestStore};

use axum::body::Body;
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use http::{Request, StatusCode};
use tokio::sync::Notify;
use tokio::time::timeout;
use tower::ServiceExt;
use tower_idempotency::store::EntryState;
use tower_idempotency::{
    Begin, Concurrent, Config, Fingerprint, Idempotency, IdempotencyLayer, Record, MAX_DURATION,
};

const LIMIT: Duration = Duration::from_secs(20);
const HOUR: Duration = Duration::from_secs(3600);

fn fp() -> Fingerprint {
    Fingerprint::of_bytes(b"request")
}

fn value(text: &'static str) -> Record {
    Record::value(fp(), Bytes::from_static(text.as_bytes()))
}

async fn within<F: std::future::Future>(future: F) -> F::Output {
    timeout(LIMIT, future).await.expect("timed out")
}

/// Runs `key` to completion on `engine`, and answers the TTL its record got.
async fn stored_ttl(engine: &Idempotency, key: &str) -> Duration {
    let Begin::Execute(lease) = within(engine.begin(key, fp())).await.unwrap() else {
        panic!("{key} runs");
    };
    assert!(within(lease.complete(value("done"))).await.unwrap());
    let entry = within(engine.record(key)).await.unwrap().unwrap();
    assert!(matches!(entry.state, EntryState::Completed(_)));
    entry.expires_in
}

#[tokio::test]
async fn a_new_record_ttl_applies_to_the_records_stored_after_it() {
    let engine = Idempotency::builder().ttl(HOUR).build().unwrap();
    assert!(stored_ttl(&engine, "s:a:before").await > HOUR - Duration::from_secs(60));

    let config = engine
        .configure(|config| config.ttl = Duration::from_secs(120))
        .unwrap();
    assert_eq!(config.ttl, Duration::from_secs(120));
    assert_eq!(engine.config(), config);
    assert!(stored_ttl(&engine, "s:a:after").await <= Duration::from_secs(120));
    // The record stored before keeps its TTL.
    let before = within(engine.record("s:a:before")).await.unwrap().unwrap();
    assert!(before.expires_in > Duration::from_secs(120));
}

#[tokio::test]
async fn a_new_lease_ttl_applies_to_the_markers_written_after_it() {
    let engine = Idempotency::builder().lease_ttl(HOUR).build().unwrap();
    let marker_ttl = |key: &'static str| {
        let engine = engine.clone();
        async move {
            let entry = within(engine.record(key)).await.unwrap().unwrap();
            assert!(matches!(entry.state, EntryState::InFlight { .. }));
            entry.expires_in
        }
    };
    let Begin::Execute(first) = within(engine.begin("s:a:one", fp())).await.unwrap() else {
        panic!("the first call runs");
    };
    assert!(marker_ttl("s:a:one").await > Duration::from_secs(120));

    engine
        .configure(|config| config.lease_ttl = Duration::from_secs(90))
        .unwrap();
    assert_eq!(engine.config().lease_ttl, Duration::from_secs(90));
    let Begin::Execute(second) = within(engine.begin("s:a:two", fp())).await.unwrap() else {
        panic!("the second call runs");
    };
    assert!(marker_ttl("s:a:two").await <= Duration::from_secs(90));
    drop((first, second));
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_new_policy_and_wait_budget_apply_to_the_duplicates_after_it() {
    let engine = Idempotency::new();
    let Begin::Execute(lease) = within(engine.begin("s:a:t", fp())).await.unwrap() else {
        panic!("the first call runs");
    };
    // Under the default `Reject`, a duplicate conflicts at once.
    let refused = within(engine.begin("s:a:t", fp())).await.unwrap();
    assert!(matches!(refused, Begin::Conflict { .. }), "{refused:?}");

    // A short wait budget: the duplicate waits, then conflicts.
    engine
        .configure(|config| {
            config.concurrent = Concurrent::Wait {
                timeout: Duration::from_secs(2),
            }
        })
        .unwrap();
    let started = tokio::time::Instant::now();
    let waited = within(engine.begin("s:a:t", fp())).await.unwrap();
    assert!(matches!(waited, Begin::Conflict { .. }), "{waited:?}");
    assert!(started.elapsed() >= Duration::from_secs(2));

    // A long one: the duplicate waits for the run and replays its result.
    engine
        .configure(|config| config.concurrent = Concurrent::wait())
        .unwrap();
    let waiter = tokio::spawn({
        let engine = engine.clone();
        async move { engine.begin("s:a:t", fp()).await }
    });
    tokio::task::yield_now().await;
    assert!(!waiter.is_finished());
    assert!(within(lease.complete(value("done"))).await.unwrap());
    match within(waiter).await.unwrap().unwrap() {
        Begin::Replay {
            record,
            coalesced: true,
        } => assert_eq!(record.as_value().unwrap(), "done"),
        other => panic!("the waiter got {other:?}"),
    }
}

#[tokio::test]
async fn the_layer_follows_a_policy_changed_on_its_engine() {
    let engine = Idempotency::new();
    let layer = IdempotencyLayer::with_engine(engine.clone())
        .build()
        .unwrap();
    let gauge = layer.clone();
    let (entered, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let app = Router::new()
        .route(
            "/orders",
            post({
                let (entered, release) = (entered.clone(), release.clone());
                move || async move {
                    entered.notify_one();
                    release.notified().await;
                    "created"
                }
            }),
        )
        .layer(layer);
    let request = || {
        Request::post("/orders")
            .header("idempotency-key", "k-1")
            .body(Body::from("{}"))
            .unwrap()
    };

    let first = tokio::spawn(app.clone().oneshot(request()));
    within(entered.notified()).await;
    let refused = within(app.clone().oneshot(request())).await.unwrap();
    assert_eq!(refused.status(), StatusCode::CONFLICT);

    engine
        .configure(|config| config.concurrent = Concurrent::wait())
        .unwrap();
    let waiter = tokio::spawn(app.clone().oneshot(request()));
    // The waiter has joined the run once the layer counts it as waiting.
    within(async {
        while gauge.waiting() == 0 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    release.notify_one();
    let first = within(first).await.unwrap().unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    let waited = within(waiter).await.unwrap().unwrap();
    assert_eq!(waited.status(), StatusCode::OK);
    assert_eq!(waited.headers()["idempotent-replayed"], "true");
    let body = axum::body::to_bytes(waited.into_body(), 1024)
        .await
        .unwrap();
    assert_eq!(body, "created");
}

#[tokio::test]
async fn a_cleanup_interval_starts_changes_and_stops_the_task() {
    let engine = Idempotency::new();
    assert_eq!(engine.config().cleanup_interval, None);
    assert!(!engine.auto_cleanup_running());

    let every = Duration::from_secs(30);
    engine
        .configure(|config| config.cleanup_interval = Some(every))
        .unwrap();
    assert_eq!(engine.config().cleanup_interval, Some(every));
    assert!(engine.auto_cleanup_running());

    engine
        .configure(|config| config.cleanup_interval = Some(every * 2))
        .unwrap();
    assert_eq!(engine.config().cleanup_interval, Some(every * 2));
    assert!(engine.auto_cleanup_running());

    engine
        .configure(|config| config.cleanup_interval = None)
        .unwrap();
    assert_eq!(engine.config().cleanup_interval, None);
    assert!(!engine.auto_cleanup_running());

    // The older methods are the same setting.
    engine.start_auto_cleanup(every).unwrap();
    assert_eq!(engine.config().cleanup_interval, Some(every));
    engine.stop_auto_cleanup();
    assert_eq!(engine.config().cleanup_interval, None);
}

/// One change to the configuration.
type Change = Box<dyn FnOnce(&mut Config)>;

#[tokio::test]
async fn an_invalid_value_is_refused_and_changes_nothing() {
    let engine = Idempotency::builder()
        .ttl(HOUR)
        .concurrent(Concurrent::wait())
        .build()
        .unwrap();
    engine
        .configure(|config| config.cleanup_interval = Some(HOUR))
        .unwrap();
    let before = engine.config();
    let too_long = MAX_DURATION + Duration::from_secs(1);
    let changes: [(&str, Change); 7] = [
        ("ttl", Box::new(|c| c.ttl = Duration::ZERO)),
        ("ttl", Box::new(move |c| c.ttl = too_long)),
        ("lease_ttl", Box::new(|c| c.lease_ttl = Duration::ZERO)),
        ("lease_ttl", Box::new(move |c| c.lease_ttl = too_long)),
        (
            "wait timeout",
            Box::new(move |c| c.concurrent = Concurrent::Wait { timeout: too_long }),
        ),
        (
            "auto-cleanup interval",
            Box::new(|c| c.cleanup_interval = Some(Duration::ZERO)),
        ),
        (
            "auto-cleanup interval",
            Box::new(move |c| c.cleanup_interval = Some(too_long)),
        ),
    ];
    for (setting, change) in changes {
        let refused = engine
            .configure(|config| {
                // A valid change beside the invalid one is not applied either.
                config.lease_ttl = Duration::from_secs(7);
                change(config);
            })
            .unwrap_err();
        assert!(refused.to_string().contains(setting), "{refused}");
        assert_eq!(engine.config(), before);
        assert!(engine.auto_cleanup_running());
    }
    // And the engine works as configured.
    let Begin::Execute(lease) = within(engine.begin("s:a:t", fp())).await.unwrap() else {
        panic!("the first call runs");
    };
    drop(lease);
}

per_store!(raising_the_lease_ttl_renews_held_leases_at_once);
/// A lease granted under a short lease TTL is renewed under the new, longer
/// one at the change, not a new heartbeat period later: another instance
/// that tries to take the key over once the old TTL has passed finds it
/// still held.
async fn raising_the_lease_ttl_renews_held_leases_at_once(store: TestStore) {
    const OLD: Duration = Duration::from_millis(900);
    let other = store.another_instance().await;
    let holder = Idempotency::builder()
        .lease_ttl(OLD)
        .store(store)
        .build()
        .unwrap();
    let rival = Idempotency::builder()
        .lease_ttl(OLD)
        .store(other)
        .build()
        .unwrap();
    let key = "s:renew:at-once";
    let Begin::Execute(lease) = within(holder.begin(key, fp())).await.unwrap() else {
        panic!("the first call runs");
    };
    holder
        .configure(|config| config.lease_ttl = Duration::from_secs(60))
        .unwrap();
    // The renewal has landed once the store holds the marker for longer
    // than the old TTL could.
    within(async {
        loop {
            let entry = holder
                .record(key)
                .await
                .unwrap()
                .expect("the marker is held");
            if entry.expires_in > Duration::from_secs(5) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    // Past the old TTL (which no longer applies to the marker).
    tokio::time::sleep(OLD + Duration::from_millis(300)).await;
    assert!(
        matches!(
            within(rival.begin(key, fp())).await.unwrap(),
            Begin::Conflict { .. }
        ),
        "the other instance must not take a held lease over"
    );
    assert!(within(lease.complete(value("done"))).await.unwrap());
}
