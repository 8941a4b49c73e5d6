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
#      Only what a batch job needs: no dashboard, no usage stats, no
#      autoscaler monitor (the allocation is fixed); a worker runs `ray start`
#      as soon as the head's raylet has registered in the GCS, beside the
#      head's agents' start-up (no fixed sleeps; bench/bench_ray_formation.py);
#   2. waits until every node has joined (GCS port first, then the GCS node
#      table; no fixed sleeps) and prints
#        ray_launch: cluster ready nodes=N cpus=C gpus=G in X.XXs (address=IP:PORT)
#   3. exports RAY_ADDRESS and runs ENTRYPOINT in this shell's node (the head),
#      forwarding SIGUSR1 (Slurm's `--signal=B:USR1@T`) and SIGTERM to it;
#   4. on exit stops the Ray steps (SIGTERM to the srun PIDs, SIGKILL after a
#      grace period; never `ray stop`) and exits with ENTRYPOINT's status.
#
# Environment read (all optional):
#   SLURM_RAY_PORT_BASE            first port of this job's 100-port block (fixed:
#                                  the job fails if a port of it is taken); by
#                                  default the block is picked from
#   SLURM_RAY_PORT_MIN/_MAX        (20000/65535) minus the ephemeral port range
#                                  (/proc/sys/net/ipv4/ip_local_port_range),
#                                  starting at SLURM_JOB_ID modulo the number of
#                                  blocks; every port of a block is probed on
#                                  every node first, and a taken block is
#                                  skipped (logged)
#   SLURM_RAY_JOIN_TIMEOUT         seconds to wait for all nodes (default 180)
#   SLURM_RAY_STOP_GRACE           seconds between SIGTERM and SIGKILL (default 8)
#   SLURM_RAY_TMP_ROOT             parent of the job's private temp dirs (default
#                                  /tmp; owned by root or you, sticky if others
#                                  may write to it)
#   SLURM_RAY_OBJECT_STORE_MEMORY  bytes per node (default 30% of the job's
#                                  memory on the node, else min(30% RAM, 2 GiB))
#   SLURM_RAY_NUM_GPUS             GPUs per node (default: detected)
#   SLURM_RAY_IFACE                take each node's address from this interface
#                                  (default: getent ahostsv4 "$(hostname)")
#   SLURM_RAY_DASHBOARD            1 = start the dashboard on the head (port base+7)
#   SLURM_RAY_AUTOSCALER           1 = start Ray's autoscaler monitor on the head
#                                  (default: not started, `ray start --no-monitor`;
#                                  the allocation never grows)
#   SLURM_RAY_LOG_MONITOR          0 = no log monitor: Ray workers' output stays
#                                  in Ray's logs instead of the entrypoint's
#   SLURM_RAY_KEEP_TMP             1 = keep the nodes' temp dirs in place
# plus Slurm's SLURM_JOB_ID, SLURM_JOB_NODELIST, SLURM_JOB_CPUS_PER_NODE,
# SLURM_CPUS_ON_NODE, SLURM_GPUS_ON_NODE, SLURM_GPUS_PER_NODE,
# SLURM_MEM_PER_NODE, SLURM_MEM_PER_CPU, CUDA_VISIBLE_DEVICES.
#
# Environment exported to every process of the job (Ray daemons, ENTRYPOINT):
#   RAY_ADDRESS=HEAD_IP:GCS_PORT (ENTRYPOINT only), RAY_AUTH_MODE=token,
#   RAY_AUTH_TOKEN_PATH=<run dir>/.ray_auth_token.<jobid> (mode 600, removed
#   at exit), RAY_USAGE_STATS_ENABLED=0, SLURM_RAY_NUM_NODES, and
#   SLURM_RAY_TMPDIR = RAY_TMPDIR: a private (0700) temp dir on the process's
#   own node (the batch shell's for ENTRYPOINT, each node step's for its Ray
#   processes), removed at exit; Ray's file locks (`_ray_lockfiles`) go there
#   instead of a name in the shared /tmp.
#
# A heterogeneous job (SLURM_HET_SIZE set; slurm_ray's GPU hetjob: component
# 0 the GPU node(s), component 1 the CPU nodes) takes its nodes and CPUs from
# SLURM_JOB_NODELIST_HET_GROUP_<g> / SLURM_JOB_CPUS_PER_NODE_HET_GROUP_<g>,
# starts each node's step with `srun --het-group=<g>`, and gives Ray no CPUs
# on component 0 (`--num-cpus=0`, GPUs as detected in that step) and no GPUs
# on the others (they inherit the batch shell's CUDA_VISIBLE_DEVICES): CPU actors
# (env runners) land on the CPU nodes, GPU learners on the GPU node(s), whose
# CPUs serve the driver and the learners.
#
# Exit status: ENTRYPOINT's status; 2 usage/environment error; 3 the Ray
# cluster did not form; 75 SIGUSR1 arrived before ENTRYPOINT started;
# 128+n a fatal signal n arrived before ENTRYPOINT started.
#
# Files: <run dir>/ray-logs/<jobid>.<node>.log (output of `ray start` per
# node, and of its cleanup); <jobid>.cleanup.log (srun's own messages when the
# cleanup step failed); Ray's temp dir on each node is a fresh private `mktemp -d`
# (<tmp root>/rs-<jobid>.XXXXXX, mode 700: a neighbour can neither pre-create
# nor own it), removed when the node's step ends, also on failure and
# scancel; unless the job succeeded, Ray's logs are first copied to
# <run dir>/ray-logs/<jobid>.<node>.ray/.
#
# Shared site: nothing read back from a file is executed (results are
# key=value data, parsed strictly, from a private directory). A port of the
# probed block taken before Ray binds it (exit 98 of the node's step) starts
# Ray once more on another block.
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

