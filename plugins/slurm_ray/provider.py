"""Airflow provider metadata (the ``apache_airflow_provider`` entry point)."""

from __future__ import annotations

import copy
from typing import Any

from slurm_ray import __version__

#: What :func:`get_provider_info` returns.
PROVIDER_INFO: dict[str, Any] = {
    "package-name": "slurm-ray",
    "name": "Slurm Ray",
    "description": "RLlib training on Slurm HPC clusters with multi-node Ray, tracked in MLflow.",
    "versions": [__version__],
    "integrations": [
        {
            "integration-name": "Slurm",
            "external-doc-url": "https://slurm.schedmd.com/",
            "tags": ["software"],
        },
        {
            "integration-name": "MLflow",
            "external-doc-url": "https://mlflow.org/",
            "tags": ["software"],
        },
    ],
    "operators": [
        {
            "integration-name": "Slurm",
            "python-modules": [
                "slurm_ray.operators.training",
                "slurm_ray.operators.environment",
                "slurm_ray.operators.sanity_check",
            ],
        }
    ],
    "hooks": [
        {"integration-name": "Slurm", "python-modules": ["slurm_ray.hooks.slurm"]},
        {"integration-name": "MLflow", "python-modules": ["slurm_ray.mlflow.hook"]},
    ],
    "triggers": [{"integration-name": "Slurm", "python-modules": ["slurm_ray.triggers.slurm_job"]}],
    "connection-types": [
        {
            "connection-type": "mlflow",
            "hook-class-name": "slurm_ray.mlflow.hook.MlflowHook",
            "hook-name": "MLflow",
            "conn-fields": {
                "path": {
                    "label": "URL path",
                    "description": "Path prefix of a tracking server behind a reverse proxy",
                    "schema": {"type": ["string", "null"]},
                }
            },
            "ui-field-behaviour": {
                "hidden-fields": ["extra"],
                "relabeling": {
                    "host": "Host (or the whole URL)",
                    "schema": "Scheme",
                    "login": "Username",
                },
                "placeholders": {
                    "host": "mlflow.example.org or https://mlflow.example.org/prefix",
                    "schema": "http or https (default http)",
                    "port": "5000",
                    "login": "HTTP basic auth user (optional)",
                    "password": "HTTP basic auth password (stays out of XCom and logs)",
                },
            },
        }
    ],
    "extra-links": ["slurm_ray.links.SlurmJobLink", "slurm_ray.links.MlflowRunLink"],
}


def get_provider_info() -> dict[str, Any]:
    """Describe this package to Airflow's ProvidersManager."""
    return copy.deepcopy(PROVIDER_INFO)
