"""Airflow provider metadata (the ``apache_airflow_provider`` entry point)."""

from __future__ import annotations

from typing import Any

from slurm_ray import __version__


def get_provider_info() -> dict[str, Any]:
    """Describe this package to Airflow's ProvidersManager."""
    return {
        "package-name": "slurm-ray",
        "name": "Slurm Ray",
        "description": "RLlib training on Slurm HPC clusters with multi-node Ray, tracked in MLflow.",
        "versions": [__version__],
        "integrations": [
            {
                "integration-name": "Slurm",
                "external-doc-url": "https://slurm.schedmd.com/",
                "tags": ["software"],
            }
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
        "hooks": [{"integration-name": "Slurm", "python-modules": ["slurm_ray.hooks.slurm"]}],
        "triggers": [
            {"integration-name": "Slurm", "python-modules": ["slurm_ray.triggers.slurm_job"]}
        ],
        "extra-links": ["slurm_ray.links.SlurmJobLink", "slurm_ray.links.MlflowRunLink"],
    }
