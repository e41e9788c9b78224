#!/usr/bin/env bash
# A local Redis Cluster for the tests: six redis-server processes on loopback
# ports BASE..BASE+5, three primaries with one replica each.
#
#   .ci/redis-cluster.sh start [BASE_PORT]   # default 7000; does nothing when the cluster answers
#   .ci/redis-cluster.sh stop  [BASE_PORT]   # shuts the six nodes down, deletes their data
#   .ci/redis-cluster.sh status [BASE_PORT]  # exit 0 when the cluster answers and is ok
#
# Environment: REDIS_CLUSTER_NODE_TIMEOUT (ms, default 2000): how long a node
# may be silent before it counts as failed, so a failover takes a few seconds.
# REDIS_CLUSTER_DIR (default ${TMPDIR:-/tmp}): where the data directories go.
#
# Settings that matter for the tests (and that production clusters should
# consider): cluster-require-full-coverage no (one failed shard does not stop
# the others), cluster-replica-validity-factor 0 (a replica always may take
# over), no persistence (RDB or AOF), as a cache of records.
set -euo pipefail

command_name=${1:-start}
base=${2:-7000}
node_timeout=${REDIS_CLUSTER_NODE_TIMEOUT:-2000}
root="${REDIS_CLUSTER_DIR:-${TMPDIR:-/tmp}}/redis-cluster-$base"
ports=()
for offset in 0 1 2 3 4 5; do ports+=($((base + offset))); done

cli() { redis-cli -h 127.0.0.1 -p "$1" "${@:2}" 2>/dev/null; }

answers() { cli "$1" ping | grep -q PONG; }

# Every node answers and sees the whole cluster as ok, with six nodes.
healthy() {
  local port info
  for port in "${ports[@]}"; do
    info=$(cli "$port" cluster info) || return 1
    grep -q '^cluster_state:ok' <<<"$info" || return 1
    grep -q '^cluster_known_nodes:6' <<<"$info" || return 1
    grep -q '^cluster_slots_assigned:16384' <<<"$info" || return 1
  done
}

# Healthy, and every replica is linked to its primary (so WAIT has replicas
# to count): what a new cluster waits for.
complete() {
  healthy || return 1
  local port replication
  for port in "${ports[@]}"; do
    replication=$(cli "$port" info replication) || return 1
    if grep -q '^role:master' <<<"$replication"; then
      grep -q '^connected_slaves:1' <<<"$replication" || return 1
    else
      grep -q '^master_link_status:up' <<<"$replication" || return 1
    fi
  done
}

wait_until() {
  local what=$1 tries=$2
  for _ in $(seq 1 "$tries"); do
    "$what" && return 0
    sleep 0.2
  done
  return 1
}

all_answer() {
  local port
  for port in "${ports[@]}"; do answers "$port" || return 1; done
}

stop() {
  local port pid
  for port in "${ports[@]}"; do
    cli "$port" shutdown nosave >/dev/null || true
  done
  for port in "${ports[@]}"; do
    pid=$(cat "$root/$port/redis.pid" 2>/dev/null || true)
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
      kill -9 "$pid" 2>/dev/null || true
    fi
  done
  rm -rf "$root"
}

start() {
  if healthy; then
    return 0
  fi
  # Nodes that answer but do not form a healthy cluster may be converging
  # (a failover under way): give them a moment before starting over.
  if all_answer && wait_until healthy 50; then
    return 0
  fi
  stop
  local port
  for port in "${ports[@]}"; do
    mkdir -p "$root/$port"
    redis-server --port "$port" --bind 127.0.0.1 --daemonize yes \
      --dir "$root/$port" --pidfile "$root/$port/redis.pid" --logfile "$root/$port/redis.log" \
      --cluster-enabled yes --cluster-config-file "$root/$port/nodes.conf" \
      --cluster-node-timeout "$node_timeout" --cluster-require-full-coverage no \
      --cluster-replica-validity-factor 0 \
      --save "" --appendonly no 9>&-
  done
  if ! wait_until all_answer 50; then
    echo "redis-cluster: the nodes on $base..$((base + 5)) did not start; see $root/*/redis.log" >&2
    exit 1
  fi
  local seeds=()
  for port in "${ports[@]}"; do seeds+=("127.0.0.1:$port"); done
  redis-cli --cluster create "${seeds[@]}" --cluster-replicas 1 --cluster-yes >"$root/create.log" 2>&1 || {
    echo "redis-cluster: cluster create failed:" >&2
    cat "$root/create.log" >&2
    exit 1
  }
  if ! wait_until complete 150; then
    echo "redis-cluster: the cluster on $base..$((base + 5)) did not become ok" >&2
    cli "$base" cluster info >&2 || true
    exit 1
  fi
}

# One caller at a time per cluster: tests may start it concurrently.
mkdir -p "$(dirname "$root")"
exec 9>"$root.lock"
flock 9

case "$command_name" in
  start) start && echo "redis-cluster: ok on 127.0.0.1:$base..$((base + 5))" ;;
  stop) stop ;;
  status) healthy ;;
  *)
    echo "usage: $0 start|stop|status [BASE_PORT]" >&2
    exit 2
    ;;
esac
