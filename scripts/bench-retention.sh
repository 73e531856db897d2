#!/usr/bin/env bash
# Ingest with and without retention running, in one run: `hub serve` with
# storage.retention = RETENTION under a saturating fleet. Until RETENTION
# has passed nothing is old enough to delete; after it, retention deletes
# as fast as readings arrive. Prints stored readings/s in both phases and
# their ratio.
#
#   scripts/bench-retention.sh           # 1000 devices x 300 Hz, 20 s retention, 70 s
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/target-dir.sh
DEVICES=${DEVICES:-1000}
RATE=${RATE:-300}
RETENTION=${RETENTION:-20}
DURATION=${DURATION:-70}

cargo build --release -q -p hub -p device-sim
HUB_ENV="HUB__STORAGE__RETENTION=${RETENTION}s ${HUB_ENV:-}"
. scripts/start-hub.sh
trap 'kill "$hub_pid" 2>/dev/null || true; rm -rf "$work"' EXIT

samples="$work/samples"
"$TARGET"/release/device-sim --hub "http://$addr" --devices "$DEVICES" --rate "$RATE" \
  --duration "${DURATION}s" --summary json --quiet >"$work/sim.json" &
sim_pid=$!
t0=$(date +%s.%N)
while kill -0 "$sim_pid" 2>/dev/null; do
  now=$(date +%s.%N)
  "$TARGET"/release/hub stats --hub "http://$addr" --format json 2>/dev/null |
    python3 -c "import json, sys; s = json.load(sys.stdin); print($now - $t0, s['readings_committed'], s['readings_stored'])" \
    >>"$samples" || true
  sleep 2
done
wait "$sim_pid" || true
kill -INT "$hub_pid"; wait "$hub_pid" || true

python3 - "$samples" "$RETENTION" "$DURATION" "$(tail -n1 "$work/sim.json")" <<'PY'
import json, sys
rows = [tuple(map(float, l.split())) for l in open(sys.argv[1]) if l.strip()]
retention, duration = float(sys.argv[2]), float(sys.argv[3])
s = json.loads(sys.argv[4])
def rate(a, b):
    window = [r for r in rows if a <= r[0] <= b]
    (t1, c1, _), (t2, c2, _) = window[0], window[-1]
    return (c2 - c1) / (t2 - t1)
before = rate(5, retention)
during = rate(retention + 5, duration - 5)
deleted = rows[-1][1] - rows[-1][2]
print(f"stored readings/s without retention work (5..{retention:.0f} s): {before:.0f}")
print(f"stored readings/s while retention deletes ({retention + 5:.0f}..{duration - 5:.0f} s): {during:.0f}")
print(f"ratio with / without: {during / before:.2f}")
print(f"readings deleted by retention: {deleted:.0f}; fleet: sent {s['sent']} acked {s['acked']} "
      f"lost_acks {s['lost_acks']} ack p99 {s['ack_p99_ms']:.0f} ms")
PY
