#!/usr/bin/env bash
# Every figure of the performance table in one run, on this machine:
# the raw sqlx insert baseline, 1000 devices x 100 Hz (ack p50/p99, RSS,
# bytes per reading, quantized and full precision), the same bytes and
# load rates for VictoriaMetrics and InfluxDB on identical data (issue 22;
# skipped where their packages are missing), saturation, 10,000
# devices x 5 Hz (100 and 20 devices per HTTP/2 connection), the hub's
# memory per idle device, the cost of 20 SSE watchers on ingest, the
# machine's PostgreSQL taking the same rows, the hub on PostgreSQL against
# SQLite, one against two hubs, failover after a SIGKILL (issue 12), and
# queries on a backfilled database (a day of 1-minute
# buckets, the same day raw, `hub devices` with 100,000 devices, ingest
# with and without a dashboard load of 20 bucket queries/s), and a fleet's
# 30 days of 1-hour buckets from blocks and from rollups.
#
#   scripts/bench.sh              # the full run (~15 min, 50M readings)
#   SMOKE=1 scripts/bench.sh      # tiny sizes, debug build: CI runs this
#
# Knobs: INGEST_S (60), SAT_S (30), SAT_RATE (600 Hz per device), FLEET_S (25), HUGE_S (90), QDEVICES (100),
# BACKFILL_S (126000 = 35 h at 4 readings/s per device: 50.4M readings),
# EXTRA_DEVICES (to reach 100,000 registered), RAW_ROWS (3000000).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/target-dir.sh
if [ "${SMOKE:-0}" = 1 ]; then
  export BIN=$TARGET/debug; bench_profile=(--profile dev)
  INGEST_S=${INGEST_S:-3}; SAT_S=${SAT_S:-3}; FLEET_S=${FLEET_S:-3}; DEVICES_HEADLINE=20
  FLEET_DEVICES=200; QDEVICES=${QDEVICES:-3}; BACKFILL_S=${BACKFILL_S:-3600}
  EXTRA_DEVICES=${EXTRA_DEVICES:-1000}; RAW_ROWS=${RAW_ROWS:-20000}; PEERS_S=3; ROLLUP_DEVICES=20; ROLLUP_DAYS=2; LINES_DEVICES=20; PROMQL_DEVICES=5; PROMQL_DAYS=1; RUNS=3; DASH_S=3; SSE_DURATION=2s; PG_ROWS=20000; CLUSTER_DURATION=3s
  HUGE_DEVICES=300; HUGE_RATE=2; HUGE_S=4
  smoke_build
else
  export BIN=$TARGET/release; bench_profile=()
  INGEST_S=${INGEST_S:-60}; SAT_S=${SAT_S:-30}; FLEET_S=${FLEET_S:-25}; DEVICES_HEADLINE=1000
  FLEET_DEVICES=10000; QDEVICES=${QDEVICES:-100}; BACKFILL_S=${BACKFILL_S:-126000}
  EXTRA_DEVICES=${EXTRA_DEVICES:-99900}; RAW_ROWS=${RAW_ROWS:-3000000}; PEERS_S=30; ROLLUP_DEVICES=1000; ROLLUP_DAYS=30; LINES_DEVICES=1000; PROMQL_DEVICES=1000; PROMQL_DAYS=30; RUNS=20; DASH_S=20; SSE_DURATION=20s; PG_ROWS=1000000; CLUSTER_DURATION=30s
  HUGE_DEVICES=100000; HUGE_RATE=0.1; HUGE_S=${HUGE_S:-90}
  cargo build --release -q -p hub -p device-sim
fi
bench() { cargo bench -q "${bench_profile[@]}" -p hub --bench "$@" 2>/dev/null; }
section() { printf '\n== %s (%s)\n' "$*" "$(date +%T)"; }

section "raw sqlx insert of the same rows (baseline, no network)"
TOTAL_ROWS=$RAW_ROWS bench raw_insert

section "$DEVICES_HEADLINE devices x 100 Hz, ${INGEST_S}s, values at sensor resolution"
DEVICES=$DEVICES_HEADLINE RATE=100 DURATION=${INGEST_S}s scripts/bench-ingest.sh

