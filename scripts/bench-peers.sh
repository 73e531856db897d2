#!/usr/bin/env bash
# The hub against its peers on identical data, in one run: VictoriaMetrics
# and InfluxDB 1.x from Debian's packages (`victoria-metrics`, `influxdb`),
# each on a loopback port in a temp dir. Skipped, with a message, for a
# peer whose package is missing.
#
# 1. device-sim stores DEVICES x RATE Hz for DURATION in a hub (values at
#    sensor resolution, then full precision); the hub's bytes on disk are
#    taken after a clean stop.
# 2. The same readings are read back from the hub (its CSV export) and
#    written as InfluxDB line protocol (`readings,device=D <sensor>=V,seq=Ni
#    TS`, ms precision: each reading is two samples for VictoriaMetrics,
#    value and seq) into files of 10,000 lines.
# 3. Each peer loads the files with 4 concurrent curl writers (its ingest
#    rate: readings/s, over the load's wall time; both ack before fsync,
#    the hub after), is stopped cleanly, and its data dir is measured.
# 4. The hub's own bulk path beside those rates: device-sim uploads the
#    same count of readings as a backlog (--backfill), 1000 a batch.
#
#   DEVICES=1000 RATE=100 DURATION=30s scripts/bench-peers.sh
# BIN: built binaries to use (default: a release build).
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICES=${DEVICES:-1000}
RATE=${RATE:-100}
DURATION=${DURATION:-30s}
. scripts/target-dir.sh
BIN=${BIN:-$TARGET/release}
[ "$BIN" = "$TARGET/release" ] && cargo build --release -q -p hub -p device-sim
export BIN

root=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$root"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_http() { for _ in $(seq 1 200); do curl -sf -o /dev/null "$1" && return 0; sleep 0.1; done; echo "$1 did not come up"; return 1; }
stop() { kill -INT "$1"; wait "$1" 2>/dev/null || true; }

# hub_run NAME [sim args]: a fresh hub stores the fleet's readings; prints
# its bytes per reading, and leaves line-protocol files in $root/NAME.lp/.
hub_run() {
  local name=$1; shift
  local db="$root/$name.db"
  mkdir -p "$db"
  HUB_DB="$db/hub.db" . scripts/start-hub.sh
  pids+=("$hub_pid")
  local summary
  summary=$("$BIN/device-sim" --hub "http://$addr" --devices "$DEVICES" --rate "$RATE" \
    --duration "$DURATION" --summary json --quiet "$@" | tail -n1 || true)
  stop "$hub_pid"
  # Open it again for the export (its HTTP door).
  HUB_DB="$db/hub.db" . scripts/start-hub.sh
  pids+=("$hub_pid")
  python3 - "$summary" "$http_addr" "$root/$name.lp" "$db" <<'PY'
import csv, io, json, os, sys, urllib.request
summary, http, out, db = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
os.makedirs(out)
def get(path):
    with urllib.request.urlopen(f"http://{http}/api/v1{path}") as r:
        return r.read()
devices, after = [], ""
while True:
    page = json.loads(get(f"/devices?limit=1000&after={after}"))
    devices += [d["device_id"] for d in page["devices"]]
    if not page.get("next_after"):
        break
    after = page["next_after"]
lines, files, n = [], 0, 0
def flush():
    global lines, files
    if lines:
        with open(f"{out}/{files:06d}.lp", "w") as f:
            f.write("\n".join(lines) + "\n")
        files += 1
        lines = []
for d in devices:
    rows = csv.DictReader(io.StringIO(get(f"/devices/{d}/readings.csv?since=0").decode()))
    for r in rows:
        lines.append(f"readings,device={d} {r['sensor']}={r['value']},seq={r['seq']}i {r['ts_ms']}")
        n += 1
        if len(lines) == 10000:
            flush()
flush()
with open(f"{out}/count", "w") as f:
    f.write(str(n))
print(f"exported {n} readings of {len(devices)} devices (acked by the sim: {summary['acked']})", file=sys.stderr)
PY
  stop "$hub_pid"
  local bytes readings
  bytes=$(du -cb "$db"/hub.db* | tail -n1 | cut -f1)
  readings=$(cat "$root/$name.lp/count")
  echo "$name hub $bytes $readings"
}

