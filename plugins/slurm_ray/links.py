"""Operator extra links: the Slurm job (and, once logged, the MLflow run)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import quote as urlquote

from airflow.sdk import BaseOperatorLink
from airflow.sdk.execution_time.xcom import XCom

if TYPE_CHECKING:
    from airflow.sdk.types import TaskInstanceKey


class SlurmJobLink(BaseOperatorLink):
    """Link showing the Slurm job id and cluster of a training task.

    Sites with a job web page (Open OnDemand, ...) set ``job_url_template`` on the
    operator (``{job_id}``, ``{cluster}``); otherwise the link is a
    ``slurm://cluster/job_id`` identifier users can paste into ``scontrol``.
    """

    name = "Slurm job"

    def get_link(self, operator: Any, *, ti_key: TaskInstanceKey) -> str:
        job_id = XCom.get_value(ti_key=ti_key, key="slurm_job_id")
        if not job_id:
            return ""
        cluster = XCom.get_value(ti_key=ti_key, key="slurm_cluster") or getattr(
            operator, "cluster_name", ""
        )
        template = getattr(operator, "job_url_template", "") or ""
        if template:
            return template.format(job_id=urlquote(str(job_id)), cluster=urlquote(str(cluster)))
        return f"slurm://{urlquote(str(cluster))}/{urlquote(str(job_id))}"


class MlflowRunLink(BaseOperatorLink):
    """Link from a training task to its MLflow run."""

    name = "MLflow run"

    def get_link(self, operator: Any, *, ti_key: TaskInstanceKey) -> str:
        run_id = XCom.get_value(ti_key=ti_key, key="mlflow_run_id")
        uri = XCom.get_value(ti_key=ti_key, key="mlflow_tracking_uri")
        if not run_id or not uri or not str(uri).startswith(("http://", "https://")):
            return ""
        experiment = XCom.get_value(ti_key=ti_key, key="mlflow_experiment_id") or "0"
        return f"{str(uri).rstrip('/')}/#/experiments/{urlquote(str(experiment))}/runs/{urlquote(str(run_id))}"
