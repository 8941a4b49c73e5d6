#!/usr/bin/env bash
# Entrypoint of the Airflow image of docker-compose.yaml.
#
#   slurm-ray-airflow init      one-shot (service airflow-init): the shared
#                               secrets, `airflow db migrate`, the admin
#                               password, and the slurm_dev SSH connection to
#                               the login node with its host key pinned
#   slurm-ray-airflow ARGS...   `airflow ARGS...` (api-server, scheduler, ...)
#
# Secrets that every Airflow component must share (the JWT secret above all:
# the scheduler signs task tokens the api-server checks; the Fernet key that
# encrypts connections) are generated once into $AIRFLOW_CONFIG, a file in the
# airflow-state volume that every component (and `docker compose exec ...
# airflow ...`) reads. A value set in the environment wins, as always.
#
# The host key: slurm-init generates the login node's key at first start and
# puts its public half in the airflow-ssh volume (mounted at $SSH_DIR); init
# stores it in the connection's `host_key` extra. Host key checking stays on:
# a changed key (a new volume) is refused until airflow-init runs again.
set -euo pipefail

STATE_DIR=${SLURM_RAY_AIRFLOW_STATE:-/opt/airflow/state}
SSH_DIR=${SLURM_RAY_AIRFLOW_SSH_DIR:-/opt/airflow/ssh}
CONFIG=${AIRFLOW_CONFIG:-$STATE_DIR/airflow.cfg}
CONN_ID=${SLURM_RAY_CONN_ID:-slurm_dev}

log() { printf '[airflow-init] %s\n' "$*" >&2; }
die() {
  printf '[airflow-init] ERROR: %s\n' "$*" >&2
  exit 1
}

rand_hex() { head -c "$1" /dev/urandom | od -An -tx1 | tr -d ' \n'; }

# The secrets as an airflow.cfg; every other setting is an environment variable.
write_config() {
  [[ -s $CONFIG ]] && return 0
  local fernet
  fernet=$(python -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())')
  cat >"$CONFIG.tmp" <<EOF
# Written once by airflow-init (docker/airflow/entrypoint.sh): the secrets all
# Airflow components of docker-compose.yaml share. Every other setting is an
# environment variable in docker-compose.yaml.
[core]
fernet_key = $fernet

[api]
secret_key = $(rand_hex 32)

[api_auth]
jwt_secret = $(rand_hex 32)
EOF
  mv "$CONFIG.tmp" "$CONFIG"
  log "generated the shared secrets in $CONFIG"
}

write_passwords() {
  local file=${AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE:-$STATE_DIR/passwords.json}
  [[ -s $file ]] && return 0
  printf '{"admin": "%s"}\n' "$(rand_hex 12)" >"$file"
  log "admin password written to $file"
}

# The connection as JSON, built by Python so that every value is quoted right.
connection_json() {
  local pubkey=$1
  LOGIN_KEY="$(cut -d' ' -f1,2 "$pubkey")" KEY_FILE="$SSH_DIR/id_ed25519" python - <<'EOF'
import base64
import hashlib
import json
import os
import sys

host_key = os.environ["LOGIN_KEY"]
if not host_key.startswith("ssh-"):
    raise SystemExit(f"not an SSH public key: {host_key!r}")
blob = base64.b64decode(host_key.split()[1])
fingerprint = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
print(f"[airflow-init] pinning host key SHA256:{fingerprint}", file=sys.stderr)
print(json.dumps({
    "conn_type": "ssh",
    "host": os.environ["SLURM_RAY_LOGIN_HOST"],
    "port": int(os.environ["SLURM_RAY_LOGIN_PORT"]),
    "login": os.environ["SLURM_RAY_LOGIN_USER"],
    "extra": {
        "key_file": os.environ["KEY_FILE"],
        "host_key": host_key,
        "conn_timeout": 10,
    },
}))
EOF
}

cmd_init() {
  : "${SLURM_RAY_LOGIN_HOST:?set by docker-compose.yaml}"
  : "${SLURM_RAY_LOGIN_PORT:?set by docker-compose.yaml}"
  : "${SLURM_RAY_LOGIN_USER:?set by docker-compose.yaml}"
  umask 077
  mkdir -p "$STATE_DIR" "$(dirname "$CONFIG")"
  export AIRFLOW_CONFIG=$CONFIG
  write_config
  write_passwords
  log "airflow db migrate"
  airflow db migrate
  local pubkey=$SSH_DIR/ssh_host_ed25519_key.pub
  [[ -s $pubkey ]] || die "$pubkey missing: slurm-init writes it (docker compose up slurm-init)"
  [[ -r $SSH_DIR/id_ed25519 ]] || die "$SSH_DIR/id_ed25519 missing or unreadable (slurm-init)"
  local conn
  conn=$(connection_json "$pubkey")
  # Replace, not keep: a new state volume means a new host key.
  airflow connections delete "$CONN_ID" >/dev/null 2>&1 || true
  airflow connections add "$CONN_ID" --conn-json "$conn"
  log "connection $CONN_ID -> $SLURM_RAY_LOGIN_USER@$SLURM_RAY_LOGIN_HOST:$SLURM_RAY_LOGIN_PORT"
}

case ${1:-} in
  init) cmd_init ;;
  *) exec airflow "$@" ;;
esac
