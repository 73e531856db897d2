#!/usr/bin/env bash
# Rollups (issue 22): DEVICES devices backfill DAYS days of one sensor, a
# reading every STEP_S seconds; then every device's whole range as 1-hour
# buckets (MODE=fleet of the query_load bench), read from blocks, and
# again once storage.rollups (ROLLUPS, default [1h]) is configured and
# built. Prints
# the load rate, the build time and rollup bytes, and the fleet query's
# wall time and per-query p50/p99 both ways; and the same through the
# Prometheus query API (issue 23): query_range of every device's 30 days
# as avg_over_time(temperature[1h]) at a 1 h step, and of one device's
# last day (raw at a 60 s step, and 5-minute averages), best of 3.
#
#   scripts/bench-rollups.sh                       # 1000 devices x 30 days, a reading a minute
#   DEVICES=50 DAYS=2 scripts/bench-rollups.sh     # what SMOKE=1 bench.sh runs
# BIN: where hub and device-sim are (default target/release, built);
# BENCH_PROFILE: cargo bench's profile arguments (bench.sh passes them).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/target-dir.sh
DEVICES=${DEVICES:-1000}
DAYS=${DAYS:-30}
STEP_S=${STEP_S:-60}
CONCURRENCY=${CONCURRENCY:-4}
BIN=${BIN:-$TARGET/release}
[ "$BIN" = "$TARGET/release" ] && cargo build --release -q -p hub -p device-sim
read -r -a bench_profile <<<"${BENCH_PROFILE:-}"

db_dir=$(mktemp -d)
export HUB_DB="$db_dir/hub.db"
ROLLUPS=${ROLLUPS:-'[{ every = "1h", keep = "0s" }]'}
printf '[storage]\nrollups = %s\n' "$ROLLUPS" >"$db_dir/rollups.toml"
wanted=$(grep -o every "$db_dir/rollups.toml" | wc -l)
hub_pid=""
cleanup() { [ -n "$hub_pid" ] && kill "$hub_pid" 2>/dev/null; rm -rf "${work:-}" "$db_dir"; }
trap cleanup EXIT
stop_hub() { kill -INT "$hub_pid"; wait "$hub_pid" || true; rm -rf "$work"; hub_pid=""; }
stored() { "$BIN/hub" stats --hub "http://$addr" --format json | python3 -c 'import json,sys; print(json.load(sys.stdin)["readings_stored"])'; }
db_bytes() { du -cb "$db_dir"/hub.db* | tail -n1 | cut -f1; }
fleet() {
  HUB_ADDR="http://$addr" MODE=fleet DEVICES=$DEVICES DAYS=$DAYS CONCURRENCY=$CONCURRENCY DEVICE_PREFIX=fl- \
    SENSOR=temperature UNTIL_MS=$until_ms cargo bench -q "${bench_profile[@]}" -p hub --bench query_load 2>/dev/null
}

# prom: the Prometheus API's query_range timings, best of 3 each.
prom() {
  python3 - "http://$http_addr" "$until_ms" "$DAYS" <<'PY'
import json, sys, time, urllib.parse, urllib.request
base, until_ms, days = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
end = until_ms // 3_600_000 * 3600
def run(label, query, start, step):
    best, series, points = None, 0, 0
    for _ in range(3):
        body = urllib.parse.urlencode({"query": query, "start": start, "end": end, "step": step}).encode()
        t = time.perf_counter()
        with urllib.request.urlopen(urllib.request.Request(base + "/api/v1/query_range", data=body), timeout=600) as r:
            body = r.read()
        # The answer's time, not this client's JSON parsing.
        took = time.perf_counter() - t
        data = json.loads(body)
        assert data["status"] == "success", data
        series = len(data["data"]["result"])
        points = sum(len(s["values"]) for s in data["data"]["result"])
        best = took if best is None else min(best, took)
    print(f"prom query_range {label}: {best * 1000:.0f} ms ({series} series, {points} points)")
run(f"fleet x {days} d, avg_over_time(temperature[1h]) step 1h", "avg_over_time(temperature[1h])", end - days * 86400, 3600)
run("1 device x 1 d, raw step 60s", 'temperature{device="fl-00001"}', end - 86400, 60)
run("1 device x 1 d, avg_over_time(temperature[5m]) step 5m", 'avg_over_time(temperature{device="fl-00001"}[5m])', end - 86400, 300)
PY
}

. scripts/start-hub.sh
per_device=$(( DAYS * 86400 / STEP_S ))
target=$(( DEVICES * per_device ))
until_ms=$(( $(date +%s%3N) ))
t0=$(date +%s.%N)
"$BIN/device-sim" --hub "http://$addr" --devices "$DEVICES" --sensors temperature \
  --rate "$(python3 -c "print(1 / $STEP_S)")" --backfill "${DAYS}days" --id-prefix fl- \
  --buffer 50000 --batch-max 1000 --quiet >/dev/null 2>&1 &
sim_pid=$!
while [ "$(stored)" -lt "$target" ]; do sleep 1; done
t1=$(date +%s.%N)
kill -INT "$sim_pid"; wait "$sim_pid" || true
n=$(stored)
python3 -c "import sys; n,a,b=int(sys.argv[1]),float(sys.argv[2]),float(sys.argv[3]); print(f'loaded {n} readings ({sys.argv[4]} devices x {sys.argv[5]} days, one every {sys.argv[6]} s) in {b-a:.0f} s: {n/(b-a):.0f} readings/s')" \
  "$n" "$t0" "$t1" "$DEVICES" "$DAYS" "$STEP_S"
staged=$(python3 -c "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); print(sum(c.execute(f'SELECT count(*) FROM readings_recent_{i}').fetchone()[0] for i in range(8)))" "$HUB_DB")
echo "-- just loaded, from blocks and $staged staged readings (a live hub's state)"
prom
stop_hub
before=$(db_bytes)

echo "-- from blocks (no rollups)"
. scripts/start-hub.sh
fleet
prom
stop_hub

echo "-- with storage.rollups = $ROLLUPS"
HUB_CONFIG="$db_dir/rollups.toml" . scripts/start-hub.sh
t0=$(date +%s.%N)
ready() { python3 -c "import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute('SELECT count(*) FROM rollup_defs WHERE ready = 1').fetchone()[0])" "$HUB_DB"; }
while [ "$(ready)" -lt "$wanted" ]; do sleep 0.2; done
t1=$(date +%s.%N)
rows=$(python3 -c "import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute('SELECT count(*) FROM rollups').fetchone()[0])" "$HUB_DB")
python3 -c "import sys; n,a,b,r=int(sys.argv[1]),float(sys.argv[2]),float(sys.argv[3]),int(sys.argv[4]); print(f'rollups built from {n} stored readings in {b-a:.1f} s ({n/(b-a):.0f} readings/s): {r} rows')" \
  "$n" "$t0" "$t1" "$rows"
fleet
prom
stop_hub
after=$(db_bytes)
python3 -c "import sys; b,a,n,r=map(int,sys.argv[1:5]); print(f'database {b/n:.2f} bytes per reading without rollups, {a/n:.2f} with ({(a-b)/max(r,1):.0f} bytes per rollup row)')" \
  "$before" "$after" "$n" "$rows"
