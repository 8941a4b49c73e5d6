#!/usr/bin/env bash
# gpu_smoke.sh: one real CUDA learner step with slurm_ray's RLlib driver.
#
#   scripts/gpu_smoke.sh [PYTHON]
#
# Runs include/train.py (the driver every Slurm job runs) on a private local
# Ray with one GPU: PPO on CartPole-v1, one learner with num_gpus_per_learner=1
# (what learner_gpus=1 renders), one training iteration. No Slurm needed. The
# dev cluster's count-only GRES cannot do this: its learner falls back to CPU.
#
# PYTHON: an interpreter with ray[rllib], gymnasium and a CUDA build of torch
# (include/requirements-cluster.txt with the CUDA torch wheel); default
# $SLURM_RAY_PYTHON, else python3.
#
# Exit status: 0 the learner trained on a CUDA device; 1 no usable GPU here
# (says why: no NVIDIA GPU, or torch without CUDA); 2 the driver ran but the
# learner was not on CUDA, or training failed (its log is printed).
# Takes about a minute (Ray start-up); killed after SLURM_RAY_SMOKE_TIMEOUT s (300).

set -uo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=${1:-${SLURM_RAY_PYTHON:-python3}}

fail() {
  printf 'gpu_smoke: FAIL: %s\n' "$2" >&2
  exit "$1"
}

command -v nvidia-smi >/dev/null 2>&1 || fail 1 "no NVIDIA GPU here (nvidia-smi not found)"
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
[[ -n $gpu ]] || fail 1 "no NVIDIA GPU here (nvidia-smi lists none)"
command -v "$py" >/dev/null 2>&1 || fail 1 "no Python interpreter '$py'"
# shellcheck disable=SC2016  # Python code
cuda=$("$py" -c 'import torch; print(torch.cuda.is_available(), torch.version.cuda)' 2>&1) ||
  fail 1 "$py cannot import torch: ${cuda##*$'\n'}"
[[ $cuda == True* ]] || fail 1 "torch in $py has no CUDA ($cuda): a CPU-only build?"

run=$(mktemp -d "${TMPDIR:-/tmp}/gpu-smoke.XXXXXX") || fail 2 "cannot create a temp dir"
trap 'rm -rf "$run"' EXIT
cat >"$run/config.json" <<'EOF'
{"algorithm": "PPO", "env_id": "CartPole-v1", "num_env_runners": 1,
 "num_envs_per_env_runner": 2, "train_batch_size": 400, "minibatch_size": 200,
 "num_epochs": 1, "hidden_sizes": [64, 64], "num_learners": 1,
 "num_gpus_per_learner": 1, "stop": {"iterations": 1}, "checkpoint_every": 1,
 "eval_episodes": 1, "seed": 1}
EOF

printf 'gpu_smoke: %s, torch CUDA %s; one PPO iteration with a GPU learner...\n' "$gpu" "${cuda#* }"
t0=$SECONDS
env -u RAY_ADDRESS RAY_USAGE_STATS_ENABLED=0 HOME="$run" \
  timeout "${SLURM_RAY_SMOKE_TIMEOUT:-300}" "$py" -u "$root/include/train.py" \
  --config "$run/config.json" --run-dir "$run" --local --num-cpus 2 --num-gpus 1 \
  >"$run/driver.log" 2>&1
rc=$?
# shellcheck disable=SC2016  # Python code
verdict=$("$py" - "$run/result.json" <<'EOF' 2>&1
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except (OSError, ValueError) as exc:
    sys.exit(f"no result.json ({exc})")
devices = r.get("learner_devices") or []
if r.get("status") != "succeeded":
    sys.exit(f"status {r.get('status')}: {r.get('error')}")
if not devices or not all(d.startswith("cuda") for d in devices):
    sys.exit(f"learner devices {devices}, not CUDA")
print(f"learner on {', '.join(devices)} ({', '.join(r['learner_hostnames'])}), "
      f"{r['iterations']} iteration, {r['env_steps']} env steps, Ray GPUs {r['ray_gpus']:g}")
EOF
)
vrc=$?
if ((rc != 0 || vrc != 0)); then
  tail -n 30 "$run/driver.log" | sed 's/^/    /' >&2
  fail 2 "driver exit $rc: $verdict"
fi
printf 'gpu_smoke: OK: %s in %ss\n' "$verdict" "$((SECONDS - t0))"
