#!/usr/bin/env bash
# Twin figures (issue 20), release builds, default settings:
# - the round trip desired change -> device holds it -> its report acked,
#   idle and while LOAD_DEVICES x LOAD_RATE Hz stream readings;
# - reported patches from REPORT_DEVICES devices, one each every
#   INTERVAL_MS, with the hub's CPU;
# - fleet filters over FILTER_DEVICES registered twin devices, on SQLite and
#   (when the machine's PostgreSQL answers) on PostgreSQL.
#
#   scripts/bench-twin.sh
#   SMOKE=1 scripts/bench-twin.sh   # tiny sizes, debug build (CI)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/target-dir.sh
if [ "${SMOKE:-0}" = 1 ]; then
  BIN=$TARGET/debug; profile=(--profile dev)
  LOAD_DEVICES=20; LOAD_RATE=10; ROUNDS=20; REPORT_DEVICES=50; REPORT_S=3; INTERVAL_MS=500; FILTER_DEVICES=300
  smoke_build
else
  BIN=$TARGET/release; profile=()
  LOAD_DEVICES=${LOAD_DEVICES:-1000}; LOAD_RATE=${LOAD_RATE:-100}; ROUNDS=${ROUNDS:-300}
  REPORT_DEVICES=${REPORT_DEVICES:-10000}; REPORT_S=${REPORT_S:-30}; INTERVAL_MS=${INTERVAL_MS:-10000}
  FILTER_DEVICES=${FILTER_DEVICES:-100000}
  cargo build --release -q -p hub -p device-sim
fi
export BIN
cargo bench -q "${profile[@]}" -p hub --bench twin --no-run 2>/dev/null
twin() { cargo bench -q "${profile[@]}" -p hub --bench twin 2>/dev/null; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

. scripts/start-hub.sh
sim_pid=""
pg_db=""
cleanup() {
  kill "$sim_pid" "$hub_pid" 2>/dev/null || true
  [ -n "$pg_db" ] && psql -qtA -h 127.0.0.1 -U postgres -d test -c "DROP DATABASE IF EXISTS $pg_db WITH (FORCE)" >/dev/null 2>&1
  rm -rf "$work"
}
trap cleanup EXIT
url="http://$addr"

echo "-- round trip, idle hub"
HUB_ADDR=$url MODE=rtt ROUNDS=$ROUNDS twin

echo "-- round trip, $LOAD_DEVICES devices x $LOAD_RATE Hz streaming"
"$BIN/device-sim" --hub "$url" --devices "$LOAD_DEVICES" --rate "$LOAD_RATE" --duration 1h --quiet >"$work/sim.log" 2>&1 &
sim_pid=$!
sleep 5
before=$("$BIN/hub" stats --hub "$url" --format json)
HUB_ADDR=$url MODE=rtt ROUNDS=$ROUNDS twin
after=$("$BIN/hub" stats --hub "$url" --format json)
python3 - "$before" "$after" <<'PY'
import json, sys
b, a = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(f"   (readings committed meanwhile: {a['readings_committed'] - b['readings_committed']})")
PY
kill -INT "$sim_pid"; wait "$sim_pid" || true; sim_pid=""

echo "-- reported patches: $REPORT_DEVICES devices, one each every ${INTERVAL_MS} ms, ${REPORT_S}s"
t0=$(cpu_ticks "$hub_pid"); s0=$(date +%s.%N)
HUB_ADDR=$url MODE=reports DEVICES=$REPORT_DEVICES INTERVAL_MS=$INTERVAL_MS SECONDS=$REPORT_S CONNECTIONS=100 twin
t1=$(cpu_ticks "$hub_pid"); s1=$(date +%s.%N)
python3 -c "import sys,os; t=(int(sys.argv[2])-int(sys.argv[1]))/os.sysconf('SC_CLK_TCK'); print(f'   hub CPU {100*t/(float(sys.argv[4])-float(sys.argv[3])):.0f}% of one core (connecting included), RSS {int(open(\"/proc/{}/status\".format(sys.argv[5])).read().split(\"VmRSS:\")[1].split()[0])//1024} MiB')" "$t0" "$t1" "$s0" "$s1" "$hub_pid"

echo "-- fleet filters over $FILTER_DEVICES devices, SQLite"
HUB_ADDR=$url MODE=filter DEVICES=$FILTER_DEVICES twin
kill -INT "$hub_pid"; wait "$hub_pid" || true

if psql -qtA -h 127.0.0.1 -U postgres -d test -c "SELECT 1" >/dev/null 2>&1; then
  pg_db="twin_bench_$$"
  psql -qtA -h 127.0.0.1 -U postgres -d test -c "CREATE DATABASE $pg_db" >/dev/null
  rm -rf "$work"
  HUB_ENV="HUB__STORAGE__BACKEND=postgres HUB__STORAGE__URL=postgres://postgres@127.0.0.1:5432/$pg_db" . scripts/start-hub.sh
  echo "-- fleet filters over $FILTER_DEVICES devices, PostgreSQL"
  HUB_ADDR="http://$addr" MODE=filter DEVICES=$FILTER_DEVICES twin
else
  echo "-- (PostgreSQL not reachable at 127.0.0.1:5432: its filters not measured)"
fi
