#!/usr/bin/env bash
# Alarm figures (issue 21), release builds, default settings:
# - ingest at saturation, DEVICES devices x RATE Hz asked, with no rules
#   and then with RULES threshold rules over every device (25 per sensor,
#   thresholds spread over each sensor's range, so some flip): the ratio;
# - alarm latency from a reading to its webhook (a local receiver), with
#   a flapping rule over LAT_DEVICES devices: p50 / p99;
# - inactivity checks over IDLE_DEVICES registered devices (check every
#   1 s): the hub's CPU with the rule and without, and the time to raise
#   an alarm for every one of them.
#
#   scripts/bench-alarms.sh
#   SMOKE=1 scripts/bench-alarms.sh   # tiny sizes, debug build (CI)
#   PARTS="ingest latency" scripts/bench-alarms.sh   # some parts only
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/target-dir.sh
if [ "${SMOKE:-0}" = 1 ]; then
  BIN=$TARGET/debug
  DEVICES=20; RATE=50; DURATION=3s; RULES=8; LAT_DEVICES=5; LAT_S=3; IDLE_DEVICES=500; IDLE_S=1
  RULESETS=${RULESETS:-flapping}  # one rule set is enough to keep the script working
  smoke_build
else
  BIN=$TARGET/release
  DEVICES=${DEVICES:-1000}; RATE=${RATE:-1000}; DURATION=${DURATION:-30s}; RULES=${RULES:-100}
  LAT_DEVICES=${LAT_DEVICES:-100}; LAT_S=${LAT_S:-30}; IDLE_DEVICES=${IDLE_DEVICES:-100000}; IDLE_S=${IDLE_S:-30}
  cargo build --release -q -p hub -p device-sim