section "the same, full-precision values (noise in every bit)"
DEVICES=$DEVICES_HEADLINE RATE=100 DURATION=$(( INGEST_S / 2 + 1 ))s EXTRA_SIM_ARGS=--full-precision \
  scripts/bench-ingest.sh | grep -E "stored|disk"

section "peers: the hub, VictoriaMetrics and InfluxDB on identical data ($DEVICES_HEADLINE devices x 100 Hz, ${PEERS_S}s): bytes per reading after a clean stop, load rates"
DEVICES=$DEVICES_HEADLINE RATE=100 DURATION=${PEERS_S}s scripts/bench-peers.sh 2>/dev/null

SAT_RATE=${SAT_RATE:-600}
section "saturation: $DEVICES_HEADLINE devices x $SAT_RATE Hz offered, ${SAT_S}s"
DEVICES=$DEVICES_HEADLINE RATE=$SAT_RATE DURATION=${SAT_S}s scripts/bench-ingest.sh | grep -E "devices|stored|ack|CPU|RSS"

section "$FLEET_DEVICES devices x 5 Hz, ${FLEET_S}s (hub log at its default, INFO)"
DEVICES=$FLEET_DEVICES RATE=5 DURATION=${FLEET_S}s HUB_RUST_LOG=info scripts/bench-ingest.sh

section "the same over 20 HTTP/2 connections instead of one per 100 devices"
DEVICES=$FLEET_DEVICES RATE=5 DURATION=${FLEET_S}s EXTRA_SIM_ARGS="--connections 20" \
  scripts/bench-ingest.sh | grep -E "devices|stored|ack|CPU|RSS"

section "$HUGE_DEVICES devices x $HUGE_RATE Hz (one connection per 100 devices), ${HUGE_S}s"
DEVICES=$HUGE_DEVICES RATE=$HUGE_RATE DURATION=${HUGE_S}s scripts/bench-ingest.sh |
  grep -E "devices|stored|ack|CPU|RSS"
if [ "${SMOKE:-0}" != 1 ]; then
  section "the same fleet, the hub SIGKILLed and started again: all back, nothing lost"
  DEVICES=$HUGE_DEVICES RATE=$HUGE_RATE DURATION=120s scripts/bench-storm.sh
fi

section "PostgreSQL groundwork: the same rows as multi-row INSERT, UNNEST, COPY, and as encoded blocks"
TOTAL_ROWS=$PG_ROWS bench pg_ingest

section "PostgreSQL backend and several hubs: SQLite vs PostgreSQL, one vs two hubs, failover after a SIGKILL"
DEVICES=$DEVICES_HEADLINE RATE=100 DURATION=$CLUSTER_DURATION SAT_RATE=$SAT_RATE SAT_DURATION=$CLUSTER_DURATION scripts/bench-cluster.sh

section "SSE watchers: ingest with 0 and with 20 watchers of /api/v1/events, one hub"
DEVICES=$DEVICES_HEADLINE RATE=100 DURATION=$SSE_DURATION scripts/bench-sse.sh

section "hub memory per connected, idle device ($FLEET_DEVICES devices)"
DEVICES=$FLEET_DEVICES scripts/bench-devices.sh

section "queries: $QDEVICES devices x 4 sensors backfill ${BACKFILL_S}s of history at 1 Hz per sensor"
db_dir=$(mktemp -d)
export HUB_DB="$db_dir/hub.db"
. scripts/start-hub.sh
cleanup() { kill "$hub_pid" 2>/dev/null || true; rm -rf "$work" "$db_dir"; }
trap cleanup EXIT
target=$(( QDEVICES * 4 * BACKFILL_S ))
load_start_ms=$(( $(date +%s%3N) ))
t0=$(date +%s.%N)
"$BIN/device-sim" --hub "http://$addr" --devices "$QDEVICES" --rate 4 --backfill "${BACKFILL_S}s" \
  --id-prefix bf- --buffer 50000 --batch-max 1000 --quiet >/dev/null 2>&1 &
