#!/usr/bin/env bash
# paxoskv next to etcd, measured by the same client (`paxoskv bench`), on
# 127.0.0.1 of this machine. One system at a time, each on fresh temporary
# data directories and free ports, both syncing to disk before they
# acknowledge (etcd fsyncs its WAL by default; paxoskv fdatasyncs its log):
#
#   - a gRPC server that answers at once and does nothing
#     (`paxoskv bench-server`): the ceiling of the client and gRPC here;
#   - etcd (Debian's etcd-server), 3 members;
#   - paxoskv, 3 replicas;
#   - paxoskv, 1 replica: what replication costs.
#
# Each gets the same four runs of `paxoskv bench` (--target etcd for etcd),
# the clients spread over every member: writes with 1, 16 and 256 clients,
# and linearizable reads with 256 clients. Then one table: ops/s, p50 and
# p99 of each run, each member's peak RSS (VmHWM) over its runs, and the
# ratios. The last line, for scripts:
#
#   paxoskv/etcd write throughput at 256 clients: R; of ceiling: C
#
# Usage: scripts/compare-etcd.sh [--seconds N] [--binary PATH]
#   --seconds N     each run's length (10)
#   --binary PATH   measure this paxoskv binary instead of building and using
#                   the release one (CI passes the one `cargo test` built, to
#                   save a second full build: its figures are a smoke run's)
#
# Installs etcd-server and etcd-client from Debian if etcd is missing.
# Everything it starts, it stops.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/apt-install.sh
. scripts/apt-install.sh

RUN_SECONDS=10
BIN=
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) RUN_SECONDS=${2:?--seconds needs a number}; shift 2 ;;
    --seconds=*) RUN_SECONDS=${1#--seconds=}; shift ;;
    --binary) BIN=${2:?--binary needs a path}; shift 2 ;;
    --binary=*) BIN=${1#--binary=}; shift ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "error: unknown argument $1 (usage: $0 [--seconds N] [--binary PATH])" >&2; exit 2 ;;
  esac
done
case "$RUN_SECONDS" in
  ''|*[!0-9]*|0) echo "error: --seconds takes a whole number of seconds, at least 1" >&2; exit 2 ;;
esac

say() { echo "== $*" >&2; }

if ! command -v etcd >/dev/null 2>&1 || ! command -v etcdctl >/dev/null 2>&1; then
  say "installing etcd-server and etcd-client (Debian)"
  apt_install etcd-server etcd-client
fi

if [ -z "$BIN" ]; then
  say "cargo build --release"
  cargo build --release --quiet
  BIN="${CARGO_TARGET_DIR:-target}/release/paxoskv"
elif [ ! -x "$BIN" ]; then
  echo "error: --binary $BIN is not an executable file" >&2
  exit 2
fi
BIN="$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")"

DIR=$(mktemp -d /tmp/compare-etcd.XXXXXX)
PIDS=() # each started process leads its own process group (setsid)
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL -- "-$pid" 2>/dev/null || true
  done
  wait 2>/dev/null || true
  rm -rf "$DIR"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# N ports free right now on 127.0.0.1 (bound together, then released).
free_ports() {
  python3 -c 'import random, socket, sys
# Below the ephemeral range, as tests/common/mod.rs does: a port bound to
# :0 and released can be taken by an outgoing connection before its
# server binds it.
try:
    high = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
except (OSError, ValueError, IndexError):
    high = 32768
low, n, socks = 10000, int(sys.argv[1]), []
port = random.randrange(low, high)
for _ in range(high - low):
    if len(socks) == n:
        break
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
        socks.append(s)
    except OSError:
        s.close()
    port = low + (port + 1 - low) % (high - low)
if len(socks) < n:
    sys.exit("no %d free ports in %d..%d" % (n, low, high))
print(" ".join(str(s.getsockname()[1]) for s in socks))' "$1"
}

# start NAME CMD...: runs CMD in a process group of its own, logging to
# $DIR/NAME.log; its pid (= its group) in $STARTED.
start() {
  local name=$1; shift
  setsid "$@" >"$DIR/$name.log" 2>&1 </dev/null &
  STARTED=$!
  PIDS+=("$STARTED")
}

