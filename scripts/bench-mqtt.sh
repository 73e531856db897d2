#!/usr/bin/env bash
# Committed readings/s with the MQTT bridge disabled and enabled, in one run
# (same machine, same load, one after the other), and the ratio.
# The bridge publishes to the Mosquitto on 127.0.0.1:1883, which must run.
#
#   scripts/bench-mqtt.sh                       # 1000 devices x 300 Hz, 30 s each
#   DEVICES=500 RATE=200 DURATION=20s scripts/bench-mqtt.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export DEVICES=${DEVICES:-1000} RATE=${RATE:-300} DURATION=${DURATION:-30s}
prefix="bench-$$"
# A subscriber on everything the bridge publishes, so the broker really
# delivers every message.
if command -v mosquitto_sub >/dev/null 2>&1; then
  mosquitto_sub -h 127.0.0.1 -t "$prefix/#" -q 0 >/dev/null &
  sub_pid=$!
  trap 'kill $sub_pid 2>/dev/null || true' EXIT
fi

rate_of() { sed -n 's/^stored readings\/s *\([0-9]*\).*/\1/p'; }
echo "== bridge disabled"
off=$(HUB_ENV="HUB__MQTT__ENABLED=false" scripts/bench-ingest.sh | tee -a /dev/stderr | rate_of)
echo "== bridge enabled"
on=$(HUB_ENV="HUB__MQTT__ENABLED=true HUB__MQTT__TOPIC_PREFIX=$prefix" \
  scripts/bench-ingest.sh | tee -a /dev/stderr | rate_of)
python3 -c "import sys; off, on = int(sys.argv[1]), int(sys.argv[2]); print(f'committed readings/s: bridge off {off}, on {on}, ratio {on / off:.2f}')" "$off" "$on"
