"""What one execution of the training operator knows about its run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from airflow.sdk import Context


@dataclass
class RunState:
    """Per-run state of :class:`~slurm_ray.operators.training.SlurmRayOperator`.

    :param context: the task's Airflow context.
    :param run_dir: the try's run directory on the cluster.
    :param job_id: the Slurm job, once submitted or adopted.
    :param mlflow_run_id: the MLflow run (None: no MLflow, or not reachable yet).
    :param relay: the serialisable relay settings the trigger carries.
    :param staged: cluster-side files staged, by name (hashed into MLflow).
    :param live_relay: the worker-side relay of the non-deferrable wait.
    """

    context: Context
    run_dir: str = ""
    job_id: str | None = None
    mlflow_run_id: str | None = None
    relay: dict[str, Any] | None = None
    staged: dict[str, bytes] = field(default_factory=dict)
    live_relay: Any = None
