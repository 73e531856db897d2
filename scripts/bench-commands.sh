#!/usr/bin/env bash
# Command round-trip latency (operator send -> SUCCEEDED seen by the
# operator) with a fleet of simulated devices connected to `hub serve`,
# idle and while they stream readings. Release builds, default settings.
#
#   scripts/bench-commands.sh                 # 1000 devices; idle, then 100 Hz each
#   DEVICES=200 LOAD_RATE=50 scripts/bench-commands.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/target-dir.sh
DEVICES=${DEVICES:-1000}
LOAD_RATE=${LOAD_RATE:-100}
COMMANDS=${COMMANDS:-500}

cargo build --release -q -p hub -p device-sim
cargo bench -q -p hub --bench command_rtt --no-run 2>/dev/null
. scripts/start-hub.sh
sim_pid=""
trap 'kill "$sim_pid" "$hub_pid" 2>/dev/null || true; rm -rf "$work"' EXIT
url="http://$addr"

run_with_rate() {
  local rate=$1 label=$2
  "$TARGET"/release/device-sim --hub "$url" --devices "$DEVICES" --rate "$rate" --duration 1h --quiet \
    >"$work/sim.log" 2>&1 &
  sim_pid=$!
  for _ in $(seq 1 300); do
    live=$("$TARGET"/release/hub stats --hub "$url" --format json | python3 -c 'import json,sys; print(json.load(sys.stdin)["live_sessions"])')
    [ "$live" -ge "$DEVICES" ] && break
    sleep 0.1
  done
  sleep 3  # let the load settle
  before=$("$TARGET"/release/hub stats --hub "$url" --format json)
  printf '%-28s ' "$label:"
  HUB_ADDR="$url" DEVICES="$DEVICES" COMMANDS="$COMMANDS" cargo bench -q -p hub --bench command_rtt 2>/dev/null
  after=$("$TARGET"/release/hub stats --hub "$url" --format json)
  python3 - "$before" "$after" <<'PY'
import json, sys
b, a = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(f"{'':29}readings committed meanwhile: {a['readings_committed'] - b['readings_committed']}")
PY
  kill -INT "$sim_pid"; wait "$sim_pid" || true; sim_pid=""
}

run_with_rate 0 "$DEVICES devices idle"
run_with_rate "$LOAD_RATE" "$DEVICES devices x $LOAD_RATE Hz"
