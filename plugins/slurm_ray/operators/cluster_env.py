"""Old home (release 0.1.0) of the environment and sanity-check operators.

DAG files written against 0.1.0 import from here; a deferred or retried task
re-parses its DAG file, so the path must keep working. New code imports
:mod:`slurm_ray.operators.environment` and :mod:`slurm_ray.operators.sanity_check`.
"""

from slurm_ray.operators.environment import ClusterEnvOperator
from slurm_ray.operators.sanity_check import GymSanityCheckOperator

__all__ = ["ClusterEnvOperator", "GymSanityCheckOperator"]
