#!/usr/bin/env bash
# ray_launch.sh — run ENTRYPOINT on a multi-node Ray cluster started inside
# the current Slurm allocation, then tear the cluster down.
#
#   ray_launch.sh ENTRYPOINT [ARGS...]
#
# Run it as (or exec it from) the batch script of an `sbatch --nodes=N` job,
# after the Python environment that provides `ray` has been activated, with
# the run directory as the working directory. It
#
#   1. starts the Ray head on the first node of the allocation and one Ray
#      worker on every other node, each as its own background
#      `srun --export=ALL --nodes=1 --ntasks=1 -w NODE ... ray start --block`
#      step (the batch script itself runs on the first node; the batch step
#      does not count against step resources, so no --overlap is needed);
#   2. waits until every node has joined (GCS port first, then the GCS node
#      table; no fixed sleeps) and prints
#        ray_launch: cluster ready nodes=N cpus=C gpus=G in X.XXs (address=IP:PORT)
#   3. exports RAY_ADDRESS and runs ENTRYPOINT in this shell's node (the head),
#      forwarding SIGUSR1 (Slurm's `--signal=B:USR1@T`) and SIGTERM to it;
#   4. on exit stops the Ray steps (SIGTERM to the srun PIDs, SIGKILL after a
#      grace period; never `ray stop`) and exits with ENTRYPOINT's status.
#
# Environment read (all optional):
#   SLURM_RAY_PORT_BASE            first port of this job's 100-port block
#                                  (default 20000 + (SLURM_JOB_ID % 400) * 100)
#   SLURM_RAY_JOIN_TIMEOUT         seconds to wait for all nodes (default 180)
#   SLURM_RAY_STOP_GRACE           seconds between SIGTERM and SIGKILL (default 8)
#   SLURM_RAY_TMP_ROOT             parent of the per-job temp dir (default /tmp)
#   SLURM_RAY_OBJECT_STORE_MEMORY  bytes per node (default 30% of the job's
#                                  memory on the node, else min(30% RAM, 2 GiB))
#   SLURM_RAY_NUM_GPUS             GPUs per node (default: detected)
#   SLURM_RAY_IFACE                take each node's address from this interface
#                                  (default: getent ahostsv4 "$(hostname)")
#   SLURM_RAY_DASHBOARD            1 = start the dashboard on the head (port base+7)
#   SLURM_RAY_KEEP_TMP             1 = keep the temp dir even on success
# plus Slurm's SLURM_JOB_ID, SLURM_JOB_NODELIST, SLURM_JOB_CPUS_PER_NODE,
# SLURM_CPUS_ON_NODE, SLURM_GPUS_ON_NODE, SLURM_GPUS_PER_NODE,
# SLURM_MEM_PER_NODE, SLURM_MEM_PER_CPU, CUDA_VISIBLE_DEVICES.
#
# Environment exported to every process of the job (Ray daemons, ENTRYPOINT):
#   RAY_ADDRESS=HEAD_IP:GCS_PORT (ENTRYPOINT only), RAY_AUTH_MODE=token,
#   RAY_AUTH_TOKEN_PATH=<run dir>/.ray_auth_token.<jobid> (mode 600, removed
#   at exit), RAY_USAGE_STATS_ENABLED=0, SLURM_RAY_TMPDIR, SLURM_RAY_NUM_NODES.
#
# Exit status: ENTRYPOINT's status; 2 usage/environment error; 3 the Ray
# cluster did not form; 75 SIGUSR1 arrived before ENTRYPOINT started;
# 128+n a fatal signal n arrived before ENTRYPOINT started.
#
# Files: <run dir>/ray-logs/<jobid>.<node>.log (output of `ray start` per
# node); /tmp/rs-<jobid>/<node> (Ray's temp dir and logs: removed when the
# job succeeded, kept when it failed).
#
# Portable to bash 4.4 (RHEL 8 / SLES 15 login and compute nodes).

set -uo pipefail

RL=ray_launch
SELF=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")

log() { printf '%s: %s\n' "$RL" "$*"; }
err() { printf '%s: ERROR: %s\n' "$RL" "$*" >&2; }

