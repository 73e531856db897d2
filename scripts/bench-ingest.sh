#!/usr/bin/env bash
# End-to-end ingest benchmark: `hub serve` (release, default settings,
# synchronous=FULL) and `device-sim` as two processes on this machine.
# Prints readings/s stored, ack latency p50/p99, hub RSS and CPU.
#
#   scripts/bench-ingest.sh                      # 1000 devices x 100 Hz, 60 s
#   DEVICES=200 RATE=50 DURATION=20s scripts/bench-ingest.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICES=${DEVICES:-1000}
RATE=${RATE:-100}
DURATION=${DURATION:-60s}
EXTRA_SIM_ARGS=${EXTRA_SIM_ARGS:-}
HUB_ENV=${HUB_ENV:-}  # extra HUB__* settings, e.g. HUB_ENV="HUB__INGEST__MAX_BATCH_ROWS=65536"
# PG_DB: a PostgreSQL database (at 127.0.0.1:5432, user postgres) to store
# into instead of SQLite; it should be empty.
if [ -n "${PG_DB:-}" ]; then
  HUB_ENV="$HUB_ENV HUB__STORAGE__BACKEND=postgres HUB__STORAGE__URL=postgres://postgres@127.0.0.1:5432/$PG_DB"
fi

. scripts/target-dir.sh
BIN=${BIN:-$TARGET/release}
[ "$BIN" = "$TARGET/release" ] && cargo build --release -q -p hub -p device-sim
. scripts/start-hub.sh
trap 'kill "$hub_pid" 2>/dev/null || true; rm -rf "$work"' EXIT

ticks=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$hub_pid/stat"; }
cpu0=$(cpu_ticks); t0=$(date +%s.%N)
# device-sim exits non-zero when a device ends unclean (e.g. its drain
# timed out past saturation): the summary says so, the bench goes on.
summary=$("$BIN/device-sim" --hub "http://$addr" --devices "$DEVICES" --rate "$RATE" \
  --duration "$DURATION" --summary json --quiet $EXTRA_SIM_ARGS | tail -n1 || true)
cpu1=$(cpu_ticks); t1=$(date +%s.%N)
rss_now=$(awk '/VmRSS/ {print $2}' "/proc/$hub_pid/status")
rss_peak=$(awk '/VmHWM/ {print $2}' "/proc/$hub_pid/status")
stats=$("$BIN/hub" stats --hub "http://$addr" --format json)
kill -INT "$hub_pid"; wait "$hub_pid" || true
if [ -n "${PG_DB:-}" ]; then
  db_bytes=$(psql -qtA -h 127.0.0.1 -U postgres -d "$PG_DB" -c "SELECT pg_database_size(current_database())")
  block_bytes=$(psql -qtA -h 127.0.0.1 -U postgres -d "$PG_DB" -c "SELECT coalesce(sum(length(data)), 0) FROM blocks")
else
  db_bytes=$(du -cb "$work"/hub.db* | tail -n1 | cut -f1)
fi
info_lines=$(grep -c " INFO " "$work/hub.log" || true)

python3 - "$summary" "$stats" "$cpu0" "$cpu1" "$t0" "$t1" "$ticks" "$rss_now" "$rss_peak" "$db_bytes" "$info_lines" "${block_bytes:--1}" <<'PY'
import json, sys
s = json.loads(sys.argv[1]); st = json.loads(sys.argv[2])
cpu0, cpu1, t0, t1, ticks = map(float, sys.argv[3:8])
rss_now, rss_peak, db_bytes, info_lines, block_bytes = map(int, sys.argv[8:13])
wall = t1 - t0
print(f"devices {s['devices']} clean {s['clean_devices']}  sent {s['sent']}  acked {s['acked']}  "
      f"dropped_at_source {s['dropped_at_source']}  reconnects {s['reconnects']}")
print(f"stored readings/s      {s['acked'] / s['elapsed_s']:.0f}  (over {s['elapsed_s']:.1f} s incl. drain)")
print(f"ack latency            p50 {s['ack_p50_ms']:.1f} ms   p99 {s['ack_p99_ms']:.1f} ms")
if s.get('steady_p99_ms'):
    print(f"ack latency, steady    p50 {s['steady_p50_ms']:.1f} ms   p99 {s['steady_p99_ms']:.1f} ms  (batches sent once every device had been online 10 s and two sampling periods, acked before the sim was told to stop)")
print(f"hub CPU                {100 * (cpu1 - cpu0) / ticks / wall:.0f} % of one core")
print(f"hub RSS                {rss_now / 1024:.0f} MiB now, {rss_peak / 1024:.0f} MiB peak")
print(f"commits                {st['commits']}  ({st['readings_committed'] / max(st['commits'], 1):.0f} rows per commit)")
print(f"disk                   {db_bytes / max(st['readings_stored'], 1):.1f} bytes per reading (db + wal; PostgreSQL: the database, staging's dead rows until autovacuum included)")
if block_bytes >= 0:
    print(f"blocks                 {block_bytes / max(st['readings_stored'], 1):.1f} bytes per reading in compressed blocks (data only)")
print(f"hub log                {info_lines} INFO lines")
if st.get('mqtt_connected') or st.get('mqtt_dropped'):
    print(f"mqtt                   connected {st.get('mqtt_connected', False)}, dropped {st.get('mqtt_dropped', 0)} messages")
PY
