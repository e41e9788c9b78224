#!/usr/bin/env bash
# Load test over loopback: examples/axum_server with and without the layer,
# driven by wrk on a passthrough path (POST without a key) and a replay path
# (POST with a fixed Idempotency-Key, answered from the store after the first
# request). Prints requests/s and p99 latency for each, and their ratios.
#
#   bash benches/load.sh                 # 10 s per run, 2 threads, 64 connections
#   DURATION=30s CONNECTIONS=128 bash benches/load.sh
#   RUNS=first bash benches/load.sh      # only the first-request run
#   RUNS=first PROXY_BIN=path/to/reverse_proxy bash benches/load.sh  # another build
#
# Last, first requests (a new key each: the handler runs and the response is
# stored) through examples/reverse_proxy on Redis (REDIS_URL, default
# redis://127.0.0.1:6379) over ONE kept-alive connection (wrk -t1 -c1): its
# p50 shows whether a response waits for a delayed ACK (Nagle, 40 ms) when
# head and body leave in two writes around the store's round trip.
#
# Stops the servers it started on exit. Needs wrk (Debian package `wrk`: the
# script installs it with apt-get when it runs as root and wrk is missing).
set -euo pipefail

DURATION=${DURATION:-10s}
THREADS=${THREADS:-2}
CONNECTIONS=${CONNECTIONS:-64}
LAYER_ADDR=${LAYER_ADDR:-127.0.0.1:3101}
BARE_ADDR=${BARE_ADDR:-127.0.0.1:3102}
PROXY_ADDR=${PROXY_ADDR:-127.0.0.1:3103}
PROXY_ADMIN_ADDR=${PROXY_ADMIN_ADDR:-127.0.0.1:3104}
REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379}
RUNS=${RUNS:-all}

cd "$(dirname "$0")/.."
work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$work"
}
trap cleanup EXIT

if ! command -v wrk >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "installing wrk with apt-get..."
        apt-get update -qq >/dev/null && apt-get install -y -qq wrk >/dev/null
    else
        echo "wrk is not installed: apt-get install wrk (Debian/Ubuntu), then run again" >&2
        exit 1
    fi
fi

