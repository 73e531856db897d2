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
#
# Then the query table of the comparison with Prometheus
# (hub/tests/promql-queries.txt), every query as an instant query and a
# 3-hour query_range at a 60 s step, over TABLE_DEVICES devices (d1..) x
# 1 day of temp, hum and a counter, a reading about every 15 s, tagged by
# site: each query's best of 3 on both, the totals, and where the answers
# differ (MetricsQL is not PromQL: rate/increase/delta do not
# extrapolate, ranges are open at the left, and the lookback differs).
#
#   DEVICES=1000 DAYS=30 TABLE_DEVICES=100 scripts/bench-promql-peers.sh
# BIN: built binaries (default: a release build); HUB_CONFIG: a settings
# file for the hub (e.g. storage.rollups).
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICES=${DEVICES:-1000}
DAYS=${DAYS:-30}
TABLE_DEVICES=${TABLE_DEVICES:-$(( DEVICES < 100 ? DEVICES : 100 ))}
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
            body = r.read()
        # The answer's time, not this client's JSON parsing.
        took = time.perf_counter() - t
        data = json.loads(body)
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

python3 - "http://$http_addr" "http://127.0.0.1:$vm_port" "$TABLE_DEVICES" hub/tests/promql-queries.txt <<'PY'
import json, math, statistics, sys, time, urllib.error, urllib.parse, urllib.request
hub, vm, devices, table = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
queries = [l.strip() for l in open(table) if l.strip() and not l.startswith("#")]
end = int(time.time()) // 3600 * 3600
t0 = (end - 86400) * 1000
def request(url, body=None, method=None, headers={}):
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    with urllib.request.urlopen(req, timeout=600) as r:
        return r.read()
# The same readings: line protocol to the hub (tags through the twin), the
# Prometheus text format to VictoriaMetrics (device and site labels).
t = time.perf_counter()
n = 0
for d in range(1, devices + 1):
    site = "north" if d % 2 else "south"
    lines, prom = [], []
    energy, ts, k = 100.0 * d, t0 + (d * 7919) % 15_000, 0
    while ts < end * 1000:
        x = (ts - t0) / 600_000 + d
        temp = round(10 * (d % 4) + 20 + 4 * math.sin(x), 3)
        hum = round(45 + 10 * (d % 4) + 3 * math.cos(x / 2), 2)
        energy = 1.5 if d == 2 and k == 3000 else round(energy + (k * 7919 % 500) / 100, 2)
        for name, v in (("temp", temp), ("hum", hum), ("energy", energy)):
            lines.append(f"readings,device=d{d} {name}={v} {ts}\n")
            prom.append(f'{name}{{device="d{d}",site="{site}"}} {v} {ts}\n')
        n += 3
        ts += 10_000 + (k * 104729 + d) % 10_000
        k += 1
    for lo in range(0, len(lines), 20_000):
        request(hub + "/api/v1/write?precision=ms", "".join(lines[lo:lo + 20_000]).encode())
        request(vm + "/api/v1/import/prometheus", "".join(prom[lo:lo + 20_000]).encode())
    request(f"{hub}/api/v1/devices/d{d}/twin", json.dumps({"tags": {"site": site}}).encode(),
            "PATCH", {"content-type": "application/json"})
request(vm + "/internal/force_flush")
print(f"query table: {n} readings of {devices} devices x 1 d into both in {time.perf_counter() - t:.0f} s")
time.sleep(2)
at = end * 1000 - 30 * 60_000
secs = lambda ms: f"{ms / 1000:.3f}"
def run(base, path, params):
    best, data = None, None
    for _ in range(3):
        t = time.perf_counter()
        try:
            body = request(base + path, urllib.parse.urlencode(params).encode())
        except urllib.error.HTTPError as e:
            body = e.read() or b"{}"
        # The answer's time, not this client's JSON parsing.
        took = time.perf_counter() - t
        data = json.loads(body)
        best = took if best is None else min(best, took)
    return best, data
def points(data):
    out = {}
    if data.get("status") != "success":
        return None
    d = data["data"]
    result = d["result"] if d["resultType"] != "scalar" else [{"metric": {}, "value": d["result"]}]
    for s in result:
        key = tuple(sorted(s["metric"].items()))
        for t, v in s.get("values", [s.get("value")] if "value" in s else []):
            out[(key, round(float(t) * 1000))] = float(v)
    return out
def same(a, b):
    if a is None or b is None:
        return a is None and b is None
    if a.keys() != b.keys():
        return False
    return all(x == y or abs(x - y) <= 1e-6 * max(abs(x), abs(y)) or (math.isnan(x) and math.isnan(y))
               for x, y in ((a[k], b[k]) for k in a))
hub_total = vm_total = 0.0
ratios, differ = [], []
print(f"{'query':58} {'hub ms':>8} {'vm ms':>8} {'hub/vm':>7}  answers")
for q in queries:
    q = q.replace("{T}", secs(at))
    reqs = [("/api/v1/query", {"query": q, "time": secs(at)})]
    if not q.endswith("]"):
        reqs.append(("/api/v1/query_range", {"query": q, "start": end - 3 * 3600, "end": end, "step": 60}))
    h_ms = v_ms = 0.0
    agree = True
    for path, params in reqs:
        h, hd = run(hub, path, params)
        v, vd = run(vm, path, {**params, "nocache": "1"})
        h_ms, v_ms = h_ms + h * 1000, v_ms + v * 1000
        agree = agree and same(points(hd), points(vd))
    hub_total, vm_total = hub_total + h_ms, vm_total + v_ms
    ratios.append(h_ms / v_ms)
    if not agree:
        differ.append(q)
    print(f"{q[:58]:58} {h_ms:8.1f} {v_ms:8.1f} {h_ms / v_ms:7.2f}  {'same' if agree else 'differ'}")
print(f"query table, {len(queries)} queries (instant + 3 h range at 60 s, best of 3 each): "
      f"hub {hub_total:.0f} ms, victoria-metrics {vm_total:.0f} ms in all; hub / vm {hub_total / vm_total:.2f} "
      f"(geometric mean of the per-query ratios {statistics.geometric_mean(ratios):.2f}); "
      f"{len(queries) - len(differ)} answers the same, {len(differ)} differ")
PY
