"""The training DAGs' Params (UI form / REST conf) and their translation into a run.

The Params of the training config are generated from its JSON Schema
(:data:`slurm_ray.training_config.SCHEMA`): every config field is a Param of
the same name (``stop.minutes`` is ``stop_minutes``) with the same rules,
unless listed in :data:`NOT_PARAMS`. The other Params place the job (profile,
nodes, time limit...) and name the MLflow experiment. The JSON schemas refuse
bad input at trigger time, naming the field; :func:`resolve_run` then does the
cross-field checks and builds the operator arguments, still before anything
reaches the cluster.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from slurm_ray.profiles import ClusterProfile, get_profile, profile_names
from slurm_ray.slurm.timefmt import parse_time_limit
from slurm_ray.training_config import SCHEMA, ConfigError, learners_for_gpus, validate_config
from slurm_ray.utils.batch import JobSpec, JobSpecError
from slurm_ray.validation import SLURM_TIME_PATTERN

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

#: Config fields that are no Param: the learner fields follow ``gpus_per_node``;
#: a form default for the PPO-only ones would break DQN; the form has no list field.
NOT_PARAMS = frozenset(
    {"num_learners", "num_gpus_per_learner", "minibatch_size", "num_epochs", "hidden_sizes"}
)
#: Param names that differ from the config field's.
_PARAM_NAMES = {"num_envs_per_env_runner": "envs_per_runner"}
#: Where the DAG's Param narrows the config's rule (``None`` drops a keyword): the
#: form offers the known envs only, and a batch size (not the algorithm's default).
_PARAM_SCHEMAS: dict[str, dict[str, Any]] = {
    "env_id": {"enum": list(KNOWN_ENVS), "pattern": None, "maxLength": None},
    "train_batch_size": {"type": "integer"},
}
_NOT_VALIDATION = ("default", "description", "errorMessage")


def config_params() -> dict[str, tuple[str, ...]]:
    """``{Param name: path in the training config}``, in the schema's order."""
    out: dict[str, tuple[str, ...]] = {}
    for name, prop in SCHEMA["properties"].items():
        if name == "stop":
            out.update({f"stop_{key}": ("stop", key) for key in prop["properties"]})
        elif name not in NOT_PARAMS:
            out[_PARAM_NAMES.get(name, name)] = (name,)
    return out


def _config_param_specs() -> dict[str, dict[str, Any]]:
    props: dict[str, Any] = SCHEMA["properties"]
    stop_default = props["stop"]["default"]
    specs = {}
    for param, path in config_params().items():
        prop = props[path[0]] if len(path) == 1 else props["stop"]["properties"][path[1]]
        schema = {k: v for k, v in prop.items() if k not in _NOT_VALIDATION}
        schema.update(_PARAM_SCHEMAS.get(param, {}))
        schema = {k: v for k, v in schema.items() if v is not None}
        default = stop_default[path[1]] if len(path) == 2 else prop.get("default")
        specs[param] = {"default": default, "schema": schema, "description": prop["description"]}
    return specs


class RunParamError(ValueError):
    """A Param combination the schema cannot express; names the field."""


#: The Params outside the training config: ``{name: (default, schema, description)}``.
_RUN_PARAMS: dict[str, tuple[Any, dict[str, Any], str]] = {
    "nodes": (
        2,
        {"type": "integer", "minimum": 1, "maximum": 512},
        "Slurm nodes; Ray head on the first, a worker on each other.",
    ),
    "cpus_per_node": (
        4,
        {"type": "integer", "minimum": 1, "maximum": 1024},
        "CPUs per node given to Ray (Eagle 36, Kestrel 104).",
    ),
    "gpus_per_node": (
        0,
        {"type": "integer", "minimum": 0, "maximum": 16},
        "GPUs per node (0: CPU only).",
    ),
    "learner_gpus": (
        0,
        {"type": "integer", "minimum": 0, "maximum": 64},
        "GPUs for the learners (0: CPU only). Above 0 the job is a hetjob: the GPU "
        "node(s) (gpu_partition) run the Ray head and the learners, the nodes run the env runners.",
    ),
    "gpu_partition": (
        None,
        {"type": ["null", "string"], "maxLength": 64, "pattern": _SAFE_TEXT},
        "Partition of the GPU node(s) when learner_gpus > 0; empty: the job's partition.",
    ),
    "gpu_nodes": (
        1,
        {"type": "integer", "minimum": 1, "maximum": 64},
        "GPU nodes when learner_gpus > 0 (learner_gpus split evenly over them).",
    ),
    "gpu_cpus": (
        None,
        {"type": ["null", "integer"], "minimum": 1, "maximum": 1024},
        "CPUs per GPU node (driver and learners) when learner_gpus > 0; empty: cpus_per_node.",
    ),
    "partition": (
        None,
        {"type": ["null", "string"], "maxLength": 64, "pattern": _SAFE_TEXT},
        "Slurm partition; empty for the profile's default.",
    ),
    "account": (
        None,
        {"type": ["null", "string"], "maxLength": 64, "pattern": _SAFE_TEXT},
        "Slurm account to charge; empty for the profile's default.",
    ),
    "time_limit": (
        "00:30:00",
        {"type": "string", "pattern": SLURM_TIME_PATTERN, "maxLength": 20},
        "Slurm time limit (MM, HH:MM:SS, D-HH:MM).",
    ),
    "experiment_name": (
        "rllib_train",
        {
            "type": "string",
            "minLength": 1,
            "maxLength": 100,
            "pattern": r"^[A-Za-z0-9 ._/-]+" + _END,
        },
        "MLflow experiment.",
    ),
    "register_model_name": (
        "rllib-cartpole",
        {"type": "string", "minLength": 1, "maxLength": 100, "pattern": r"^[A-Za-z0-9._-]+" + _END},
        "MLflow registered model name.",
    ),
    "deferrable": (
        True,
        {"type": "boolean"},
        "Wait for the Slurm job in the triggerer, freeing the worker slot. "
        "false: the train task polls from its worker (no triggerer needed).",
    ),
    "force_sanity_check": (
        False,
        {"type": "boolean"},
        "Run the Gym sanity check for real even when a pass of this environment build, "
        "env id and partition from the last 24 h is recorded on the cluster.",
    ),
}
#: The demo DAGs' defaults where they differ from the training config's.
_DAG_DEFAULTS = {
    "stop_env_steps": 400000,
    "stop_iterations": 200,
    "stop_minutes": 20.0,
    "train_batch_size": 4000,
    "num_env_runners": 2,
    "seed": 42,
    "checkpoint_every": 5,
}


