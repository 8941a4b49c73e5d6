#!/usr/bin/env bash
# Entrypoint of the slurm image of docker-compose.yaml. ROLE picks what runs:
#
#   ROLE=init        one-shot (service slurm-init): lays out the shared state
#                    volume, creates the munge key, the login node's SSH host
#                    key and the client key pair, and hands Airflow (its own
#                    volume) the client key and the host public key, so that
#                    airflow-init can pin the host key in the slurm_dev connection
#   ROLE=controller  munged, slurmctld, the cluster-side venv (built from
#                    include/requirements-cluster.txt by include/build_env.sh; a
#                    no-op once built), then sshd on port 22022: the login node
#   ROLE=compute     munged and slurmd; the node name is the container's hostname
#
# The state volume is mounted at /var/lib/slurm-ray-dev in every slurm
# container: the path the `local` profile uses, laid out like the native dev
# cluster's (scripts/devcluster.sh): venv/ scratch/ log/ munge/ ssh/
# authorized_keys/. Daemons run in the foreground; when one exits, the others
# are stopped and the container exits with its status.
set -euo pipefail

ROLE=${ROLE:-}
STATE=${SLURM_RAY_DEV_STATE:-/var/lib/slurm-ray-dev}
JOB_USER=${SLURM_RAY_DEV_USER:-slurmray}
LOGIN_HOST=${SLURM_RAY_LOGIN_HOST:-slurmctld}
LOGIN_PORT=${SLURM_RAY_LOGIN_PORT:-22022}
INCLUDE=${SLURM_RAY_INCLUDE_DIR:-/opt/slurm_ray/include}
AIRFLOW_SSH=${SLURM_RAY_AIRFLOW_SSH_DIR:-/airflow-ssh}
AIRFLOW_UID=${AIRFLOW_UID:-50000}
export SLURM_CONF=${SLURM_CONF:-/etc/slurm/slurm.conf}
LOG=$STATE/log
VENV=$STATE/venv
SCRATCH=$STATE/scratch
MUNGE_KEY=$STATE/munge/munge.key
HOST_KEY=$STATE/ssh/ssh_host_ed25519_key
CLIENT_KEY=$STATE/ssh/id_ed25519
SSHD_CONFIG=/etc/ssh/slurm_ray_sshd_config

log() { printf '[slurm %s] %s\n' "${ROLE:-?}" "$*" >&2; }
die() {
  printf '[slurm %s] ERROR: %s\n' "${ROLE:-?}" "$*" >&2
  exit 1
}

# wait_for SECONDS DESCRIPTION CMD...: poll CMD until it succeeds (a readiness
# check, not a fixed sleep); fail naming what never came up.
wait_for() {
  local limit=$1 what=$2
  shift 2
  local deadline=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die "$what not ready after ${limit}s"
    sleep 0.5
  done
}

tcp_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }
munge_ok() { munge -n | unmunge; }
ctld_ok() {
  local out
  out=$(timeout 10 scontrol ping 2>&1) || return 1
  [[ $out == *UP* ]]
}
node_ok() {
  local state
  state=$(timeout 10 sinfo -h -N -n "$1" -o %t 2>/dev/null | head -1)
  [[ $state =~ ^(idle|mix|alloc|comp)$ ]]
}

# --- the daemons: started in the background, supervised by this shell -------
PIDS=()

stop_all() {
  local pid
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait || true
}

# Wait until any daemon exits (or docker stop sends SIGTERM), then stop the
# rest: a container whose slurmctld or sshd died must not look alive.
supervise() {
  trap 'log "stopping"; stop_all; exit 0' TERM INT
  local rc=0
  wait -n "${PIDS[@]}" || rc=$?
  log "a daemon exited (status $rc); stopping the others"
  stop_all
  exit $((rc == 0 ? 1 : rc))
}

start_munge() {
  wait_for 60 "munge key $MUNGE_KEY (written by slurm-init)" test -s "$MUNGE_KEY"
  install -o munge -g munge -m 0400 "$MUNGE_KEY" /etc/munge/munge.key
  install -d -o munge -g munge -m 0755 /run/munge
  # setpriv execs (no fork): the pid is munged's own.
  setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged --foreground &
  PIDS+=($!)
  wait_for 15 munged munge_ok
}

