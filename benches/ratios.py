#!/usr/bin/env python3
"""Reads the last criterion run (target/criterion) and prints every figure
and the ratios of the layer against its baselines, as markdown. The
performance targets are judged on `cargo bench --bench concurrent`
(BENCHMARKS.md); these ratios are the sequential view beside it.

    cargo bench --bench layer --bench stores --bench peer
    python3 benches/ratios.py [target/criterion]

Each figure is criterion's point estimate of the time per iteration (the
slope where criterion fitted one, else the mean), the one it prints in the
middle of `time: [...]`.
"""

import json
import pathlib
import sys

root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "target/criterion")
if not root.is_dir():
    sys.exit(f"no criterion results under {root}: run cargo bench first")

figures = {}
for meta in sorted(root.glob("**/new/benchmark.json")):
    info = json.loads(meta.read_text())
    estimates = json.loads((meta.parent / "estimates.json").read_text())
    typical = estimates.get("slope") or estimates["mean"]
    elements = (info.get("throughput") or {}).get("Elements", 1)
    figures[info["full_id"]] = (typical["point_estimate"], elements)


def human_time(ns):
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("µs", 1e3)):
        if ns >= scale:
            return f"{ns / scale:.3g} {unit}"
    return f"{ns:.3g} ns"


def rate(ns, elements):
    per_second = elements * 1e9 / ns
    for unit, scale in (("M", 1e6), ("K", 1e3)):
        if per_second >= scale:
            return f"{per_second / scale:.3g} {unit}elem/s"
    return f"{per_second:.3g} elem/s"


print("| benchmark | time | throughput |")
print("|---|---:|---:|")
for name, (ns, elements) in figures.items():
    print(f"| `{name}` | {human_time(ns)} | {rate(ns, elements)} |")


def ratio(label, numerator, denominator, target=None, lower_is_better=True):
    """Prints numerator/denominator of the per-request times."""
    if numerator not in figures or denominator not in figures:
        return
    value = figures[numerator][0] / figures[denominator][0]
    verdict = ""
    if target is not None:
        met = value <= target if lower_is_better else value >= target
        verdict = f"{'met' if met else 'missed'} ({'<=' if lower_is_better else '>='} {target})"
    print(f"| {label} | {value:.2f} | {verdict} |")


print()
print("| ratio (from the run above) | value | |")
print("|---|---:|---|")
for size in ("0B", "1KiB", "64KiB"):
    group = f"layer/{size}"
    ratio(f"passthrough / bare, {size}", f"{group}/passthrough", f"{group}/bare")
    ratio(f"replay / floor, {size}", f"{group}/replay", f"{group}/floor")
    ratio(f"miss / floor, {size}", f"{group}/miss", f"{group}/floor")
ratio("passthrough / bare, 1KiB, typical request fields",
      "layer/typical-1KiB/passthrough", "layer/typical-1KiB/bare")
for size in ("0B", "1KiB", "64KiB"):
    group = f"peer/{size}"
    # Throughput ratio ours/peer = time(peer) / time(ours).
    ratio(f"replay throughput, ours / axum-idempotent, {size}",
          f"{group}/replay/axum-idempotent", f"{group}/replay/ours")
    ratio(f"miss throughput, ours / axum-idempotent, {size}",
          f"{group}/miss/axum-idempotent", f"{group}/miss/ours")
    ratio(f"replay throughput, ours / axum-idempotent-hashing, {size}",
          f"{group}/replay/axum-idempotent-hashing", f"{group}/replay/ours")
    ratio(f"miss throughput, ours / axum-idempotent-hashing, {size}",
          f"{group}/miss/axum-idempotent-hashing", f"{group}/miss/ours")
ratio("engine replay, redis / memory", "stores/redis/replay", "stores/memory/replay")
ratio("engine miss, redis / memory", "stores/redis/miss", "stores/memory/miss")