def param_specs(defaults: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """``{name: {"default", "schema", "description"}}`` for :class:`airflow.sdk.Param`."""
    d = {**_DAG_DEFAULTS, **(defaults or {})}
    specs: dict[str, dict[str, Any]] = {
        "profile": {
            "default": d.get("profile", "local"),
            "schema": {"type": "string", "enum": profile_names()},
            "description": "Cluster profile: login connection, scratch path, modules, env activation.",
        },
        **_config_param_specs(),
    }
    for name, (default, schema, description) in _RUN_PARAMS.items():
        specs[name] = {"default": default, "schema": dict(schema), "description": description}
    for name, spec in specs.items():
        spec["default"] = d.get(name, spec["default"])
    return specs


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
    cfg: dict[str, Any] = {}
    for param, path in config_params().items():
        if param not in params:
            continue
        if path[0] != "stop":
            cfg[path[0]] = params[param]
        elif params[param] is not None:
            cfg.setdefault("stop", {})[path[1]] = params[param]
    if "stop" not in cfg:
        raise RunParamError("stop_*: give at least one stop criterion")
    algo = str(cfg.get("algorithm", "PPO")).upper()
    env_id = cfg.get("env_id")
    if algo in _DISCRETE_ONLY and env_id in _CONTINUOUS_ENVS:
        raise RunParamError(
            f"algorithm: {algo} needs a discrete action space; {env_id} is continuous"
        )
    if params.get("gpus_per_node"):
        cfg["num_learners"] = 1
        cfg["num_gpus_per_learner"] = 1
    try:
        config = validate_config(cfg, env_modules=env_modules).to_dict()
        return learners_for_gpus(config, int(params.get("learner_gpus") or 0))
    except ConfigError as exc:
        raise RunParamError(str(exc)) from exc


def _job_spec(
    params: Mapping[str, Any], profile: ClusterProfile, config: Mapping[str, Any]
) -> dict[str, Any]:
    """The training job's ``job_spec``: the placement Params checked against the profile."""
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
    seconds = parse_time_limit(time_limit)  # None: UNLIMITED
    if stop_minutes and seconds is not None and stop_minutes >= seconds / 60:
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
    job_spec.update(_gpu_component(params, profile, cpus))
    job_spec = {k: v for k, v in job_spec.items() if v not in (None, "")}
    if job_spec.get("account") == "CHANGE_ME":
        raise RunParamError(f"account: the {profile.name} profile needs your Slurm account")
    try:
        JobSpec.from_dict({**job_spec, "job_name": "validate"})
    except JobSpecError as exc:
        raise RunParamError(str(exc)) from exc
    return job_spec


def _gpu_component(params: Mapping[str, Any], profile: ClusterProfile, cpus: int) -> dict[str, Any]:
    """The hetjob's GPU component (:mod:`slurm_ray.utils.hetjob`); empty for learner_gpus 0."""
    learner_gpus = int(params.get("learner_gpus") or 0)
    if not learner_gpus:
        return {}
    if params.get("gpus_per_node"):
        raise RunParamError("gpus_per_node: set learner_gpus or gpus_per_node, not both")
    nodes = int(params.get("gpu_nodes") or 1)
    if learner_gpus > nodes * profile.gpus_per_node:
        raise RunParamError(
            f"learner_gpus: {learner_gpus} exceeds the {profile.gpus_per_node} GPUs of "
            f"{nodes} {profile.name} GPU node(s)"
        )
    gpu_cpus = int(params.get("gpu_cpus") or cpus)
    if gpu_cpus > profile.cores_per_node:
        raise RunParamError(
            f"gpu_cpus: {gpu_cpus} exceeds the {profile.cores_per_node} cores of a {profile.name} node"
        )
    return {
        "learner_gpus": learner_gpus,
        "gpu_nodes": nodes,
        "gpu_cpus": gpu_cpus,
        "gpu_partition": params.get("gpu_partition") or None,
    }


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
    job_spec = _job_spec(params, profile, config)
    from slurm_ray.mlflow.hook import public_uri

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
        "force_sanity_check": bool(params.get("force_sanity_check", False)),
        "mlflow": {
            "tracking_uri": tracking_uri,
            "experiment_name": params.get("experiment_name") or "rllib_train",
            "registered_model_name": params.get("register_model_name") or "rllib-model",
        },
    }
