"""The training DAGs' Params (UI form / REST conf) and their translation into a run.

The JSON schemas here refuse bad input at trigger time (wrong type, out of
range, unknown env, algorithm or profile), naming the field; :func:`resolve_run`
then does the cross-field checks and builds the operator arguments, still
before anything reaches the cluster.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

from slurm_ray.profiles import get_profile, profile_names
from slurm_ray.training_config import ConfigError, validate_config
from slurm_ray.utils.batch import JobSpec, JobSpecError

#: Environments the driver can build from gymnasium alone (no extra packages).
KNOWN_ENVS = (
    "CartPole-v1",
    "CartPole-v0",
    "Acrobot-v1",
    "MountainCar-v0",
    "MountainCarContinuous-v0",
    "Pendulum-v1",
)
_DISCRETE_ONLY = {"DQN"}
_CONTINUOUS_ENVS = {"MountainCarContinuous-v0", "Pendulum-v1"}
# Python's `$` (jsonschema uses re.search) also matches before a trailing
# newline; `(?!\n)` gives the `\Z` meaning in both Python and the UI's JavaScript.
_END = r"$(?!\n)"
_SAFE_TEXT = r"^[A-Za-z0-9._:@+-]*" + _END
_TIME = r"^(UNLIMITED|[0-9]+(-[0-9]{1,2}(:[0-9]{2}){0,2}|(:[0-9]{2}){0,2}))" + _END


class RunParamError(ValueError):
    """A Param combination the schema cannot express; names the field."""


def param_specs(defaults: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """``{name: {"default", "schema", "description"}}`` for :class:`airflow.sdk.Param`."""
    d = {
        "profile": "local",
        "env_id": "CartPole-v1",
        "algorithm": "PPO",
        "nodes": 2,
        "cpus_per_node": 4,
        "gpus_per_node": 0,
        "partition": None,
        "account": None,
        "time_limit": "00:30:00",
        "stop_return_mean": 450.0,
        "stop_env_steps": 400000,
        "stop_iterations": 200,
        "stop_minutes": 20.0,
        "lr": 3e-4,
        "train_batch_size": 4000,
        "num_env_runners": 2,
        "envs_per_runner": 8,
        "seed": 42,
        "experiment_name": "rllib_train",
        "checkpoint_every": 5,
        "register_model_name": "rllib-cartpole",
        "deferrable": True,
    }
    d.update(defaults or {})
    names = profile_names()
    return {
        "profile": {
            "default": d["profile"],
            "schema": {"type": "string", "enum": names},
            "description": "Cluster profile: login connection, scratch path, modules, env activation.",
        },
        "env_id": {
            "default": d["env_id"],
            "schema": {"type": "string", "enum": list(KNOWN_ENVS)},
            "description": "Gymnasium environment id.",
        },
        "algorithm": {
            "default": d["algorithm"],
            "schema": {"type": "string", "enum": ["PPO", "DQN"]},
            "description": "RLlib algorithm (current API stack).",
        },
        "nodes": {
            "default": d["nodes"],
            "schema": {"type": "integer", "minimum": 1, "maximum": 512},
            "description": "Slurm nodes; Ray head on the first, a worker on each other.",
        },
        "cpus_per_node": {
            "default": d["cpus_per_node"],
            "schema": {"type": "integer", "minimum": 1, "maximum": 1024},
            "description": "CPUs per node given to Ray (Eagle 36, Kestrel 104).",
        },
        "gpus_per_node": {
            "default": d["gpus_per_node"],
            "schema": {"type": "integer", "minimum": 0, "maximum": 16},
            "description": "GPUs per node (0: CPU only).",
        },
        "partition": {
            "default": d["partition"],
            "schema": {"type": ["null", "string"], "maxLength": 64, "pattern": _SAFE_TEXT},
            "description": "Slurm partition; empty for the profile's default.",
        },
        "account": {
            "default": d["account"],
            "schema": {"type": ["null", "string"], "maxLength": 64, "pattern": _SAFE_TEXT},
            "description": "Slurm account to charge; empty for the profile's default.",
        },
        "time_limit": {
            "default": d["time_limit"],
            "schema": {"type": "string", "pattern": _TIME, "maxLength": 20},
            "description": "Slurm time limit (MM, HH:MM:SS, D-HH:MM).",
        },
        "stop_return_mean": {
            "default": d["stop_return_mean"],
            "schema": {"type": ["number", "null"]},
            "description": "Stop when the mean episode return reaches this.",
        },
        "stop_env_steps": {
            "default": d["stop_env_steps"],
            "schema": {"type": ["integer", "null"], "minimum": 1},
            "description": "Stop after this many environment steps.",
        },
        "stop_iterations": {
            "default": d["stop_iterations"],
            "schema": {"type": ["integer", "null"], "minimum": 1, "maximum": 1000000},
            "description": "Stop after this many training iterations.",
        },
        "stop_minutes": {
            "default": d["stop_minutes"],
            "schema": {"type": ["number", "null"], "exclusiveMinimum": 0},
            "description": "Stop after this many minutes of training (wall clock).",
        },
        "lr": {
            "default": d["lr"],
            "schema": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
            "description": "Learning rate.",
        },
        "train_batch_size": {
            "default": d["train_batch_size"],
            "schema": {"type": "integer", "minimum": 1, "maximum": 10000000},
            "description": "Env steps per training iteration.",
        },
        "num_env_runners": {
            "default": d["num_env_runners"],
            "schema": {"type": ["integer", "null"], "minimum": 0, "maximum": 100000},
            "description": "Ray env-runner actors (spread over the nodes); null = all CPUs.",
        },
        "envs_per_runner": {
            "default": d["envs_per_runner"],
            "schema": {"type": "integer", "minimum": 1, "maximum": 1024},
            "description": "Vectorised environments per env runner.",
        },
        "seed": {
            "default": d["seed"],
            "schema": {"type": ["integer", "null"], "minimum": 0},
            "description": "Random seed (null: random).",
        },
        "experiment_name": {
            "default": d["experiment_name"],
            "schema": {
                "type": "string",
                "minLength": 1,
                "maxLength": 100,
                "pattern": r"^[A-Za-z0-9 ._/-]+" + _END,
            },
            "description": "MLflow experiment.",
        },
        "checkpoint_every": {
            "default": d["checkpoint_every"],
            "schema": {"type": "integer", "minimum": 1},
            "description": "Checkpoint every k iterations.",
        },
        "register_model_name": {
            "default": d["register_model_name"],
            "schema": {
                "type": "string",
                "minLength": 1,
                "maxLength": 100,
                "pattern": r"^[A-Za-z0-9._-]+" + _END,
            },
            "description": "MLflow registered model name.",
        },
        "deferrable": {
            "default": d["deferrable"],
            "schema": {"type": "boolean"},
            "description": (
                "Wait for the Slurm job in the triggerer, freeing the worker slot. "
                "false: the train task polls from its worker (no triggerer needed)."
            ),
        },
    }


def check_params(params: Mapping[str, Any], *, prefix: str = "") -> None:
    """Check each known Param value against its schema; the error names ``prefix + field``.

    The trigger form and REST API check the same schemas, but values also
    arrive from sweep overrides, ``dags test`` confs and defaults.
    """
    from jsonschema import Draft202012Validator

    specs = param_specs()
    for name, value in params.items():
        if name not in specs:
            continue
        error = next(iter(Draft202012Validator(specs[name]["schema"]).iter_errors(value)), None)
        if error is not None:
            raise RunParamError(f"{prefix}{name}: {error.message[:200]}")


def airflow_params(defaults: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The same specs as :class:`airflow.sdk.Param` objects."""
    from airflow.sdk import Param

    return {
        name: Param(spec["default"], description=spec["description"], **spec["schema"])
        for name, spec in param_specs(defaults).items()
    }