# stop PID...: SIGTERM to each group, then wait for them to exit.
stop() {
  local pid
  for pid in "$@"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  for pid in "$@"; do
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL -- "-$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
}

# wait_for WHAT CMD...: until CMD succeeds, up to 30 s.
wait_for() {
  local what=$1; shift
  for _ in $(seq 300); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  echo "error: $what not ready after 30 s; logs:" >&2
  tail -n 20 "$DIR"/*.log >&2 || true
  exit 1
}

# peak_rss PID...: each process's VmHWM in MiB, comma-separated.
peak_rss() {
  local pid out=()
  for pid in "$@"; do
    out+=("$(awk '/^VmHWM:/ {printf "%.0f", $2 / 1024}' "/proc/$pid/status" 2>/dev/null || echo "?")")
  done
  (IFS=,; echo "${out[*]}")
}

mkdir -p "$DIR/results"
# workloads SYSTEM ENDPOINTS [BENCH FLAGS...]: the four runs, each a JSON
# report in $DIR/results/SYSTEM-WORKLOAD.json.
workloads() {
  local system=$1 endpoints=$2; shift 2
  local run clients op
  for run in w1:1:write w16:16:write w256:256:write r256:256:read; do
    IFS=: read -r name clients op <<<"$run"
    say "$system: $op, $clients clients, $RUN_SECONDS s"
    if ! "$BIN" bench --json --endpoints "$endpoints" --clients "$clients" --op "$op" \
      --seconds "$RUN_SECONDS" "$@" >"$DIR/results/$system-$name.json" 2>"$DIR/bench.err"; then
      echo "error: paxoskv bench against $system ($op, $clients clients) failed:" >&2
      cat "$DIR/bench.err" >&2
      exit 1
    fi
  done
}

# The ceiling: a no-op KvStore, in a process of its own.
read -r port < <(free_ports 1)
start noop "$BIN" bench-server --listen "127.0.0.1:$port"
noop=$STARTED
wait_for "the no-op server" "$BIN" get ready --endpoint "127.0.0.1:$port" --timeout-ms 500
workloads ceiling "127.0.0.1:$port"
peak_rss "$noop" >"$DIR/results/ceiling.rss"
stop "$noop"

# etcd, 3 members.
read -r c1 c2 c3 p1 p2 p3 < <(free_ports 6)
cluster="e1=http://127.0.0.1:$p1,e2=http://127.0.0.1:$p2,e3=http://127.0.0.1:$p3"
etcd_pids=()
for i in 1 2 3; do
  c=$(eval echo "\$c$i"); p=$(eval echo "\$p$i")
  start "etcd-$i" etcd --name "e$i" --data-dir "$DIR/etcd-$i" \
    --listen-client-urls "http://127.0.0.1:$c" --advertise-client-urls "http://127.0.0.1:$c" \
    --listen-peer-urls "http://127.0.0.1:$p" --initial-advertise-peer-urls "http://127.0.0.1:$p" \
    --initial-cluster "$cluster" --initial-cluster-state new \
    --initial-cluster-token "compare-$$" --logger zap --log-level warn
  etcd_pids+=("$STARTED")
done
etcd_endpoints="127.0.0.1:$c1,127.0.0.1:$c2,127.0.0.1:$c3"
wait_for "etcd" env ETCDCTL_API=3 etcdctl --endpoints "$etcd_endpoints" \
  --command-timeout=1s endpoint health
workloads etcd "$etcd_endpoints" --target etcd
peak_rss "${etcd_pids[@]}" >"$DIR/results/etcd.rss"
stop "${etcd_pids[@]}"
etcd --version 2>/dev/null | awk '/etcd Version/ {print $3}' >"$DIR/results/etcd.version"

# paxoskv_cluster SYSTEM N: N replicas, the four runs, peak RSS.
paxoskv_cluster() {
  local system=$1 n=$2 i peers="" endpoints="" pids=()
  local ports
  read -r -a ports < <(free_ports $((2 * n)))
  for i in $(seq "$n"); do
    peers+="${peers:+,}$i=127.0.0.1:${ports[$((n + i - 1))]}"
    endpoints+="${endpoints:+,}127.0.0.1:${ports[$((i - 1))]}"
  done
  for i in $(seq "$n"); do
    start "$system-$i" "$BIN" serve --id "$i" --listen "127.0.0.1:${ports[$((i - 1))]}" \
      --peer-listen "127.0.0.1:${ports[$((n + i - 1))]}" --peers "$peers" \
      --data-dir "$DIR/$system-$i"
    pids+=("$STARTED")
  done
  # `paxoskv status` exits 0 once the cluster has a leader and a quorum.
  wait_for "paxoskv ($n replicas)" "$BIN" status --endpoint "127.0.0.1:${ports[0]}" --timeout-ms 1000
  workloads "$system" "$endpoints"
  peak_rss "${pids[@]}" >"$DIR/results/$system.rss"
  stop "${pids[@]}"
}
paxoskv_cluster paxoskv3 3
paxoskv_cluster paxoskv1 1

say "done: $(nproc) cores, $RUN_SECONDS s a run"
python3 - "$DIR/results" "$RUN_SECONDS" <<'EOF'
import json, os, sys

results, seconds = sys.argv[1], sys.argv[2]
runs = ["w1", "w16", "w256", "r256"]
systems = ["ceiling", "etcd", "paxoskv3", "paxoskv1"]

def load(system, run):
    with open(os.path.join(results, f"{system}-{run}.json")) as f:
        return json.load(f)

def text(path):
    try:
        with open(os.path.join(results, path)) as f:
            return f.read().strip()
    except OSError:
        return "?"

r = {s: {w: load(s, w) for w in runs} for s in systems}
names = {
    "ceiling": "no-op gRPC server (the ceiling)",
    "etcd": f"etcd {text('etcd.version')}, 3 members",
    "paxoskv3": "paxoskv, 3 replicas",
    "paxoskv1": "paxoskv, 1 replica",
}

def ops(x):
    return f"{x['ops_per_s']:,.0f}"

def lat(us):
    return f"{us:,} µs" if us < 10_000 else f"{us / 1000:,.1f} ms"

def ratio(a, b):
    return f"{a / b:.2f}×" if b else "—"

header = ["", "w/s, 1 client", "p50", "p99", "w/s, 16 clients", "p50", "p99",
          "w/s, 256 clients", "p50", "p99", "reads/s, 256 clients", "p50", "p99",
          "peak RSS per member"]
rows = []
for s in systems:
    row = [names[s]]
    for w in runs:
        x = r[s][w]
        row += [ops(x), lat(x["latency_us"]["p50"]), lat(x["latency_us"]["p99"])]
    rss = text(f"{s}.rss")
    row.append(", ".join(f"{v} MiB" for v in rss.split(",")))
    rows.append(row)
for label, a, b in [("paxoskv 3 / etcd", "paxoskv3", "etcd"),
                    ("paxoskv 3 / ceiling", "paxoskv3", "ceiling"),
                    ("paxoskv 3 / paxoskv 1", "paxoskv3", "paxoskv1")]:
    row = [label]
    for w in runs:
        x, y = r[a][w], r[b][w]
        row += [ratio(x["ops_per_s"], y["ops_per_s"]),
                ratio(x["latency_us"]["p50"], y["latency_us"]["p50"]),
                ratio(x["latency_us"]["p99"], y["latency_us"]["p99"])]
    row.append("")
    rows.append(row)

print(f"Each run {seconds} s; ops/s counts successful calls; p50 and p99 of "
      "successful calls; ratios are of the paxoskv, 3 replicas row.")
print()
print("| " + " | ".join(header) + " |")
print("|" + "---|" * len(header))
for row in rows:
    print("| " + " | ".join(row) + " |")
print()
errors = []
for s in systems:
    for w in runs:
        x = r[s][w]
        if x["errors"]:
            codes = ", ".join(f"{c} {n}" for c, n in x["errors_by_code"].items())
            errors.append(f"  {names[s]}, {w}: {x['errors']} errors ({codes}); "
                          f"first: {x['first_error']}")
print("errors:" if errors else "errors: none")
for e in errors:
    print(e)
p, e, c = (r[s]["w256"]["ops_per_s"] for s in ("paxoskv3", "etcd", "ceiling"))
print(f"paxoskv/etcd write throughput at 256 clients: "
      f"{p / e if e else 0:.2f}; of ceiling: {p / c if c else 0:.2f}")
EOF
