"""Field readers shared by the squeue, scontrol and sacct parsers."""

from __future__ import annotations

import re

__all__ = ["JOB_ID_RE", "int_or_none", "node_list"]

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