# port_blocks LO HI: the first port of every 100-port block within
# SLURM_RAY_PORT_MIN..SLURM_RAY_PORT_MAX that stays clear of the ephemeral
# range LO-HI (every outgoing connection on the node takes a port from there).
port_blocks() {
  local lo=$1 hi=$2 min=${SLURM_RAY_PORT_MIN:-20000} max=${SLURM_RAY_PORT_MAX:-65535} b
  for ((b = min; b + 99 <= max; b += 100)); do
    if ((b + 99 < lo || b > hi)); then printf '%s\n' "$b"; fi
  done
}

# preferred_block JOBID < BLOCKS: the block a job tries first (spread by job id).
preferred_block() {
  local blocks=()
  mapfile -t blocks
  ((${#blocks[@]})) || return 1
  printf '%s\n' "${blocks[$1 % ${#blocks[@]}]}"
}

# each_node_srun SECONDS ARGS...: `srun --overlap ARGS` with one task on every
# node of the allocation (one step per hetjob component), each under `timeout`.
each_node_srun() {
  local t=$1 g rc=0
  shift
  if ((${#HET_SIZES[@]} == 0)); then
    # An explicit status: a bare `return` in a function that the EXIT trap
    # calls returns the status from before the trap (the job's).
    timeout "$t" srun --export=ALL --overlap --nodes="$NUM_NODES" --ntasks="$NUM_NODES" \
      --ntasks-per-node=1 --cpus-per-task=1 "$@" || rc=$?
    return "$rc"
  fi
  for g in "${!HET_SIZES[@]}"; do
    timeout "$t" srun --het-group="$g" --export=ALL --overlap --nodes="${HET_SIZES[g]}" \
      --ntasks="${HET_SIZES[g]}" --ntasks-per-node=1 --cpus-per-task=1 "$@" || rc=$?
  done
  return "$rc"
}

# het_layout: NODES, cpus_list (the caller's), HET_GROUP and HET_SIZES from
# every component's SLURM_JOB_NODELIST_HET_GROUP_<g> and CPU counts.
het_layout() {
  local g list cpus nodes=() counts=() n
  for ((g = 0; g < SLURM_HET_SIZE; g++)); do
    list=SLURM_JOB_NODELIST_HET_GROUP_$g cpus=SLURM_JOB_CPUS_PER_NODE_HET_GROUP_$g
    if [[ -z ${!list:-} ]]; then
      err "hetjob of $SLURM_HET_SIZE components but $list is unset"
      return 1
    fi
    mapfile -t nodes < <(scontrol show hostnames "${!list}")
    read -ra counts <<<"$(expand_counts "${!cpus:-}")"
    if ((${#nodes[@]} == 0 || ${#counts[@]} != ${#nodes[@]})); then
      err "hetjob component $g: nodes '${!list}' do not match CPUs '${!cpus:-}'"
      return 1
    fi
    NODES+=("${nodes[@]}")
    cpus_list+=("${counts[@]}")
    for n in "${nodes[@]}"; do HET_GROUP+=("$g"); done
    HET_SIZES+=("${#nodes[@]}")
  done
}

# choose_ports: probe the candidate blocks on every node (one srun task per
# node) and set PORT_BASE to the first block that is free everywhere.
choose_ports() {
  local order=() blocks=() lo=32768 hi=60999 n i start
  if [[ -n ${SLURM_RAY_PORT_BASE:-} ]]; then
    if ! [[ $SLURM_RAY_PORT_BASE =~ ^[0-9]+$ ]] || ((SLURM_RAY_PORT_BASE < 1024 ||
      SLURM_RAY_PORT_BASE > 65436)); then
      err "SLURM_RAY_PORT_BASE=$SLURM_RAY_PORT_BASE: must be a port number 1024..65436"
      return 2
    fi
    order=("$SLURM_RAY_PORT_BASE")
  else
    read -r lo hi </proc/sys/net/ipv4/ip_local_port_range || true
    mapfile -t blocks < <(port_blocks "$lo" "$hi")
    n=${#blocks[@]}
    if ((n == 0)); then
      err "no 100-port block in ${SLURM_RAY_PORT_MIN:-20000}-${SLURM_RAY_PORT_MAX:-65535} outside the ephemeral range $lo-$hi"
      return 2
    fi
    start=$((SLURM_JOB_ID % n))
    for ((i = 0; i < n; i++)); do order+=("${blocks[(start + i) % n]}"); done
  fi
  local out list live reap=()
  list=$(printf '%s,' "${order[@]}")
  # This user's jobs that are not over (%A: one id per array element): their
  # temp dirs stay; without that list nothing is reaped.
  if live=$(squeue -h -u "$(id -un)" -o %A 2>/dev/null) && [[ -n $live ]]; then
    reap=(--reap "${SLURM_RAY_TMP_ROOT:-/tmp}" "$SLURM_JOB_ID" "$(tr '\n' , <<<"$live")")
  fi
  if ! out=$(each_node_srun 60 --job-name=ray-ports \
    "$py" "$_RL_SELF_DIR/ray_wait.py" ports "$list" 100 "${reap[@]}" \
    2>>"$RUN_DIR/ray-logs/$SLURM_JOB_ID.ports.log"); then
    err "could not probe Ray's ports on the nodes (see $RUN_DIR/ray-logs/$SLURM_JOB_ID.ports.log)"
    return 3
  fi
  local -A why=()
  local word base port node skipped=0 reaped
  reaped=$(grep -c '^reaped ' <<<"$out")
  ((reaped)) && log "removed $reaped temp dir(s) that ended jobs (cancelled) left on the nodes"
  while read -r word base port node; do
    [[ $word == taken && $base =~ ^[0-9]+$ && $port =~ ^([0-9]+|ephemeral)$ &&
      $node =~ ^[A-Za-z0-9._-]+$ ]] || continue
    why[$base]+="${why[$base]:+, }port $port on $node"
  done <<<"$out"
  for base in "${order[@]}"; do
    if [[ -z ${why[$base]:-} ]]; then
      PORT_BASE=$base
      ((skipped)) && log "skipped $skipped taken port block(s); using $base-$((base + 99))"
      return 0
    fi
    skipped=$((skipped + 1))
    if ((skipped <= 3)); then
      log "port block $base-$((base + 99)) is taken (${why[$base]}); trying the next one"
    fi
  done
  if [[ -n ${SLURM_RAY_PORT_BASE:-} ]]; then
    err "port block $SLURM_RAY_PORT_BASE-$((SLURM_RAY_PORT_BASE + 99)) (SLURM_RAY_PORT_BASE) is taken: ${why[$SLURM_RAY_PORT_BASE]}"
  else
    err "every port block is taken on some node"
  fi
  return 3
}

# private_dir: a new directory that only this user can use, under the temp
# root. `mktemp -d` creates an unpredictable name exclusively (mode 700), so
# a neighbour can neither pre-create it, own it nor deny it to us.
private_dir() {
  local root=${SLURM_RAY_TMP_ROOT:-/tmp} d owner mode
  if [[ ! -d $root || -L $root ]]; then
    err "temp root $root is not a directory (SLURM_RAY_TMP_ROOT)"
    return 1
  fi
  owner=$(stat -c %u "$root") mode=$(stat -c %a "$root")
  if [[ $owner != 0 && $owner != "$(id -u)" ]]; then
    err "temp root $root belongs to uid $owner, not to root or you (SLURM_RAY_TMP_ROOT)"
    return 1
  fi
  if (((8#$mode & 8#022) && !(8#$mode & 8#1000))); then
    err "temp root $root is writable by others and not sticky (SLURM_RAY_TMP_ROOT)"
    return 1
  fi
  if ! d=$(umask 077 && mktemp -d "$root/rs-$SLURM_JOB_ID.XXXXXX"); then
    err "cannot create a temp dir in $root"
    return 1
  fi
  if [[ -L $d || ! -O $d || $(stat -c %a "$d") != 700 ]]; then
    err "temp dir $d is not private"
    return 1
  fi
  # Whose dir it is, for cleanups on a temp root that nodes share.
  printf '%s\n' "${SLURMD_NODENAME:-$(hostname -s)}" >"$d/node"
  printf '%s\n' "$d"
}

# read_result FILE: ray_wait.py's key=value lines into alive/cpus/gpus/dead_node.
# Data only: any other line is refused, nothing is evaluated.
read_result() {
  local line
  while IFS= read -r line; do
    if [[ $line =~ ^(alive|cpus|gpus)=([0-9]+(\.[0-9]+)?)$ ]] ||
      [[ $line =~ ^(dead_node)=([A-Za-z0-9._-]*)$ ]]; then
      case ${BASH_REMATCH[1]} in
        alive) alive=${BASH_REMATCH[2]} ;;
        cpus) cpus=${BASH_REMATCH[2]} ;;
        gpus) gpus=${BASH_REMATCH[2]} ;;
        dead_node) dead_node=${BASH_REMATCH[2]} ;;
      esac
    else
      err "ignoring unexpected line in $1: ${line:0:80}"
    fi
  done <"$1"
}

# Port layout inside the job's block (BASE .. BASE+99).
set_ports() {
  PORT_BASE=$1
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
NODE_TMP=""
NODE_NAME=""
RAY_PID=""

node_main() {
  local role=$1 cpus=$2 ray_cpus=${3:-$2} ray_gpus=${4:-}
  set_ports "$_RL_PORT_BASE"
  local node=${SLURMD_NODENAME:-$(hostname -s)}
  local logdir="$_RL_RUN_DIR/ray-logs" logf off i
  mkdir -p "$logdir"
  logf="$logdir/$SLURM_JOB_ID.$node.log"
  off=$(stat -c %s "$logf" 2>/dev/null) || off=0
  exec >>"$logf" 2>&1
  printf '==== %s %s on %s job %s step %s\n' "$(date '+%F %T')" "$role" "$node" \
    "$SLURM_JOB_ID" "${SLURM_STEP_ID:-?}"

  local ip
  ip=$(node_ip)
  if [[ -z $ip ]]; then
    err "no IPv4 address found for $(hostname) (set SLURM_RAY_IFACE)"
    exit 97
  fi
  NODE_NAME=$node
  trap node_exit EXIT
  trap 'node_signal TERM' TERM
  trap 'node_signal INT' INT
  trap 'node_signal HUP' HUP
  NODE_TMP=$(private_dir) || exit 96
  # Ray makes its temp dir world-writable (0777): it lives one level below
  # our private dir, which nobody else can enter.
  local tmp=$NODE_TMP/ray
  printf 'temp dir %s\n' "$tmp"
  # Ray's daemons and workers on this node inherit these, not the batch
  # shell's dir: on a real site that path exists only on the batch node.
  export SLURM_RAY_TMPDIR=$NODE_TMP RAY_TMPDIR=$NODE_TMP
  # For the cleanup step (srun's SIGTERM reaches this shell as SIGKILL), and
  # for the next job's reaper when a scancel leaves the dir behind.
  (umask 077 && printf '%s\n' "$NODE_TMP" >"$logdir/$SLURM_JOB_ID.$node.tmp" &&
    printf '%s\n' "$_RL_RUN_DIR" >"$NODE_TMP/run_dir")

  local gpus osm
  if [[ -n $ray_gpus ]]; then
    # A hetjob's CPU component inherits the batch shell's CUDA_VISIBLE_DEVICES.
    gpus=$ray_gpus
    unset CUDA_VISIBLE_DEVICES SLURM_GPUS_ON_NODE
  else
    gpus=$(detect_gpus)
  fi
  osm=$(object_store_bytes "$cpus")

  local args=(
    --node-ip-address="$ip"
    --temp-dir="$tmp"
    --num-cpus="$ray_cpus"
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
  # Ray's log monitor streams workers' stdout/stderr to the driver (the
  # entrypoint's output); without it they stay in Ray's logs on the node.
  if [[ ${SLURM_RAY_LOG_MONITOR:-1} == 0 ]]; then
    args+=(--include-log-monitor=false)
  fi
  if [[ $role == head ]]; then
    if tcp_open "$ip" "$GCS_PORT"; then
      err "port $GCS_PORT on $ip is already in use (another job's Ray?); set SLURM_RAY_PORT_BASE"
      exit 98
    fi
    args+=(--head --port="$GCS_PORT")
    # The allocation is fixed: Ray's autoscaler monitor has nothing to scale
    # and only costs CPU while the cluster forms.
    [[ ${SLURM_RAY_AUTOSCALER:-0} == 1 ]] || args+=(--no-monitor)
    if [[ ${SLURM_RAY_DASHBOARD:-0} == 1 ]]; then
      args+=(--include-dashboard=true --dashboard-host=0.0.0.0 --dashboard-port="$DASHBOARD_PORT")
    else
      args+=(--include-dashboard=false)
    fi
    printf 'ray start %s\n' "${args[*]}"
    ray start "${args[@]}" &
  else
    args+=(--address="$_RL_HEAD_IP:$GCS_PORT")
    printf 'ray start %s\n' "${args[*]}"
    # `ray start` via ray_wait.py: imports Ray while the head is starting,
    # then starts (no fixed sleep) as soon as the head's raylet has
    # registered in the GCS, while the head's agents are still starting.
    python "$_RL_SELF_DIR/ray_wait.py" worker-start "$_RL_HEAD_IP:$GCS_PORT" \
      "${SLURM_RAY_JOIN_TIMEOUT:-180}" start "${args[@]}" &
  fi
  # A child, not exec: when Ray exits by itself this shell still cleans up.
  RAY_PID=$!
  if ! watch_bind "$tmp" "$logf" "$off"; then
    err "a port of block $_RL_PORT_BASE-$((_RL_PORT_BASE + 99)) on $node was taken after the probe"
    # `ray start` ignores SIGTERM while it waits for its GCS.
    node_signal TERM
    for ((i = 0; i < 20; i++)); do
      pid_running "$RAY_PID" || break
      sleep 0.1
    done
    node_signal KILL
    wait_pid "$RAY_PID"
    exit 98
  fi
  wait_pid "$RAY_PID"
  exit "$WAIT_RC"
}

# watch_bind TMP LOG OFFSET: until `ray start` says in LOG (past OFFSET) that
# Ray started, look in Ray's own logs for a port it could not bind: taken by
# someone after the probe. Ray gives up on that only after ~40 s; status 1
# (the line printed) at once, so that the batch shell tries another block.
watch_bind() {
  local tmp=$1 logf=$2 off=$3 line
  while pid_running "$RAY_PID"; do
    tail -c +"$((off + 1))" "$logf" 2>/dev/null | grep -q "Ray runtime started" && return 0
    line=$(grep -hs -m 1 "Failed to start the grpc server" "$tmp"/session_2*/logs/*.out)
    if [[ -n $line ]]; then
      printf '%s\n' "${line:0:400}"
      return 1
    fi
    sleep 0.5 # a watcher only: Ray starts meanwhile
  done
  return 0
}

node_signal() {
  if pid_running "$RAY_PID"; then kill -s "$1" "$RAY_PID" 2>/dev/null; fi
}

# The node step ends by itself (Ray failed) or by scancel's SIGTERM: clean up.
# (The batch shell's SIGTERM to srun arrives as SIGKILL: __cleanup__ then.)
node_exit() {
  local rc=$? i
  trap '' TERM INT HUP
  printf '%s node step exiting (status %s)\n' "$(date '+%T.%N')" "$rc"
  if pid_running "$RAY_PID"; then
    kill -TERM "$RAY_PID" 2>/dev/null
    for ((i = 0; i < 30; i++)); do
      pid_running "$RAY_PID" || break
      sleep 0.1
    done
  fi
  if [[ -z $NODE_TMP || ! -d $NODE_TMP ]]; then exit "$rc"; fi
  if [[ ${SLURM_RAY_KEEP_TMP:-0} == 1 ]]; then
    printf 'keeping temp dir %s (SLURM_RAY_KEEP_TMP=1)\n' "$NODE_TMP"
    exit "$rc"
  fi
  local status=""
  [[ -f $_RL_RUN_DIR/ray-logs/$SLURM_JOB_ID.status ]] &&
    status=$(head -c 8 "$_RL_RUN_DIR/ray-logs/$SLURM_JOB_ID.status")
  remove_node_tmp "$NODE_TMP" "$NODE_NAME" "${status:-1}"
  exit "$rc"
}

# remove_node_tmp DIR NODE STATUS: unless STATUS is 0, copy Ray's logs to
# <run dir>/ray-logs/<jobid>.<node>.ray/ first; then remove DIR.
remove_node_tmp() {
  local d=$1 node=$2 status=$3 s i
  if [[ $status != 0 ]]; then
    local dest="$_RL_RUN_DIR/ray-logs/$SLURM_JOB_ID.$node.ray"
    for s in "$d"/ray/session_2*; do
      [[ -d $s/logs ]] && mkdir -p "$dest" && cp -r "$s/logs/." "$dest/" 2>/dev/null
    done
    printf '%s Ray logs of %s -> %s (status %s)\n' "$(date '+%T.%N')" "$d" "$dest" "$status"
  fi
  # Ray's daemons may still be exiting and writing.
  for ((i = 0; i < 5; i++)); do
    rm -rf "$d" 2>/dev/null && break
    sleep 0.2
  done
  rm -f "$_RL_RUN_DIR/ray-logs/$SLURM_JOB_ID.$node.tmp"
  printf '%s removed %s\n' "$(date '+%T.%N')" "$d"
}

# __cleanup__ STATUS, one task per node after the Ray steps ended: remove the
# temp dir the node step recorded, and any other dir of this job on the node
# (a step killed between creating its dir and recording it, e.g. when the
# join timed out while it started). Only this job's dirs, owned by us, and
# not another node's where the temp root is shared: that node's task keeps
# its logs under its own name.
cleanup_main() {
  local node=${SLURMD_NODENAME:-$(hostname -s)} rec d=""
  exec >>"$_RL_RUN_DIR/ray-logs/$SLURM_JOB_ID.$node.log" 2>&1
  rec="$_RL_RUN_DIR/ray-logs/$SLURM_JOB_ID.$node.tmp"
  printf '==== %s cleanup on %s job %s step %s (status %s, record %s)\n' "$(date '+%F %T.%N')" \
    "$node" "$SLURM_JOB_ID" "${SLURM_STEP_ID:-?}" "$1" "$([[ -f $rec ]] && head -n 1 "$rec")"
  [[ -f $rec ]] && d=$(head -n 1 "$rec")
  if [[ $d =~ /rs-$SLURM_JOB_ID\.[A-Za-z0-9]{6}$ && -d $d && ! -L $d && -O $d ]]; then
    remove_node_tmp "$d" "$node" "$1"
  fi
  for d in "${SLURM_RAY_TMP_ROOT:-/tmp}/rs-$SLURM_JOB_ID".??????; do
    if [[ $d =~ /rs-$SLURM_JOB_ID\.[A-Za-z0-9]{6}$ && -d $d && ! -L $d && -O $d ]]; then
      [[ -f $d/node && $(head -n 1 "$d/node") != "$node" ]] && continue
      [[ -e $d/batch ]] && continue # the batch shell's own, in use between two tries
      remove_node_tmp "$d" "$node" "$1"
    fi
  done
  return 0
}

# ---------------------------------------------------------------------------
# The batch script side.
# ---------------------------------------------------------------------------
STEP_PIDS=()
STEP_NODES=()
HET_GROUP=() # each node's hetjob component (empty: one component)
HET_SIZES=() # nodes per hetjob component
PRIV_DIR=""
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
  # Tells each node step whether to keep Ray's logs before removing its temp dir.
  ((${#STEP_PIDS[@]})) && printf '%s\n' "$rc" >"$RUN_DIR/ray-logs/$SLURM_JOB_ID.status"
  stop_steps
  [[ -n ${RAY_AUTH_TOKEN_PATH:-} ]] && rm -f "$RAY_AUTH_TOKEN_PATH"
  [[ -n $PRIV_DIR ]] && rm -rf "$PRIV_DIR"
  if ((${#STEP_PIDS[@]})); then
    if [[ ${SLURM_RAY_KEEP_TMP:-0} == 1 ]]; then
      log "keeping Ray's temp dirs (SLURM_RAY_KEEP_TMP=1): see 'temp dir' in $RUN_DIR/ray-logs/$SLURM_JOB_ID.<node>.log"
    else
      # The batch shell holds the job's CPUs on the first node only; the
      # Ray steps are gone, but --overlap keeps this from ever waiting.
      local crc=0 clog="$RUN_DIR/ray-logs/$SLURM_JOB_ID.cleanup.log"
      each_node_srun 60 bash "$SELF" __cleanup__ "$rc" >>"$clog" 2>&1 || crc=$?
      if ((crc != 0)); then
        log "could not remove Ray's temp dirs on every node (srun status $crc; see $clog)"
      elif [[ ! -s $clog ]]; then
        rm -f "$clog"
      fi
      rm -f "$RUN_DIR/ray-logs/$SLURM_JOB_ID.status"
      if [[ $rc != 0 ]]; then
        log "kept Ray's logs in $RUN_DIR/ray-logs/$SLURM_JOB_ID.<node>.ray/ (exit status $rc); ray start output in $RUN_DIR/ray-logs/"
      fi
    fi
  fi
  log "exit $rc"
  exit "$rc"
}

# form_cluster PY CPUS...: probe the ports, start Ray on every node (one srun
# step each) and wait until all joined. Sets alive, cpus, gpus, and for a
# step that exited first dead_node and dead_rc (its status); 1 when not formed.
form_cluster() {
  local py=$1 prc tp
  shift
  local cpus_list=("$@")
  tp=$(now)
  choose_ports
  prc=$?
  if ((prc != 0)); then
    FINAL_RC=$prc
    exit "$prc"
  fi
  set_ports "$PORT_BASE"
  export _RL_PORT_BASE=$PORT_BASE

  log "job $SLURM_JOB_ID: head $HEAD_NODE ($HEAD_IP:$GCS_PORT), nodes ${NODES[*]}, cpus/node ${cpus_list[*]}, ports $PORT_BASE-$((PORT_BASE + 99)) (probed in $(elapsed "$tp")s), temp ${SLURM_RAY_TMP_ROOT:-/tmp}/rs-$SLURM_JOB_ID.XXXXXX (private, per node)"

  # Start every node at once; workers wait for the head's GCS themselves.
  # srun's own messages go to the node's log next to `ray start`'s output.
  local i role het=() ray_cpus ray_gpus=()
  if ((${#HET_SIZES[@]})); then
    log "hetjob: component 0 (GPU, no Ray CPUs) ${NODES[*]:0:HET_SIZES[0]}, component 1 (CPU) ${NODES[*]:HET_SIZES[0]}"
  fi
  for ((i = 0; i < NUM_NODES; i++)); do
    role=worker
    ((i == 0)) && role='head'
    ray_cpus=${cpus_list[i]}
    if ((${#HET_SIZES[@]})); then
      het=(--het-group="${HET_GROUP[i]}")
      ray_gpus=(0)
      ((HET_GROUP[i] == 0)) && ray_cpus=0 ray_gpus=()
    fi
    srun "${het[@]}" --export=ALL --nodes=1 --ntasks=1 --cpus-per-task="${cpus_list[i]}" \
      -w "${NODES[i]}" --job-name="ray-$role" \
      bash "$SELF" __node__ "$role" "${cpus_list[i]}" "$ray_cpus" "${ray_gpus[@]}" \
      >>"$RUN_DIR/ray-logs/$SLURM_JOB_ID.${NODES[i]}.log" 2>&1 &
    STEP_PIDS+=($!)
    STEP_NODES+=("${NODES[i]}")
  done

  # Wait for all nodes; ray_wait.py watches the srun PIDs as well.
  local result="$PRIV_DIR/wait"
  local watch=() rc
  for ((i = 0; i < NUM_NODES; i++)); do watch+=(--watch "${STEP_PIDS[i]}=${STEP_NODES[i]}"); done
  "$py" -u "$_RL_SELF_DIR/ray_wait.py" --address "$HEAD_IP:$GCS_PORT" \
    --nodes "$NUM_NODES" --timeout "${SLURM_RAY_JOIN_TIMEOUT:-180}" \
    --result "$result" "${watch[@]}" &
  WAIT_PID=$!
  wait_pid "$WAIT_PID"
  rc=$WAIT_RC
  WAIT_PID=""
  alive=0 cpus=0 gpus=0 dead_node="" dead_rc=0
  [[ -f $result ]] && read_result "$result"
  rm -f "$result"
  for ((i = 0; i < NUM_NODES; i++)); do
    if [[ ${STEP_NODES[i]} == "$dead_node" ]]; then
      wait_pid "${STEP_PIDS[i]}"
      dead_rc=$WAIT_RC
    fi
  done
  return $((rc != 0))
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
  local cpus_list=()
  if [[ ${SLURM_HET_SIZE:-} =~ ^[0-9]+$ ]]; then
    NODES=()
    het_layout || exit 2
  else
    # shellcheck disable=SC2207
    NODES=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))
  fi
  NUM_NODES=${#NODES[@]}
  if ((NUM_NODES == 0)); then
    err "no nodes in SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST"
    exit 2
  fi
  # shellcheck disable=SC2207
  ((${#HET_SIZES[@]})) || cpus_list=($(expand_counts "${SLURM_JOB_CPUS_PER_NODE:-}"))
  if ((${#cpus_list[@]} != NUM_NODES)); then
    # Fall back to the batch node's count for every node.
    cpus_list=()
    local i
    for ((i = 0; i < NUM_NODES; i++)); do cpus_list+=("${SLURM_CPUS_ON_NODE:-1}"); done
  fi

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
  unset RAY_ADDRESS SLURM_RAY_TMPDIR RAY_TMPDIR

  trap on_exit EXIT
  trap 'on_signal USR1' USR1
  trap 'on_signal TERM' TERM
  trap 'on_signal INT' INT
  trap 'on_signal HUP' HUP

  # The batch shell's own private dir (ray_wait's result; SLURM_RAY_TMPDIR).
  PRIV_DIR=$(private_dir) || exit 2
  : >"$PRIV_DIR/batch"
  export SLURM_RAY_TMPDIR=$PRIV_DIR RAY_TMPDIR=$PRIV_DIR
  mkdir -p "$RUN_DIR/ray-logs"
  rm -f "$RUN_DIR/ray-logs/$SLURM_JOB_ID.status"

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

  # Two tries: the probe leaves a window (about a second) in which someone
  # else can take a port of the block before Ray binds it.
  local try took alive=0 cpus=0 gpus=0 dead_node="" dead_rc=0
  for try in 1 2; do
    form_cluster "$py" "${cpus_list[@]}" && break
    if ((try == 1 && dead_rc == 98)); then
      log "a port of block $PORT_BASE-$((PORT_BASE + 99)) was taken on $dead_node after the probe (see $RUN_DIR/ray-logs/$SLURM_JOB_ID.$dead_node.log); starting Ray again on another block"
      stop_steps
      each_node_srun 60 bash "$SELF" __cleanup__ 0 >>"$RUN_DIR/ray-logs/$SLURM_JOB_ID.cleanup.log" 2>&1
      STEP_PIDS=() STEP_NODES=()
      continue
    fi
    took=$(elapsed "$t0")
    if [[ -n $dead_node ]]; then
      err "ray start on $dead_node exited before the cluster formed (see $RUN_DIR/ray-logs/$SLURM_JOB_ID.$dead_node.log)"
      local logf="$RUN_DIR/ray-logs/$SLURM_JOB_ID.$dead_node.log"
      [[ -r $logf ]] && tail -n 20 "$logf" | sed 's/^/    /' >&2
    fi
    err "only $alive of $NUM_NODES Ray nodes joined after $took s; see $RUN_DIR/ray-logs/"
    FINAL_RC=3
    exit 3
  done
  took=$(elapsed "$t0")
  log "cluster ready nodes=$alive cpus=$cpus gpus=$gpus in ${took}s (address=$HEAD_IP:$GCS_PORT)"

  export RAY_ADDRESS="$HEAD_IP:$GCS_PORT"
  "$@" &
  EP_PID=$!
  wait_pid "$EP_PID"
  FINAL_RC=$WAIT_RC
  EP_PID=""
  # Read by slurm_ray's job watcher (slurm/follow.py ENTRYPOINT_EXITED): keep it.
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
      cleanup_main "${2:-1}"
      ;;
    *)
      main "$@"
      ;;
  esac
fi