fi
export BIN
ticks=$(getconf CLK_TCK)
PARTS=${PARTS:-ingest latency inactivity}
want() { [[ " $PARTS " == *" $1 "* ]]; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
sim_pid=""; recv_pid=""; hub_pid=""; work=""
cleanup() {
  kill "$sim_pid" "$recv_pid" "$hub_pid" 2>/dev/null || true
  [ -n "$work" ] && rm -rf "$work"
}
trap cleanup EXIT

put_rule() { # name json
  curl -sf -X PUT -H 'content-type: application/json' -d "$2" "http://$http_addr/api/v1/alarm-rules/$1" >/dev/null
}
rules() { # how many threshold rules, spread over the sim's four sensors; "quiet": lines
  # past the signals' normal range (alarms are rare, as in a healthy fleet),
  # "flapping": lines across it with no hysteresis (alarms come and go all
  # the time: the worst case)
  python3 - "$1" "$2" <<'PY' | while read -r name json; do put_rule "$name" "$json"; done
import json, sys
n = int(sys.argv[1])
if sys.argv[2] == "quiet":
    ranges = {"temperature": (32, 44, ">"), "humidity": (92, 99, ">"), "pressure": (1040, 1060, ">"), "battery": (5, 20, "<")}
else:
    ranges = {"temperature": (14, 26, ">"), "humidity": (40, 70, ">"), "pressure": (1008, 1018, ">"), "battery": (80, 100, "<")}
names = list(ranges)
for i in range(n):
    s = names[i % 4]; lo, hi, op = ranges[s]; k = i // 4; per = max(1, n // 4)
    v = round(lo + (hi - lo) * k / per, 2)
    back = "<" if op == ">" else ">"
    rule = {"severity": "minor", "threshold": {"sensor": s, "raise": f"{op} {v}", "raise_for": f"{k % 5}s",
            "clear": f"{back} {v}", "clear_for": f"{k % 3}s"}}
    print(f"bench-{i}", json.dumps(rule))
PY
}
ingest() { # label
  local summary stats
  summary=$("$BIN/device-sim" --hub "http://$addr" --devices "$DEVICES" --rate "$RATE" \
    --duration "$DURATION" --summary json --quiet | tail -n1 || true)
  stats=$(curl -sf "http://$http_addr/api/v1/alarms/summary")
  python3 - "$1" "$summary" "$stats" <<'PY'
import json, sys
s = json.loads(sys.argv[2]); a = json.loads(sys.argv[3])
rate = s['acked'] / s['elapsed_s']
print(f"   {sys.argv[1]}: {rate:.0f} readings/s stored, ack p50 {s['ack_p50_ms']:.1f} ms p99 {s['ack_p99_ms']:.1f} ms, "
      f"devices with open alarms {len(a['devices'])}")
open("/tmp/bench-alarms-rate-" + sys.argv[1].split()[0], "w").write(str(rate))
PY
}

if want ingest; then
echo "-- ingest at saturation: $DEVICES devices x $RATE Hz asked, $DURATION"
. scripts/start-hub.sh
ingest "none (no rules)"
kill -INT "$hub_pid"; wait "$hub_pid" || true; rm -rf "$work"
for kind in ${RULESETS:-quiet flapping}; do
  . scripts/start-hub.sh
  rules "$RULES" "$kind"
  ingest "$kind ($RULES threshold rules over every device)"
  python3 -c "import sys; a=float(open('/tmp/bench-alarms-rate-none').read()); b=float(open('/tmp/bench-alarms-rate-' + sys.argv[1]).read()); print(f'   ratio {sys.argv[1]} / no rules: {b/a:.2f}')" "$kind"
  events=$(sqlite3 "$work/hub.db" "SELECT count(*) FROM alarm_events" 2>/dev/null || echo "?")
  echo "   alarm events committed: $events"
  kill -INT "$hub_pid"; wait "$hub_pid" || true; rm -rf "$work"
done
fi

if want latency; then
echo "-- alarm latency, reading -> webhook: $LAT_DEVICES devices x 20 Hz, a flapping rule, ${LAT_S}s"
port=$(python3 -c "import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])")
lat_file=$(mktemp)
python3 - "$port" "$lat_file" <<'PY' &
import http.server, json, sys, time
out = open(sys.argv[2], "w")
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["content-length"]))
        now = time.time() * 1000
        e = json.loads(body)
        if e["kind"] in ("raised", "cleared"):
            out.write(f"{now - e['alarm']['changed_ms']:.1f}\n"); out.flush()
        self.send_response(204); self.end_headers()
    def log_message(self, *a): pass
class S(http.server.ThreadingHTTPServer):
    request_queue_size = 1024  # the default 5 drops connections: 1 s SYN retries
