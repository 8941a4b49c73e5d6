"""Operator extra links: the Slurm job (and, once logged, the MLflow run)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import quote as urlquote
from urllib.parse import urlencode

from airflow.sdk import BaseOperatorLink
from airflow.sdk.execution_time.xcom import XCom

if TYPE_CHECKING:
    from airflow.sdk.types import TaskInstanceKey


class SlurmJobLink(BaseOperatorLink):
    """Link from a training task to its Slurm job.

    Sites with a job web page (Open OnDemand, ...) set ``job_url_template`` on the
    operator (``{job_id}``, ``{cluster}``). Otherwise the link opens this task
    try's log in the Airflow UI, where the triggerer streams the job's Slurm log
    (the UI shows only http(s) and same-site links, so a ``slurm://`` identifier
    would never appear); ``slurm_job=<cluster>:<id>`` in the link names the job.
    """

    name = "Slurm job"

    def get_link(self, operator: Any, *, ti_key: TaskInstanceKey) -> str:
        job_id = XCom.get_value(ti_key=ti_key, key="slurm_job_id")
        if not job_id:
            return ""
        cluster = XCom.get_value(ti_key=ti_key, key="slurm_cluster") or getattr(
            operator, "cluster_name", ""
        )
        template = XCom.get_value(ti_key=ti_key, key="slurm_job_url_template") or getattr(
            operator, "job_url_template", ""
        )
        if template:
            return str(template).format(
                job_id=urlquote(str(job_id)), cluster=urlquote(str(cluster))
            )
        return task_log_url(ti_key, slurm_job=f"{cluster}:{job_id}")


def task_log_url(ti_key: TaskInstanceKey, **query: str) -> str:
    """The Airflow UI page of one task try (its log), on the API server's base URL."""
    from airflow.sdk import conf

    base = (conf.get("api", "base_url", fallback="") or "").rstrip("/")
    path = "/".join(
        urlquote(str(part), safe="")
        for part in ("dags", ti_key.dag_id, "runs", ti_key.run_id, "tasks", ti_key.task_id)
    )
    if ti_key.map_index >= 0:
        path += f"/mapped/{ti_key.map_index}"
    return f"{base}/{path}?{urlencode({'try_number': ti_key.try_number, **query})}"


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
