//! The case of batched renewal: `renew_many` answers as `renew` would, lease
//! by lease, in order.

use std::sync::Arc;
use std::time::Duration;

use super::{fingerprint, lease_of, record, record_of, LONG};
use crate::store::{LeaseToken, StoreAdmin};

/// How many leases the larger batch holds: enough to span every node of a
/// clustered backend.
const MANY: usize = 300;

pub(in crate::store::conformance) async fn renew_many_is_fenced<S: StoreAdmin>(store: Arc<S>) {
    let short = Duration::from_secs(5);
    let (held, other, done) = (
        LeaseToken::random(),
        LeaseToken::random(),
        LeaseToken::random(),
    );
    ok!(
        "renew_many",
        store.begin("s:b:held", fingerprint(1), held, short)
    );
    ok!(
        "renew_many",
        store.begin("s:b:other", fingerprint(2), other, short)
    );
    ok!(
        "renew_many",
        store.begin("s:b:done", fingerprint(3), done, short)
    );
    ok!(
        "renew_many",
        store.complete("s:b:done", done, record(3, "done"), LONG)
    );
    let asked = [
        ("s:b:held", held),
        ("s:b:other", held),
        ("s:b:none", held),
        ("s:b:done", done),
        ("s:b:other", other),
    ];
    let renewed = store.renew_many(&asked, LONG).await;
    let renewed: Vec<bool> = renewed
        .into_iter()
        .map(|answer| match answer {
            Ok(renewed) => renewed,
            Err(error) => panic!("store conformance `renew_many`: a renewal failed: {error}"),
        })
        .collect();
    check!(
        "renew_many",
        renewed == [true, false, false, false, true],
        "renew_many of (held, another's token, missing, completed, holder's) answered {renewed:?}"
    );
    for key in ["s:b:held", "s:b:other"] {
        let entry = ok!("renew_many", store.get(key));
        let expires_in = entry.as_ref().map(|e| e.expires_in).unwrap_or_default();
        check!(
            "renew_many",
            expires_in > short && expires_in <= LONG,
            "after renew_many to {LONG:?} the marker of {key} expires in {expires_in:?}"
        );
    }
    check!(
        "renew_many",
        lease_of(ok!("renew_many", store.get("s:b:other"))) == Some(other),
        "a renewal with another's token changed the marker"
    );
    check!(
        "renew_many",
        ok!("renew_many", store.get("s:b:none")).is_none(),
        "renew_many of a missing key wrote something"
    );
    check!(
        "renew_many",
        record_of(ok!("renew_many", store.get("s:b:done"))).is_some(),
        "renew_many of a completed key changed the record"
    );
    check!(
        "renew_many",
        store.renew_many(&[], LONG).await.is_empty(),
        "renew_many of no lease answered something"
    );

    let keys: Vec<String> = (0..MANY).map(|n| format!("s:b:many:{n}")).collect();
    let lease = LeaseToken::random();
    for key in &keys {
        ok!("renew_many", store.begin(key, fingerprint(4), lease, short));
    }
    let asked: Vec<(&str, LeaseToken)> = keys.iter().map(|key| (key.as_str(), lease)).collect();
    let renewed = store.renew_many(&asked, LONG).await;
    check!(
        "renew_many",
        renewed.len() == MANY && renewed.iter().all(|answer| matches!(answer, Ok(true))),
        "renew_many of {MANY} held leases did not renew each: {} answers, {} renewed",
        renewed.len(),
        renewed
            .iter()
            .filter(|answer| matches!(answer, Ok(true)))
            .count()
    );
}