def training_config_from(
    params: Mapping[str, Any], env_modules: tuple[str, ...] = ()
) -> dict[str, Any]:
    """The driver's config (validated) from the flat Params."""
    stop = {
        key: params.get(f"stop_{key}")
        for key in ("return_mean", "env_steps", "iterations", "minutes")
        if params.get(f"stop_{key}") is not None
    }
    if not stop:
        raise RunParamError("stop_*: give at least one stop criterion")
    algo = str(params.get("algorithm", "PPO")).upper()
    env_id = params.get("env_id", "CartPole-v1")
    if algo in _DISCRETE_ONLY and env_id in _CONTINUOUS_ENVS:
        raise RunParamError(
            f"algorithm: {algo} needs a discrete action space; {env_id} is continuous"
        )
    cfg: dict[str, Any] = {
        "algorithm": algo,
        "env_id": env_id,
        "num_env_runners": params.get("num_env_runners"),
        "num_envs_per_env_runner": params.get("envs_per_runner", 8),
        "lr": params.get("lr", 3e-4),
        "train_batch_size": params.get("train_batch_size"),
        "seed": params.get("seed"),
        "stop": stop,
        "checkpoint_every": params.get("checkpoint_every", 5),
    }
    if params.get("gpus_per_node"):
        cfg["num_learners"] = 1
        cfg["num_gpus_per_learner"] = 1
    try:
        return validate_config(cfg, env_modules=env_modules).to_dict()
    except ConfigError as exc:
        raise RunParamError(str(exc)) from exc


