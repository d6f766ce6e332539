#!/usr/bin/env bash
# Client-Server API benchmark of Hyphae next to Synapse, the reference homeserver, on this
# machine: message send throughput (sequential and concurrent), /sync delivery latency, lossless
# delivery, /messages back-pagination and room creation. Prints a Markdown table and writes the
# raw figures to target/bench-client.json.
#
# Synapse is installed from PyPI into target/bench-synapse/venv on first use (SYNAPSE_VERSION
# pins a version) and runs with a fresh SQLite database, listening on loopback only, offline
# (no federation, no key servers), with its rate limits lifted and presence off.
#
#   HYPHAE_NODE_BIN  the hyphae-node to measure (default target/release/hyphae-node)
#   BENCH_N          messages in the sequential phase (default 500; the concurrent one sends 2N)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=$ROOT/target/bench-synapse
VENV=$WORK/venv
PY=$VENV/bin/python
HYPHAE_BIN=$(realpath -m "${HYPHAE_NODE_BIN:-target/release/hyphae-node}")

if [[ ! -x $HYPHAE_BIN ]]; then
  echo "no hyphae-node at $HYPHAE_BIN (cargo build --release --bin hyphae-node, or set HYPHAE_NODE_BIN)" >&2
  exit 1
fi
command -v node >/dev/null || { echo "node is needed to run scripts/bench-client.mjs" >&2; exit 1; }
mkdir -p "$WORK"

# --- Synapse, installed once -------------------------------------------------------------------
if ! "$PY" -c 'import synapse' 2>/dev/null; then
  t0=$SECONDS
  if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
    echo "== python3 has no venv module: installing python3-venv" >&2
    if [[ $(id -u) -eq 0 ]]; then
      apt-get update -qq && apt-get install -y -qq python3-venv
    else
      sudo apt-get update -qq && sudo apt-get install -y -qq python3-venv
    fi
  fi
  echo "== installing Synapse into $VENV" >&2
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --upgrade pip
  "$VENV/bin/pip" install --quiet "matrix-synapse${SYNAPSE_VERSION:+==$SYNAPSE_VERSION}"
  echo "== Synapse installed in $((SECONDS - t0)) s" >&2
fi
SYNAPSE_VERSION_FOUND=$("$PY" -c 'import synapse; print(synapse.__version__.split()[0])')

# --- processes, stopped however this script ends -------------------------------------------------
synapse_pid=
hyphae_pid=
hyphae_data=
stop() {
  local pid
  for pid in $hyphae_pid $synapse_pid; do
    kill -TERM "$pid" 2>/dev/null || continue
    for _ in $(seq 1 50); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.2
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  [[ -n $hyphae_data ]] && rm -rf "$hyphae_data"
  return 0
}
trap stop EXIT
trap 'exit 130' INT TERM

# --- Synapse config: generated afresh each run, then edited --------------------------------------
rm -rf "$WORK/homeserver.yaml" "$WORK/localhost.log.config" "$WORK"/homeserver.db* \
  "$WORK/media_store" "$WORK"/homeserver.log* "$WORK/synapse.out" "$WORK/hyphae.out"
"$PY" -m synapse.app.homeserver --server-name localhost \
  --config-path "$WORK/homeserver.yaml" --data-directory "$WORK" \
  --generate-config --report-stats=no >/dev/null
SYNAPSE_PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$PY" - "$WORK/homeserver.yaml" "$WORK/localhost.log.config" "$SYNAPSE_PORT" <<'EOF'
import os
import sys

import yaml

config_path, log_config_path, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
with open(config_path) as f:
    config = yaml.safe_load(f)

# Loopback only, client API only: nothing here federates.
config["listeners"] = [{
    "port": port,
    "bind_addresses": ["127.0.0.1"],
    "type": "http",
    "tls": False,
    "x_forwarded": False,
    "resources": [{"names": ["client"], "compress": False}],
}]
config["enable_registration"] = True
config["enable_registration_without_verification"] = True
# Offline: fetch no keys from other servers, phone nowhere home.
config["trusted_key_servers"] = []
config["suppress_key_server_warning"] = True
config["report_stats"] = False
config["federation_domain_whitelist"] = []
config["url_preview_enabled"] = False
# Presence wakes /sync long-polls with updates no benchmark phase asks for.
config["presence"] = {"enabled": False}

