"""Slurm job ids as they may reach a shell."""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["validate_job_id", "validate_job_ids"]

# What sbatch --parsable prints (no cluster suffix), an array task (123_4) or a
# het component (123+1). Anything else could be an option or shell text.
_JOB_ID_RE = re.compile(r"[1-9][0-9]*(?:_[0-9]+|\+[0-9]+)?", re.ASCII)


def validate_job_id(job_id: str) -> str:
    """``job_id`` if it is a Slurm job id (``123``, ``123_4``, ``123+1``), else ValueError."""
    if isinstance(job_id, int) and not isinstance(job_id, bool):
        job_id = str(job_id)
    if not isinstance(job_id, str) or not _JOB_ID_RE.fullmatch(job_id):
        raise ValueError(f"invalid Slurm job id {job_id!r}: expected digits, 123_4 or 123+1")
    return job_id


def validate_job_ids(job_ids: Sequence[str]) -> list[str]:
    """The ids of ``job_ids``, each validated, duplicates dropped; never empty."""
    if isinstance(job_ids, str):
        # a bare "123" would otherwise be read as the ids "1", "2", "3"
        raise TypeError("job_ids must be a sequence of ids, not a string")
    ids = list(dict.fromkeys(validate_job_id(j) for j in job_ids))
    if not ids:
        raise ValueError("job_ids must not be empty")
    return ids