# Starts `binary` on `addr` with the given flags and waits until it accepts
# connections.
start_binary() {
    local binary=$1 addr=$2
    shift 2
    "$binary" --listen "$addr" "$@" >"$work/server-$addr.log" 2>&1 &
    pids+=("$!")
    local host=${addr%:*} port=${addr##*:}
    for _ in $(seq 1 100); do
        if (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    echo "the server on $addr did not start:" >&2
    cat "$work/server-$addr.log" >&2
    exit 1
}
start() {
    start_binary "$server" "$@"
}

# Prints the first-request run: first requests (a new key each) over ONE
# kept-alive connection through examples/reverse_proxy on Redis.
first_requests() {
    local proxy=${PROXY_BIN:-target/release/examples/reverse_proxy}
    if [ -z "${PROXY_BIN:-}" ]; then
        echo "building examples/reverse_proxy (release, feature redis)..."
        cargo build --release --quiet --features redis --example reverse_proxy
    fi
    local hostport=${REDIS_URL#redis://}
    hostport=${hostport%%/*}
    if ! (exec 3<>"/dev/tcp/${hostport%:*}/${hostport##*:}") 2>/dev/null; then
        echo "no Redis on $REDIS_URL: first-request run skipped" >&2
        return 0
    fi
    # A prefix of its own, and records that expire soon: the shared Redis
    # keeps nothing of this run.
    local prefix
    prefix="load-first-$$-$(date +%s):"
    start_binary "$proxy" "$PROXY_ADDR" \
        --admin "$PROXY_ADMIN_ADDR" --redis "$REDIS_URL" --redis-prefix "$prefix" --ttl 60
    cat >"$work/first.lua" <<EOF
wrk.method = "POST"
wrk.body = '$body'
wrk.headers["Content-Type"] = "application/json"
local n = 0
request = function()
  n = n + 1
  wrk.headers["Idempotency-Key"] = "first-" .. n
  return wrk.format()
end
$check
EOF
    local out requests p50 p99
    out=$(wrk --latency -t1 -c1 -d"$DURATION" -s "$work/first.lua" "http://$PROXY_ADDR/orders")
    echo "$out" >>"$work/wrk.log"
    if echo "$out" | grep -q "Non-2xx"; then
        echo "wrk saw non-2xx answers from the proxy:" >&2
        echo "$out" >&2
        exit 1
    fi
    requests=$(echo "$out" | awk '/requests in/ {print $1}')
    p50=$(echo "$out" | awk -v q="50%" "$latency_ms")
    p99=$(echo "$out" | awk -v q="99%" "$latency_ms")
    printf '\n%-48s %10s %10s %10s\n' "run" "requests" "p50 ms" "p99 ms"
    printf '%-48s %10s %10s %10s\n' "proxy on Redis, first requests, 1 connection" \
        "$requests" "$p50" "$p99"
}

# awk program: the latency at quantile q ("50%", "99%") of wrk --latency, in ms.
latency_ms='$1 == q {
    v = $2
    if (v ~ /us$/) { sub(/us$/, "", v); v = v / 1000 }
    else if (v ~ /ms$/) { sub(/ms$/, "", v) }
    else if (v ~ /s$/) { sub(/s$/, "", v); v = v * 1000 }
    print v }'

body='{"item":"book","quantity":1}'
# Each wrk thread reports the first unexpected answer it sees.
check='
response = function(status, headers, body)
  if status ~= 201 and not reported then
    reported = true
    io.stderr:write("unexpected answer: ", status, " ", body, "\n")
  end
end'

if [ "$RUNS" = first ]; then
    first_requests
    exit 0
fi

echo "building examples/axum_server (release)..."
cargo build --release --quiet --example axum_server
server=target/release/examples/axum_server

start "$LAYER_ADDR"
start "$BARE_ADDR" --no-idempotency

cat >"$work/passthrough.lua" <<EOF
wrk.method = "POST"
wrk.body = '$body'
wrk.headers["Content-Type"] = "application/json"
$check
EOF
cat >"$work/replay.lua" <<EOF
wrk.method = "POST"
wrk.body = '$body'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Idempotency-Key"] = "load-replay-1"
$check
EOF

# The first request with the key runs the handler; wrk then only replays.
curl -sf -o /dev/null -X POST -H 'Content-Type: application/json' \
    -H 'Idempotency-Key: load-replay-1' -d "$body" "http://$LAYER_ADDR/orders" ||
    { echo "priming the replay key failed" >&2; exit 1; }

# Prints "requests_per_second p99_ms" for one wrk run.
run() {
    local addr=$1 script=$2 out
    out=$(wrk --latency -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" -s "$script" "http://$addr/orders")
    echo "$out" >>"$work/wrk.log"
    if echo "$out" | grep -q "Non-2xx"; then
        echo "wrk saw non-2xx answers from $addr ($(basename "$script")):" >&2
        echo "$out" >&2
        exit 1
    fi
    local rps p99
    rps=$(echo "$out" | awk '/^Requests\/sec:/ {print $2}')
    p99=$(echo "$out" | awk '$1 == "99%" {
        v = $2
        if (v ~ /us$/) { sub(/us$/, "", v); v = v / 1000 }
        else if (v ~ /ms$/) { sub(/ms$/, "", v) }
        else if (v ~ /s$/) { sub(/s$/, "", v); v = v * 1000 }
        print v }')
    echo "$rps $p99"
}

echo "wrk: $THREADS threads, $CONNECTIONS connections, $DURATION per run; body $body"
read -r bare_pass_rps bare_pass_p99 < <(run "$BARE_ADDR" "$work/passthrough.lua")
read -r layer_pass_rps layer_pass_p99 < <(run "$LAYER_ADDR" "$work/passthrough.lua")
read -r bare_key_rps bare_key_p99 < <(run "$BARE_ADDR" "$work/replay.lua")
read -r layer_replay_rps layer_replay_p99 < <(run "$LAYER_ADDR" "$work/replay.lua")

for value in "$bare_pass_rps" "$layer_pass_rps" "$bare_key_rps" "$layer_replay_rps"; do
    [ -n "$value" ] || { echo "a wrk run failed; its output is above" >&2; exit 1; }
done

executions=$(curl -sf "http://$LAYER_ADDR/stats" || echo '{}')

printf '\n%-44s %14s %10s\n' "run" "requests/s" "p99 ms"
printf '%-44s %14s %10s\n' "bare handler, POST without key" "$bare_pass_rps" "$bare_pass_p99"
printf '%-44s %14s %10s\n' "layer, passthrough (POST without key)" "$layer_pass_rps" "$layer_pass_p99"
printf '%-44s %14s %10s\n' "bare handler, POST with key (runs each time)" "$bare_key_rps" "$bare_key_p99"
printf '%-44s %14s %10s\n' "layer, replay (POST with the same key)" "$layer_replay_rps" "$layer_replay_p99"
echo
awk -v a="$layer_pass_rps" -v b="$bare_pass_rps" -v la="$layer_pass_p99" -v lb="$bare_pass_p99" \
    'BEGIN { printf "passthrough / bare:  throughput %.3f, p99 %.3f\n", a / b, la / lb }'
awk -v a="$layer_replay_rps" -v b="$bare_key_rps" -v la="$layer_replay_p99" -v lb="$bare_key_p99" \
    'BEGIN { printf "replay / bare:       throughput %.3f, p99 %.3f\n", a / b, la / lb }'
echo
echo "layer server /stats after the runs: $executions"

first_requests
