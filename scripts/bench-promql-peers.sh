#!/usr/bin/env bash
# The Prometheus query API against VictoriaMetrics (issue 23), on the same
# data and queries in one run: DEVICES devices x DAYS days of one sensor,
# a reading a minute, the same line-protocol bodies posted to both (the
# hub's /api/v1/write, VictoriaMetrics' /write); then query_range through
# each one's Prometheus API, best of 3 (VictoriaMetrics with nocache=1):
# every device's range as avg_over_time(...[1h]) at a 1 h step, one
# device's last day raw at a 60 s step, and its 5-minute averages. Skipped
# with a message without Debian's victoria-metrics.
#
#   DEVICES=1000 DAYS=30 scripts/bench-promql-peers.sh
# BIN: built binaries (default: a release build); HUB_CONFIG: a settings
# file for the hub (e.g. storage.rollups).
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICES=${DEVICES:-1000}
DAYS=${DAYS:-30}
if ! command -v victoria-metrics >/dev/null; then
  echo "SKIPPED: victoria-metrics not installed (apt-get install victoria-metrics)"
  exit 0
fi
. scripts/target-dir.sh
BIN=${BIN:-$TARGET/release}
[ "$BIN" = "$TARGET/release" ] && cargo build --release -q -p hub -p device-sim
vm_dir=$(mktemp -d)
vm_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
victoria-metrics -storageDataPath="$vm_dir" -httpListenAddr="127.0.0.1:$vm_port" \
  -retentionPeriod=100y -search.latencyOffset=0s -loggerLevel=ERROR >"$vm_dir.log" 2>&1 &
vm_pid=$!
# A backfill: past the per-device rate of live writers.
HUB_ENV="${HUB_ENV:-} HUB__SERVER__MAX_READINGS_PER_SEC=100000000" . scripts/start-hub.sh
cleanup() { kill "$vm_pid" "$hub_pid" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$vm_dir" "$vm_dir.log" "$work"; }
trap cleanup EXIT
for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$vm_port/health" >/dev/null && break; sleep 0.1; done

python3 - "http://$http_addr" "http://127.0.0.1:$vm_port" "$DEVICES" "$DAYS" <<'PY'
import json, math, sys, time, urllib.parse, urllib.request
hub, vm, devices, days = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
end = int(time.time()) // 3600 * 3600
start_ms = (end - days * 86400) * 1000
per = days * 1440
def post(url, body):
    with urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=600) as r:
        r.read()
t0 = time.perf_counter()
for d in range(1, devices + 1):
    for lo in range(0, per, 10_000):
        lines = "".join(
            f"env,device=fl-{d:05} temperature={20 + 5 * math.sin(i / 240 + d) + (i * 7919 % 13) / 100:.2f} {start_ms + i * 60_000}\n"
            for i in range(lo, min(per, lo + 10_000))).encode()
        post(hub + "/api/v1/write?precision=ms", lines)
        post(vm + "/write?precision=ms", lines)
post(vm + "/internal/force_flush", b"")
print(f"loaded {devices * per} readings into both in {time.perf_counter() - t0:.0f} s")
time.sleep(2)
def run(base, extra, query, start, step):
    best, series, points = None, 0, 0
    for _ in range(3):
        params = {"query": query, "start": start, "end": end, "step": step, **extra}
        t = time.perf_counter()
        with urllib.request.urlopen(urllib.request.Request(base + "/api/v1/query_range",
                data=urllib.parse.urlencode(params).encode()), timeout=600) as r:
            data = json.load(r)
        took = time.perf_counter() - t
        assert data["status"] == "success", data
        series = len(data["data"]["result"])
        points = sum(len(s["values"]) for s in data["data"]["result"])
        best = took if best is None else min(best, took)
    return best, series, points
for label, query, start, step in [
    (f"{devices} devices x {days} d, avg_over_time 1h step 1h", "avg_over_time(env_temperature[1h])", end - days * 86400, 3600),
    ("1 device x 1 d, raw step 60s", 'env_temperature{device="fl-00001"}', end - 86400, 60),
    ("1 device x 1 d, avg_over_time 5m step 5m", 'avg_over_time(env_temperature{device="fl-00001"}[5m])', end - 86400, 300),
]:
    h = run(hub, {}, query, start, step)
    v = run(vm, {"nocache": "1"}, query, start, step)
    print(f"query_range {label}: hub {h[0] * 1000:.0f} ms ({h[1]} series, {h[2]} points), "
          f"victoria-metrics {v[0] * 1000:.0f} ms ({v[1]} series, {v[2]} points): hub / vm {h[0] / v[0]:.2f}")
PY
