"""The ``rllib_tune`` DAG's pieces: its Params, the operator's Tune job, the best trial.

One Slurm job, one Ray cluster, ``include/tune_driver.py`` running every
trial; the spec is checked by :mod:`slurm_ray.tune_space` before anything is
submitted (errors name the Param: ``search.lr.loguniform: ...``).
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from airflow.sdk.exceptions import AirflowFailException

from slurm_ray.operators.remote_env import include_dir
from slurm_ray.tune_space import SCHEDULERS, TuneSpecError, validate_tune

__all__ = [
    "TUNE_ENTRYPOINT",
    "TUNE_PARAMS",
    "plan_tune",
    "tag_best_trial",
    "tune_files",
    "tune_params",
]

#: The job's command on the Ray head (the launcher sets SLURM_RAY_RUN_DIR).
TUNE_ENTRYPOINT = (
    'python -u tune_driver.py --config config.json --run-dir "$SLURM_RAY_RUN_DIR" --export-model'
)
#: Slurm sends SIGUSR1 this long before the time limit: Tune saves its state.
CHECKPOINT_SIGNAL_S = 60
#: The Params of the sweep itself (the rest are the training Params).
TUNE_PARAMS = ("search", "num_samples", "scheduler", "max_concurrent_trials")


def tune_params() -> dict[str, Any]:
    """The sweep's Params (the trigger form checks their shape; :func:`plan_tune` the rest)."""
    from airflow.sdk import Param

    kinds = {"type": "object", "minProperties": 1, "maxProperties": 1}
    return {
        "search": Param(
            {"lr": {"loguniform": [1e-4, 3e-3]}},
            type="object",
            minProperties=1,
            additionalProperties=kinds,
            description=(
                "Search space: config key -> {'grid': [...]} (all tried), {'choice': [...]} "
                "or {'loguniform': [low, high]} (sampled per trial)."
            ),
        ),
        "num_samples": Param(
            4, type="integer", minimum=1, maximum=256, description="Samples of the search space."
        ),
        "scheduler": Param(
            "asha",
            enum=list(SCHEDULERS),
            description="fifo: all trials to the end; asha: stop weak trials early; "
            "pbt: copy strong trials' weights and mutate their hyperparameters.",
        ),
        "max_concurrent_trials": Param(
            0, type="integer", minimum=0, description="0: as many as the allocation's CPUs fit."
        ),
    }


def tune_files() -> dict[str, str]:
    """Files staged next to train.py for the Tune driver."""
    plugin = Path(__file__).resolve().parent
    return {
        "tune_driver.py": str(include_dir() / "tune_driver.py"),
        "tune_space.py": str(plugin / "tune_space.py"),
    }


def plan_tune(resolved: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` (``{"base", "tune"}``) and ``job_spec`` of the Tune job, or a clear failure."""
    tune = {key: params[key] for key in TUNE_PARAMS if key in params}
    try:
        spec = validate_tune(tune, resolved["config"])
    except TuneSpecError as exc:
        raise AirflowFailException(f"invalid Params: {str(exc).removeprefix('tune.')}") from exc
    job_spec = {**resolved["job_spec"], "signal": f"B:USR1@{CHECKPOINT_SIGNAL_S}"}
    # Tune would wait forever (until the time limit) for a trial that cannot fit.
    need = 1 + int(resolved["config"].get("num_env_runners") or 0)
    cpus = int(job_spec.get("nodes") or 1) * int(job_spec.get("cpus_per_task") or 1)
    if need > cpus:
        raise AirflowFailException(
            f"invalid Params: num_env_runners: a trial needs {need} CPUs (1 + num_env_runners) "
            f"but the job has {cpus} (nodes x cpus_per_node); lower num_env_runners "
            "(0: the trial samples itself) or give the job more CPUs"
        )
    return {"config": {"base": dict(resolved["config"]), "tune": spec}, "job_spec": job_spec}


def tag_best_trial(
    summary: Mapping[str, Any], mlflow: Mapping[str, Any], ssh_conn_id: str, dag_id: str
) -> dict[str, str]:
    """Tag the parent run with the best trial (from result.json) and that trial's nested run."""
    from slurm_ray.hooks.slurm import SlurmHook
    from slurm_ray.mlflow.runs import client_for, set_tags
    from slurm_ray.mlflow.settings import MlflowSettings

    hook = SlurmHook(ssh_conn_id)
    try:
        raw = hook.read_file(posixpath.join(summary["run_dir"], "result.json"))
    finally:
        hook.close()
    best = str((json.loads(raw) if raw else {}).get("tune", {}).get("best_trial_id") or "")
    if not best:
        raise AirflowFailException(f"result.json in {summary['run_dir']} names no best trial")
    settings = MlflowSettings.from_dict(dict(mlflow), default_experiment=dag_id)
    parent = str(summary["mlflow_run_id"])
    client = client_for(settings)
    children = client.search_runs(
        [client.get_run(parent).info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent}'",
    )
    by_trial = {r.data.tags.get("slurm_ray.trial_id"): r.info.run_id for r in children}
    tags = {"slurm_ray.best_trial_id": best, "slurm_ray.best_trial_run_id": by_trial.get(best)}
    set_tags(settings, parent, {k: v for k, v in tags.items() if v})
    if best in by_trial:
        set_tags(settings, by_trial[best], {"slurm_ray.best_trial": "true"})
    return {k: str(v or "") for k, v in tags.items()}