# Rate limits out of the way: the benchmark measures the server, not its throttle.
unlimited = {"per_second": 1_000_000, "burst_count": 1_000_000}
for key in [
    "rc_message", "rc_registration", "rc_registration_token_validity", "rc_admin_redaction",
    "rc_joins_per_room", "rc_key_requests", "rc_3pid_validation", "rc_third_party_invite",
    "rc_media_create", "rc_delayed_event_mgmt", "rc_room_creation", "rc_reports",
    "rc_user_directory", "rc_profile",
]:
    config[key] = dict(unlimited)
config["rc_login"] = {k: dict(unlimited) for k in ["address", "account", "failed_attempts"]}
config["rc_joins"] = {k: dict(unlimited) for k in ["local", "remote"]}
config["rc_invites"] = {k: dict(unlimited) for k in ["per_room", "per_user", "per_issuer"]}
config["rc_presence"] = {"per_user": dict(unlimited)}
config["rc_federation"] = {
    "window_size": 1000, "sleep_limit": 1_000_000, "sleep_delay": 1,
    "reject_limit": 1_000_000, "concurrent": 1_000,
}

with open(config_path, "w") as f:
    yaml.safe_dump(config, f, sort_keys=False)

# Warnings and errors only, as hyphae-node runs with RUST_LOG=warn.
with open(log_config_path) as f:
    log_config = yaml.safe_load(f)
log_config["root"]["level"] = "WARNING"
# (Generated, it names a file in the working directory of the generating process.)
log_config["handlers"]["file"]["filename"] = os.path.join(os.path.dirname(config_path), "homeserver.log")
log_config.setdefault("loggers", {}).setdefault("synapse.storage.SQL", {})["level"] = "WARNING"
with open(log_config_path, "w") as f:
    yaml.safe_dump(log_config, f, sort_keys=False)
EOF

# --- start both servers -------------------------------------------------------------------------
SYNAPSE_URL=http://127.0.0.1:$SYNAPSE_PORT
started=$SECONDS
echo "== starting Synapse $SYNAPSE_VERSION_FOUND (SQLite) on $SYNAPSE_URL" >&2
(cd "$WORK" && exec "$PY" -m synapse.app.homeserver --config-path "$WORK/homeserver.yaml") \
  >"$WORK/synapse.out" 2>&1 &
synapse_pid=$!

hyphae_data=$(mktemp -d "${TMPDIR:-/tmp}/hyphae-bench-client-XXXXXX")
echo "== starting $HYPHAE_BIN" >&2
RUST_LOG=${RUST_LOG:-warn} NO_COLOR=1 "$HYPHAE_BIN" --data "$hyphae_data" --no-mdns \
  --listen /ip4/127.0.0.1/tcp/0 --http 127.0.0.1:0 >"$WORK/hyphae.out" 2>&1 &
hyphae_pid=$!

# Readiness probes: a bounded number of attempts with a short pause between them.
ready() { # name pid url-or-empty log
  local name=$1 pid=$2 log=$4
  for _ in $(seq 1 300); do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "$name exited before it was ready; its output:" >&2
      tail -n 50 "$log" >&2
      return 1
    fi
    if [[ -n $3 ]] && curl -fsS -o /dev/null --max-time 2 "$3/_matrix/client/versions" 2>/dev/null; then
      return 0
    fi
    sleep 0.2
  done
  echo "$name was not ready within 60 s; its output:" >&2
  tail -n 50 "$log" >&2
  return 1
}
HYPHAE_URL=
for _ in $(seq 1 300); do
  HYPHAE_URL=$(sed -n 's/^client api:[[:space:]]*\(http[^[:space:]]*\).*/\1/p' "$WORK/hyphae.out" | head -n 1)
  [[ -n $HYPHAE_URL ]] && break
  kill -0 "$hyphae_pid" 2>/dev/null || break
  sleep 0.2
done
HYPHAE_URL=${HYPHAE_URL%/}
[[ -n $HYPHAE_URL ]] || { echo "hyphae-node printed no client api URL:" >&2; tail -n 50 "$WORK/hyphae.out" >&2; exit 1; }
ready hyphae-node "$hyphae_pid" "$HYPHAE_URL" "$WORK/hyphae.out"
ready Synapse "$synapse_pid" "$SYNAPSE_URL" "$WORK/synapse.out"
echo "== Hyphae on $HYPHAE_URL, Synapse on $SYNAPSE_URL (both ready after $((SECONDS - started)) s)" >&2

BENCH_SYNAPSE_VERSION=$SYNAPSE_VERSION_FOUND BENCH_HYPHAE_BIN=$HYPHAE_BIN \
  node scripts/bench-client.mjs "$HYPHAE_URL" "$SYNAPSE_URL"
