"""A Ray Tune sweep in ONE Slurm job: one Ray cluster, many concurrent trials.

Unlike `rllib_sweep` (one Slurm job per configuration, each queued on its
own), this DAG asks Slurm once and lets Ray Tune run `num_samples` trials
over the `search` space on the allocation's CPUs, with a scheduler that can
stop weak trials early (`asha`) or copy strong ones (`pbt`). Every trial is a
nested MLflow run under the task's run, its metrics relayed live; the best
trial's model is exported, registered and promoted like any run.

Example conf::

    {"search": {"lr": {"loguniform": [0.0001, 0.003]},
                "hidden_sizes": {"grid": [[32], [64, 64]]}},
     "num_samples": 2, "scheduler": "asha", "stop_iterations": 20, "nodes": 2}
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, cast

from airflow.sdk import DAG, task
from slurm_ray.operators.training import SlurmRayOperator
from slurm_ray.params import airflow_params
from slurm_ray.pipeline import (
    TRAIN_POLL_INTERVAL,
    TRAIN_RETRIES,
    environment_tasks,
    promote_model,
    register_trained_model,
    resolve_or_fail,
    train_kwargs,
)
from slurm_ray.tune_plan import (
    TUNE_ENTRYPOINT,
    TUNE_PARAMS,
    plan_tune,
    tag_best_trial,
    tune_files,
    tune_params,
)

with DAG(
    dag_id="rllib_tune",
    description="Ray Tune sweep (ASHA / PBT) inside one Slurm allocation; best trial promoted",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    params={
        # Trials sample in their own process by default: every CPU runs a trial.
        **airflow_params(
            {"experiment_name": "rllib_tune", "stop_iterations": 20, "num_env_runners": 0}
        ),
        **tune_params(),
    },
    render_template_as_native_obj=True,
    max_active_runs=2,
    tags=["slurm", "ray", "rllib", "mlflow", "tune"],
    doc_md=__doc__,
):

    @task(multiple_outputs=True)
    def resolve(params: dict[str, Any] | None = None) -> dict[str, Any]:
        """Validate the training Params and the search space before anything reaches the cluster."""
        params = dict(params or {})
        resolved = resolve_or_fail({k: v for k, v in params.items() if k not in TUNE_PARAMS})
        return {**resolved, **plan_tune(resolved, params)}

    # Any: XComArg indexing (multiple_outputs) is invisible to type checkers.
    resolved: Any = resolve()
    env, sanity = environment_tasks(resolved)
    train = SlurmRayOperator(
        task_id="tune",
        **train_kwargs(resolved),
        entrypoint=TUNE_ENTRYPOINT,
        extra_files=tune_files(),
        retries=TRAIN_RETRIES,
        retry_delay=timedelta(seconds=10),
        execution_timeout=timedelta(hours=12),
        deferrable=resolved["deferrable"],
        poll_interval=TRAIN_POLL_INTERVAL,
    )

    @task
    def register_best(
        summary: dict[str, Any],
        mlflow: dict[str, Any],
        ssh_conn_id: str,
        environment: dict[str, Any],
        dag_run: Any = None,
    ) -> dict[str, Any]:
        """Register the best trial's model (on the parent run), tag which trial it is."""
        best = tag_best_trial(summary, mlflow, ssh_conn_id, dag_run.dag_id)
        out = register_trained_model(summary, mlflow, ssh_conn_id, dag_run.dag_id, environment)
        return {**out, **best}

    @task
    def promote(
        registered: dict[str, Any], mlflow: dict[str, Any], dag_run: Any = None
    ) -> dict[str, Any]:
        """Champion alias to the best trial's model if it beats the champion."""
        return promote_model(registered, mlflow, dag_run.dag_id)

    registered: Any = register_best(
        cast(Any, train.output),
        resolved["mlflow"],
        resolved["ssh_conn_id"],
        resolved["environment"],
    )
    promote(registered, resolved["mlflow"])
    sanity >> train
