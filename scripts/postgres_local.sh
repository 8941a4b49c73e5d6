#!/usr/bin/env bash
# A private PostgreSQL 15 cluster for one local Airflow (the demo's, or a test's).
#
#   postgres_local.sh start|stop|status|url DIR
#
# DIR holds everything: data/ (initdb), run/ (the Unix socket), server.pid,
# server.log. One cluster per DIR, so several Airflows on one machine never
# share a database or a socket. It listens on its Unix socket only (no TCP
# port at all); the port number only names the socket file inside run/.
#
# Owned by a non-root user: `postgres` (Debian's package account) when run as
# root, else the calling user. Authentication is `peer` (the kernel's idea of
# the connecting OS user, no password to leak): role `airflow` accepts only
# the user who ran `start` first, role `postgres` only the owner.
# Started with setsid and stopped by the PID in server.pid (SIGINT = fast
# shutdown, SIGKILL to the process group after a grace period), never by name.
set -euo pipefail

PG_BIN=${SLURM_RAY_PG_BIN:-/usr/lib/postgresql/15/bin}
PG_PORT=5432
START_TIMEOUT=${SLURM_RAY_PG_START_TIMEOUT:-60}

log() { printf '[postgres] %s\n' "$*" >&2; }
die() { printf '[postgres] ERROR: %s\n' "$*" >&2; exit 1; }

cmd=${1:-}
DIR=${2:-}
[[ -n $cmd && -n $DIR ]] || die "usage: $0 start|stop|status|url DIR"
DIR=$(realpath -m -- "$DIR")
DATA=$DIR/data
SOCK=$DIR/run
PIDFILE=$DIR/server.pid
LOGFILE=$DIR/server.log
# A socket path longer than sun_path (107 bytes) cannot be bound.
((${#SOCK} + 16 < 107)) || die "socket directory path too long: $SOCK"

if ((EUID == 0)); then
  OWNER=${SLURM_RAY_PG_OWNER:-postgres}
  id -u "$OWNER" >/dev/null 2>&1 || die "no user $OWNER (apt-get install postgresql-15 creates it)"
  AS_OWNER=(setpriv --reuid="$OWNER" --regid="$(id -g "$OWNER")" --init-groups --)
else
  OWNER=$(id -un)
  AS_OWNER=()
fi
as_owner() { "${AS_OWNER[@]}" "$@"; }

running_pid() {
  local pid cmdline
  [[ -s $PIDFILE ]] || return 1
  pid=$(<"$PIDFILE")
  [[ $pid =~ ^[0-9]+$ && -r /proc/$pid/cmdline ]] || return 1
  cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
  [[ $cmdline == *"postgres -D $DATA "* ]] || return 1
  echo "$pid"
}

ready() { "$PG_BIN/pg_isready" -q -h "$SOCK" -p "$PG_PORT" -d postgres 2>/dev/null; }

init_cluster() {
  local client
  client=$(id -un)
  mkdir -p "$DIR"
  chown "$OWNER:" "$DIR"
  # Others may traverse to the socket (peer auth decides who gets in) but not list.
  chmod 711 "$DIR"
  as_owner test -x "$DIR" || die "$OWNER cannot reach $DIR (a parent directory is not o+x)"
  as_owner "$PG_BIN/initdb" -D "$DATA" -U postgres -A reject -E UTF8 --locale=C.UTF-8 \
    --no-instructions >"$DIR/initdb.log" 2>&1 || { cat "$DIR/initdb.log" >&2; die "initdb failed"; }
  as_owner tee -a "$DATA/postgresql.conf" >/dev/null <<EOF
# slurm_ray: a private cluster on a Unix socket only
listen_addresses = ''
port = $PG_PORT
unix_socket_directories = '$SOCK'
unix_socket_permissions = 0777
max_connections = 200
shared_buffers = 64MB
# A dev/test metadata DB: losing the last commits in a machine crash is fine,
# waiting for fsync on every heartbeat on a busy 2-core machine is not.
synchronous_commit = off
EOF
  as_owner tee "$DATA/pg_hba.conf" >/dev/null <<EOF
# TYPE  DATABASE  USER      METHOD
local   all       postgres  peer
local   airflow   airflow   peer map=slurm_ray
EOF
  as_owner tee "$DATA/pg_ident.conf" >/dev/null <<EOF
# MAPNAME   SYSTEM-USERNAME  PG-USERNAME
slurm_ray   $client          airflow
EOF
}

do_start() {
  local pid deadline fresh=0
  mkdir -p "$DIR"
  if pid=$(running_pid) && ready; then
    log "already running (pid $pid, socket $SOCK)"
    return 0
  fi
  if [[ ! -s $DATA/PG_VERSION ]]; then
    init_cluster
    fresh=1
  fi
  if ! running_pid >/dev/null; then
    rm -f "$PIDFILE"
    as_owner mkdir -p "$SOCK"
    chmod 755 "$SOCK"
    # setsid: its own process group; the inner shell writes its pid, then
    # execs (as the owner) into the postmaster, so the pid file names it.
    # shellcheck disable=SC2016  # $$ and "$@" belong to the inner shell
    setsid bash -c 'echo $$ >"$0"; exec "$@"' "$PIDFILE" \
      "${AS_OWNER[@]}" "$PG_BIN/postgres" -D "$DATA" -k "$SOCK" </dev/null >>"$LOGFILE" 2>&1 &
  fi
  deadline=$((SECONDS + START_TIMEOUT))
  until ready; do
    running_pid >/dev/null || [[ ! -s $PIDFILE ]] || { tail -20 "$LOGFILE" >&2; die "postgres exited (log: $LOGFILE)"; }
    ((SECONDS < deadline)) || { tail -20 "$LOGFILE" >&2; die "postgres not ready in ${START_TIMEOUT}s"; }
    sleep 0.2
  done
  if ((fresh)); then
    as_owner "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$SOCK" -p "$PG_PORT" -U postgres -d postgres \
      >/dev/null <<'EOF' || die "creating role/database airflow failed"
CREATE ROLE airflow LOGIN;
CREATE DATABASE airflow OWNER airflow;
EOF
  fi
  log "up (pid $(<"$PIDFILE"), socket $SOCK)"
}

do_stop() {
  local pid i
  if ! pid=$(running_pid); then
    rm -f "$PIDFILE"
    return 0
  fi
  # SIGINT: fast shutdown (rolls back open transactions, closes connections).
  kill -INT "$pid" 2>/dev/null || true
  for ((i = 0; i < 150; i++)); do
    kill -0 -- "-$pid" 2>/dev/null || break
    sleep 0.2
  done
  kill -KILL -- "-$pid" 2>/dev/null || true
  rm -f "$PIDFILE"
  log "stopped (pid $pid)"
}

do_status() {
  local pid
  if pid=$(running_pid) && ready; then
    echo "postgres: up (pid $pid, socket $SOCK)"
  else
    echo "postgres: down ($DIR)"
    return 1
  fi
}

# The SQLAlchemy URL: peer auth over the socket, no password.
do_url() { echo "postgresql+psycopg2://airflow@/airflow?host=$SOCK&port=$PG_PORT"; }

case $cmd in
  start) do_start ;;
  stop) do_stop ;;
  status) do_status ;;
  url) do_url ;;
  *) die "usage: $0 start|stop|status|url DIR" ;;
esac