S(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
PY
recv_pid=$!
conf=$(mktemp --suffix=.toml)
printf '[alarms]\ncheck_interval = "1s"\n[[alarms.webhooks]]\nname = "bench"\nurl = "http://127.0.0.1:%s/"\nsecret = "bench"\n' "$port" > "$conf"
# start-hub.sh takes no --config: the webhook goes in through a settings file.
work=$(mktemp -d)
env HUB__SERVER__LISTEN=127.0.0.1:0 HUB__HTTP__LISTEN=127.0.0.1:0 HUB__STORAGE__PATH="$work/hub.db" \
  RUST_LOG=warn,hub::app=info "$BIN/hub" serve --config "$conf" >"$work/hub.log" 2>&1 &
hub_pid=$!
for _ in $(seq 1 100); do
  addr=$(sed -n 's/.*listening on \([0-9.:]*\).*/\1/p' "$work/hub.log" | head -n1); [ -n "$addr" ] && break; sleep 0.1
done
http_addr=$(sed -n 's/.*web console on http:\/\/\([0-9.:]*\)\/.*/\1/p' "$work/hub.log" | head -n1)
put_rule flap '{"severity": "warning", "threshold": {"sensor": "temperature", "raise": "> 20.2", "clear": "< 19.8"}}'
"$BIN/device-sim" --hub "http://$addr" --devices "$LAT_DEVICES" --rate 20 --duration "${LAT_S}s" --quiet >/dev/null 2>&1 || true
sleep 2
python3 - "$lat_file" <<'PY'
import sys
d = sorted(float(x) for x in open(sys.argv[1]) if x.strip())
if not d:
    print("   no notifications"); sys.exit()
at = lambda q: d[min(len(d) - 1, int(len(d) * q))]
print(f"   {len(d)} notifications: p50 {at(0.5):.1f} ms, p99 {at(0.99):.1f} ms, max {d[-1]:.1f} ms "
      "(from the reading's timestamp: its ack, commit and the POST)")
PY
kill "$recv_pid" 2>/dev/null || true; recv_pid=""
kill -INT "$hub_pid"; wait "$hub_pid" || true; rm -rf "$work" "$conf" "$lat_file"
fi

if want inactivity; then
echo "-- inactivity over $IDLE_DEVICES devices, checked every 1 s"
work=$(mktemp -d)
HUB_DB="$work/idle.db"
# The schema first (a hub run), then the devices, as if they had sent a
# reading just now.
env HUB__SERVER__LISTEN=127.0.0.1:0 HUB__HTTP__LISTEN=127.0.0.1:0 HUB__STORAGE__PATH="$HUB_DB" \
  RUST_LOG=warn "$BIN/hub" serve >"$work/first.log" 2>&1 &
first=$!
for _ in $(seq 1 100); do grep -q "listening on" "$work/first.log" 2>/dev/null && break; sleep 0.1; done
kill -INT "$first"; wait "$first" || true
python3 - "$HUB_DB" "$IDLE_DEVICES" <<'PY'
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1]); now = int(time.time() * 1000)
db.executemany("INSERT INTO devices (external_id, firmware, tags, first_seen_ms, last_seen_ms, last_reading_ms) VALUES (?, 'bench', '{}', ?, ?, ?)",
               ((f"idle-{i:06}", now, now, now) for i in range(int(sys.argv[2]))))
db.commit()
PY
keep=$work; work=$(mktemp -d)
HUB_ENV="HUB__ALARMS__CHECK_INTERVAL=1s" . scripts/start-hub.sh
sleep 2
c0=$(cpu_ticks "$hub_pid"); sleep "$IDLE_S"; c1=$(cpu_ticks "$hub_pid")
put_rule quiet '{"severity": "warning", "inactivity": {"after": "1h"}}'
sleep 1
c2=$(cpu_ticks "$hub_pid"); sleep "$IDLE_S"; c3=$(cpu_ticks "$hub_pid")
python3 -c "import sys; t=float(sys.argv[5]); s=float(sys.argv[6]); a=(int(sys.argv[2])-int(sys.argv[1]))/t/s; b=(int(sys.argv[4])-int(sys.argv[3]))/t/s; print(f'   hub CPU idle {100*a:.1f}% of one core, with an inactivity rule over every device {100*b:.1f}% ({1000*(b-a):.0f} ms of CPU per check)')" "$c0" "$c1" "$c2" "$c3" "$ticks" "$IDLE_S"
t0=$(date +%s.%N)
put_rule quiet '{"severity": "warning", "inactivity": {"after": "1s"}}'
for _ in $(seq 1 600); do
  n=$(curl -sf "http://$http_addr/api/v1/alarms/summary" | python3 -c "import json,sys; print(len(json.load(sys.stdin)['devices']))")
  [ "$n" -ge "$IDLE_DEVICES" ] && break
  sleep 0.5
done
t1=$(date +%s.%N)
python3 -c "import sys; print(f'   every device silent: {sys.argv[3]} alarms raised in {float(sys.argv[2])-float(sys.argv[1]):.1f} s')" "$t0" "$t1" "$n"
kill -INT "$hub_pid"; wait "$hub_pid" || true
rm -rf "$keep"
fi
