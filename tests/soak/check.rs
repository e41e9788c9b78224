//! The soak test's checker: what the handler ran, what the clients got and
//! what the store holds at the end, held against the promise key by key,
//! and against the layer's counters.
//!
//! Every key is judged on its own: each of its runs must be allowed by what
//! happened to that key, each answer its clients got must come from a run
//! of that key, and the store must end holding what its last run left.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use http::StatusCode;
use tokio::time::Instant;
use tower_idempotency::{StatsSnapshot, StoredResponse};

use super::traffic::{Answer, Body, ClientLog, Outcome, Run};

/// A client's scope (`Authorization`) and its key.
pub(crate) type ScopedKey = (String, String);

/// Everything observed in one soak run.
pub(crate) struct Observed {
    /// When the traffic began; times in messages are counted from it.
    pub(crate) start: Instant,
    pub(crate) runs: Vec<Run>,
    pub(crate) logs: Vec<ClientLog>,
    /// The counters of every engine, added up.
    pub(crate) totals: Totals,
    /// Records the store dropped by itself (`evicted` + `expired`).
    pub(crate) dropped_records: u64,
    /// Whether the store drops records by itself (the memory store at its
    /// entry bound), which no key can see.
    pub(crate) store_can_evict: bool,
    /// Whether the store may fail (a Redis paused mid-run).
    pub(crate) store_can_fail: bool,
    /// The engines' lease TTL: an abandoned marker lives that long at least.
    pub(crate) lease_ttl: Duration,
    /// Per key, when the store wrote a record for it.
    pub(crate) writes: HashMap<ScopedKey, Vec<Instant>>,
    /// Per key, what the store held at the end.
    pub(crate) held: HashMap<ScopedKey, Held>,
    /// When `held` was read.
    pub(crate) held_at: Instant,
    /// Entries in the store under no key of the soak's.
    pub(crate) foreign: Vec<String>,
}

/// What the store held under a key at the end.
#[derive(Debug)]
pub(crate) enum Held {
    /// An in-flight marker.
    Marker,
    /// A completed record.
    Record(StoredResponse),
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
    pub(crate) omitted: u64,
    pub(crate) ambiguous: u64,
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
        self.omitted += stats.omitted;
        self.ambiguous += stats.ambiguous;
        self.store_errors += stats.store_errors;
    }
}

/// What one key went through.
#[derive(Default)]
struct Trace<'a> {
    /// Its runs, in the order they began.
    runs: Vec<&'a Run>,
    answers: Vec<&'a Answer>,
}

/// Every broken promise in `observed`, in words; each names its key.
pub(crate) fn check(observed: &Observed) -> Vec<String> {
    let mut failures: Vec<String> = observed
        .logs
        .iter()
        .flat_map(|log| &log.errors)
        .map(|error| format!("request failed: {error}"))
        .collect();
    failures.extend(
        observed
            .foreign
            .iter()
            .map(|key| format!("the store holds {key:?}, no key of the soak's")),
    );
    let mut traces: BTreeMap<ScopedKey, Trace> = BTreeMap::new();
    for run in &observed.runs {
        let scoped = (run.scope.clone(), run.key.clone());
        traces.entry(scoped).or_default().runs.push(run);
    }
    for answer in observed.logs.iter().flat_map(|log| &log.answers) {
        let scoped = (answer.scope.to_owned(), answer.key.clone());
        traces.entry(scoped).or_default().answers.push(answer);
    }
    for scoped in observed.held.keys() {
        traces.entry(scoped.clone()).or_default();
    }
    let mut evicted_reruns = Vec::new();
    for (scoped, trace) in &mut traces {
        trace.runs.sort_by_key(|run| run.started);
        let mut judge = Judge {
            observed,
            name: format!("{} {}", scoped.0, scoped.1),
            failures: &mut failures,
        };
        evicted_reruns.extend(judge.runs(scoped, &trace.runs));
        judge.answers(&trace.runs, &trace.answers);
        judge.store(observed.held.get(scoped), trace.runs.last().copied());
    }
    // Evictions are counted in total only: the reruns each key put down to
    // one cannot outnumber them.
    if evicted_reruns.len() as u64 > observed.dropped_records {
        failures.push(format!(
            "{} keys ran again after an eviction, but the store dropped only {} records: {evicted_reruns:#?}",
            evicted_reruns.len(),
            observed.dropped_records
        ));
    }
    check_counters(observed, &mut failures);
    failures
}

