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
#   RUNS=nginx bash benches/load.sh      # only the reverse proxy against nginx
#   RUNS=nginx REPEAT=3 PIN=1 bash benches/load.sh   # three rounds, pinned
#
# Then the reverse proxy against nginx (RUNS=nginx for this part alone):
# nginx (Debian's package, installed with apt-get when missing and root) is
# started on free ports as the upstream (`return 201` with a small body) and
# as a `proxy_pass` front with upstream `keepalive` and a buffered access
# log; examples/reverse_proxy (memory store, access log to a file) runs in
# front of the same upstream. wrk (THREADS, CONNECTIONS, 1 KiB POSTs) then
# measures, side by side in one round: nginx passthrough; the proxy without
# a key; first requests (a new key each); replays (one fixed key); and the
# proxy without a key and with --access-log off (the access log's cost).
# PIN=1 runs the servers on CPU 0 and wrk on CPU 1 (taskset), the same for
# nginx and the proxy. Without nginx these rows are skipped with a message.
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
REPEAT=${REPEAT:-1}
PIN=${PIN:-0}

cd "$(dirname "$0")/.."
work=$(mktemp -d)
pids=()
nginx_confs=()
cleanup() {
    for conf in "${nginx_confs[@]}"; do
        nginx -c "$conf" -s quit 2>/dev/null || true
    done
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

# A free loopback port, from the kernel.
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Waits until something accepts connections on 127.0.0.1:$1.
wait_port() {
    for _ in $(seq 1 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    echo "nothing listens on 127.0.0.1:$1" >&2
    return 1
}

# Starts nginx (a daemon, stopped on exit through its config) named $1 with
# the http{} block $2.
start_nginx() {
    local name=$1 http=$2 dir="$work/nginx-$1"
    mkdir -p "$dir"
    cat >"$dir/nginx.conf" <<NGINX
worker_processes ${NGINX_WORKERS:-auto};
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 4096; }
http {
    client_body_temp_path $dir/body;
    proxy_temp_path $dir/proxy;
    fastcgi_temp_path $dir/fastcgi;
    uwsgi_temp_path $dir/uwsgi;
    scgi_temp_path $dir/scgi;
    $http
}
NGINX
    $pin_servers nginx -c "$dir/nginx.conf" -e "$dir/error.log"
    nginx_confs+=("$dir/nginx.conf")
}

# Prints "requests_per_second p99_ms" for one wrk run against $1 (host:port)
# with the lua script $2, pinned like the clients.
wrk_run() {
    local addr=$1 script=$2 out rps p99
    out=$($pin_client wrk --latency -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" -s "$script" "http://$addr/orders")
    echo "$out" >>"$work/wrk.log"
    if echo "$out" | grep -q "Non-2xx"; then
        echo "wrk saw non-2xx answers from $addr ($(basename "$script")):" >&2
        echo "$out" >&2
        exit 1
    fi
    rps=$(echo "$out" | awk '/^Requests\/sec:/ {print $2}')
    p99=$(echo "$out" | awk -v q="99%" "$latency_ms")
    echo "$rps $p99"
}

# The reverse proxy against nginx passthrough, REPEAT rounds.
proxy_vs_nginx() {
    PATH=$PATH:/usr/sbin
    if ! command -v nginx >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "installing nginx with apt-get..."
        { apt-get update -qq && apt-get install -y -qq nginx; } >/dev/null 2>&1 || true
    fi
    if ! command -v nginx >/dev/null; then
        echo "nginx is not installed and could not be: the reverse proxy against nginx rows are skipped" >&2
        return 0
    fi
    local proxy=${PROXY_BIN:-target/release/examples/reverse_proxy}
    if [ -z "${PROXY_BIN:-}" ]; then
        echo "building examples/reverse_proxy (release)..."
        cargo build --release --quiet --example reverse_proxy
    fi
    pin_servers="" pin_client=""
    if [ "$PIN" = 1 ] && command -v taskset >/dev/null; then
        pin_servers="taskset -c 0" pin_client="taskset -c 1"
    fi
    local up front proxy_port proxy_admin quiet_port quiet_admin
    up=$(free_port) front=$(free_port) proxy_port=$(free_port) proxy_admin=$(free_port)
    quiet_port=$(free_port) quiet_admin=$(free_port)
    start_nginx upstream "access_log off;
    server {
        listen 127.0.0.1:$up;
        location / { return 201 '{\"id\":1,\"status\":\"created\"}\n'; }
    }"
    start_nginx front "log_format timed '\$remote_addr [\$time_local] \"\$request\" \$status \$body_bytes_sent \$request_time';
    access_log $work/nginx-front/access.log timed buffer=64k flush=1s;
    upstream backend { server 127.0.0.1:$up; keepalive 64; }
    server {
        listen 127.0.0.1:$front;
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
            proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
        }
    }"
    wait_port "$up" && wait_port "$front"
    # Two proxies: access log to a file (as nginx's), and off.
    $pin_servers "$proxy" --listen "127.0.0.1:$proxy_port" --admin "127.0.0.1:$proxy_admin" \
        --upstream "http://127.0.0.1:$up" --access-log "$work/proxy-access.log" \
        >"$work/proxy.log" 2>&1 &
    pids+=("$!")
    $pin_servers "$proxy" --listen "127.0.0.1:$quiet_port" --admin "127.0.0.1:$quiet_admin" \
        --upstream "http://127.0.0.1:$up" --access-log off \
        >"$work/proxy-quiet.log" 2>&1 &
    pids+=("$!")
    wait_port "$proxy_port" && wait_port "$quiet_port"

    # 1 KiB JSON bodies.
    local big
    big=$(python3 -c 'import json; pad = 1024 - len(json.dumps({"item": "book", "pad": ""})); print(json.dumps({"item": "book", "pad": "x" * pad}))')
    cat >"$work/nokey.lua" <<LUA
wrk.method = "POST"
wrk.body = '$big'
wrk.headers["Content-Type"] = "application/json"
$check
LUA
    # A new key per request: the round's prefix, the thread's number, a counter.
    cat >"$work/newkey.lua" <<LUA
wrk.method = "POST"
wrk.body = '$big'
wrk.headers["Content-Type"] = "application/json"
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end
local n = 0
request = function()
  n = n + 1
  wrk.headers["Idempotency-Key"] = prefix .. "-" .. tid .. "-" .. n
  return wrk.format()
end
$check
LUA
    cat >"$work/samekey.lua" <<LUA
wrk.method = "POST"
wrk.body = '$big'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Idempotency-Key"] = "replay-" .. prefix
$check
LUA

    echo
    echo "reverse proxy against nginx: wrk -t$THREADS -c$CONNECTIONS -d$DURATION, 1 KiB POSTs," \
        "$REPEAT round(s)$([ -n "$pin_servers" ] && echo ", servers on CPU 0 and wrk on CPU 1")"
    printf '%-6s %-34s %12s %9s %9s %9s\n' round run "requests/s" "p99 ms" "x nginx" "p99 x"
    local round nginx_rps nginx_p99 rps p99 row name script addr logged_rps quiet_rps prefix
    for round in $(seq 1 "$REPEAT"); do
        echo "round $round, load average: $(uptime | sed 's/.*load average: //')"
        read -r nginx_rps nginx_p99 < <(wrk_run "127.0.0.1:$front" "$work/nokey.lua")
        [ -n "$nginx_rps" ] || { echo "the nginx run failed" >&2; exit 1; }
        printf '%-6s %-34s %12s %9s %9s %9s\n' "$round" "nginx proxy_pass (no key)" "$nginx_rps" "$nginx_p99" 1.000 1.000
        for row in "proxy, no key:nokey:$proxy_port" "proxy, first request (memory):newkey:$proxy_port" \
            "proxy, replay (memory):samekey:$proxy_port" "proxy, no key, --access-log off:nokey:$quiet_port"; do
            IFS=: read -r name script addr <<<"$row"
            prefix="r$round-$RANDOM-$(date +%s)"
            sed -i "1i prefix = \"$prefix\"" "$work/$script.lua"
            # The replayed key is stored just before its run: the first
            # requests before it may have evicted an older one.
            if [ "$script" = samekey ]; then
                curl -sf -o /dev/null -X POST -H 'Content-Type: application/json' \
                    -H "Idempotency-Key: replay-$prefix" -d "$big" "http://127.0.0.1:$addr/orders" ||
                    { echo "priming the replay key failed" >&2; exit 1; }
            fi
            read -r rps p99 < <(wrk_run "127.0.0.1:$addr" "$work/$script.lua")
            sed -i 1d "$work/$script.lua"
            [ -n "$rps" ] || { echo "a wrk run failed" >&2; exit 1; }
            printf '%-6s %-34s %12s %9s %9s %9s\n' "$round" "$name" "$rps" "$p99" \
                "$(awk -v a="$rps" -v b="$nginx_rps" 'BEGIN { printf "%.3f", a / b }')" \
                "$(awk -v a="$p99" -v b="$nginx_p99" 'BEGIN { printf "%.3f", a / b }')"
            if [ "$script" = nokey ] && [ "$addr" = "$proxy_port" ]; then logged_rps=$rps; fi
            if [ "$addr" = "$quiet_port" ]; then quiet_rps=$rps; fi
        done
        awk -v on="$logged_rps" -v off="$quiet_rps" \
            'BEGIN { printf "%-6s access log cost (no key, file vs off): %.1f %% of throughput\n", "", (1 - on / off) * 100 }'
    done
    echo "proxy /stats after the rounds: $(curl -sf "http://127.0.0.1:$proxy_admin/stats" |
        python3 -c 'import json, sys; s = json.load(sys.stdin); print({k: s[k] for k in ("requests", "executed", "replayed", "access_log_dropped", "evicted")})' 2>/dev/null || echo '?')"
}

if [ "$RUNS" = nginx ]; then
    proxy_vs_nginx
    exit 0
fi

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

proxy_vs_nginx
