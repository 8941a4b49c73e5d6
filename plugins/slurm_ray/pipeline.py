"""The training chain shared by the DAGs: resolve → env → sanity → train → register → promote.

Each DAG only chooses defaults and a schedule, so all of them behave the same way.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Mapping
from datetime import timedelta
from typing import Any, cast

from airflow.sdk import task
from airflow.sdk.exceptions import AirflowFailException

from slurm_ray.operators.environment import ClusterEnvOperator
from slurm_ray.operators.sanity_check import GymSanityCheckOperator
from slurm_ray.operators.training import SlurmRayOperator
from slurm_ray.params import RunParamError, check_params, param_specs, resolve_run

#: Retries for the training task: a retry re-attaches to a running job or
#: resumes from the newest checkpoint (a rare scheduler race can fail a try).
TRAIN_RETRIES = 2

#: Seconds between job polls. The poll is one squeue per host per interval
#: however many jobs are watched; 2 s keeps "job ended -> next task" short.
TRAIN_POLL_INTERVAL = 2


def resolve_or_fail(params: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`resolve_run`, failing the task for good (no retry) on bad Params."""
    try:
        resolved = resolve_run(params)
    except (RunParamError, ValueError) as exc:
        raise AirflowFailException(f"invalid Params: {exc}") from exc
    if not resolved["mlflow"]["tracking_uri"]:
        raise AirflowFailException(
            "mlflow.tracking_uri: set SLURM_RAY_MLFLOW_URI (or MLFLOW_TRACKING_URI) for the workers"
        )
    return resolved


#: :func:`resolve_run` keys that are training operator arguments of the same name.
_TRAIN_KEYS = (
    "ssh_conn_id",
    "remote_base_dir",
    "job_spec",
    "environment",
    "config",
    "mlflow",
    "job_url_template",
    "env_modules",
)

#: Params one sweep shares: a configuration may not override them (one sanity check).
SWEEP_FIXED = frozenset({"profile", "experiment_name", "register_model_name", "force_sanity_check"})