/// Judges one key.
struct Judge<'a> {
    observed: &'a Observed,
    /// The key, as failures name it.
    name: String,
    failures: &'a mut Vec<String>,
}

impl Judge<'_> {
    fn fail(&mut self, what: String) {
        self.failures.push(format!("{}: {what}", self.name));
    }

    /// Milliseconds since the traffic began.
    fn at(&self, instant: Instant) -> u128 {
        instant
            .saturating_duration_since(self.observed.start)
            .as_millis()
    }

    /// Every run finished, no two overlap, and each run after the first is
    /// allowed by how the one before it ended: a release (502, `no-store`,
    /// panic), its abandoned marker running out, or (memory store) its
    /// record written and then evicted. Answers the reruns put down to an
    /// eviction.
    fn runs(&mut self, scoped: &ScopedKey, runs: &[&Run]) -> Vec<String> {
        let mut evicted = Vec::new();
        for run in runs {
            if run.outcome == Outcome::Running || run.ended.is_none() {
                self.fail(format!("run {} never finished", run.id));
            }
        }
        for pair in runs.windows(2) {
            let (before, next) = (pair[0], pair[1]);
            let (b, n) = (before.id, next.id);
            // The layer frees a key no earlier than its handler's answer,
            // and writes a record no earlier than the end of its body.
            let freed = match before.outcome {
                Outcome::Stored(_) | Outcome::Omitted(_) => before.ended,
                _ => before.answered,
            };
            if freed.is_none_or(|freed| next.started < freed) {
                self.fail(format!(
                    "runs {b} and {n} overlap: run {n} began at {} ms, before run {b} ({}) let go of the key",
                    self.at(next.started),
                    describe(&before.outcome)
                ));
                continue;
            }
            match &before.outcome {
                Outcome::NotStored(..) | Outcome::Panicked | Outcome::Running => {}
                Outcome::CutOff => {
                    // The marker expires no earlier than a lease TTL after
                    // its begin, which came after the request was sent.
                    let expired = before.sent + self.observed.lease_ttl;
                    if next.started < expired {
                        self.fail(format!(
                            "run {n} ran at {} ms while run {b}'s abandoned marker lived (its body was cut off after the head; the marker lives until {} ms at least)",
                            self.at(next.started),
                            self.at(expired)
                        ));
                    }
                }
                Outcome::Stored(_) | Outcome::Omitted(_) => {
                    let what = describe(&before.outcome);
                    if !self.observed.store_can_evict {
                        self.fail(format!(
                            "run {n} ran again after run {b} ({what}), and the store drops no records"
                        ));
                        continue;
                    }
                    // The memory store evicts in silence: a rerun is put
                    // down to an eviction only when the store did write
                    // the record before.
                    let written = self.observed.writes.get(scoped).is_some_and(|writes| {
                        writes
                            .iter()
                            .any(|&at| before.started < at && at < next.started)
                    });
                    if written {
                        evicted.push(format!("{} after run {b}: run {n}", self.name));
                    } else {
                        self.fail(format!(
                            "run {n} ran again after run {b} ({what}), whose record the store never wrote"
                        ));
                    }
                }
            }
        }
        evicted
    }

    /// Every answer with a run's header comes from a run of this key and
    /// matches it: a first answer is that run's own (one per run), a replay
    /// is a stored run's record (a head-only record replayed as one) read
    /// before any later run of the key began. The layer's own answers are
    /// 409, 503 (a store that can fail) and 500 (after a panicked run).
    fn answers(&mut self, runs: &[&Run], answers: &[&Answer]) {
        let mut firsts: HashMap<usize, usize> = HashMap::new();
        for answer in answers {
            let Some(id) = answer.run else {
                self.own_answer(runs, answer);
                continue;
            };
            let Some(run) = runs.iter().find(|run| run.id == id) else {
                let other = self
                    .observed
                    .runs
                    .iter()
                    .find(|run| run.id == id)
                    .map_or_else(
                        || "no run at all".to_owned(),
                        |run| format!("a run of {} {}", run.scope, run.key),
                    );
                self.fail(format!(
                    "got run {id}'s answer, which was {other}: {answer:?}"
                ));
                continue;
            };
            if answer.replayed {
                self.replay(runs, run, answer);
            } else {
                *firsts.entry(id).or_default() += 1;
                self.first(run, answer);
            }
        }
        for (id, count) in firsts {
            if count > 1 {
                self.fail(format!("run {id}'s own answer reached {count} clients"));
            }
        }
    }

    /// The answer the layer made itself (no run's header).
    fn own_answer(&mut self, runs: &[&Run], answer: &Answer) {
        let panicked = || {
            runs.iter()
                .any(|run| run.outcome == Outcome::Panicked && run.started < answer.received)
        };
        let expected = match answer.status {
            StatusCode::CONFLICT => true,
            StatusCode::SERVICE_UNAVAILABLE => self.observed.store_can_fail,
            StatusCode::INTERNAL_SERVER_ERROR => panicked(),
            _ => false,
        };
        if !expected || answer.replayed || matches!(answer.body, Body::Failed(_)) {
            self.fail(format!("an answer no run of the key explains: {answer:?}"));
        }
    }

    /// The first answer of `run`, to the client whose request ran it.
    fn first(&mut self, run: &Run, answer: &Answer) {
        let (status, body) = match &run.outcome {
            Outcome::Stored(body) | Outcome::Omitted(body) => (StatusCode::CREATED, Some(body)),
            Outcome::NotStored(status, body) => (*status, Some(body)),
            Outcome::CutOff => (StatusCode::CREATED, None),
            Outcome::Panicked | Outcome::Running => {
                let what = describe(&run.outcome);
                self.fail(format!("run {} ({what}) answered: {answer:?}", run.id));
                return;
            }
        };
        let body_as_run = match (&answer.body, body) {
            (Body::Unread, _) => true,
            (Body::Read(read), Some(body)) => read == body,
            // A cut-off body fails; no other does.
            (Body::Failed(_), None) => true,
            (Body::Failed(error), Some(_)) => {
                let (id, what) = (run.id, describe(&run.outcome));
                self.fail(format!("the body of run {id} ({what}) failed: {error}"));
                return;
            }
            (Body::Read(_), None) => false,
        };
        let no_store = status == StatusCode::OK;
        if answer.status != status || answer.omitted || answer.no_store != no_store || !body_as_run
        {
            let what = describe(&run.outcome);
            self.fail(format!(
                "the first answer of run {} ({what}) is not what it answered: {answer:?}",
                run.id
            ));
        }
    }

    /// A replayed (or coalesced) answer of `run`.
    fn replay(&mut self, runs: &[&Run], run: &Run, answer: &Answer) {
        let as_recorded = match (&run.outcome, &answer.body) {
            (Outcome::Stored(_), Body::Unread) => !answer.omitted,
            (Outcome::Stored(body), Body::Read(read)) => !answer.omitted && read == body,
            (Outcome::Omitted(_), Body::Unread) => answer.omitted,
            (Outcome::Omitted(_), Body::Read(read)) => answer.omitted && read.is_empty(),
            _ => false,
        };
        if answer.status != StatusCode::CREATED || !as_recorded {
            let what = describe(&run.outcome);
            self.fail(format!(
                "a replay of run {} ({what}) is not its record: {answer:?}",
                run.id
            ));
        }
        // A later run began only once this record was gone.
        if let Some(later) = runs
            .iter()
            .find(|later| later.started > run.started && later.started < answer.sent)
        {
            self.fail(format!(
                "replayed run {} to a request sent at {} ms, after run {} began at {} ms (the record was gone by then): {answer:?}",
                run.id,
                self.at(answer.sent),
                later.id,
                self.at(later.started)
            ));
        }
    }

    /// The store ends holding what the key's last run left: its record (or,
    /// on a store that evicts, nothing), a marker for a run cut off (until
    /// the marker can have expired), and nothing after a release.
    fn store(&mut self, held: Option<&Held>, last: Option<&Run>) {
        let Some(last) = last else {
            if let Some(held) = held {
                self.fail(format!("the store holds {held:?}, but the key never ran"));
            }
            return;
        };
        let what = describe(&last.outcome);
        let id = last.id;
        match (held, &last.outcome) {
            (Some(Held::Record(record)), Outcome::Stored(body)) => {
                if !is_record_of(record, id) || record.is_body_omitted() || record.body() != body {
                    self.fail(format!(
                        "the store holds {record:?}, not the record of run {id}, the last ({what})"
                    ));
                }
            }
            (Some(Held::Record(record)), Outcome::Omitted(_)) => {
                if !is_record_of(record, id) || !record.is_body_omitted() {
                    self.fail(format!(
                        "the store holds {record:?}, not the head of run {id}, the last ({what})"
                    ));
                }
            }
            (Some(Held::Marker), Outcome::CutOff) => {}
            (None, Outcome::Stored(_) | Outcome::Omitted(_)) if !self.observed.store_can_evict => {
                self.fail(format!(
                    "the store lost the record of run {id}, the last ({what})"
                ));
            }
            (None, Outcome::CutOff)
                if self.observed.held_at < last.sent + self.observed.lease_ttl =>
            {
                self.fail(format!(
                    "run {id}'s abandoned marker is gone at {} ms, before its lease TTL (its body was cut off after the head)",
                    self.at(self.observed.held_at)
                ));
            }
            (None, _) => {}
            (Some(held), _) => self.fail(format!(
                "the store holds {held:?} after run {id}, the last ({what})"
            )),
        }
    }
}

