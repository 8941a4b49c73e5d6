"""On-demand RLlib training on a Slurm cluster, triggered from the UI form or REST.

Params are validated by their JSON schemas at trigger time; the `resolve` task
does the cross-field checks. Defaults: PPO on CartPole-v1, two nodes of the
local dev cluster, until the mean return reaches 450.
"""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG
from slurm_ray.params import airflow_params
from slurm_ray.pipeline import build_training_chain

with DAG(
    dag_id="rllib_train",
    description="Train an RLlib agent on a Slurm cluster (multi-node Ray), tracked in MLflow",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    params=airflow_params(),
    render_template_as_native_obj=True,
    max_active_runs=4,
    tags=["slurm", "ray", "rllib", "mlflow"],
    doc_md=__doc__,
):
    build_training_chain()