now() { date +%s.%N; }
# elapsed T0 -> seconds since T0 with two decimals
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }

# expand_counts "4(x2),2" -> "4 4 2"  (Slurm's compressed per-node lists)
expand_counts() {
  local item n r out=()
  local IFS=,
  for item in $1; do
    if [[ $item =~ ^([0-9]+)\(x([0-9]+)\)$ ]]; then
      n=${BASH_REMATCH[1]}
      for ((r = 0; r < BASH_REMATCH[2]; r++)); do out+=("$n"); done
    elif [[ $item =~ ^[0-9]+$ ]]; then
      out+=("$item")
    fi
  done
  IFS=' '
  printf '%s\n' "${out[*]:-}"
}

# last_number "a100:2" -> 2, "gpu:2" -> 2, "3" -> 3, "" -> ""
last_number() {
  local v=${1##*:}
  v=${v%%(*}
  [[ $v =~ ^[0-9]+$ ]] && printf '%s\n' "$v"
}

# detect_gpus: GPUs this node's step may use (SLURM_RAY_NUM_GPUS wins; then
# CUDA_VISIBLE_DEVICES, SLURM_GPUS_ON_NODE, SLURM_GPUS_PER_NODE ("a100:2")).
detect_gpus() {
  local gpus=${SLURM_RAY_NUM_GPUS:-}
  if [[ -z $gpus ]]; then
    if [[ -n ${CUDA_VISIBLE_DEVICES:-} && $CUDA_VISIBLE_DEVICES != NoDevFiles ]]; then
      gpus=$(awk -F, '{print NF}' <<<"$CUDA_VISIBLE_DEVICES")
    elif [[ ${SLURM_GPUS_ON_NODE:-} =~ ^[0-9]+$ ]]; then
      gpus=$SLURM_GPUS_ON_NODE
    elif [[ -n ${SLURM_GPUS_PER_NODE:-} ]]; then
      gpus=$(last_number "$SLURM_GPUS_PER_NODE")
    fi
  fi
  printf '%s\n' "${gpus:-0}"
}

# object_store_bytes CPUS: --object-store-memory for this node. Every raylet
# believes it has the whole machine, so size it from the job's share.
object_store_bytes() {
  local cpus=$1 osm=${SLURM_RAY_OBJECT_STORE_MEMORY:-} mem_mb="" ram_kb
  if [[ -n $osm ]]; then
    printf '%s\n' "$osm"
    return
  fi
  if [[ ${SLURM_MEM_PER_NODE:-} =~ ^[0-9]+$ && $SLURM_MEM_PER_NODE -gt 0 ]]; then
    mem_mb=$SLURM_MEM_PER_NODE
  elif [[ ${SLURM_MEM_PER_CPU:-} =~ ^[0-9]+$ && $SLURM_MEM_PER_CPU -gt 0 ]]; then
    mem_mb=$((SLURM_MEM_PER_CPU * cpus))
  fi
  if [[ -n $mem_mb ]]; then
    osm=$((mem_mb * 1024 * 1024 * 3 / 10))
  else
    ram_kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
    osm=$((ram_kb * 1024 * 3 / 10))
    ((osm > 2147483648)) && osm=2147483648
  fi
  ((osm < 100000000)) && osm=100000000
  printf '%s\n' "$osm"
}

# node_ip: this node's IPv4 address, as other nodes reach it.
node_ip() {
  local ip="" host
  if [[ -n ${SLURM_RAY_IFACE:-} ]]; then
    ip=$(ip -4 -o addr show dev "$SLURM_RAY_IFACE" 2>/dev/null | awk '{split($4, a, "/"); print a[1]; exit}')
  fi
  if [[ -z $ip ]]; then
    host=$(hostname)
    ip=$(getent ahostsv4 "$host" 2>/dev/null | awk '$1 !~ /^127\./ {print $1; exit}')
  fi
  if [[ -z $ip && -n ${SLURMD_NODENAME:-} ]]; then
    ip=$(getent ahostsv4 "$SLURMD_NODENAME" 2>/dev/null | awk '$1 !~ /^127\./ {print $1; exit}')
  fi
  if [[ -z $ip ]]; then
    ip=$(hostname -I 2>/dev/null | tr ' ' '\n' | awk '/^[0-9.]+$/ && $1 !~ /^127\./ {print; exit}')
  fi
  printf '%s\n' "$ip"
}

# tcp_open HOST PORT: something accepts TCP connections there.
tcp_open() {
  # shellcheck disable=SC2016  # expanded by the inner bash
  timeout 2 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" 2>/dev/null
}

# Port layout inside the job's block (BASE .. BASE+99).
set_ports() {
  local jobid=${SLURM_JOB_ID:-0}
  PORT_BASE=${SLURM_RAY_PORT_BASE:-$((20000 + (jobid % 400) * 100))}
  GCS_PORT=$((PORT_BASE + 0))
  NODE_MANAGER_PORT=$((PORT_BASE + 1))
  OBJECT_MANAGER_PORT=$((PORT_BASE + 2))
  RUNTIME_ENV_AGENT_PORT=$((PORT_BASE + 3))
  METRICS_EXPORT_PORT=$((PORT_BASE + 4))
  DASHBOARD_AGENT_GRPC_PORT=$((PORT_BASE + 5))
  DASHBOARD_AGENT_LISTEN_PORT=$((PORT_BASE + 6))
  DASHBOARD_PORT=$((PORT_BASE + 7))
  MIN_WORKER_PORT=$((PORT_BASE + 10))
  MAX_WORKER_PORT=$((PORT_BASE + 99))
}

# ---------------------------------------------------------------------------
# Inside one node's srun step: `ray_launch.sh __node__ head|worker CPUS`.
# ---------------------------------------------------------------------------
node_main() {
  local role=$1 cpus=$2
  set_ports
  local node=${SLURMD_NODENAME:-$(hostname -s)}
  local tmp="$SLURM_RAY_TMPDIR/$node"
  local logdir="$_RL_RUN_DIR/ray-logs"
  mkdir -p "$logdir"
  exec >>"$logdir/$SLURM_JOB_ID.$node.log" 2>&1
  printf '==== %s %s on %s job %s step %s\n' "$(date '+%F %T')" "$role" "$node" \
    "$SLURM_JOB_ID" "${SLURM_STEP_ID:-?}"

  local ip
  ip=$(node_ip)
  if [[ -z $ip ]]; then
    err "no IPv4 address found for $(hostname) (set SLURM_RAY_IFACE)"
    exit 97
  fi
  mkdir -p "$tmp" && chmod 700 "$SLURM_RAY_TMPDIR" "$tmp"

  local gpus osm
  gpus=$(detect_gpus)
  osm=$(object_store_bytes "$cpus")

  local args=(
    --node-ip-address="$ip"
    --temp-dir="$tmp"
    --num-cpus="$cpus"
    --num-gpus="$gpus"
    --object-store-memory="$osm"
    --node-manager-port="$NODE_MANAGER_PORT"
    --object-manager-port="$OBJECT_MANAGER_PORT"
    --runtime-env-agent-port="$RUNTIME_ENV_AGENT_PORT"
    --metrics-export-port="$METRICS_EXPORT_PORT"
    --dashboard-agent-grpc-port="$DASHBOARD_AGENT_GRPC_PORT"
    --dashboard-agent-listen-port="$DASHBOARD_AGENT_LISTEN_PORT"
    --min-worker-port="$MIN_WORKER_PORT"
    --max-worker-port="$MAX_WORKER_PORT"
    --disable-usage-stats
    --block
  )
  if [[ $role == head ]]; then
    if tcp_open "$ip" "$GCS_PORT"; then
      err "port $GCS_PORT on $ip is already in use (another job's Ray?); set SLURM_RAY_PORT_BASE"
      exit 98
    fi
    args+=(--head --port="$GCS_PORT")
    if [[ ${SLURM_RAY_DASHBOARD:-0} == 1 ]]; then
      args+=(--include-dashboard=true --dashboard-host=0.0.0.0 --dashboard-port="$DASHBOARD_PORT")
    else
      args+=(--include-dashboard=false)
    fi
  else
    args+=(--address="$_RL_HEAD_IP:$GCS_PORT")
    printf 'ray start %s\n' "${args[*]}"
    # `ray start` via ray_wait.py: imports Ray while the head is starting,
    # then waits (no fixed sleep) until the head is registered in the GCS.
    exec python "$_RL_SELF_DIR/ray_wait.py" worker-start "$_RL_HEAD_IP:$GCS_PORT" \
      "${SLURM_RAY_JOIN_TIMEOUT:-180}" start "${args[@]}"
  fi
  printf 'ray start %s\n' "${args[*]}"
  exec ray start "${args[@]}"
}

# On success: remove the per-job temp dir on every node (node-local /tmp).
cleanup_main() {
  local node=${SLURMD_NODENAME:-$(hostname -s)}
  rm -rf "${SLURM_RAY_TMPDIR:?}/$node" 2>/dev/null
  rmdir "$SLURM_RAY_TMPDIR" 2>/dev/null
  return 0
}

# ---------------------------------------------------------------------------
# The batch script side.
# ---------------------------------------------------------------------------
STEP_PIDS=()
STEP_NODES=()
EP_PID=""
WAIT_PID=""
FINAL_RC=""
CLEANING=0

pid_running() { [[ -n $1 ]] && kill -0 "$1" 2>/dev/null; }

on_signal() {
  local sig=$1
  ((CLEANING)) && return
  if pid_running "$EP_PID"; then
    log "forwarding SIG$sig to the entrypoint (pid $EP_PID)"
    kill -s "$sig" "$EP_PID" 2>/dev/null
    return
  fi
  # No entrypoint yet: the cluster is still forming.
  if [[ $sig == USR1 ]]; then
    log "SIGUSR1 (time limit near) before the entrypoint started; stopping"
    FINAL_RC=75
  else
    log "SIG$sig before the entrypoint started; stopping"
    case $sig in
      TERM) FINAL_RC=143 ;;
      INT) FINAL_RC=130 ;;
      HUP) FINAL_RC=129 ;;
      *) FINAL_RC=1 ;;
    esac
  fi
  if pid_running "$WAIT_PID"; then kill -TERM "$WAIT_PID" 2>/dev/null; fi
  exit "$FINAL_RC"
}

