#!/usr/bin/env bash
# Memory per connected device: `hub serve` (default settings) with DEVICES
# simulated devices that stay connected but send almost nothing (one
# reading every 20 s), sharing HTTP/2 connections the simulator's default
# way (100 devices per connection). Prints the hub's RSS before and with
# them, and the difference per device.
#
#   scripts/bench-devices.sh                 # 10,000 devices
#   DEVICES=1000 scripts/bench-devices.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICES=${DEVICES:-10000}
. scripts/target-dir.sh
BIN=${BIN:-$TARGET/release}
[ "$BIN" = "$TARGET/release" ] && cargo build --release -q -p hub -p device-sim
. scripts/start-hub.sh
sim_pid=""
# Stop both and wait for them: the next benchmark must not share the
# machine with a hub still closing 10,000 streams.
cleanup() {
  kill -INT $sim_pid "$hub_pid" 2>/dev/null || true
  wait $sim_pid "$hub_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

rss() { awk '/VmRSS/ {print $2}' "/proc/$hub_pid/status"; }
live() {
  "$BIN/hub" stats --hub "http://$addr" --format json |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["live_sessions"])'
}
rss_before=$(rss)
"$BIN/device-sim" --hub "http://$addr" --devices "$DEVICES" --rate 0.05 --quiet >/dev/null 2>&1 &
sim_pid=$!
for _ in $(seq 1 600); do
  [ "$(live)" -ge "$DEVICES" ] && break
  sleep 0.2
done
[ "$(live)" -ge "$DEVICES" ] || { echo "only $(live) of $DEVICES devices connected"; exit 1; }
sleep 3   # registrations committed, first readings in
rss_with=$(rss)
echo "hub RSS ${rss_before} KiB alone, ${rss_with} KiB with $DEVICES idle devices:" \
  "$(( (rss_with - rss_before) * 1024 / DEVICES )) bytes per idle device"
