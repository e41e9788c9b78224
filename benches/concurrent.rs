//! This crate's layer and `axum-idempotent` as a server sees them: 16 client
//! tasks on a 2-worker Tokio runtime, each sending one request after the
//! other through the same router (`oneshot`, in process), with throughput
//! and per-request latency (p50, p99); and, beside it, one client on a
//! current-thread runtime (the sequential run), so the two can be compared
//! in one run.
//!
//! Paths, at 0 B, 1 KiB and 64 KiB request bodies:
//!
//! * `bare`: the axum handler alone;
//! * `passthrough`: this crate's layer, a POST without a key;
//! * `first request`: a new key per request (the handler runs, the response
//!   is stored), for this crate and for the peer;
//! * `replay`: each client repeats its own key, answered from the store,
//!   for this crate and for the peer;
//! * `a no-op layer`: an identity layer on the same `Router`, what axum
//!   charges any layer;
//! * `first request, a bound never reached`: this crate's first request on
//!   a memory store whose bound the run never reaches, so that nothing is
//!   evicted: the footing the peer's session store is on in these runs
//!   (it holds 10,000 sessions of 100 keys). The targets are judged on the
//!   default bound, which every measured first request reaches.
//!
//! The routers and the peer's setup (header mode, inside a `ruts` session
//! layer inside a cookie manager, a client logging in once and every 100
//! keys on the miss path) are those of `peer.rs`. Only the requests to
//! `/orders` are counted: throughput is every client's requests over the
//! round's wall time, which on the peer's first-request path includes a
//! login every 100 keys (about 1 % of its requests). Each figure
//! is the median of 3 rounds of `ROUND_MS` milliseconds (default 400), after
//! a warm-up of a quarter round.
//!
//! ```sh
//! cargo bench --bench concurrent            # about a minute
//! ROUND_MS=1000 cargo bench --bench concurrent
//! ```
//!
//! It prints markdown tables, then what the parts of a first request and a
//! replay that the memory store's setup fixes (moka at the bound as
//! `src/store/memory/` sets it up, SHA-256 of the body, a store read)
//! cost alone (`support/floor.rs`), then the performance targets, met or
//! missed (`BENCHMARKS.md`). Beside
//! throughput it gives the process's CPU time per request (all threads, from
//! `/proc/self/stat`, 10 ms ticks): on a machine shared with other work,
//! throughput follows what the others leave over, CPU time much less so.

#[path = "support/floor.rs"]
mod floor;
#[path = "support/routers.rs"]
mod routers;

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::HeaderValue;
use axum::Router;
use tokio::runtime::Runtime;
use tokio::sync::Barrier;

use routers::{
    bare_router, noop_layer_router, order, ours_router, ours_router_bounded, peer_router, send,
    Client, SIZES, UNREACHED_BOUND,
};

/// Client tasks in the concurrent run.
const CLIENTS: usize = 16;
/// Worker threads of the concurrent run's runtime.
const WORKERS: usize = 2;
const ROUNDS: usize = 3;

/// What a client sends.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Path {
    /// No key (on the bare router: no layer at all).
    NoKey,
    /// A new key per request.
    First,
    /// The client's own key, used once before the run.
    Replay,
}

/// One measured configuration.
#[derive(Clone, Copy)]
struct Case {
    name: &'static str,
    router: usize,
    logs_in: bool,
    path: Path,
    /// The index in `CASES` of the peer's case this one is set against in
    /// the tables' "vs peer" columns.
    peer: Option<usize>,
}

const BARE: usize = 0;
const OURS: usize = 1;
const PEER: usize = 2;
const NOOP: usize = 3;
/// This crate's layer with a bound the run never reaches.
const OURS_UNBOUNDED: usize = 4;

