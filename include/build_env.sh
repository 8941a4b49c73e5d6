#!/usr/bin/env bash
# Build (or confirm) the cluster-side Python environment, once per spec.
#
#   build_env.sh KIND PREFIX SPEC
#     KIND   conda | venv | modules | none
#     PREFIX where the environment lives (conda --prefix / venv directory)
#     SPEC   environment.yml (conda) or a requirements file (venv)
#
# The sha256 of SPEC is stamped inside the environment as the last step of a
# build: an unchanged spec is a no-op, a changed one rebuilds.  Builders hold
# an exclusive flock on PREFIX.lock; jobs hold a shared lock on it from
# activation to their end, so nobody runs on a half-built environment and a
# rebuild never changes packages under a running job (it waits for them).
# Environment: PYTHON (interpreter for venv, default python3), CONDA (conda or
# mamba executable, default conda), SLURM_RAY_MODULE_LINES (shell lines run
# first, e.g. "module purge; module load conda"), SLURM_RAY_UNSET_LD_PRELOAD=1.
set -euo pipefail

kind=${1:?usage: build_env.sh KIND PREFIX SPEC}
prefix=${2:-}
spec=${3:-}
stamp_name=.slurm_ray_spec_sha256

fail() { printf 'build_env: %s\n' "$*" >&2; exit 2; }

if [[ -n ${SLURM_RAY_MODULE_LINES:-} ]]; then
  eval "$SLURM_RAY_MODULE_LINES"
fi
if [[ ${SLURM_RAY_UNSET_LD_PRELOAD:-0} == 1 ]]; then unset LD_PRELOAD; fi

case $kind in
  none | modules)
    echo "build_env: kind=$kind, nothing to build"
    exit 0
    ;;
  conda | venv) ;;
  *) fail "unknown kind '$kind' (valid: conda, venv, modules, none)" ;;
esac

[[ -n $prefix ]] || fail "PREFIX is required for kind=$kind"
[[ -n $spec ]] || fail "SPEC is required for kind=$kind"
[[ -r $spec ]] || fail "spec file '$spec' is not readable"
want=$(sha256sum <"$spec" | cut -c1-64)

current() { cat "$prefix/$stamp_name" 2>/dev/null || true; }

if [[ $(current) == "$want" ]]; then
  echo "build_env: up-to-date prefix=$prefix sha256=$want"
  exit 0
fi

mkdir -p "$(dirname "$prefix")" || fail "cannot create $(dirname "$prefix")"
exec 9>"$prefix.lock" || fail "cannot write lock file $prefix.lock"
if ! flock -n 9; then
  echo "build_env: $prefix is in use (a running job, or another build); waiting until it is free"
  flock 9
fi
# Someone else may have built it while we waited.
if [[ $(current) == "$want" ]]; then
  echo "build_env: up-to-date prefix=$prefix sha256=$want (built concurrently)"
  exit 0
fi

buildlog="$prefix.build.log"
: >"$buildlog" || fail "cannot write $buildlog"
started=$SECONDS
rm -f "$prefix/$stamp_name"

build() {
  case $kind in
    venv)
      local py=${PYTHON:-python3}
      if [[ ! -x $prefix/bin/python ]]; then
        "$py" -m venv "$prefix"
      fi
      "$prefix/bin/python" -m pip install --disable-pip-version-check -q --upgrade pip
      "$prefix/bin/python" -m pip install --disable-pip-version-check -r "$spec"
      "$prefix/bin/python" -m pip check
      ;;
    conda)
      local conda=${CONDA:-conda}
      if [[ -d $prefix/conda-meta ]]; then
        "$conda" env update --prefix "$prefix" --file "$spec" --prune
      else
        "$conda" env create --prefix "$prefix" --file "$spec"
      fi
      ;;
  esac
}

echo "build_env: building kind=$kind prefix=$prefix sha256=$want (log: $buildlog)"
# In the background and waited for: called as an `if` condition, bash would
# ignore errexit inside build (a failed `pip install -r` followed by a passing
# `pip check` would count as built).
build >>"$buildlog" 2>&1 &
if ! wait $!; then
  echo "build_env: FAILED after $((SECONDS - started))s; last lines of $buildlog:" >&2
  tail -n 40 "$buildlog" >&2
  exit 1
fi
printf '%s\n' "$want" >"$prefix/$stamp_name.tmp"
mv "$prefix/$stamp_name.tmp" "$prefix/$stamp_name"
echo "build_env: built prefix=$prefix sha256=$want in $((SECONDS - started))s"
