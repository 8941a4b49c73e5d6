"""Field readers shared by the squeue, scontrol and sacct parsers."""

from __future__ import annotations

import re
from datetime import UTC, datetime

__all__ = ["JOB_ID_RE", "SLURM_TIME_ENV", "int_or_none", "node_list", "slurm_time", "time_or_none"]

#: Prefix of every Slurm command whose times we read: ISO times in UTC, whatever
#: the user's ``SLURM_TIME_FORMAT`` or the login node's time zone.
SLURM_TIME_ENV = "TZ=UTC SLURM_TIME_FORMAT=standard"

#: Job ids as Slurm prints them: plain, array task (123_4, or a pending range
#: 123_[1-9%2]) and het component (123+1).
JOB_ID_RE = re.compile(r"[0-9]+(?:_[0-9]+|_\[[^\]\s]*\]|\+[0-9]+)?", re.ASCII)
_LEADING_INT_RE = re.compile(r"[0-9]+", re.ASCII)


def int_or_none(text: str) -> int | None:
    """The leading integer (scontrol prints NumNodes=2-2, min-max, while pending)."""
    m = _LEADING_INT_RE.match(text.strip())
    return int(m[0]) if m else None


def node_list(text: str) -> str:
    """A node list, empty when none is allocated."""
    text = text.strip()
    return "" if text in ("", "(null)", "None assigned") else text


def slurm_time(text: str | None) -> datetime | None:
    """A time as Slurm prints it under :data:`SLURM_TIME_ENV` (``2026-12-01T14:32:00``, UTC).

    ``N/A``, ``Unknown``, ``None`` (no estimate yet, never started) and
    anything else that is not such a time give None.
    """
    try:
        return datetime.strptime((text or "").strip(), "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)
    except ValueError:
        return None


def time_or_none(text: str | None) -> str | None:
    """``text`` when it is a Slurm time (:func:`slurm_time`), else None (``N/A``, ``Unknown``)."""
    return text.strip() if slurm_time(text) is not None else None  # type: ignore[union-attr]
