//! The soak test's checker: what the handler ran and what the clients got,
//! held against the promise and against the layer's counters.

use std::collections::HashMap;

use bytes::Bytes;
use http::StatusCode;
use tower_idempotency::StatsSnapshot;

use super::traffic::{ClientLog, Outcome, Run};

/// Everything observed in one soak run.
pub(crate) struct Observed {
    pub(crate) runs: Vec<Run>,
    pub(crate) logs: Vec<ClientLog>,
    /// The counters of every engine, added up.
    pub(crate) totals: Totals,
    /// Records the store dropped by itself (`evicted` + `expired`): each one
    /// lets its key run once more.
    pub(crate) dropped_records: u64,
    /// Whether the store may fail (a Redis paused mid-run).
    pub(crate) store_can_fail: bool,
    /// The body of every record the store held at the end.
    pub(crate) stored: Vec<Bytes>,
}

/// Counters of several engines, added up.
#[derive(Debug, Default)]
pub(crate) struct Totals {
    pub(crate) requests: u64,
    pub(crate) executed: u64,
    pub(crate) replayed: u64,
    pub(crate) coalesced: u64,
    pub(crate) conflicts: u64,
    pub(crate) mismatches: u64,
    pub(crate) rejected_keys: u64,
    pub(crate) too_large: u64,
    pub(crate) not_stored: u64,
    pub(crate) store_errors: u64,
}

impl Totals {
    pub(crate) fn add(&mut self, stats: &StatsSnapshot) {
        self.requests += stats.requests;
        self.executed += stats.executed;
        self.replayed += stats.replayed;
        self.coalesced += stats.coalesced;
        self.conflicts += stats.conflicts;
        self.mismatches += stats.mismatches;
        self.rejected_keys += stats.rejected_keys;
        self.too_large += stats.too_large;
        self.not_stored += stats.not_stored;
        self.store_errors += stats.store_errors;
    }
}

/// Every broken promise in `observed`, in words.
pub(crate) fn check(observed: &Observed) -> Vec<String> {
    let mut failures = Vec::new();
    let stored_runs = check_runs(observed, &mut failures);
    check_answers(observed, &stored_runs, &mut failures);
    check_store(observed, &stored_runs, &mut failures);
    check_counters(observed, &mut failures);
    failures
}

type ScopedKey = (String, String);

/// Per key, the runs whose answer the layer stores: at most one, unless the
/// store dropped records. Answers them by key and run number.
fn check_runs(
    observed: &Observed,
    failures: &mut Vec<String>,
) -> HashMap<ScopedKey, Vec<(usize, Bytes)>> {
    let mut stored: HashMap<ScopedKey, Vec<(usize, Bytes)>> = HashMap::new();
    for (index, run) in observed.runs.iter().enumerate() {
        let number = index + 1;
        match &run.outcome {
            Outcome::Running => failures.push(format!("run {number} never finished")),
            Outcome::Storable(body) => stored
                .entry((run.scope.clone(), run.key.clone()))
                .or_default()
                .push((number, body.clone())),
            Outcome::NotStored | Outcome::Panicked => {}
        }
    }
    let reruns: usize = stored.values().map(|runs| runs.len() - 1).sum();
    if reruns as u64 > observed.dropped_records {
        let mut twice: Vec<_> = stored
            .iter()
            .filter(|(_, runs)| runs.len() > 1)
            .map(|((scope, key), runs)| {
                format!(
                    "{scope} {key}: runs {:?}",
                    runs.iter().map(|r| r.0).collect::<Vec<_>>()
                )
            })
            .collect();
        twice.sort();
        failures.push(format!(
            "{reruns} stored results ran again, but the store dropped only {} records: {twice:#?}",
            observed.dropped_records
        ));
    }
    stored
}

/// Every answer belongs to its client's scope and key; every 201 is the
/// stored body of a run of that key, byte for byte, and all 201s of a key
/// that ran once are identical; only stored results are replayed.
fn check_answers(
    observed: &Observed,
    stored: &HashMap<ScopedKey, Vec<(usize, Bytes)>>,
    failures: &mut Vec<String>,
) {
    for log in &observed.logs {
        failures.extend(
            log.errors
                .iter()
                .map(|error| format!("request failed: {error}")),
        );
        for answer in &log.answers {
            let scoped = (answer.scope.to_owned(), answer.key.clone());
            let from_handler = [StatusCode::CREATED, StatusCode::OK, StatusCode::BAD_GATEWAY];
            if from_handler.contains(&answer.status) {
                let text = String::from_utf8_lossy(&answer.body);
                let mut fields = text.split('|');
                let (scope, key) = (fields.next(), fields.next());
                if (scope, key) != (Some(answer.scope), Some(answer.key.as_str())) {
                    failures.push(format!(
                        "{} {} got another client's answer: {text:?}",
                        answer.scope, answer.key
                    ));
                    continue;
                }
            }
            if answer.replayed && answer.status != StatusCode::CREATED {
                failures.push(format!("a {} was replayed: {answer:?}", answer.status));
            }
            match answer.status {
                StatusCode::CREATED => {
                    let runs = stored.get(&scoped).map(Vec::as_slice).unwrap_or_default();
                    if !runs.iter().any(|(_, body)| *body == answer.body) {
                        failures.push(format!(
                            "a 201 that no stored run of its key answered: {answer:?}"
                        ));
                    } else if runs.len() == 1 && runs[0].1 != answer.body {
                        failures.push(format!("a 201 differs from the first: {answer:?}"));
                    }
                }
                StatusCode::OK if answer.no_store => {}
                StatusCode::BAD_GATEWAY
                | StatusCode::CONFLICT
                // The handler panicked.
                | StatusCode::INTERNAL_SERVER_ERROR => {}
                StatusCode::SERVICE_UNAVAILABLE if observed.store_can_fail => {}
                _ => failures.push(format!("unexpected answer: {answer:?}")),
            }
        }
    }
}

