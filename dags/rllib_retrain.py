"""Scheduled retraining with the production profile's defaults.

`promotion_metric` (`eval_return_mean` or `return_per_node_hour`) is what the
new version must beat the champion by. When `promote` moves the `champion` alias, the `rllib_champion` Asset is
updated so downstream DAGs (serving, evaluation) can react. The schedule and
profile are settings so operations can change them without a
deploy, through the environment of the scheduler and dag-processor:
`SLURM_RAY_RETRAIN_SCHEDULE` (cron or preset, default `@weekly`) and
`SLURM_RAY_RETRAIN_PROFILE` (default `kestrel`).
"""

from __future__ import annotations

import os
from datetime import datetime
from typing import Any

from airflow.sdk import DAG, Asset, Param, task
from slurm_ray.mlflow.registry import EVAL_RETURN, PROMOTION_PARAM
from slurm_ray.params import airflow_params
from slurm_ray.pipeline import build_training_chain

CHAMPION = Asset("mlflow://models/rllib-cartpole@champion", group="models")
SCHEDULE = os.environ.get("SLURM_RAY_RETRAIN_SCHEDULE", "@weekly")
PROFILE = os.environ.get("SLURM_RAY_RETRAIN_PROFILE", "kestrel")

with DAG(
    dag_id="rllib_retrain",
    description="Weekly RLlib retraining on the production cluster; updates the champion Asset",
    schedule=SCHEDULE,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    params={
        **airflow_params(
            {
                "profile": PROFILE,
                "nodes": 2,
                "cpus_per_node": 104 if PROFILE == "kestrel" else 4,
                "time_limit": "02:00:00",
                "stop_minutes": 90.0,
                "experiment_name": "rllib_retrain",
            }
        ),
        "promotion_metric": Param(EVAL_RETURN, **PROMOTION_PARAM),
    },
    render_template_as_native_obj=True,
    max_active_runs=1,
    # Production retraining needs a site account and connection first: it
    # starts paused, and an operator unpauses it once the profile is set up.
    is_paused_upon_creation=True,
    tags=["slurm", "ray", "rllib", "mlflow", "scheduled"],
    doc_md=__doc__,
):
    tasks = build_training_chain()

    @task(outlets=[CHAMPION])
    def publish_champion(promotion: dict[str, Any], outlet_events: Any = None) -> dict[str, Any]:
        """Update the champion Asset only when the alias actually moved."""
        from airflow.sdk.exceptions import AirflowSkipException

        if not promotion.get("promoted"):
            raise AirflowSkipException("champion unchanged; no Asset event")
        outlet_events[CHAMPION].extra = {
            "model_name": promotion.get("model_name"),
            "version": promotion.get("version"),
            "metric": promotion.get("new"),
        }
        return promotion

    publish_champion(tasks["promote"])
