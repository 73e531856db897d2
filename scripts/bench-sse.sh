#!/usr/bin/env bash
# The cost of live SSE watchers (`GET /api/v1/events`) on ingest, in one run
# on one hub: the same fleet streams three times, with no watcher, with 20
# watchers of one device each (what 20 open console device pages ask for),
# and with 20 watchers of every reading (the worst case). Watchers are curl
# processes writing to a byte counter. Prints stored readings/s, ack p99
# and hub CPU per phase, and what the watchers received.
#
#   scripts/bench-sse.sh                          # 1000 devices x 100 Hz, 20 s per phase
#   DEVICES=200 RATE=50 DURATION=5s WATCHERS=5 scripts/bench-sse.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICES=${DEVICES:-1000}
RATE=${RATE:-100}
DURATION=${DURATION:-20s}
WATCHERS=${WATCHERS:-20}

. scripts/target-dir.sh
BIN=${BIN:-$TARGET/release}
[ "$BIN" = "$TARGET/release" ] && cargo build --release -q -p hub -p device-sim
. scripts/start-hub.sh
watcher_pids=()
# Waits for the curls (they stop at --max-time), then for their counts.
stop_watchers() {
  for pid in "${watcher_pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  for i in $(seq 1 "${#watcher_pids[@]}"); do
    for _ in $(seq 1 50); do [ -s "$work/watch-$i.bytes" ] && break; sleep 0.1; done
  done
  watcher_pids=()
}
trap 'kill "${watcher_pids[@]}" "$hub_pid" 2>/dev/null || true; rm -rf "$work"' EXIT
[ -n "$http_addr" ] || { cat "$work/hub.log"; echo "no web console address in the hub's log"; exit 1; }

ticks=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$hub_pid/stat"; }

# phase NAME QUERY: runs the fleet with $WATCHERS watchers of QUERY (none
# when QUERY is "-"); QUERY may hold {i}, replaced by the watcher's number.
phase() {
  local name=$1 query=$2
  rm -f "$work"/watch-*.bytes
  if [ "$query" != - ]; then
    for i in $(seq 1 "$WATCHERS"); do
      q=${query//\{i\}/$(printf '%05d' "$i")}
      # curl streams for the phase and a little more; wc counts what arrived.
      curl -sN --max-time "$(( ${DURATION%s} + 4 ))" "http://$http_addr/api/v1/events?$q" \
        > >(wc -c > "$work/watch-$i.bytes") &
      watcher_pids+=("$!")
    done
    sleep 1
  fi
  local cpu0 t0 cpu1 t1 summary
  cpu0=$(cpu_ticks); t0=$(date +%s.%N)
  summary=$("$BIN/device-sim" --hub "http://$addr" --devices "$DEVICES" --rate "$RATE" \
    --duration "$DURATION" --id-prefix "sse-" --summary json --quiet | tail -n1)
  cpu1=$(cpu_ticks); t1=$(date +%s.%N)
  # The watchers drain what was committed, then stop.
  stop_watchers
  local bytes=0
  for f in "$work"/watch-*.bytes; do
    [ -f "$f" ] && bytes=$(( bytes + $(cat "$f") ))
  done
  python3 - "$name" "$summary" "$cpu0" "$cpu1" "$t0" "$t1" "$ticks" "$bytes" "$WATCHERS" "$query" <<'PY'
import json, sys
name, summary = sys.argv[1], json.loads(sys.argv[2])
cpu0, cpu1, t0, t1, ticks = map(float, sys.argv[3:8])
received, watchers, query = int(sys.argv[8]), int(sys.argv[9]), sys.argv[10]
wall = t1 - t0
rate = summary["acked"] / summary["elapsed_s"]
line = (f"{name:<28} stored {rate:>8.0f} readings/s   ack p99 {summary['ack_p99_ms']:>7.1f} ms   "
        f"hub CPU {100 * (cpu1 - cpu0) / ticks / wall:>4.0f} %")
if query != "-":
    line += f"   watchers got {received / wall / 1e6:.1f} MB/s ({received / watchers / wall / 1e3:.0f} kB/s each)"
print(line)
PY
}

echo "$DEVICES devices x $RATE Hz for $DURATION per phase, one hub; $WATCHERS watchers"
phase "no watcher" -
phase "$WATCHERS x one device each" "device=sse-{i}&kinds=readings,commands,presence"
phase "$WATCHERS x every reading" "kinds=readings"
phase "no watcher, again" -
