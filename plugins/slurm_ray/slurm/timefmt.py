"""The one Slurm time grammar: time limits (``--time``) and elapsed times.

Slurm reads a time limit as ``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``,
``D-HH:MM`` or ``D-HH:MM:SS`` (sbatch(1)), and prints elapsed and CPU times in
the same shapes (``05:30``, ``1-02:03:04``; ``TotalCPU`` adds ``.mmm``).
``UNLIMITED``/``INFINITE`` mean no limit.
"""

from __future__ import annotations

import re

__all__ = ["TIME_PATTERN", "parse_elapsed", "parse_time_limit"]

_HH = "(?:[01]?[0-9]|2[0-3])"
_MS = "[0-5]?[0-9]"
#: A Slurm time limit, anchored, usable as a JSON Schema ``pattern`` (ECMA 262:
#: no flags, no look-behind). ``$`` would also match before a final newline in
#: Python; the look-ahead refuses it in both dialects.
TIME_PATTERN = (
    f"^(?:[0-9]+(?::{_MS}){{0,2}}|[0-9]+-{_HH}(?::{_MS}){{0,2}}"
    "|UNLIMITED|INFINITE|unlimited|infinite)$(?![\\n])"
)
_TIME_RE = re.compile(TIME_PATTERN, re.ASCII)
# What sacct/squeue print: [D-][HH:]MM:SS with optional fractional seconds.
_ELAPSED_RE = re.compile(
    r"(?:(?P<d>[0-9]+)-)?(?:(?P<h>[0-9]+):)?(?P<m>[0-9]+):(?P<s>[0-9]+(?:\.[0-9]*)?)", re.ASCII
)


def parse_time_limit(text: str) -> int | None:
    """Seconds of a ``--time`` value; None for UNLIMITED/INFINITE.

    :raises ValueError: naming the grammar, for anything Slurm would not read.
    """
    if not isinstance(text, str) or not _TIME_RE.match(text):
        raise ValueError(
            f"time {text!r}: expected MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS or UNLIMITED"
        )
    if text.upper() in ("UNLIMITED", "INFINITE"):
        return None
    days, _, rest = text.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:
        # D-HH[:MM[:SS]]
        h, m, s = ([*parts, 0, 0])[:3]
        return ((int(days) * 24 + h) * 60 + m) * 60 + s
    # MM, MM:SS, HH:MM:SS
    if len(parts) == 1:
        return parts[0] * 60
    if len(parts) == 2:
        return parts[0] * 60 + parts[1]
    return (parts[0] * 60 + parts[1]) * 60 + parts[2]


def parse_elapsed(text: str | None) -> float | None:
    """Seconds of an elapsed/CPU time as Slurm prints it; None when it is not one."""
    m = _ELAPSED_RE.fullmatch((text or "").strip())
    if m is None:
        return None
    days, hours = int(m["d"] or 0), int(m["h"] or 0)
    return ((days * 24 + hours) * 60 + int(m["m"])) * 60 + float(m["s"])
