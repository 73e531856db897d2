# Sourced by the bench scripts: starts `target/release/hub serve` on a free
# port with a temp database and sets $work, $hub_pid, $addr and $http_addr
# (the web console and its API, also on a free port). Extra
# settings come from $HUB_ENV (e.g. "HUB__MQTT__ENABLED=true").
# BIN: where the binaries are (target/release); HUB_DB: an existing
# database to open instead of a new one; HUB_RUST_LOG: the log filter;
# HUB_CONFIG: a settings file (for what env vars cannot say, e.g.
# storage.rollups).
work=$(mktemp -d)
BIN=${BIN:-${TARGET:-target}/release}
# shellcheck disable=SC2086
env ${HUB_ENV:-} HUB__SERVER__LISTEN=127.0.0.1:0 HUB__HTTP__LISTEN=127.0.0.1:0 HUB__STORAGE__PATH="${HUB_DB:-$work/hub.db}" \
  RUST_LOG="${HUB_RUST_LOG:-warn,hub::app=info}" "$BIN/hub" serve ${HUB_CONFIG:+--config "$HUB_CONFIG"} >"$work/hub.log" 2>&1 &
hub_pid=$!
addr=""
for _ in $(seq 1 100); do
  addr=$(sed -n 's/.*listening on \([0-9.:]*\).*/\1/p' "$work/hub.log" | head -n1)
  [ -n "$addr" ] && break
  sleep 0.1
done
[ -n "$addr" ] || { cat "$work/hub.log"; echo "hub did not start"; exit 1; }
http_addr=$(sed -n 's/.*web console on http:\/\/\([0-9.:]*\)\/.*/\1/p' "$work/hub.log" | head -n1)