# load NAME URL: 4 concurrent writers; prints readings/s.
load() {
  local dir="$root/$1.lp" url=$2 t0 t1 n
  n=$(cat "$dir/count")
  t0=$(date +%s.%N)
  find "$dir" -type f -name '*.lp' -print0 | xargs -0 -P4 -I{} \
    curl -sf -o /dev/null --data-binary @{} "$url"
  t1=$(date +%s.%N)
  python3 -c "print(f'{$n / ($t1 - $t0):.0f}')"
}

vm_run() {
  local name=$1 dir="$root/vm-$1" port
  port=$(free_port)
  victoria-metrics -storageDataPath="$dir" -httpListenAddr="127.0.0.1:$port" \
    -retentionPeriod=100y -search.latencyOffset=0s -loggerLevel=ERROR >"$root/vm-$name.log" 2>&1 &
  local pid=$!; pids+=("$pid")
  wait_http "http://127.0.0.1:$port/health"
  local rate
  rate=$(load "$name" "http://127.0.0.1:$port/write?precision=ms")
  curl -sf "http://127.0.0.1:$port/internal/force_flush" >/dev/null
  local samples
  samples=$(curl -sf "http://127.0.0.1:$port/api/v1/query" \
    --data-urlencode 'query=sum(count_over_time({__name__=~"readings_.+"}[1d]))' \
    --data-urlencode "time=$(( $(date +%s) + 60 ))" \
    | python3 -c 'import json,sys; r=json.load(sys.stdin)["data"]["result"]; print(r[0]["value"][1] if r else 0)')
  # Does it keep values exactly? One series read back against what was sent.
  local exact
  exact=$(python3 - "$root/$name.lp" "$port" <<'PY'
import glob, json, sys, urllib.parse, urllib.request
lines = open(sorted(glob.glob(f"{sys.argv[1]}/*.lp"))[0]).read().split("\n")
tags, fields, ts = lines[0].split(" ")
device, sensor = tags.split("=")[1], fields.split("=")[0]
sent = {}
for line in lines:
    if line.startswith(f"{tags} {sensor}="):
        _, f, t = line.split(" ")
        sent[int(t)] = float(f.split(",")[0].split("=")[1])
q = urllib.parse.urlencode({"match[]": f'readings_{sensor}{{device="{device}"}}'})
with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[2]}/api/v1/export?{q}") as r:
    got = json.loads(r.read().splitlines()[0])
back = dict(zip(got["timestamps"], got["values"]))
same = sum(1 for t, v in sent.items() if back.get(t) == v)
print(f"{same}/{len(sent)}")
PY
)
  stop "$pid"
  echo "$name victoria-metrics $(du -sb "$dir" | cut -f1) $(cat "$root/$name.lp/count") $rate $samples $exact"
}

influx_run() {
  local name=$1 dir="$root/influx-$1" port rpc
  port=$(free_port); rpc=$(free_port)
  mkdir -p "$dir"
  cat >"$dir.conf" <<EOF
reporting-disabled = true
bind-address = "127.0.0.1:$rpc"
[meta]
  dir = "$dir/meta"
[data]
  dir = "$dir/data"
  wal-dir = "$dir/wal"
  query-log-enabled = false
[http]
  bind-address = "127.0.0.1:$port"
  log-enabled = false
[monitor]
  store-enabled = false
EOF
  influxd -config "$dir.conf" >"$root/influx-$name.log" 2>&1 &
  local pid=$!; pids+=("$pid")
  wait_http "http://127.0.0.1:$port/ping"
  curl -sf -XPOST "http://127.0.0.1:$port/query" --data-urlencode "q=CREATE DATABASE bench" >/dev/null
  local rate
  rate=$(load "$name" "http://127.0.0.1:$port/write?db=bench&precision=ms")
  stop "$pid"
  echo "$name influxdb $(du -sb "$dir" | cut -f1) $(cat "$root/$name.lp/count") $rate"
}