def _minutes(time_limit: str) -> float:
    if time_limit == "UNLIMITED":
        return math.inf
    days, _, rest = time_limit.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:
        hms = [*parts, 0, 0][:3]
        return int(days) * 1440 + hms[0] * 60 + hms[1] + hms[2] / 60
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2:
        return parts[0] + parts[1] / 60
    return parts[0] * 60 + parts[1] + parts[2] / 60


def resolve_run(params: Mapping[str, Any]) -> dict[str, Any]:
    """
    Everything the training tasks need, from the Params, or a RunParamError.

    Returns operator kwargs: ``ssh_conn_id``, ``remote_base_dir``, ``environment``,
    ``job_spec``, ``config``, ``mlflow``, ``profile``, ``deferrable``.
    """
    check_params(params)
    try:
        profile = get_profile(str(params.get("profile", "local")))
    except ValueError as exc:
        raise RunParamError(str(exc)) from exc
    config = training_config_from(params, profile.env_modules)
    nodes = int(params.get("nodes", 1))
    cpus = int(params.get("cpus_per_node") or profile.cores_per_node)
    if cpus > profile.cores_per_node:
        raise RunParamError(
            f"cpus_per_node: {cpus} exceeds the {profile.cores_per_node} cores of a {profile.name} node"
        )
    gpus = int(params.get("gpus_per_node") or 0)
    if gpus > profile.gpus_per_node:
        raise RunParamError(
            f"gpus_per_node: {gpus} exceeds the {profile.gpus_per_node} GPUs of a {profile.name} node"
        )
    time_limit = str(params.get("time_limit") or "00:30:00")
    stop_minutes = config["stop"].get("minutes")
    if stop_minutes and stop_minutes >= _minutes(time_limit):
        raise RunParamError(
            f"stop_minutes: {stop_minutes} does not fit in time_limit {time_limit}; leave time to checkpoint"
        )
    job_spec: dict[str, Any] = {
        "nodes": nodes,
        "ntasks_per_node": 1,
        "cpus_per_task": cpus,
        "time": time_limit,
        "partition": params.get("partition") or profile.partition,
        "account": params.get("account") or profile.account,
        "qos": profile.qos,
    }
    if gpus:
        job_spec["gpus_per_node"] = gpus
    job_spec = {k: v for k, v in job_spec.items() if v not in (None, "")}
    if job_spec.get("account") == "CHANGE_ME":
        raise RunParamError(f"account: the {profile.name} profile needs your Slurm account")
    try:
        JobSpec.from_dict({**job_spec, "job_name": "validate"})
    except JobSpecError as exc:
        raise RunParamError(str(exc)) from exc
    from slurm_ray.mlflow_tracking import public_uri

    # Without credentials: this dict goes to XCom and the rendered fields; the
    # worker and triggerer take them from their own environment again.
    tracking_uri = public_uri(
        os.environ.get("SLURM_RAY_MLFLOW_URI") or os.environ.get("MLFLOW_TRACKING_URI", "")
    )
    return {
        "profile": profile.name,
        "job_url_template": profile.job_url_template,
        "ssh_conn_id": profile.ssh_conn_id,
        "remote_base_dir": profile.remote_base_dir,
        "environment": profile.environment.to_dict(),
        "env_stage_dir": profile.env_stage_dir,
        "env_build_vars": dict(profile.env_build_vars),
        "env_modules": list(profile.env_modules),
        "sanity_partition": job_spec.get("partition"),
        "sanity_account": job_spec.get("account"),
        "job_spec": job_spec,
        "config": config,
        "deferrable": bool(params.get("deferrable", True)),
        "mlflow": {
            "tracking_uri": tracking_uri,
            "experiment_name": params.get("experiment_name") or "rllib_train",
            "registered_model_name": params.get("register_model_name") or "rllib-model",
        },
    }
