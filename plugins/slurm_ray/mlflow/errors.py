"""Exceptions of the MLflow layer."""

from __future__ import annotations

from airflow.sdk.exceptions import AirflowException


class MlflowError(AirflowException):
    """An MLflow step of slurm_ray failed; the message says which and why."""


class MlflowUnreachableError(MlflowError):
    """The tracking server did not answer."""
