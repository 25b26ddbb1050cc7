#!/usr/bin/env bash
# Measures the storage targets of a 3-replica cluster on 127.0.0.1, with
# default settings: after WRITES writes of distinct keys, the log on disk and
# each replica's RSS; how long a SIGKILLed replica takes to serve again; and
# how long a follower whose data directory was deleted takes to be back in
# sync. Prints one line per figure. Not part of the tests: it takes minutes.
#
#   scripts/storage-targets.sh [WRITES] [CLIENTS]
set -euo pipefail
cd "$(dirname "$0")/.."
WRITES=${1:-1000000}
CLIENTS=${2:-64}
BIN=target/release/paxoskv
cargo build --release --quiet
DIR=$(mktemp -d /tmp/paxoskv-targets.XXXXXX)
# Replica N: clients on 1818N, peers on 1828N, metrics on 1919N.
PEERS=1=127.0.0.1:18281,2=127.0.0.1:18282,3=127.0.0.1:18283
declare -A PID
start() {
  $BIN serve --id "$1" --listen "127.0.0.1:1818$1" --peer-listen "127.0.0.1:1828$1" --peers $PEERS \
    --data-dir "$DIR/$1" --metrics-listen "127.0.0.1:1919$1" \
    >>"$DIR/replica-$1.log" 2>&1 &
  PID[$1]=$!
}
cleanup() { kill "${PID[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$DIR"; }
trap cleanup EXIT
status() { $BIN status --endpoint 127.0.0.1:18181 2>/dev/null || true; }
# `paxoskv status` columns: 1 ID, 2 CLIENT, 3 PEER, 4 ROLE, 5 BALLOT,
# 6 COMMITTED, 7 APPLIED.
field() { # field ID COLUMN: a column of replica ID's row in `paxoskv status`
  status | awk -v id="$1" -v col="$2" '$1==id {print $col}'
}
for i in 1 2 3; do start $i; done
until status | grep -q leader; do sleep 0.2; done

# Fill: a closed loop of CLIENTS clients, each its own share of the keys.
echo "writing $WRITES distinct keys with $CLIENTS clients..."
rate=$($BIN bench --endpoints 127.0.0.1:18181,127.0.0.1:18182,127.0.0.1:18183 \
  --clients "$CLIENTS" --keys "$WRITES" --seconds 3600 --total "$WRITES" | tail -1)
echo "fill: $rate"
status
for i in 1 2 3; do
  log=$(du -sb "$DIR/$i/log" | cut -f1)
  state=$(du -sb "$DIR/$i/state" | cut -f1)
  rss=$(awk '/VmRSS/ {print $2}' "/proc/${PID[$i]}/status")
  echo "replica $i: log on disk $((log / 1024)) KiB, state machine $((state / 1024)) KiB, RSS $((rss / 1024)) MiB"
done

leader=$(status | awk '$4=="leader" {print $1}')
follower=$(( leader % 3 + 1 ))

# A SIGKILLed replica (the follower) serves again: until its status answers
# with a leader known and its applied index caught up.
kill -9 "${PID[$follower]}"; wait "${PID[$follower]}" 2>/dev/null || true
t0=$(date +%s.%N); start $follower
until [ "$(field $follower 4)" = "follower" ]; do sleep 0.02; done
t1=$(date +%s.%N)
echo "restart after SIGKILL: replica $follower serving as follower after $(awk "BEGIN {printf \"%.2f\", $t1 - $t0}") s"

# One client's writes to the leader for 10 s, as a baseline for the next.
lead=127.0.0.1:1818$leader
echo "one client, no snapshot being sent: $($BIN bench --endpoints $lead --seconds 10 | tail -1)"

# A follower whose data directory is deleted: back in sync (voting, applied
# the leader's commit index) after ... While the leader sends it the
# snapshot, one client writes to the leader, as above.
kill -9 "${PID[$follower]}"; wait "${PID[$follower]}" 2>/dev/null || true
rm -rf "${DIR:?}/$follower"
$BIN bench --endpoints $lead --seconds 10 > "$DIR/during.txt" &
BENCH=$!
t0=$(date +%s.%N); start $follower
until [ "$(field $follower 4)" = "follower" ] && \
      [ "$(field $follower 7)" = "$(field "$leader" 6)" ]; do sleep 0.1; done
t1=$(date +%s.%N)
echo "wiped follower: replica $follower back in sync (voting, applied = leader's commit) after $(awk "BEGIN {printf \"%.2f\", $t1 - $t0}") s"
grep -h "installed a snapshot" "$DIR/replica-$follower.log" | tail -1 || true
wait $BENCH
echo "one client, while the snapshot was being sent: $(tail -1 "$DIR/during.txt")"
status