stop_steps() {
  local pid i live grace=${SLURM_RAY_STOP_GRACE:-8}
  live=()
  for pid in "${STEP_PIDS[@]}"; do pid_running "$pid" && live+=("$pid"); done
  ((${#live[@]})) || return 0
  log "stopping Ray on ${#STEP_PIDS[@]} node(s) (SIGTERM to srun steps ${live[*]})"
  kill -TERM "${live[@]}" 2>/dev/null
  for ((i = 0; i < grace * 10; i++)); do
    live=()
    for pid in "${STEP_PIDS[@]}"; do pid_running "$pid" && live+=("$pid"); done
    ((${#live[@]})) || break
    sleep 0.1
  done
  if ((${#live[@]})); then
    log "Ray steps ${live[*]} still running after ${grace}s; SIGKILL"
    kill -KILL "${live[@]}" 2>/dev/null
  fi
  for pid in "${STEP_PIDS[@]}"; do wait "$pid" 2>/dev/null; done
}

on_exit() {
  local rc=$?
  CLEANING=1
  trap '' USR1 TERM INT HUP
  [[ -n $FINAL_RC ]] && rc=$FINAL_RC
  if pid_running "$WAIT_PID"; then kill -TERM "$WAIT_PID" 2>/dev/null; fi
  if pid_running "$EP_PID"; then
    log "entrypoint still running at exit; SIGTERM"
    kill -TERM "$EP_PID" 2>/dev/null
  fi
  stop_steps
  [[ -n ${RAY_AUTH_TOKEN_PATH:-} ]] && rm -f "$RAY_AUTH_TOKEN_PATH"
  if ((${#STEP_PIDS[@]})); then
    if [[ $rc == 0 && ${SLURM_RAY_KEEP_TMP:-0} != 1 ]]; then
      # The batch shell holds the job's CPUs on the first node only; the
      # Ray steps are gone, but --overlap keeps this from ever waiting.
      timeout 60 srun --export=ALL --overlap --nodes="$NUM_NODES" --ntasks="$NUM_NODES" \
        --ntasks-per-node=1 --cpus-per-task=1 bash "$SELF" __cleanup__ >/dev/null 2>&1 ||
        log "could not remove $SLURM_RAY_TMPDIR on every node"
    else
      log "keeping Ray temp dir $SLURM_RAY_TMPDIR/<node> on ${NODES[*]} (Ray's logs; exit status $rc); ray start output in $RUN_DIR/ray-logs/"
    fi
  fi
  log "exit $rc"
  exit "$rc"
}

main() {
  if (($# == 0)); then
    err "usage: ray_launch.sh ENTRYPOINT [ARGS...]"
    exit 2
  fi
  if [[ -z ${SLURM_JOB_ID:-} || -z ${SLURM_JOB_NODELIST:-} ]]; then
    err "not inside a Slurm job (SLURM_JOB_ID / SLURM_JOB_NODELIST unset)"
    exit 2
  fi
  if ! command -v ray >/dev/null 2>&1; then
    err "'ray' is not on PATH: activate the environment before ray_launch.sh"
    exit 2
  fi
  local py
  py=$(command -v python || command -v python3) || {
    err "no python on PATH"
    exit 2
  }

  local t0
  t0=$(now)
  RUN_DIR=$(pwd)
  set_ports
  # shellcheck disable=SC2207
  NODES=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))
  NUM_NODES=${#NODES[@]}
  if ((NUM_NODES == 0)); then
    err "no nodes in SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST"
    exit 2
  fi
  local cpus_list=()
  # shellcheck disable=SC2207
  cpus_list=($(expand_counts "${SLURM_JOB_CPUS_PER_NODE:-}"))
  if ((${#cpus_list[@]} != NUM_NODES)); then
    # Fall back to the batch node's count for every node.
    cpus_list=()
    local i
    for ((i = 0; i < NUM_NODES; i++)); do cpus_list+=("${SLURM_CPUS_ON_NODE:-1}"); done
  fi

  export SLURM_RAY_TMPDIR="${SLURM_RAY_TMP_ROOT:-/tmp}/rs-$SLURM_JOB_ID"
  export SLURM_RAY_NUM_NODES=$NUM_NODES
  export RAY_USAGE_STATS_ENABLED=0
  # Ray packs actors onto the first node until it is half busy; spread them
  # so env runners sample on every node of the allocation (users can override).
  export RAY_scheduler_spread_threshold="${RAY_scheduler_spread_threshold:-0.0}"
  export RAY_AUTH_MODE=token
  export RAY_AUTH_TOKEN_PATH="$RUN_DIR/.ray_auth_token.$SLURM_JOB_ID"
  export _RL_RUN_DIR=$RUN_DIR
  _RL_SELF_DIR=$(dirname "$SELF")
  export _RL_SELF_DIR
  [[ -n ${SLURM_RAY_PORT_BASE:-} ]] && export SLURM_RAY_PORT_BASE
  unset RAY_ADDRESS

  trap on_exit EXIT
  trap 'on_signal USR1' USR1
  trap 'on_signal TERM' TERM
  trap 'on_signal INT' INT
  trap 'on_signal HUP' HUP

  (
    umask 077
    head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$RAY_AUTH_TOKEN_PATH"
  ) || {
    err "cannot write the Ray auth token to $RAY_AUTH_TOKEN_PATH"
    exit 2
  }
  chmod 600 "$RAY_AUTH_TOKEN_PATH"

  HEAD_NODE=${NODES[0]}
  HEAD_IP=$(node_ip)
  if [[ -z $HEAD_IP ]]; then
    err "no IPv4 address found for $(hostname) (set SLURM_RAY_IFACE)"
    exit 2
  fi
  export _RL_HEAD_IP=$HEAD_IP
  local short_host
  short_host=$(hostname -s)
  if [[ $short_host != "${HEAD_NODE%%.*}" ]]; then
    log "warning: batch shell runs on $short_host, not on the first node $HEAD_NODE"
  fi

  log "job $SLURM_JOB_ID: head $HEAD_NODE ($HEAD_IP:$GCS_PORT), nodes ${NODES[*]}, cpus/node ${cpus_list[*]}, ports $PORT_BASE-$((PORT_BASE + 99)), temp $SLURM_RAY_TMPDIR"

  # Start every node at once; workers wait for the head's GCS port themselves.
  # srun's own messages go to the node's log next to `ray start`'s output.
  mkdir -p "$RUN_DIR/ray-logs"
  local i role
  for ((i = 0; i < NUM_NODES; i++)); do
    role=worker
    ((i == 0)) && role='head'
    srun --export=ALL --nodes=1 --ntasks=1 --cpus-per-task="${cpus_list[i]}" \
      -w "${NODES[i]}" --job-name="ray-$role" \
      bash "$SELF" __node__ "$role" "${cpus_list[i]}" \
      >>"$RUN_DIR/ray-logs/$SLURM_JOB_ID.${NODES[i]}.log" 2>&1 &
    STEP_PIDS+=($!)
    STEP_NODES+=("${NODES[i]}")
  done

  # Wait for all nodes; ray_wait.py watches the srun PIDs as well.
  local result="$SLURM_RAY_TMPDIR.wait.$$"
  local watch=() rc
  for ((i = 0; i < NUM_NODES; i++)); do watch+=(--watch "${STEP_PIDS[i]}=${STEP_NODES[i]}"); done
  "$py" -u "$_RL_SELF_DIR/ray_wait.py" --address "$HEAD_IP:$GCS_PORT" \
    --nodes "$NUM_NODES" --timeout "${SLURM_RAY_JOIN_TIMEOUT:-180}" \
    --result "$result" "${watch[@]}" &
  WAIT_PID=$!
  wait_pid "$WAIT_PID"
  rc=$WAIT_RC
  WAIT_PID=""
  local alive=0 cpus=0 gpus=0 dead_node=""
  if [[ -s $result ]]; then
    # shellcheck disable=SC1090
    source "$result"
  fi
  rm -f "$result"
  local took
  took=$(elapsed "$t0")
  if ((rc != 0)); then
    if [[ -n $dead_node ]]; then
      err "ray start on $dead_node exited before the cluster formed (see $RUN_DIR/ray-logs/$SLURM_JOB_ID.$dead_node.log)"
      local logf="$RUN_DIR/ray-logs/$SLURM_JOB_ID.$dead_node.log"
      [[ -r $logf ]] && tail -n 20 "$logf" | sed 's/^/    /' >&2
    fi
    err "only $alive of $NUM_NODES Ray nodes joined after $took s; see $SLURM_RAY_TMPDIR logs"
    FINAL_RC=3
    exit 3
  fi
  log "cluster ready nodes=$alive cpus=$cpus gpus=$gpus in ${took}s (address=$HEAD_IP:$GCS_PORT)"

  export RAY_ADDRESS="$HEAD_IP:$GCS_PORT"
  "$@" &
  EP_PID=$!
  wait_pid "$EP_PID"
  FINAL_RC=$WAIT_RC
  EP_PID=""
  log "entrypoint exited with status $FINAL_RC"
  exit "$FINAL_RC"
}

# wait_pid PID: wait for a background child, surviving trapped signals
# (they interrupt `wait`); sets WAIT_RC to the child's exit status.
wait_pid() {
  local pid=$1 r
  WAIT_RC=0
  while :; do
    wait "$pid"
    r=$?
    if pid_running "$pid"; then
      continue # interrupted by a trapped signal
    fi
    WAIT_RC=$r
    # If `wait` was interrupted just as the child exited, this returns the
    # child's real status; if the child was already reaped, 127.
    wait "$pid" 2>/dev/null
    r=$?
    ((r != 127)) && WAIT_RC=$r
    return 0
  done
}

# Sourcing the file (tests) only defines the functions.
if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
  case ${1:-} in
    __node__)
      shift
      node_main "$@"
      ;;
    __cleanup__)
      cleanup_main
      ;;
    *)
      main "$@"
      ;;
  esac
fi