/// Every record the store holds is the result of a run of its key; and a
/// store that drops nothing holds the result of every run that answered 201:
/// none was lost to a failed write.
fn check_store(
    observed: &Observed,
    stored_runs: &HashMap<ScopedKey, Vec<(usize, Bytes)>>,
    failures: &mut Vec<String>,
) {
    let mut held: HashMap<ScopedKey, Vec<Bytes>> = HashMap::new();
    for body in &observed.stored {
        let text = String::from_utf8_lossy(body);
        let mut fields = text.split('|');
        let (Some(scope), Some(key)) = (fields.next(), fields.next()) else {
            failures.push(format!("the store holds a foreign record: {text:?}"));
            continue;
        };
        let scoped = (scope.to_owned(), key.to_owned());
        let runs = stored_runs
            .get(&scoped)
            .map(Vec::as_slice)
            .unwrap_or_default();
        if !runs.iter().any(|(_, run)| run == body) {
            failures.push(format!(
                "the store holds a record no stored run answered: {text:?}"
            ));
        }
        held.entry(scoped).or_default().push(body.clone());
    }
    if observed.dropped_records > 0 {
        return;
    }
    let mut lost: Vec<_> = stored_runs
        .iter()
        .filter(|(scoped, _)| !held.contains_key(*scoped))
        .map(|((scope, key), runs)| {
            format!(
                "{scope} {key} (runs {:?})",
                runs.iter().map(|r| r.0).collect::<Vec<_>>()
            )
        })
        .collect();
    lost.sort();
    if !lost.is_empty() {
        failures.push(format!("results answered 201 but not stored: {lost:#?}"));
    }
}

/// The counters add up to the requests sent, and agree with what the
/// clients and the handler saw.
fn check_counters(observed: &Observed, failures: &mut Vec<String>) {
    let totals = &observed.totals;
    let sent: u64 = observed.logs.iter().map(|log| log.sent).sum();
    let answers = || observed.logs.iter().flat_map(|log| &log.answers);
    let answered = answers().count() as u64;
    let count = |status: StatusCode| answers().filter(|a| a.status == status).count() as u64;
    let unavailable = count(StatusCode::SERVICE_UNAVAILABLE);
    let conflicts = count(StatusCode::CONFLICT);
    let replays = answers().filter(|a| a.replayed).count() as u64;
    let firsts = answers()
        .filter(|a| {
            !a.replayed
                && ![StatusCode::CONFLICT, StatusCode::SERVICE_UNAVAILABLE].contains(&a.status)
        })
        .count() as u64;
    let runs = observed.runs.len() as u64;
    let not_stored = observed
        .runs
        .iter()
        .filter(|run| run.outcome == Outcome::NotStored)
        .count() as u64;
    let decided =
        totals.executed + totals.replayed + totals.coalesced + totals.conflicts + totals.mismatches;

    let mut expect = |holds: bool, what: String| {
        if !holds {
            failures.push(format!(
                "counters: {what} ({totals:?}, {sent} sent, {answered} answered)"
            ));
        }
    };
    expect(totals.requests == sent, "requests != requests sent".into());
    expect(
        answered - unavailable <= decided && decided <= sent - unavailable,
        format!("executed + replayed + coalesced + conflicts + mismatches = {decided} is not between the {} decided answers and the {} requests that got no 503", answered - unavailable, sent - unavailable),
    );
    // A lease taken for a client that went away before the handler was
    // called may be released unrun: at most one per request given up.
    let given_up: u64 = observed.logs.iter().map(|log| log.given_up).sum();
    expect(
        runs <= totals.executed && totals.executed <= runs + given_up,
        format!("executed is not between the {runs} handler runs and {given_up} more"),
    );
    expect(
        firsts <= totals.executed,
        format!("{firsts} first answers > executed"),
    );
    expect(
        replays <= totals.replayed + totals.coalesced,
        format!("{replays} replayed answers > replayed + coalesced"),
    );
    expect(
        conflicts <= totals.conflicts,
        format!("{conflicts} 409s > conflicts"),
    );
    expect(
        not_stored <= totals.not_stored && totals.not_stored <= not_stored + totals.store_errors,
        format!("not_stored is not the {not_stored} runs answered 502 or no-store"),
    );
    expect(
        totals.mismatches + totals.rejected_keys + totals.too_large == 0,
        "mismatches, rejected keys or bodies too large".into(),
    );
    expect(
        unavailable <= totals.store_errors,
        format!("{unavailable} 503s > store_errors"),
    );
    if !observed.store_can_fail {
        expect(
            totals.store_errors == 0,
            "store errors from a store that cannot fail".into(),
        );
    }
}
