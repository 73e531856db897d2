#!/usr/bin/env bash
# Line-protocol ingest (POST /api/v1/write, issue 23) against the gRPC bulk
# path, in one run on the same count of readings: a fresh hub takes
# DEVICES devices' backlog of SECONDS at RATE readings/s each as lines
# (250 lines of 4 fields a request, WORKERS then MANY_WORKERS clients, plain,
# then gzip), then
# a fresh hub takes the same count from device-sim --backfill in
# 1000-reading batches. Both acked after the commit.
#
#   DEVICES=1000 RATE=100 SECONDS=30 scripts/bench-lines.sh
# BIN: built binaries (default: a release build); BENCH_PROFILE: cargo
# bench's profile flags (SMOKE passes "--profile dev").
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICES=${DEVICES:-1000}
RATE=${RATE:-100}
SECONDS_OF_DATA=${SECONDS:-30}
WORKERS=${WORKERS:-8}
MANY_WORKERS=${MANY_WORKERS:-64}
. scripts/target-dir.sh
BIN=${BIN:-$TARGET/release}
[ "$BIN" = "$TARGET/release" ] && cargo build --release -q -p hub -p device-sim
# The bench client, built once and run directly (no rebuild between runs).
# shellcheck disable=SC2086
client=$(cargo bench -q ${BENCH_PROFILE:-} -p hub --bench line_write --no-run --message-format json 2>/dev/null |
  python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "line_write" and m.get("executable"):
        print(m["executable"])')
stop() { kill -INT "$1" 2>/dev/null; wait "$1" 2>/dev/null || true; }
stored() { "$BIN/hub" stats --hub "http://$addr" --format json | python3 -c 'import json,sys; print(json.load(sys.stdin)["readings_stored"])'; }

# A write is answered after its commit, so a client's rate is its
# concurrency over the commit latency: WORKERS (8) writers, then
# MANY_WORKERS (64, nearer the 1000 streams of the gRPC run), plain and
# gzip.
for run in "0 $WORKERS" "0 $MANY_WORKERS" "1 $MANY_WORKERS"; do
  read -r gz workers <<<"$run"
  . scripts/start-hub.sh
  printf '%s writers: ' "$workers"
  HUB_HTTP="http://$http_addr" DEVICES=$DEVICES RATE=$RATE SECONDS=$SECONDS_OF_DATA WORKERS=$workers GZIP=$gz \
    "$client" --bench
  stop "$hub_pid"; rm -rf "$work"
done

. scripts/start-hub.sh
target=$(( DEVICES * RATE * SECONDS_OF_DATA ))
t0=$(date +%s.%N)
"$BIN/device-sim" --hub "http://$addr" --devices "$DEVICES" --rate "$RATE" --backfill "${SECONDS_OF_DATA}s" \
  --batch-max 1000 --buffer 50000 --quiet >/dev/null 2>&1 &
sim=$!
# Until all are stored, or nothing more comes for 3 s (a short backfill
# may hold a few readings fewer than the product).
last=-1; still=0
while n=$(stored); [ "$n" -lt "$target" ]; do
  if [ "$n" = "$last" ]; then still=$((still + 1)); else still=0; last=$n; fi
  # Stalled: after some were stored, or with the simulator gone.
  if [ "$still" -ge 15 ] && { [ "$n" -gt 0 ] || ! kill -0 "$sim" 2>/dev/null; }; then break; fi
  sleep 0.2
done
t1=$(date +%s.%N)
n=$(stored)
kill -INT "$sim" 2>/dev/null || true; wait "$sim" 2>/dev/null || true
stop "$hub_pid"; rm -rf "$work"
python3 -c "import sys; n,a,b=int(sys.argv[1]),float(sys.argv[2]),float(sys.argv[3]); print(f'grpc_backfill readings {n} in {b-a:.1f} s: {n/(b-a):.0f} readings/s (device-sim --backfill, 1000-reading batches)')" "$n" "$t0" "$t1"