# --- ROLE=init ---------------------------------------------------------------
cmd_init() {
  id "$JOB_USER" >/dev/null 2>&1 || die "job user $JOB_USER missing from the image"
  mkdir -p "$LOG" "$STATE/munge" "$STATE/ssh" "$STATE/authorized_keys" "$SCRATCH" "$AIRFLOW_SSH"
  chmod 755 "$STATE" "$LOG" "$STATE/authorized_keys" "$AIRFLOW_SSH"
  chmod 700 "$STATE/munge" "$STATE/ssh"
  if [[ ! -s $MUNGE_KEY ]]; then
    log "creating the munge key"
    dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none
  fi
  chmod 600 "$MUNGE_KEY"
  [[ -s $HOST_KEY ]] ||
    ssh-keygen -q -t ed25519 -N '' -C slurm-ray-compose-host -f "$HOST_KEY"
  [[ -s $CLIENT_KEY ]] ||
    ssh-keygen -q -t ed25519 -N '' -C slurm-ray-compose-client -f "$CLIENT_KEY"
  install -m 644 "$CLIENT_KEY.pub" "$STATE/authorized_keys/$JOB_USER"
  chown "$JOB_USER:" "$SCRATCH"
  chmod 755 "$SCRATCH"
  # The Airflow side: the client key (readable by the airflow user only) and
  # the login node's public host key, pinned by airflow-init.
  install -m 600 -o "$AIRFLOW_UID" -g 0 "$CLIENT_KEY" "$AIRFLOW_SSH/id_ed25519"
  install -m 644 "$CLIENT_KEY.pub" "$AIRFLOW_SSH/id_ed25519.pub"
  install -m 644 "$HOST_KEY.pub" "$AIRFLOW_SSH/ssh_host_ed25519_key.pub"
  printf '[%s]:%s %s\n' "$LOGIN_HOST" "$LOGIN_PORT" "$(cut -d' ' -f1,2 "$HOST_KEY.pub")" \
    >"$AIRFLOW_SSH/known_hosts"
  chmod 644 "$AIRFLOW_SSH/known_hosts"
  log "login node host key: $(ssh-keygen -l -f "$HOST_KEY.pub")"
}

# --- ROLE=controller -----------------------------------------------------------
build_venv() {
  if [[ ${SLURM_RAY_DEV_SKIP_VENV:-0} == 1 ]]; then
    log "SLURM_RAY_DEV_SKIP_VENV=1: not building $VENV"
    return 0
  fi
  if [[ -n ${SLURM_RAY_PIP_EXTRA_INDEX_URL:-} ]]; then
    export PIP_EXTRA_INDEX_URL=$SLURM_RAY_PIP_EXTRA_INDEX_URL
  fi
  log "cluster-side venv $VENV from $INCLUDE/requirements-cluster.txt (first start: minutes)"
  # The same script ClusterEnvOperator runs over SSH; Debian's python3, so
  # that the job user can execute the venv on every node.
  PYTHON=/usr/bin/python3 bash "$INCLUDE/build_env.sh" venv "$VENV" \
    "$INCLUDE/requirements-cluster.txt"
  chmod -R a+rX "$VENV"
}

write_sshd_config() {
  cat >"$SSHD_CONFIG" <<EOF
# Written by docker/slurm/entrypoint.sh: the login node of the compose cluster.
Port $LOGIN_PORT
HostKey $HOST_KEY
PidFile /run/sshd.pid
AuthorizedKeysFile $STATE/authorized_keys/%u
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin no
AllowUsers $JOB_USER
UsePAM no
StrictModes no
LogLevel VERBOSE
MaxSessions 100
MaxStartups 100:30:200
SetEnv SLURM_CONF=$SLURM_CONF
Subsystem sftp internal-sftp
EOF
}

cmd_controller() {
  [[ -s $HOST_KEY ]] || die "no SSH host key in $STATE/ssh: run slurm-init first"
  start_munge
  mkdir -p /var/spool/slurmctld
  slurmctld -D &
  PIDS+=($!)
  wait_for 60 slurmctld ctld_ok
  log "slurmctld up"
  build_venv
  write_sshd_config
  mkdir -p /run/sshd
  chmod 755 /run/sshd
  /usr/sbin/sshd -t -f "$SSHD_CONFIG" || die "invalid $SSHD_CONFIG"
  /usr/sbin/sshd -D -e -f "$SSHD_CONFIG" &
  PIDS+=($!)
  wait_for 15 "sshd on port $LOGIN_PORT" tcp_open 127.0.0.1 "$LOGIN_PORT"
  log "up: login node $LOGIN_HOST:$LOGIN_PORT (user $JOB_USER, key only)"
  supervise
}

# --- ROLE=compute ------------------------------------------------------------
cmd_compute() {
  local node=${SLURM_NODENAME:-$(hostname -s)}
  start_munge
  wait_for 120 "slurmctld (seen from $node)" ctld_ok
  mkdir -p /var/spool/slurmd
  slurmd -D -N "$node" &
  PIDS+=($!)
  wait_for 60 "node $node in sinfo" node_ok "$node"
  log "up: node $node"
  supervise
}

case $ROLE in
  init) cmd_init ;;
  controller) cmd_controller ;;
  compute) cmd_compute ;;
  *) die "ROLE must be init, controller or compute (got '${ROLE}')" ;;
esac
