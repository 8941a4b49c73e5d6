#!/usr/bin/env bash
# Local MLflow tracking server for slurm_ray (dev cluster, demo, tests).
#
#   scripts/mlflow_server.sh start|stop|status|url [PORT]
#
# Runs `mlflow server --workers 1` from the cluster-side venv on 127.0.0.1 with
# a sqlite backend and proxied artifacts (--serve-artifacts), so the Airflow
# side needs only mlflow-skinny and uploads artifacts over HTTP. Everything
# lives in one data directory:
#
#   $MLFLOW_DATA_DIR (default ${SLURM_RAY_DEV_STATE:-/var/lib/slurm-ray-dev}/mlflow)
#     mlflow.db  artifacts/  server.pid  server.port  server.log
#
# One server per data directory (two servers on one sqlite file would fight
# over its lock). Idempotent: `start` on a healthy server is a no-op, `stop`
# on a stopped one too. Stopped by PID (process group: the server forks
# uvicorn workers), never by name.
#
# Environment overrides: MLFLOW_DATA_DIR, MLFLOW_PORT, MLFLOW_HOST,
# MLFLOW_VENV (where bin/mlflow lives), MLFLOW_ALLOWED_HOSTS,
# MLFLOW_START_TIMEOUT (seconds, default 90).
set -euo pipefail

STATE=${SLURM_RAY_DEV_STATE:-/var/lib/slurm-ray-dev}
DATA=${MLFLOW_DATA_DIR:-$STATE/mlflow}
VENV=${MLFLOW_VENV:-$STATE/venv}
HOST=${MLFLOW_HOST:-127.0.0.1}
START_TIMEOUT=${MLFLOW_START_TIMEOUT:-90}
PIDFILE=$DATA/server.pid
PORTFILE=$DATA/server.port
LOGFILE=$DATA/server.log

usage() {
  echo "usage: $0 start|stop|status|url [PORT]" >&2
  exit 2
}

cmd=${1:-}
[[ -n $cmd ]] || usage
PORT=${2:-${MLFLOW_PORT:-5055}}
[[ $PORT =~ ^[0-9]+$ ]] || { echo "invalid port: $PORT" >&2; exit 2; }

export MLFLOW_DISABLE_TELEMETRY=true
export DO_NOT_TRACK=true
# The server's job runner (huey consumers for GenAI scorers etc.) adds eight
# processes and ~500 MB; slurm_ray needs only tracking + registry + artifacts.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}

# The pid file is trusted only if that pid is still an mlflow server on THIS
# data directory (a pid reused by another process after a crash does not count).
running_pid() {
  local pid cmdline
  [[ -s $PIDFILE ]] || return 1
  pid=$(<"$PIDFILE")
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  [[ -r /proc/$pid/cmdline ]] || return 1
  cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
  [[ $cmdline == *"mlflow"*"server"*"$DATA/mlflow.db"* ]] || return 1
  echo "$pid"
}

healthy() {  # healthy PORT
  curl -fsS --max-time 2 "http://$HOST:$1/health" >/dev/null 2>&1
}

current_port() {
  if [[ -s $PORTFILE ]]; then cat "$PORTFILE"; else echo "$PORT"; fi
}

do_status() {
  local pid port
  if pid=$(running_pid); then
    port=$(current_port)
    if healthy "$port"; then
      echo "mlflow server running: pid $pid, http://$HOST:$port (data $DATA)"
      return 0
    fi
    echo "mlflow server process $pid exists but http://$HOST:$port/health does not answer" >&2
    return 1
  fi
  echo "mlflow server not running (data $DATA)"
  return 3
}

do_start() {
  local pid port deadline
  mkdir -p "$DATA/artifacts"
  # Serialise concurrent `start`s on the same data dir (tests, make demo).
  exec 8>"$DATA/.lock"
  flock -w 120 8 || { echo "could not lock $DATA/.lock" >&2; exit 1; }

  if pid=$(running_pid); then
    port=$(current_port)
    if [[ $port != "$PORT" ]]; then
      echo "an mlflow server (pid $pid) already serves $DATA on port $port; stop it first" >&2
      exit 1
    fi
    if healthy "$port"; then
      echo "mlflow server already running: pid $pid, http://$HOST:$port"
      return 0
    fi
    # Alive but not healthy: maybe still starting; fall through to the wait.
  else
    rm -f "$PIDFILE" "$PORTFILE"
    if healthy "$PORT"; then
      echo "port $PORT already answers /health but is not our server ($DATA); pick another port" >&2
      exit 1
    fi
    [[ -x $VENV/bin/mlflow ]] || { echo "no mlflow in $VENV/bin (set MLFLOW_VENV)" >&2; exit 1; }
    local allowed=${MLFLOW_ALLOWED_HOSTS:-localhost,localhost:$PORT,127.0.0.1,127.0.0.1:$PORT}
    # setsid: the server and its uvicorn workers get their own process group,
    # which `stop` signals as a whole. The inner shell writes its own pid and
    # then execs, so the pid file names the group leader.
    # shellcheck disable=SC2016  # $$ and "$@" belong to the inner shell
    setsid bash -c 'echo $$ >"$0"; exec "$@"' "$PIDFILE" \
      "$VENV/bin/mlflow" server \
      --backend-store-uri "sqlite:///$DATA/mlflow.db" \
      --serve-artifacts --artifacts-destination "$DATA/artifacts" \
      --host "$HOST" --port "$PORT" --workers 1 \
      --allowed-hosts "$allowed" \
      </dev/null >>"$LOGFILE" 2>&1 8>&- &
    echo "$PORT" >"$PORTFILE"
  fi

  deadline=$((SECONDS + START_TIMEOUT))
  while ((SECONDS < deadline)); do
    if healthy "$PORT"; then
      echo "mlflow server running: pid $(<"$PIDFILE"), http://$HOST:$PORT (data $DATA)"
      return 0
    fi
    if [[ -s $PIDFILE ]] && ! running_pid >/dev/null; then
      echo "mlflow server exited during start; last lines of $LOGFILE:" >&2
      tail -n 30 "$LOGFILE" >&2 || true
      rm -f "$PIDFILE" "$PORTFILE"
      exit 1
    fi
    sleep 0.3
  done
  echo "mlflow server not healthy after ${START_TIMEOUT}s; last lines of $LOGFILE:" >&2
  tail -n 30 "$LOGFILE" >&2 || true
  exit 1
}

do_stop() {
  local pid i
  mkdir -p "$DATA"
  if ! pid=$(running_pid); then
    rm -f "$PIDFILE" "$PORTFILE"
    echo "mlflow server not running (data $DATA)"
    return 0
  fi
  # Negative pid: the whole process group started by setsid (uvicorn workers too).
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 100; i++)); do
    kill -0 -- "-$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 -- "-$pid" 2>/dev/null; then
    echo "mlflow server (pgid $pid) ignored SIGTERM for 10s; sending SIGKILL" >&2
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  rm -f "$PIDFILE" "$PORTFILE"
  echo "mlflow server stopped (pid $pid)"
}

case $cmd in
  start) do_start ;;
  stop) do_stop ;;
  status) do_status ;;
  url) echo "http://$HOST:$(current_port)" ;;
  *) usage ;;
esac
