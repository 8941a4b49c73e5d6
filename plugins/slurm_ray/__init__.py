"""slurm_ray: RLlib training on Slurm HPC clusters from Airflow.

The heavy classes are imported lazily so that ``import slurm_ray`` (the
provider entry point, the pure helpers) stays cheap for the scheduler.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "ClusterEnvOperator",
    "GymSanityCheckOperator",
    "SlurmHook",
    "SlurmJobTrigger",
    "SlurmRayOperator",
    "__version__",
]

_LAZY = {
    "SlurmHook": "slurm_ray.hooks.slurm",
    "SlurmJobTrigger": "slurm_ray.triggers.slurm_job",
    "SlurmRayOperator": "slurm_ray.operators.training",
    "ClusterEnvOperator": "slurm_ray.operators.environment",
    "GymSanityCheckOperator": "slurm_ray.operators.sanity_check",
}

if TYPE_CHECKING:
    from slurm_ray.hooks.slurm import SlurmHook
    from slurm_ray.operators.environment import ClusterEnvOperator
    from slurm_ray.operators.sanity_check import GymSanityCheckOperator
    from slurm_ray.operators.training import SlurmRayOperator
    from slurm_ray.triggers.slurm_job import SlurmJobTrigger


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'slurm_ray' has no attribute {name!r}")