sim_pid=$!
stored() { "$BIN/hub" stats --hub "http://$addr" --format json | python3 -c 'import json,sys; print(json.load(sys.stdin)["readings_stored"])'; }
while [ "$(stored)" -lt "$target" ]; do sleep 2; done
t1=$(date +%s.%N)
kill -INT "$sim_pid"; wait "$sim_pid" || true
n=$(stored)
python3 -c "import sys; n,a,b=int(sys.argv[1]),float(sys.argv[2]),float(sys.argv[3]); print(f'loaded {n} readings in {b-a:.0f} s: {n/(b-a):.0f} readings/s')" "$n" "$t0" "$t1"
sleep 5   # merges settle
bytes=$(du -cb "$db_dir"/hub.db* | tail -n1 | cut -f1)
python3 -c "import sys; print(f'disk {int(sys.argv[1])/int(sys.argv[2]):.2f} bytes per reading (db + wal) at {int(sys.argv[2])} readings')" "$bytes" "$n"

section "ingest at saturation (1000 x 300 Hz, ${DASH_S}s) without and with 20 bucket queries/s"
live() {
  "$BIN/device-sim" --hub "http://$addr" --devices "$DEVICES_HEADLINE" --rate 300 --duration "${DASH_S}s" \
    --id-prefix "live$1-" --summary json --quiet | tail -n1 |
    python3 -c 'import json,sys; s=json.load(sys.stdin); print(round(s["acked"] / s["elapsed_s"]))'
}
quiet_rate=$(live a)
HUB_ADDR="http://$addr" DEVICES=$QDEVICES MODE=dashboard QPS=20 SECONDS=$DASH_S \
  UNTIL_MS=$load_start_ms bench query_load > "$db_dir/dash.txt" &
dash_pid=$!
busy_rate=$(live b)
wait "$dash_pid"
cat "$db_dir/dash.txt"
python3 -c "import sys; q,b=float(sys.argv[1]),float(sys.argv[2]); print(f'ingest without queries {q:.0f}/s, with {b:.0f}/s: ratio {b/q:.2f}')" "$quiet_rate" "$busy_rate"

section "queries, cold (hub restarted, page cache dropped) then warm; $(( QDEVICES + EXTRA_DEVICES )) devices registered"
kill -INT "$hub_pid"; wait "$hub_pid" || true
python3 - "$HUB_DB" "$EXTRA_DEVICES" <<'PY'
import sqlite3, sys
db = sqlite3.connect(sys.argv[1])
db.executemany("INSERT INTO devices (external_id, firmware, tags, first_seen_ms, last_seen_ms) VALUES (?, 'bench', '{}', 0, 0)",
               ((f"idle-{i:06}",) for i in range(int(sys.argv[2]))))
db.commit()
PY
sync; (echo 3 > /proc/sys/vm/drop_caches) 2>/dev/null || echo "(page cache not dropped: not root)"
rm -rf "$work"
. scripts/start-hub.sh
HUB_ADDR="http://$addr" DEVICES=$QDEVICES RUNS=$RUNS UNTIL_MS=$load_start_ms bench query_load

section "twin (issue 20): desired round trip idle and under load, reported patches, fleet filters on both backends"
kill -INT "$hub_pid" 2>/dev/null; wait "$hub_pid" 2>/dev/null || true
scripts/bench-twin.sh

section "rollups (issue 22): $ROLLUP_DEVICES devices x $ROLLUP_DAYS days of one sensor, a reading a minute; every device's range as 1-hour buckets, from blocks and from a 1-hour rollup"
DEVICES=$ROLLUP_DEVICES DAYS=$ROLLUP_DAYS BENCH_PROFILE="${bench_profile[*]:-}" scripts/bench-rollups.sh

section "alarms (issue 21): ingest with rules against without, reading-to-webhook latency, inactivity checks"
scripts/bench-alarms.sh

section "line protocol (issue 23): $LINES_DEVICES devices' backlog through POST /api/v1/write (plain, gzip) against gRPC backfill, the same count"
DEVICES=$LINES_DEVICES RATE=100 SECONDS=$PEERS_S BENCH_PROFILE="${bench_profile[*]:-}" scripts/bench-lines.sh

section "Prometheus query API (issue 23) against VictoriaMetrics: $PROMQL_DEVICES devices x $PROMQL_DAYS days, a reading a minute, the same queries"
DEVICES=$PROMQL_DEVICES DAYS=$PROMQL_DAYS scripts/bench-promql-peers.sh
