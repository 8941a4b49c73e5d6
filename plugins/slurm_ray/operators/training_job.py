"""The training job of :class:`~slurm_ray.operators.training.SlurmRayOperator`.

Pure (nothing touches the cluster): its arguments validated, errors naming
the field, then the batch script and the files staged into the run directory.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow.sdk.exceptions import AirflowException

from slurm_ray.operators.remote_env import include_dir
from slurm_ray.profiles import ProfileError, merge_placement
from slurm_ray.utils.batch import JobSpec, render_batch_script
from slurm_ray.utils.environment import EnvironmentSpec
from slurm_ray.utils.quoting import quote

if TYPE_CHECKING:
    from slurm_ray.operators.training import SlurmRayOperator

__all__ = ["JOB_ENV_FILE", "job_env_file", "render_script", "run_dir_files", "validate_job"]

PLUGIN_DIR = Path(__file__).resolve().parents[1]
#: Cluster-side files staged into every run directory.
DEFAULT_FILES = ("ray_launch.sh", "ray_wait.py", "train.py", "sanity_check.py", "export_model.py")
#: The job's env_vars, 0600, read by job.sbatch (never uploaded anywhere).
JOB_ENV_FILE = "job.env"


def validate_job(
    op: SlurmRayOperator, job_name: str, log_path: str
) -> tuple[JobSpec, EnvironmentSpec, dict[str, Any] | None]:
    """The job spec, environment and training config (None for an ``entrypoint``)."""
    try:
        merged = merge_placement(
            op.profile_placement, op.job_spec, op.placement, profile=op.profile or ""
        )
    except ProfileError as exc:
        raise AirflowException(str(exc)) from exc
    spec_dict = {k: v for k, v in merged.items() if v is not None}
    if "job_name" in spec_dict:
        raise AirflowException("job_spec.job_name: derived from the task; do not set it")
    for key in ("output", "error", "chdir"):
        value = spec_dict.get(key)
        if isinstance(value, str) and (
            value.startswith("/") or ".." in value.replace("\\", "/").split("/")
        ):
            raise AirflowException(
                f"job_spec.{key}: {value[:80]!r} must be a path inside the run directory "
                "(relative, no '..')"
            )
    spec_dict.setdefault("output", log_path)
    if op.checkpoint_signal_s and op.entrypoint is None:
        spec_dict.setdefault("signal", f"B:USR1@{int(op.checkpoint_signal_s)}")
    try:
        spec = JobSpec.from_dict({**spec_dict, "job_name": job_name})
        env = EnvironmentSpec.from_dict(op.environment)
    except ValueError as exc:
        raise AirflowException(str(exc)) from exc
    config: dict[str, Any] | None = None
    if op.entrypoint is None:
        from slurm_ray.training_config import ConfigError, learners_for_gpus, validate_config

        try:
            config = validate_config(op.config, env_modules=_env_modules(op.env_modules)).to_dict()
            config = learners_for_gpus(config, spec.learner_gpus)  # a GPU hetjob's learners
        except ConfigError as exc:
            raise AirflowException(str(exc)) from exc
    for key, value in op.env_vars.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise AirflowException(f"env_vars: {key!r} is not a valid variable name")
        if not isinstance(value, str) or "\0" in value:
            raise AirflowException(f"env_vars[{key!r}]: expected a string without NUL bytes")
    return spec, env, config


def _env_modules(mods: Any) -> tuple[str, ...]:
    """The rendered ``env_modules`` argument as module names."""
    if isinstance(mods, str) or not all(isinstance(m, str) for m in mods):
        raise AirflowException(f"env_modules: expected a list of module names, got {mods!r}")
    return tuple(mods)


def render_script(
    op: SlurmRayOperator,
    spec: JobSpec,
    env: EnvironmentSpec,
    run_dir: str,
    config: dict[str, Any] | None,
) -> str:
    """The batch script: environment, then the Ray launcher running the entrypoint."""
    if config is not None:
        command = f"python -u train.py --config config.json --run-dir {quote(run_dir)}"
        if op.export_model:
            command += " --export-model"
    else:
        command = f"bash -c {quote(op.entrypoint or 'true')}"
    env_vars = {
        "SLURM_RAY_RUN_DIR": run_dir,
        "SLURM_RAY_JOIN_TIMEOUT": str(op.join_timeout),
        "RAY_USAGE_STATS_ENABLED": "0",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "PYTHONUNBUFFERED": "1",
    }
    if _env_modules(op.env_modules):
        env_vars["SLURM_RAY_ENV_MODULES"] = ",".join(_env_modules(op.env_modules))
    setup = [f"cd {quote(run_dir)}"]
    if op.env_vars:
        # env_vars may hold secrets: they live in the 0600 job.env (NUL-separated
        # records, read as data, never sourced), not in this script, which is
        # kept for audit and uploaded to MLflow.
        setup.append(f"while IFS= read -r -d '' kv; do export \"$kv\"; done < {JOB_ENV_FILE}")
    setup += env.activation_lines()
    return render_batch_script(
        spec,
        command=f"exec bash ray_launch.sh {command}",
        setup_lines=setup,
        env=env_vars,
        header_comment=f"slurm_ray {op.task_id}: rendered by SlurmRayOperator",
    )


def run_dir_files(
    extra_files: Mapping[str, str], config: Mapping[str, Any], script: str
) -> dict[str, bytes]:
    """The run directory's files: cluster-side scripts, ``config.json``, ``job.sbatch``."""
    files: dict[str, Path] = {name: include_dir() / name for name in DEFAULT_FILES}
    files["training_config.py"] = PLUGIN_DIR / "training_config.py"
    files.update({name: Path(path) for name, path in extra_files.items()})
    out: dict[str, bytes] = {}
    for name, local in files.items():
        if "/" in name or name in ("", ".", ".."):
            raise AirflowException(f"extra_files: {name!r} must be a plain file name")
        out[name] = local.read_bytes()
    out["config.json"] = json.dumps(config, indent=2, sort_keys=True).encode()
    out["job.sbatch"] = script.encode()
    return out


def job_env_file(env_vars: Mapping[str, str]) -> bytes:
    """``job.env``: NUL-terminated ``K=V`` records (values may hold any byte but NUL)."""
    return b"".join(f"{k}={v}".encode() + b"\0" for k, v in env_vars.items())
