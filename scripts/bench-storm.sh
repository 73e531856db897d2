#!/usr/bin/env bash
# Reconnect storm: DEVICES simulated devices stream to `hub serve` (release,
# default settings); the hub is SIGKILLed and started again on the same port
# and database, and every device comes back at once. Prints how long until
# all are online again, the restarted hub's peak RSS, and the fleet's
# summary (lost_acks must be 0: no acked reading lost).
#
#   scripts/bench-storm.sh                 # 5000 devices at 1 Hz
#   DEVICES=10000 RATE=5 scripts/bench-storm.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/target-dir.sh
DEVICES=${DEVICES:-5000}
RATE=${RATE:-1}
DURATION=${DURATION:-90s}

cargo build --release -q -p hub -p device-sim
work=$(mktemp -d)
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
url="http://127.0.0.1:$port"
hub_pid=""
sim_pid=""
trap 'kill -9 "$hub_pid" "$sim_pid" 2>/dev/null || true; rm -rf "$work"' EXIT

start_hub() {
  HUB__SERVER__LISTEN="127.0.0.1:$port" HUB__HTTP__ENABLED=false HUB__STORAGE__PATH="$work/hub.db" RUST_LOG=warn \
    "$TARGET"/release/hub serve >>"$work/hub.log" 2>&1 &
  hub_pid=$!
}
live() {
  "$TARGET"/release/hub stats --hub "$url" --format json 2>/dev/null |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["live_sessions"])' 2>/dev/null || echo 0
}
now() { date +%s.%N; }
wait_all_online() {
  for _ in $(seq 1 1200); do
    [ "$(live)" -ge "$DEVICES" ] && return 0
    sleep 0.1
  done
  echo "not all devices online: $(live) of $DEVICES"; tail -n 20 "$work/hub.log"; exit 1
}

start_hub
"$TARGET"/release/device-sim --hub "$url" --devices "$DEVICES" --rate "$RATE" \
  --duration "$DURATION" --summary json --quiet >"$work/sim.json" &
sim_pid=$!
t_start=$(now)
wait_all_online
t_first=$(now)
sleep 5
kill -9 "$hub_pid"; wait "$hub_pid" 2>/dev/null || true
t_kill=$(now)
start_hub
wait_all_online
t_back=$(now)
rss_peak=$(awk '/VmHWM/ {print $2}' "/proc/$hub_pid/status")
wait "$sim_pid" || true
sim_pid=""
kill -INT "$hub_pid"; wait "$hub_pid" || true

python3 - "$(tail -n1 "$work/sim.json")" "$t_start" "$t_first" "$t_kill" "$t_back" "$rss_peak" "$DEVICES" <<'PY'
import json, sys
s = json.loads(sys.argv[1])
t_start, t_first, t_kill, t_back = map(float, sys.argv[2:6])
rss_peak, devices = int(sys.argv[6]), int(sys.argv[7])
print(f"{devices} devices: first connect {t_first - t_start:.1f} s; after SIGKILL all back in {t_back - t_kill:.1f} s")
print(f"restarted hub peak RSS {rss_peak / 1024:.0f} MiB")
print(f"fleet: sent {s['sent']} acked {s['acked']} lost_acks {s['lost_acks']} bad_acks {s['bad_acks']} "
      f"reconnects {s['reconnects']} clean {s['clean_devices']}/{s['devices']} ack p99 {s['ack_p99_ms']:.0f} ms")
PY