# hub_backfill: the hub's own bulk path, for the load rates: a fresh hub
# takes DEVICES devices' backlog of DURATION at RATE Hz (the same count and
# generator as hub_run's), uploaded in 1000-reading batches, acked after
# fsync; prints readings/s over the load's wall time.
hub_backfill() {
  local db="$root/backfill.db" target t0 t1 n
  mkdir -p "$db"
  HUB_DB="$db/hub.db" . scripts/start-hub.sh
  pids+=("$hub_pid")
  target=$(python3 -c "print(int($DEVICES * $RATE * ${DURATION%s}))")
  t0=$(date +%s.%N)
  "$BIN/device-sim" --hub "http://$addr" --devices "$DEVICES" --rate "$RATE" --backfill "$DURATION" \
    --batch-max 1000 --buffer 50000 --quiet >/dev/null 2>&1 &
  local sim=$!
  stored() { "$BIN/hub" stats --hub "http://$addr" --format json | python3 -c 'import json,sys; print(json.load(sys.stdin)["readings_stored"])'; }
  while [ "$(stored)" -lt "$target" ]; do sleep 0.2; done
  t1=$(date +%s.%N)
  n=$(stored)
  kill -INT "$sim"; wait "$sim" 2>/dev/null || true
  stop "$hub_pid"
  rm -rf "$db"
  python3 -c "print(f'{$n / ($t1 - $t0):.0f}')"
}

results=()
for kind in quantized full; do
  args=(); [ "$kind" = full ] && args=(--full-precision)
  results+=("$(hub_run "$kind" "${args[@]}")")
  if command -v victoria-metrics >/dev/null; then
    results+=("$(vm_run "$kind")")
  else
    echo "SKIPPED: victoria-metrics not installed (apt-get install victoria-metrics)"
  fi
  if command -v influxd >/dev/null; then
    results+=("$(influx_run "$kind")")
  else
    echo "SKIPPED: influxdb not installed (apt-get install influxdb)"
  fi
  rm -rf "$root/$kind.lp"
done

backfill_rate=$(hub_backfill)

python3 - "$backfill_rate" "${results[@]}" <<'PY'
import sys
backfill = int(sys.argv[1])
rows = [r.split() for r in sys.argv[2:]]
hub = {r[0]: int(r[2]) / max(int(r[3]), 1) for r in rows if r[1] == "hub"}
print(f"{'values':<10} {'store':<17} {'B/reading':>10} {'hub / it':>9} {'load readings/s':>16}")
for r in rows:
    kind, store, b, n = r[0], r[1], int(r[2]), max(int(r[3]), 1)
    per = b / n
    ratio = "" if store == "hub" else f"{hub[kind] / per:.2f}"
    rate = r[4] if len(r) > 4 else "(device-sim)"
    print(f"{kind:<10} {store:<17} {per:>10.2f} {ratio:>9} {rate:>16}")
    if store == "victoria-metrics":
        if int(float(r[5])) != 2 * n:
            print(f"  ! VictoriaMetrics holds {r[5]} samples, not {2 * n}")
        print(f"  VictoriaMetrics gave back {r[6]} values of one series exactly as sent (the hub: every value, to the bit)")
vm = [int(r[4]) for r in rows if r[1] == "victoria-metrics" and r[0] == "quantized"]
print(f"hub bulk load (device-sim backfill, 1000-reading batches, acked after fsync): {backfill} readings/s"
      + (f"; / VictoriaMetrics' load of the quantized set: {backfill / vm[0]:.2f}" if vm else ""))
PY
