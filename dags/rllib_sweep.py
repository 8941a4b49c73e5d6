"""A sweep: one Slurm job per configuration, in parallel, compared in MLflow.

`configs` is a list of objects; each overrides the base Params (e.g.
`{"lr": 0.001}` or `{"envs_per_runner": 4, "seed": 7}`). Every configuration
becomes a mapped `train` task (its own Slurm job and MLflow run); `compare`
logs a learning-curve plot and a table to a parent run and picks the best,
whose model is registered and promoted if it beats the champion.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, cast

from airflow.sdk import DAG, Param, task
from slurm_ray.operators.slurm_ray import SlurmRayOperator
from slurm_ray.params import airflow_params, param_specs
from slurm_ray.pipeline import (
    TRAIN_POLL_INTERVAL,
    TRAIN_RETRIES,
    environment_tasks,
    promote_model,
    register_trained_model,
    resolve_or_fail,
)

_OVERRIDABLE = sorted(set(param_specs()) - {"profile", "experiment_name", "register_model_name"})

with DAG(
    dag_id="rllib_sweep",
    description="Parallel RLlib runs over a list of configurations; best one promoted",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    params={
        **airflow_params({"experiment_name": "rllib_sweep", "stop_minutes": 10.0}),
        "configs": Param(
            [{"lr": 0.0003}, {"lr": 0.001}],
            type="array",
            minItems=1,
            maxItems=64,
            items={
                "type": "object",
                "propertyNames": {"enum": _OVERRIDABLE},
            },
            description="Configurations to compare; each object overrides the base Params.",
        ),
    },
    render_template_as_native_obj=True,
    max_active_runs=2,
    tags=["slurm", "ray", "rllib", "mlflow", "sweep"],
    doc_md=__doc__,
):

    @task(multiple_outputs=True)
    def resolve(params: dict[str, Any] | None = None) -> dict[str, Any]:
        """Validate the base Params (cluster, MLflow) before anything reaches the cluster."""
        base = dict(params or {})
        base.pop("configs", None)
        return resolve_or_fail(base)

    @task
    def plan_runs(params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """One operator-kwargs dict per configuration; each one validated, errors indexed."""
        params = dict(params or {})
        configs = params.pop("configs", [])
        runs = []
        for i, overrides in enumerate(configs):
            try:
                resolved = resolve_or_fail({**params, **overrides})
            except Exception as exc:
                raise type(exc)(f"configs[{i}]: {exc}") from exc
            runs.append(
                {
                    "ssh_conn_id": resolved["ssh_conn_id"],
                    "remote_base_dir": resolved["remote_base_dir"],
                    "job_spec": resolved["job_spec"],
                    "environment": resolved["environment"],
                    "config": resolved["config"],
                    "mlflow": resolved["mlflow"],
                    "cluster_name": resolved["profile"],
                }
            )
        return runs

    # Any: XComArg indexing (multiple_outputs) is invisible to type checkers.
    resolved: Any = resolve()
    runs: Any = plan_runs()
    env, sanity = environment_tasks(resolved)
    train = SlurmRayOperator.partial(
        task_id="train",
        retries=TRAIN_RETRIES,
        retry_delay=timedelta(seconds=10),
        deferrable=True,
        poll_interval=TRAIN_POLL_INTERVAL,
    ).expand_kwargs(runs)

    @task
    def compare(
        summaries: list[dict[str, Any]], mlflow: dict[str, Any], dag_run: Any = None
    ) -> dict[str, Any]:
        """Learning curves and a table of final metrics in a parent MLflow run; pick the best."""
        from slurm_ray.mlflow_tracking import MlflowSettings, compare_runs

        summaries = list(summaries)
        settings = MlflowSettings.from_dict(mlflow, default_experiment=dag_run.dag_id)
        out = compare_runs(
            settings,
            [s["mlflow_run_id"] for s in summaries],
            parent_run_name=f"sweep {dag_run.run_id}",
        )
        best = next(s for s in summaries if s["mlflow_run_id"] == out["best_run_id"])
        return {**out, "best": best}

    @task
    def register_best(
        comparison: dict[str, Any],
        mlflow: dict[str, Any],
        ssh_conn_id: str,
        environment: dict[str, Any],
        dag_run: Any = None,
    ) -> dict[str, Any]:
        """Register the best run's model."""
        return register_trained_model(
            comparison["best"], mlflow, ssh_conn_id, dag_run.dag_id, environment
        )

    @task
    def promote(
        registered: dict[str, Any], mlflow: dict[str, Any], dag_run: Any = None
    ) -> dict[str, Any]:
        """Champion alias to the best model if it beats the current champion."""
        return promote_model(registered, mlflow, dag_run.dag_id)

    comparison: Any = compare(cast(Any, train.output), resolved["mlflow"])
    registered: Any = register_best(
        comparison, resolved["mlflow"], resolved["ssh_conn_id"], resolved["environment"]
    )
    promote(registered, resolved["mlflow"])
    runs >> env
    sanity >> train