const CASES: [Case; 8] = [
    Case {
        name: "bare",
        router: BARE,
        logs_in: false,
        path: Path::NoKey,
        peer: None,
    },
    Case {
        name: "passthrough (no key)",
        router: OURS,
        logs_in: false,
        path: Path::NoKey,
        peer: None,
    },
    Case {
        name: "first request",
        router: OURS,
        logs_in: false,
        path: Path::First,
        peer: Some(3),
    },
    Case {
        name: "axum-idempotent first request",
        router: PEER,
        logs_in: true,
        path: Path::First,
        peer: None,
    },
    Case {
        name: "replay",
        router: OURS,
        logs_in: false,
        path: Path::Replay,
        peer: Some(5),
    },
    Case {
        name: "axum-idempotent replay",
        router: PEER,
        logs_in: true,
        path: Path::Replay,
        peer: None,
    },
    Case {
        name: "a no-op layer (no key)",
        router: NOOP,
        logs_in: false,
        path: Path::NoKey,
        peer: None,
    },
    // The peer's store never evicts in these runs; this is this crate's
    // first request on the same footing. The verdicts use the default bound.
    Case {
        name: "first request, a bound never reached",
        router: OURS_UNBOUNDED,
        logs_in: false,
        path: Path::First,
        peer: Some(3),
    },
];

/// One round's figures.
#[derive(Clone, Copy, Default)]
struct Figures {
    ops_per_sec: f64,
    p50_us: f64,
    p99_us: f64,
    /// The process's CPU time (every thread) per request: on a machine
    /// shared with other work, steadier than throughput.
    cpu_us: f64,
}

/// CPU time this process has used (user and system, every thread), from
/// `/proc/self/stat`, in 10 ms ticks; `None` where there is no such file.
fn cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The fields after the command name, which is in parentheses.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

/// A client: once every client is ready, sends requests of `case` until
/// `stop`, and answers how long each took.
async fn client(
    router: Router,
    case: Case,
    body: Bytes,
    id: String,
    ready: Arc<Barrier>,
    stop: Arc<AtomicBool>,
) -> Vec<u64> {
    let mut client = Client::new(&router, case.logs_in).await;
    let no_cookie = HeaderValue::from_static("session=none");
    let replay_key = format!("replay-{id}");
    if case.path == Path::Replay {
        assert!(!send(&router, order(&body, &replay_key, &client.cookie)).await);
    }
    let mut latencies_ns = Vec::with_capacity(1 << 16);
    let mut n = 0u64;
    ready.wait().await;
    while !stop.load(Relaxed) {
        let request = match case.path {
            Path::NoKey => {
                let mut request = order(&body, "", &no_cookie);
                request.headers_mut().remove("idempotency-key");
                request
            }
            Path::First => order(&body, &format!("first-{id}-{n}"), &client.cookie),
            Path::Replay => order(&body, &replay_key, &client.cookie),
        };
        let start = Instant::now();
        let replayed = send(&router, request).await;
        latencies_ns.push(start.elapsed().as_nanos() as u64);
        assert_eq!(
            replayed,
            case.path == Path::Replay,
            "{}: a replay if and only if the key was used before",
            case.name
        );
        n += 1;
        if case.path == Path::First {
            client.next_key().await;
        }
        // A request that never waits never yields: let the other clients,
        // and the timer that ends the round, have the worker (as a server's
        // connection task does between requests).
        tokio::task::yield_now().await;
    }
    latencies_ns
}