def plan_sweep_runs(params: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One operator-kwargs dict per ``configs`` entry; every override value checked.

    Each override passes the same schema as the base Params (errors name
    ``configs[i].field``) before the merged Params are resolved.
    """
    base = dict(params)
    configs = base.pop("configs", [])
    overridable = set(param_specs()) - SWEEP_FIXED
    runs = []
    for i, overrides in enumerate(configs):
        where = f"configs[{i}]"
        try:
            if not isinstance(overrides, Mapping):
                raise RunParamError(f"{where}: expected an object, got {type(overrides).__name__}")
            for key in overrides:
                if key not in overridable:
                    raise RunParamError(
                        f"{where}.{key}: not a Param a configuration may override; "
                        f"valid: {', '.join(sorted(overridable))}"
                    )
            check_params(overrides, prefix=f"{where}.")
        except RunParamError as exc:
            raise AirflowFailException(f"invalid Params: {exc}") from exc
        try:
            resolved = resolve_or_fail({**base, **overrides})
        except AirflowFailException as exc:
            raise AirflowFailException(f"{where}: {exc}") from exc
        runs.append(train_kwargs(resolved))
    return runs


def train_kwargs(resolved: Any) -> dict[str, Any]:
    """The training operator's run arguments from :func:`resolve_run`'s result (or its XCom)."""
    return {**{key: resolved[key] for key in _TRAIN_KEYS}, "cluster_name": resolved["profile"]}


def _settings(mlflow: Mapping[str, Any], dag_id: str) -> Any:
    from slurm_ray.mlflow.settings import MlflowSettings

    return MlflowSettings.from_dict(dict(mlflow), default_experiment=dag_id)


def export_model_command(run_dir: str, environment: Mapping[str, Any]) -> str:
    """Shell text that builds ``run_dir/mlflow_model`` with the cluster-side env (once)."""
    from slurm_ray.slurm.commands import build_export_model_command
    from slurm_ray.utils.environment import EnvironmentSpec

    env = EnvironmentSpec.from_dict(environment)
    return build_export_model_command(run_dir, env.activation_lines())


def register_trained_model(
    summary: Mapping[str, Any],
    mlflow: Mapping[str, Any],
    ssh_conn_id: str,
    dag_id: str,
    environment: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Export the pyfunc model on the cluster, log artifacts and register a version."""
    from slurm_ray.hooks.slurm import SlurmHook
    from slurm_ray.mlflow.artifacts import finalize_run

    hook = SlurmHook(ssh_conn_id, command_timeout=900)
    run_dir = summary["run_dir"]
    if environment is not None:
        # Model loading needs ray/torch: it happens on the cluster, never here.
        res = hook.run(export_model_command(run_dir, environment), timeout=900)
        if res.exit_code != 0:
            raise AirflowFailException(
                f"exporting the model in {run_dir} failed (exit {res.exit_code}): "
                f"{(res.stderr or res.stdout).strip()[-2000:]}"
            )
    raw = hook.read_file(posixpath.join(run_dir, "result.json"))
    result = json.loads(raw) if raw else None
    out = finalize_run(
        _settings(mlflow, dag_id),
        summary["mlflow_run_id"],
        hook=hook,
        run_dir=run_dir,
        job_id=str(summary["job_id"]),
        result=result,
    )
    return {**out, "eval_return_mean": (result or {}).get("eval_return_mean")}


def promote_model(
    registered: Mapping[str, Any],
    mlflow: Mapping[str, Any],
    dag_id: str,
    metric: str = "eval_return_mean",
) -> dict[str, Any]:
    """Move the ``champion`` alias to the new version if it is better by the margin."""
    from slurm_ray.mlflow.registry import check_promotion_metric, promote_if_better

    try:
        metric = check_promotion_metric(metric)
    except ValueError as exc:
        raise AirflowFailException(f"invalid Params: {exc}") from exc
    return promote_if_better(
        _settings(mlflow, dag_id),
        registered["model_name"],
        registered["model_version"],
        metric=metric,
    )


def environment_tasks(resolved: Any) -> tuple[ClusterEnvOperator, GymSanityCheckOperator]:
    """Build the cluster-side environment, then Gym-check it on a compute node.

    The check reuses a recorded pass of the same environment build, env id and
    partition from the last 24 h unless the ``force_sanity_check`` Param is set.
    """
    env = ClusterEnvOperator(
        task_id="build_env",
        ssh_conn_id=resolved["ssh_conn_id"],
        environment=resolved["environment"],
        remote_dir=resolved["env_stage_dir"],
        extra_env=resolved["env_build_vars"],
    )
    sanity = GymSanityCheckOperator(
        task_id="sanity_check",
        ssh_conn_id=resolved["ssh_conn_id"],
        environment=resolved["environment"],
        env_id="{{ params.env_id }}",
        where="compute",
        partition=resolved["sanity_partition"],
        account=resolved["sanity_account"],
        quiet=True,
        env_modules=resolved["env_modules"],
        force=resolved["force_sanity_check"],
    )
    env >> sanity
    return env, sanity


def build_training_chain(*, train_timeout: timedelta = timedelta(hours=12)) -> dict[str, Any]:
    """Add the training tasks to the DAG in context; returns them by name."""

    @task(multiple_outputs=True)
    def resolve(params: dict[str, Any] | None = None) -> dict[str, Any]:
        """Validate the Params and derive the run (nothing has touched the cluster yet)."""
        return resolve_or_fail(params or {})

    # Any: XComArg indexing (multiple_outputs) is invisible to type checkers.
    resolved: Any = resolve()
    env, sanity = environment_tasks(resolved)
    train = SlurmRayOperator(
        task_id="train",
        **train_kwargs(resolved),
        retries=TRAIN_RETRIES,
        retry_delay=timedelta(seconds=10),
        execution_timeout=train_timeout,
        deferrable=resolved["deferrable"],
        poll_interval=TRAIN_POLL_INTERVAL,
        export_model=True,
    )

    @task
    def register_model(
        summary: dict[str, Any],
        mlflow: dict[str, Any],
        ssh_conn_id: str,
        environment: dict[str, Any],
        dag_run: Any = None,
    ) -> dict[str, Any]:
        """Artifacts, pyfunc model and a registered version in MLflow."""
        return register_trained_model(summary, mlflow, ssh_conn_id, dag_run.dag_id, environment)

    @task
    def promote(
        registered: dict[str, Any], mlflow: dict[str, Any], dag_run: Any = None, params: Any = None
    ) -> dict[str, Any]:
        """Champion alias to the new version if it is better by ``promotion_metric``."""
        metric = (params or {}).get("promotion_metric", "eval_return_mean")
        return promote_model(registered, mlflow, dag_run.dag_id, metric)

    registered: Any = register_model(
        cast(Any, train.output),
        resolved["mlflow"],
        resolved["ssh_conn_id"],
        resolved["environment"],
    )
    promoted = promote(registered, resolved["mlflow"])
    sanity >> train
    return {
        "resolve": resolved,
        "build_env": env,
        "sanity_check": sanity,
        "train": train,
        "register_model": registered,
        "promote": promoted,
    }
