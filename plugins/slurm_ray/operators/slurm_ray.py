"""Old home (release 0.1.0) of the training operator.

DAG files written against 0.1.0 import ``SlurmRayOperator`` (and
``run_identity``) from here; a deferred or retried task re-parses its DAG
file, so the path must keep working. New code imports
:mod:`slurm_ray.operators.training`.
"""

from slurm_ray.operators.identity import run_identity, sanitize, task_key
from slurm_ray.operators.training import SlurmRayOperator

__all__ = ["SlurmRayOperator", "run_identity", "sanitize", "task_key"]