/// Runs `clients` clients of `case` on `rt` for `length` (once they are
/// all ready: logged in, their replay key stored), and answers the round's
/// figures.
fn round(
    rt: &Runtime,
    router: &Router,
    case: Case,
    body: &Bytes,
    clients: usize,
    length: Duration,
    tag: &str,
) -> Figures {
    let stop = Arc::new(AtomicBool::new(false));
    let ready = Arc::new(Barrier::new(clients + 1));
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            rt.spawn(client(
                router.clone(),
                case,
                body.clone(),
                format!("{tag}-{c}"),
                ready.clone(),
                stop.clone(),
            ))
        })
        .collect();
    let (latencies, elapsed, cpu) = rt.block_on(async {
        ready.wait().await;
        let start = Instant::now();
        let cpu_start = cpu_time();
        tokio::time::sleep(length).await;
        stop.store(true, Relaxed);
        let mut latencies = Vec::new();
        for task in tasks {
            latencies.extend(task.await.expect("client task"));
        }
        let cpu = cpu_time()
            .zip(cpu_start)
            .map(|(end, start)| end.saturating_sub(start));
        (latencies, start.elapsed(), cpu)
    });
    let mut all = latencies;
    all.sort_unstable();
    let at = |q: f64| all[((all.len() - 1) as f64 * q) as usize] as f64 / 1_000.0;
    Figures {
        ops_per_sec: all.len() as f64 / elapsed.as_secs_f64(),
        p50_us: at(0.50),
        p99_us: at(0.99),
        cpu_us: cpu.map_or(f64::NAN, |cpu| cpu.as_secs_f64() * 1e6 / all.len() as f64),
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Median figures of `ROUNDS` rounds of every case at every size.
fn run(rt: &Runtime, clients: usize, round_len: Duration) -> Vec<(usize, Vec<Figures>)> {
    let mut tag = 0u64;
    let mut results = Vec::new();
    for (size_index, (_, size)) in SIZES.iter().enumerate() {
        let body = Bytes::from(vec![b'x'; *size]);
        let mut per_case = Vec::new();
        for case in CASES {
            // A router of its own per case: a replay run never meets a store
            // that a first-request run filled to its bound.
            let router = router_of(rt, case);
            let mut next_tag = || {
                tag += 1;
                format!("{clients}-{tag}")
            };
            round(
                rt,
                &router,
                case,
                &body,
                clients,
                round_len / 4,
                &next_tag(),
            );
            let rounds: Vec<Figures> = (0..ROUNDS)
                .map(|_| round(rt, &router, case, &body, clients, round_len, &next_tag()))
                .collect();
            eprintln!(
                "{clients} client(s), {}, {}: {:.0} ops/s",
                SIZES[size_index].0,
                case.name,
                median(rounds.iter().map(|f| f.ops_per_sec).collect())
            );
            per_case.push(Figures {
                ops_per_sec: median(rounds.iter().map(|f| f.ops_per_sec).collect()),
                p50_us: median(rounds.iter().map(|f| f.p50_us).collect()),
                p99_us: median(rounds.iter().map(|f| f.p99_us).collect()),
                cpu_us: median(rounds.iter().map(|f| f.cpu_us).collect()),
            });
        }
        results.push((size_index, per_case));
    }
    results
}

fn human_ops(ops: f64) -> String {
    if ops >= 1e6 {
        format!("{:.2} M", ops / 1e6)
    } else {
        format!("{:.0} k", ops / 1e3)
    }
}

fn print_table(title: &str, results: &[(usize, Vec<Figures>)]) {
    println!("### {title}");
    println!();
    println!(
        "| body | path | ops/s | p50 µs | p99 µs | CPU µs/request | ops/s vs bare | ops/s vs peer | CPU µs vs peer |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|");
    for (size_index, figures) in results {
        let label = SIZES[*size_index].0;
        let bare = figures[0].ops_per_sec;
        for (case, f) in CASES.iter().zip(figures) {
            let (peer, cpu_peer) = match case.peer {
                Some(peer) => {
                    let peer = &figures[peer];
                    (
                        format!("{:.2}x", f.ops_per_sec / peer.ops_per_sec),
                        format!("{:.2}x", f.cpu_us / peer.cpu_us),
                    )
                }
                None => (String::new(), String::new()),
            };
            println!(
                "| {label} | {} | {} | {:.2} | {:.1} | {:.2} | {:.2}x | {peer} | {cpu_peer} |",
                case.name,
                human_ops(f.ops_per_sec),
                f.p50_us,
                f.p99_us,
                f.cpu_us,
                f.ops_per_sec / bare,
            );
        }
    }
    println!();
}

/// The performance targets (the crate's issue 26), on the concurrent run:
/// every figure a ratio of two cases of the same run. `floor_cpu` is the
/// replay floor's CPU µs on the run's worker count (bare + SHA-256 + one
/// store read), when the floor was measured.
fn print_targets(results: &[(usize, Vec<Figures>)], replay_floor_cpu: Option<f64>) {
    let at = |label: &str| {
        results
            .iter()
            .find(|(i, _)| SIZES[*i].0 == label)
            .map(|(_, f)| f)
    };
    let (Some(f), Some(zero)) = (at("1KiB"), at("0B")) else {
        return;
    };
    let verdict = |met: bool| if met { "met" } else { "missed" };
    let ops = |f: &[Figures], a: usize, b: usize| f[a].ops_per_sec / f[b].ops_per_sec;
    // CPU time per request, inverted so that above 1 is better as for
    // throughput: steadier than throughput where other work shares the
    // machine.
    let cpu = |f: &[Figures], a: usize, b: usize| f[b].cpu_us / f[a].cpu_us;
    let first = ops(f, 2, 3);
    let first_p99 = f[2].p99_us / f[3].p99_us;
    let bound = ops(f, 2, 7);
    let replay = ops(f, 4, 5);
    let replay_zero = ops(zero, 4, 5);
    let no_key_noop = ops(f, 1, 6);
    let no_key = ops(f, 1, 0);
    println!("### Targets (concurrent run; 1 KiB unless said)");
    println!();
    println!("| target | figure | verdict | from CPU time per request |");
    println!("|---|---:|---|---:|");
    println!(
        "| first request >= 1.0x the peer's throughput | {first:.2}x | {} | {:.2}x |",
        verdict(first >= 1.0),
        cpu(f, 2, 3)
    );
    println!(
        "| first request p99 <= 1.0x the peer's | {first_p99:.2}x | {} | |",
        verdict(first_p99 <= 1.0)
    );
    println!(
        "| first request, default bound >= 0.9x a bound never reached | {bound:.2}x | {} | {:.2}x |",
        verdict(bound >= 0.9),
        cpu(f, 2, 7)
    );
    println!(
        "| (for reference) first request, a bound never reached, against the peer: throughput; p99 | {:.2}x; {:.2}x | | {:.2}x |",
        ops(f, 7, 3),
        f[7].p99_us / f[3].p99_us,
        cpu(f, 7, 3)
    );
    println!(
        "| replay >= 1.5x the peer's | {replay:.2}x | {} | {:.2}x |",
        verdict(replay >= 1.5),
        cpu(f, 4, 5)
    );
    println!(
        "| replay at 0 B >= 2x the peer's | {replay_zero:.2}x | {} | {:.2}x |",
        verdict(replay_zero >= 2.0),
        cpu(zero, 4, 5)
    );
    if let Some(floor) = replay_floor_cpu {
        let against = floor / f[4].cpu_us;
        println!(
            "| replay >= 0.7x its floor (bare + SHA-256 + one store read), from CPU time | {against:.2}x | {} | {against:.2}x |",
            verdict(against >= 0.7)
        );
    }
    println!(
        "| POST without a key >= 0.97x a no-op layer | {no_key_noop:.2}x | {} | {:.2}x |",
        verdict(no_key_noop >= 0.97),
        cpu(f, 1, 6)
    );
    println!(
        "| POST without a key >= 0.9x bare | {no_key:.2}x | {} | {:.2}x |",
        verdict(no_key >= 0.9),
        cpu(f, 1, 0)
    );
    println!();
}

/// The runtime of the concurrent run: `WORKERS` worker threads.
fn concurrent_runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(WORKERS)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// A router of its own for `case`, made on `rt`.
fn router_of(rt: &Runtime, case: Case) -> Router {
    rt.block_on(async {
        match case.router {
            BARE => bare_router(),
            OURS => ours_router(),
            OURS_UNBOUNDED => ours_router_bounded(Some(UNREACHED_BOUND)),
            NOOP => noop_layer_router(),
            _ => peer_router(false),
        }
    })
}

/// `PROFILE=<case name>`: runs only that case, concurrently, at 1 KiB, for
/// `ROUND_MS` (so `perf record` sees one path), and prints its figures.
/// A part of `support/floor.rs` can be named too.
fn profile(case_name: &str, round_len: Duration) {
    if let Some(part) = floor::Part::ALL.into_iter().find(|p| p.name() == case_name) {
        let (ops, cpu) = floor::measure(part, WORKERS, round_len, cpu_time);
        println!("{case_name}: {ops:.0} ops/s, {cpu:.2} CPU us/operation");
        return;
    }
    let Some(case) = CASES.into_iter().find(|case| case.name == case_name) else {
        eprintln!("no case named {case_name:?}");
        return;
    };
    let rt = concurrent_runtime();
    let router = router_of(&rt, case);
    let body = Bytes::from(vec![b'x'; 1024]);
    let figures = round(&rt, &router, case, &body, CLIENTS, round_len, "profile");
    println!(
        "{case_name}: {:.0} ops/s, p50 {:.2} us, p99 {:.1} us, {:.2} CPU us/request",
        figures.ops_per_sec, figures.p50_us, figures.p99_us, figures.cpu_us
    );
}

fn main() {
    let round_len = Duration::from_millis(
        std::env::var("ROUND_MS")
            .ok()
            .and_then(|ms| ms.parse().ok())
            .unwrap_or(400),
    );
    if let Ok(case_name) = std::env::var("PROFILE") {
        profile(&case_name, round_len);
        return;
    }
    let concurrent = concurrent_runtime();
    let results = run(&concurrent, CLIENTS, round_len);
    drop(concurrent);
    let sequential = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let sequential_results = run(&sequential, 1, round_len);
    println!(
        "Medians of {ROUNDS} rounds of {} ms; {CLIENTS} clients on {WORKERS} workers, then 1 client on a current-thread runtime.",
        round_len.as_millis()
    );
    println!();
    print_table(
        &format!("Concurrent: {CLIENTS} client tasks, {WORKERS}-worker runtime"),
        &results,
    );
    print_table(
        "Sequential: 1 client, current-thread runtime",
        &sequential_results,
    );
    let replay_floor = print_floor(&results, round_len);
    print_targets(&results, replay_floor);
}

/// The parts of a first request and of a replay that the memory store's
/// setup fixes, each measured alone on `WORKERS` threads (contended as in
/// the run) and on one (uncontended), against the requests of the same
/// run; answers the replay floor's CPU µs on `WORKERS` threads.
fn print_floor(results: &[(usize, Vec<Figures>)], round_len: Duration) -> Option<f64> {
    let (_, f) = results.iter().find(|(i, _)| SIZES[*i].0 == "1KiB")?;
    println!("### What the parts of a first request cost alone (1 KiB)");
    println!();
    println!(
        "| part | ops/s, {WORKERS} threads | CPU µs per operation, {WORKERS} threads | CPU µs per operation, 1 thread |"
    );
    println!("|---|---:|---:|---:|");
    // Per part: CPU µs per operation on `WORKERS` threads, then on one.
    let mut cpu = Vec::new();
    for part in floor::Part::ALL {
        let medians = |threads| {
            let rounds: Vec<(f64, f64)> = (0..ROUNDS)
                .map(|_| floor::measure(part, threads, round_len, cpu_time))
                .collect();
            (
                median(rounds.iter().map(|r| r.0).collect()),
                median(rounds.iter().map(|r| r.1).collect()),
            )
        };
        let (ops, contended) = medians(WORKERS);
        let (_, alone) = medians(1);
        println!(
            "| {} | {} | {contended:.2} | {alone:.2} |",
            part.name(),
            human_ops(ops)
        );
        cpu.push([contended, alone]);
    }
    let [lru, lru_expiry, store_setup, sha256, get] = cpu[..] else {
        return None;
    };
    let (bare, first, peer) = (f[0].cpu_us, f[2].cpu_us, f[3].cpu_us);
    // The first-request target: the peer's CPU time per request.
    let target = peer;
    let row = |name: &str, moka: [f64; 2]| {
        let floor = |i: usize| bare + moka[i] + sha256[i];
        println!(
            "| {name} | {:.2} ({:.2}x) | {:.2} ({:.2}x) |",
            floor(0),
            floor(0) / target,
            floor(1),
            floor(1) / target
        );
    };
    println!();
    println!(
        "| CPU µs per first request, 1 KiB (against the target) | parts on {WORKERS} threads | parts on 1 thread |"
    );
    println!("|---|---:|---:|");
    println!("| the target: axum-idempotent's first request | {target:.2} | {target:.2} |");
    row(
        "floor: bare + moka as the store sets it up + SHA-256",
        store_setup,
    );
    row("floor without the eviction listener", lru_expiry);
    row("floor without the listener and the expiry per entry", lru);
    println!(
        "| this crate's first request | {first:.2} ({:.2}x) | |",
        first / target
    );
    println!();
    // A replay runs no handler, but the bare request is mostly the client
    // and axum (its handler answers a constant): with the fingerprint and
    // one store read, a replay's floor before its response.
    let replay = f[4].cpu_us;
    println!("| CPU µs per replay, 1 KiB | figure | replay against it |");
    println!("|---|---:|---:|");
    for (threads, part) in [(WORKERS, 0), (1, 1)] {
        let floor = bare + sha256[part] + get[part];
        println!(
            "| floor: bare + SHA-256 + one store read on {threads} thread(s) | {floor:.2} | {:.2}x |",
            floor / replay
        );
    }
    println!("| this crate's replay | {replay:.2} | |");
    println!();
    Some(bare + sha256[0] + get[0])
}