/// Whether `record` is the answer of run `id` (its `x-soak-run` header).
fn is_record_of(record: &StoredResponse, id: usize) -> bool {
    record.status() == StatusCode::CREATED
        && record
            .headers()
            .get("x-soak-run")
            .is_some_and(|run| run.to_str().ok() == Some(id.to_string().as_str()))
}

/// A run's outcome, for a failure message.
fn describe(outcome: &Outcome) -> &'static str {
    match outcome {
        Outcome::Running => "still running",
        Outcome::Stored(_) => "a stored 201",
        Outcome::Omitted(_) => "an oversized 201, recorded head only",
        Outcome::NotStored(..) => "a 502 or no-store answer, released",
        Outcome::Panicked => "a panic, released",
        Outcome::CutOff => "a body cut off after its head, lease abandoned",
    }
}

/// The counters add up to the requests sent, and agree with what the
/// clients and the handler saw. (The counters exist in total only.)
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
    let outcomes = |is: fn(&Outcome) -> bool| {
        observed.runs.iter().filter(|run| is(&run.outcome)).count() as u64
    };
    let not_stored = outcomes(|outcome| matches!(outcome, Outcome::NotStored(..)));
    let omitted = outcomes(|outcome| matches!(outcome, Outcome::Omitted(_)));
    let cut_off = outcomes(|outcome| *outcome == Outcome::CutOff);
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
    // Counted once the head is stored: a store that fails may lose one.
    expect(
        totals.omitted <= omitted && (observed.store_can_fail || totals.omitted == omitted),
        format!("omitted is not the {omitted} runs answered over max_response_body"),
    );
    expect(
        totals.ambiguous == cut_off,
        format!("ambiguous is not the {cut_off} runs whose body was cut off"),
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
