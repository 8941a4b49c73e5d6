"""A sweep: one Slurm job per configuration, in parallel, compared in MLflow.

`configs` is a list of objects; each overrides the base Params (e.g.
`{"lr": 0.001}` or `{"envs_per_runner": 4, "seed": 7}`). Every configuration
becomes a mapped `train` task (its own Slurm job and MLflow run); `compare`
logs a learning-curve plot and a table to a parent run and picks the best,
whose model is registered and promoted if it beats the champion.
`promotion_metric` says what "best" means: `eval_return_mean`, or
`return_per_node_hour` (the evaluation return per node-hour the job cost,
from Slurm accounting).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, cast

from airflow.sdk import DAG, Param, task
from slurm_ray.mlflow.registry import EVAL_RETURN, PROMOTION_PARAM
from slurm_ray.operators.slurm_ray import SlurmRayOperator
from slurm_ray.params import airflow_params, param_specs
from slurm_ray.pipeline import (
    SWEEP_FIXED,
    TRAIN_POLL_INTERVAL,
    TRAIN_RETRIES,
    environment_tasks,
    plan_sweep_runs,
    register_trained_model,
    resolve_or_fail,
)

_OVERRIDABLE = sorted(set(param_specs()) - SWEEP_FIXED)

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
            # The trigger form / REST API refuse a bad override value too
            # (plan_runs checks again, naming configs[i].field).
            items={
                "type": "object",
                "properties": {name: param_specs()[name]["schema"] for name in _OVERRIDABLE},
                "additionalProperties": False,
            },
            description="Configurations to compare; each object overrides the base Params.",
        ),
        "promotion_metric": Param(EVAL_RETURN, **PROMOTION_PARAM),
    },
    render_template_as_native_obj=True,
    max_active_runs=2,
    tags=["slurm", "ray", "rllib", "mlflow", "sweep"],
    doc_md=__doc__,
):

    @task(multiple_outputs=True)
    def resolve(params: dict[str, Any] | None = None) -> dict[str, Any]:
        """Validate the base Params (cluster, MLflow) before anything reaches the cluster."""
        from airflow.sdk.exceptions import AirflowFailException
        from slurm_ray.mlflow.registry import check_promotion_metric

        base = dict(params or {})
        base.pop("configs", None)
        try:
            metric = check_promotion_metric(base.pop("promotion_metric", EVAL_RETURN))
        except ValueError as exc:
            raise AirflowFailException(f"invalid Params: {exc}") from exc
        return {**resolve_or_fail(base), "promotion_metric": metric}

    @task
    def plan_runs(params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """One operator-kwargs dict per configuration; every override checked, errors indexed."""
        return plan_sweep_runs(params or {})

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
        summaries: list[dict[str, Any]],
        mlflow: dict[str, Any],
        ssh_conn_id: str,
        environment: dict[str, Any],
        metric: str,
        dag_run: Any = None,
    ) -> dict[str, Any]:
        """Learning curves and a table of final metrics in a parent MLflow run; pick the best.

        The figure is drawn with matplotlib in the cluster environment (over SSH).
        """
        from slurm_ray.hooks.slurm import SlurmHook
        from slurm_ray.mlflow.compare import compare_runs
        from slurm_ray.mlflow.plot import RemotePlotter
        from slurm_ray.mlflow.settings import MlflowSettings

        summaries = list(summaries)
        settings = MlflowSettings.from_dict(mlflow, default_experiment=dag_run.dag_id)
        hook = SlurmHook(ssh_conn_id)
        try:
            out = compare_runs(
                settings,
                [s["mlflow_run_id"] for s in summaries],
                parent_run_name=f"sweep {dag_run.run_id}",
                plotter=RemotePlotter(hook, environment),
                metric=metric,
                # the evaluation return reaches MLflow only at finalize (best run)
                known={
                    s["mlflow_run_id"]: {"eval_return_mean": s.get("eval_return_mean")}
                    for s in summaries
                },
            )
        finally:
            hook.close()
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
        registered: dict[str, Any], mlflow: dict[str, Any], metric: str, dag_run: Any = None
    ) -> dict[str, Any]:
        """Champion alias to the best model if it beats the current champion by ``metric``."""
        from slurm_ray.mlflow.registry import promote_if_better
        from slurm_ray.mlflow.settings import MlflowSettings

        settings = MlflowSettings.from_dict(dict(mlflow), default_experiment=dag_run.dag_id)
        return promote_if_better(
            settings, registered["model_name"], registered["model_version"], metric=metric
        )

    comparison: Any = compare(
        cast(Any, train.output),
        resolved["mlflow"],
        resolved["ssh_conn_id"],
        resolved["environment"],
        resolved["promotion_metric"],
    )
    registered: Any = register_best(
        comparison, resolved["mlflow"], resolved["ssh_conn_id"], resolved["environment"]
    )
    promote(registered, resolved["mlflow"], resolved["promotion_metric"])
    runs >> env
    sanity >> train
