#!/usr/bin/env bash
# A local Airflow (api-server, scheduler, dag-processor, triggerer) for the demo
# and the end-to-end tests: `airflow standalone` in its own process group.
#
#   airflow_local.sh start|stop|status|env
#   airflow_local.sh component triggerer|scheduler|dag-processor
#       start one more component on its own (to replace one that died: standalone
#       does not restart its children); stop stops it too.
#
# AIRFLOW_HOME defaults to $SLURM_RAY_DEV_STATE/airflow; the UI listens on
# 127.0.0.1:${SLURM_RAY_AIRFLOW_PORT:-8080}. Login: admin / the password in
# $AIRFLOW_HOME/passwords.json (generated once).
#
# The metadata database is PostgreSQL 15 (LocalExecutor; SQLite answers 500
# "database is locked" under load and serialises parallel tasks): a private
# cluster of this instance in ${SLURM_RAY_AIRFLOW_PG_DIR:-$AIRFLOW_HOME-pg}
# (scripts/postgres_local.sh), on a Unix socket only, started before Airflow
# and stopped after it.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE=${SLURM_RAY_DEV_STATE:-/var/lib/slurm-ray-dev}
PORT=${SLURM_RAY_AIRFLOW_PORT:-8080}
HOME_DIR=${SLURM_RAY_AIRFLOW_HOME:-$STATE/airflow}
PIDFILE=$HOME_DIR/standalone.pid
LOG=$HOME_DIR/standalone.log
PG_DIR=${SLURM_RAY_AIRFLOW_PG_DIR:-$HOME_DIR-pg}
PG_SCRIPT=$HERE/scripts/postgres_local.sh
VENV=${SLURM_RAY_AIRFLOW_VENV:-$HERE/.venv}
MLFLOW_URI=${SLURM_RAY_MLFLOW_URI:-http://127.0.0.1:${SLURM_RAY_MLFLOW_PORT:-5055}}

log() { printf '[airflow] %s\n' "$*" >&2; }
die() { printf '[airflow] ERROR: %s\n' "$*" >&2; exit 1; }

export_env() {
  # Settings inherited from a caller (a test's unit-test mode, another home)
  # would silently change this Airflow: start from ours only.
  local var
  for var in $(compgen -e | grep '^AIRFLOW__' || true); do unset "$var"; done
  export AIRFLOW_HOME=$HOME_DIR
  export AIRFLOW__CORE__DAGS_FOLDER=$HERE/dags
  export AIRFLOW__CORE__LOAD_EXAMPLES=False
  AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=$(bash "$PG_SCRIPT" url "$PG_DIR")
  export AIRFLOW__DATABASE__SQL_ALCHEMY_CONN
  export AIRFLOW__CORE__EXECUTOR=LocalExecutor
  # A 4-configuration sweep trains concurrently: four train tasks (short-lived
  # in a worker: they defer) plus the sweep's and other runs' small tasks.
  export AIRFLOW__CORE__PARALLELISM=${SLURM_RAY_AIRFLOW_PARALLELISM:-8}
  export AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION=False
  export AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS=admin:admin
  export AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE=$HOME_DIR/passwords.json
  export AIRFLOW__API__HOST=127.0.0.1
  export AIRFLOW__API__PORT=$PORT
  export AIRFLOW__API__BASE_URL=http://127.0.0.1:$PORT
  export AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL=10
  # Airflow's default, 30 s: an edited DAG file may take that long to show. A
  # re-parse every 10 s cost the idle stack 9.4 CPU-s a minute against 7.7 (two
  # interleaved rounds each), taken from training on a small machine.
  export AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL=${SLURM_RAY_DAG_PARSE_INTERVAL:-30}
  export AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT=600
  # A task's calls to the API server (XCom, state) give up after 5 s by default,
  # retried for about a minute: too little on a small machine while a sweep's
  # tasks start together (measured: XCom pushes failed the tasks).
  export AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT=30
  # An idle scheduler loop sleeps this long (default 1 s): every hand-off
  # between a run's tasks waits for it (bench/results.md §4 breakdown).
  export AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME=${SLURM_RAY_SCHEDULER_IDLE_SLEEP:-0.25}
  export AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE=True
  export AIRFLOW__TRIGGERER__DEFAULT_CAPACITY=200
  export SLURM_RAY_MLFLOW_URI=$MLFLOW_URI
  export MLFLOW_TRACKING_URI=$MLFLOW_URI
  export MLFLOW_DISABLE_TELEMETRY=true
  export RAY_USAGE_STATS_ENABLED=0
  export PATH=$VENV/bin:$PATH
  if [[ -f $STATE/cluster.env ]]; then
    # A connection given by the caller wins (the tests pass one with its secrets inline).
    local conn=${AIRFLOW_CONN_SLURM_DEV_OVERRIDE:-}
    # shellcheck disable=SC1091
    source "$STATE/cluster.env"
    if [[ -n $conn ]]; then export AIRFLOW_CONN_SLURM_DEV=$conn; fi
  fi
}

alive() {
  [[ -s $PIDFILE ]] || return 1
  local pid cmd
  pid=$(<"$PIDFILE")
  [[ -r /proc/$pid/cmdline ]] || return 1
  cmd=$(tr '\0' ' ' <"/proc/$pid/cmdline")
  [[ $cmd == *airflow*standalone* ]]
}

healthy() {
  local out
  out=$(curl -fsS --max-time 3 "http://127.0.0.1:$PORT/api/v2/monitor/health" 2>/dev/null) || return 1
  # scheduler, triggerer and dag-processor all report "healthy"
  [[ $(grep -o '"status":"healthy"' <<<"$out" | wc -l) -ge 3 ]]
}

cmd_start() {
  mkdir -p "$HOME_DIR"
  chmod 700 "$HOME_DIR"
  if [[ ! -s $HOME_DIR/passwords.json ]]; then
    printf '{"admin": "%s"}\n' "$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')" >"$HOME_DIR/passwords.json"
    chmod 600 "$HOME_DIR/passwords.json"
  fi
  export_env
  if alive && healthy; then
    log "already running (pid $(<"$PIDFILE")) on http://127.0.0.1:$PORT"
    return 0
  fi
  alive && cmd_stop
  bash "$PG_SCRIPT" start "$PG_DIR"
  airflow db migrate >"$HOME_DIR/migrate.log" 2>&1 || { tail -20 "$HOME_DIR/migrate.log" >&2; die "airflow db migrate failed"; }
  # setsid: its own process group, so stop can reach every child it forks.
  setsid airflow standalone >"$LOG" 2>&1 </dev/null &
  echo $! >"$PIDFILE"
  local deadline=$((SECONDS + ${SLURM_RAY_AIRFLOW_START_TIMEOUT:-180}))
  until healthy; do
    alive || { tail -30 "$LOG" >&2; die "airflow standalone exited (log: $LOG)"; }
    ((SECONDS < deadline)) || { tail -30 "$LOG" >&2; die "airflow not healthy in time (log: $LOG)"; }
    sleep 1
  done
  log "up: http://127.0.0.1:$PORT (user admin, password in $HOME_DIR/passwords.json)"
}

# A component started on its own: its own process group and pid file.
cmd_component() {
  local name=${1:-}
  [[ $name =~ ^(triggerer|scheduler|dag-processor)$ ]] || die "component: triggerer, scheduler or dag-processor"
  export_env
  local pidfile=$HOME_DIR/$name.component.pid
  if [[ -s $pidfile ]] && kill -0 -- "-$(<"$pidfile")" 2>/dev/null; then
    log "$name already running (pid $(<"$pidfile"))"
    return 0
  fi
  setsid airflow "$name" >>"$HOME_DIR/$name.component.log" 2>&1 </dev/null &
  echo $! >"$pidfile"
  log "$name started (pid $!, log $HOME_DIR/$name.component.log)"
}

stop_group() {
  local pid=$1 i
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 150); do
    kill -0 -- "-$pid" 2>/dev/null || break
    sleep 0.2
  done
  kill -KILL -- "-$pid" 2>/dev/null || true
}

cmd_stop() {
  local f
  for f in "$HOME_DIR"/*.component.pid; do
    [[ -s $f ]] || continue
    stop_group "$(<"$f")"
    rm -f "$f"
  done
  if alive; then
    stop_group "$(<"$PIDFILE")"
    log "stopped"
  fi
  rm -f "$PIDFILE"
  bash "$PG_SCRIPT" stop "$PG_DIR"
}

cmd_status() {
  bash "$PG_SCRIPT" status "$PG_DIR" || true
  if alive && healthy; then
    echo "airflow: up on http://127.0.0.1:$PORT (pid $(<"$PIDFILE"))"
  else
    echo "airflow: down"
    return 1
  fi
}

case ${1:-} in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  component) cmd_component "${2:-}" ;;
  env) export_env; env | grep -E '^(AIRFLOW|SLURM_RAY|MLFLOW)' | grep -v -E 'CONN|PASSWORD' ;;
  *) die "usage: $0 start|stop|status|env|component NAME" ;;
esac
