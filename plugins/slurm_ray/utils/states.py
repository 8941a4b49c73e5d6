"""Slurm job states, the sets that classify them, and what one query says about a job.

Modelled on the Kubernetes provider: a ``str`` Enum plus ``frozenset`` s and
small predicates. ``UNKNOWN`` (unparseable) and ``NOT_FOUND`` (no source knows
the job) belong to no set: they are neither active nor terminal, and never a
success, so a caller cannot mistake a failed query for a finished job.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from enum import Enum
from typing import Any, Literal

__all__ = [
    "ACTIVE_STATES",
    "FAILED_STATES",
    "NOT_FOUND_CONFIRMATIONS",
    "PENDING_STATES",
    "RUNNING_STATES",
    "TERMINAL_STATES",
    "JobInfo",
    "JobSource",
    "SlurmState",
    "describe",
    "end_from_run_dir",
    "is_active",
    "is_success",
    "is_terminal",
    "parse_state",
]


class SlurmState(str, Enum):
    """Every job state Slurm reports, plus two of our own: UNKNOWN and NOT_FOUND."""

    PENDING = "PENDING"
    CONFIGURING = "CONFIGURING"
    RUNNING = "RUNNING"
    COMPLETING = "COMPLETING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    TIMEOUT = "TIMEOUT"
    NODE_FAIL = "NODE_FAIL"
    OUT_OF_MEMORY = "OUT_OF_MEMORY"
    CANCELLED = "CANCELLED"
    PREEMPTED = "PREEMPTED"
    BOOT_FAIL = "BOOT_FAIL"
    DEADLINE = "DEADLINE"
    SUSPENDED = "SUSPENDED"
    REQUEUED = "REQUEUED"
    REQUEUE_HOLD = "REQUEUE_HOLD"
    REQUEUE_FED = "REQUEUE_FED"
    RESIZING = "RESIZING"
    REVOKED = "REVOKED"
    SIGNALING = "SIGNALING"
    SPECIAL_EXIT = "SPECIAL_EXIT"
    STAGE_OUT = "STAGE_OUT"
    STOPPED = "STOPPED"
    RESV_DEL_HOLD = "RESV_DEL_HOLD"
    #: The text could not be read as a state (or the query failed).
    UNKNOWN = "UNKNOWN"
    #: No source (squeue, scontrol, sacct) knows the job id.
    NOT_FOUND = "NOT_FOUND"

    def __str__(self) -> str:
        return self.value


#: Waiting for an allocation, or held/requeued and going to wait again.
PENDING_STATES: frozenset[SlurmState] = frozenset(
    {
        SlurmState.PENDING,
        SlurmState.CONFIGURING,  # allocated, nodes still booting
        SlurmState.REQUEUED,
        SlurmState.REQUEUE_HOLD,
        SlurmState.REQUEUE_FED,
        SlurmState.RESV_DEL_HOLD,
        SlurmState.SPECIAL_EXIT,  # requeued and held after a special exit code
    }
)
#: Holding an allocation. COMPLETING, SIGNALING and STAGE_OUT are included:
#: the final state is not known until they are over.
RUNNING_STATES: frozenset[SlurmState] = frozenset(
    {
        SlurmState.RUNNING,
        SlurmState.COMPLETING,
        SlurmState.SUSPENDED,
        SlurmState.STOPPED,
        SlurmState.RESIZING,
        SlurmState.SIGNALING,
        SlurmState.STAGE_OUT,
    }
)
#: Not finished: watch it, and cancel it when the Airflow task goes away.
ACTIVE_STATES: frozenset[SlurmState] = PENDING_STATES | RUNNING_STATES
#: Finished for good on this cluster.
TERMINAL_STATES: frozenset[SlurmState] = frozenset(
    {
        SlurmState.COMPLETED,
        SlurmState.FAILED,
        SlurmState.TIMEOUT,
        SlurmState.NODE_FAIL,
        SlurmState.OUT_OF_MEMORY,
        SlurmState.CANCELLED,
        SlurmState.PREEMPTED,
        SlurmState.BOOT_FAIL,
        SlurmState.DEADLINE,
        SlurmState.REVOKED,  # federation: a sibling cluster runs it, not this one
    }
)
#: Polls in a row that must find a job NOT_FOUND before its end is decided from
#: the run directory (:func:`end_from_run_dir`): one answer could be a glitch.
NOT_FOUND_CONFIRMATIONS = 2
#: Terminal and not COMPLETED.
FAILED_STATES: frozenset[SlurmState] = TERMINAL_STATES - {SlurmState.COMPLETED}

# squeue's %t / sacct's short codes, accepted by parse_state too.
_SHORT_CODES = {
    "PD": SlurmState.PENDING,
    "CF": SlurmState.CONFIGURING,
    "R": SlurmState.RUNNING,
    "CG": SlurmState.COMPLETING,
    "CD": SlurmState.COMPLETED,
    "F": SlurmState.FAILED,
    "TO": SlurmState.TIMEOUT,
    "NF": SlurmState.NODE_FAIL,
    "OOM": SlurmState.OUT_OF_MEMORY,
    "CA": SlurmState.CANCELLED,
    "PR": SlurmState.PREEMPTED,
    "BF": SlurmState.BOOT_FAIL,
    "DL": SlurmState.DEADLINE,
    "S": SlurmState.SUSPENDED,
    "RQ": SlurmState.REQUEUED,
    "RH": SlurmState.REQUEUE_HOLD,
    "RF": SlurmState.REQUEUE_FED,
    "RS": SlurmState.RESIZING,
    "RV": SlurmState.REVOKED,
    "SI": SlurmState.SIGNALING,
    "SE": SlurmState.SPECIAL_EXIT,
    "SO": SlurmState.STAGE_OUT,
    "ST": SlurmState.STOPPED,
    "RD": SlurmState.RESV_DEL_HOLD,
}


def parse_state(text: str | None) -> SlurmState:
    """Read a state as squeue, scontrol or sacct print it.

    ``"CANCELLED by 1001"`` and ``"CANCELLED+"`` (sacct's truncation mark) are
    CANCELLED; case does not matter; short codes (``CD``, ``PD``) are accepted.
    Anything else, empty text and ``None`` give ``UNKNOWN``.
    """
    if not isinstance(text, str):
        return SlurmState.UNKNOWN
    words = text.strip().split()
    if not words:
        return SlurmState.UNKNOWN
    word = words[0].rstrip("+").upper()
    try:
        return SlurmState(word)
    except ValueError:
        return _SHORT_CODES.get(word, SlurmState.UNKNOWN)


def _as_state(state: SlurmState | str) -> SlurmState:
    return state if isinstance(state, SlurmState) else parse_state(state)


def is_terminal(state: SlurmState | str) -> bool:
    """True when the job is finished for good (successfully or not)."""
    return _as_state(state) in TERMINAL_STATES


def is_success(state: SlurmState | str) -> bool:
    """True only for COMPLETED; UNKNOWN and NOT_FOUND are never a success."""
    return _as_state(state) is SlurmState.COMPLETED


def is_active(state: SlurmState | str) -> bool:
    """True while the job is pending or holds an allocation."""
    return _as_state(state) in ACTIVE_STATES


JobSource = Literal["squeue", "scontrol", "sacct", "trigger", "run_dir", "none"]


@dataclass(frozen=True)
class JobInfo:
    """What one query said about one job.

    :param job_id: the id as Slurm prints it (``123``, ``123_4``, ``123+1``).
    :param state: the parsed state.
    :param reason: Slurm's reason (``None``, ``BeginTime``, ``NonZeroExitCode``…)
        or, for UNKNOWN/NOT_FOUND, why we could not tell.
    :param name: the job name.
    :param nodelist: allocated nodes in Slurm's compressed form; empty when none.
    :param num_nodes: allocated nodes, or the minimum requested while pending.
    :param exit_code: ``"EXIT:SIGNAL"`` such as ``"3:0"``; squeue does not report it.
    :param elapsed: run time as Slurm prints it (``0:05``, ``00:01:13``, ``1-02:00:00``).
    :param submit_time: when it was submitted (``2026-12-01T14:20:00``, UTC), if reported.
    :param start_time: Slurm's start estimate while pending (None until it has one),
        the real start once started (UTC, as ``submit_time``).
    :param source: which command reported it; ``"none"`` when none did.
    """

    job_id: str
    state: SlurmState
    reason: str = ""
    name: str = ""
    nodelist: str = ""
    num_nodes: int | None = None
    exit_code: str | None = None
    elapsed: str | None = None
    submit_time: str | None = None
    start_time: str | None = None
    source: JobSource = "none"

    def queue_wait_s(self) -> float | None:
        """Seconds from submit to start, once the job has started (None before, or unknown)."""
        from slurm_ray.slurm.fields import slurm_time

        submit, start = slurm_time(self.submit_time), slurm_time(self.start_time)
        # A job cancelled while pending has a StartTime (its end) but never ran.
        started = self.state in RUNNING_STATES or (is_terminal(self.state) and self.nodelist)
        if not started or submit is None or start is None or start < submit:
            return None
        return (start - submit).total_seconds()

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (for trigger events and XCom)."""
        out = asdict(self)
        out["state"] = self.state.value
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JobInfo:
        """Inverse of :meth:`to_dict`."""
        return cls(**{**d, "state": SlurmState(d["state"])})


# The launcher's last log line (include/ray_launch.sh, on_exit): its exit status is the job's.
_LAUNCH_EXIT_RE = re.compile(r"^ray_launch: exit (?P<rc>[0-9]+)[ \t]*$", re.M)


def end_from_run_dir(job_id: str, result: dict[str, Any] | None, log_tail: str) -> JobInfo:
    """How a job ended that Slurm has forgotten (``NOT_FOUND``: purged after
    ``MinJobAge`` on a site without accounting), from its run directory.

    The launcher's ``ray_launch: exit N`` line in the Slurm log is the batch
    script's own exit status: 0 is COMPLETED, anything else FAILED. Without
    it (killed before its exit trap ran) ``result.json`` decides: status
    ``succeeded`` is COMPLETED, any other status FAILED. With neither the
    outcome is not known and the state stays NOT_FOUND (never a success).
    """
    matches = list(_LAUNCH_EXIT_RE.finditer(log_tail or ""))
    status = str((result or {}).get("status", "")) if isinstance(result, dict) else ""
    if matches:
        rc = int(matches[-1]["rc"])
        state = SlurmState.COMPLETED if rc == 0 else SlurmState.FAILED
        why = f"Slurm log: ray_launch exited {rc}"
        if status:
            why += f"; result.json status {status!r}"
        return JobInfo(job_id, state, reason=why, exit_code=f"{rc}:0", source="run_dir")
    if status == "succeeded":
        return JobInfo(
            job_id, SlurmState.COMPLETED, reason="result.json status 'succeeded'", source="run_dir"
        )
    if status:
        return JobInfo(
            job_id, SlurmState.FAILED, reason=f"result.json status {status!r}", source="run_dir"
        )
    return JobInfo(
        job_id,
        SlurmState.NOT_FOUND,
        reason="no result.json and no exit line in the Slurm log",
        source="run_dir",
    )


def _span(seconds: float) -> str:
    """``45 s``, ``12 min``, ``3 h 5 min``, ``2 d 4 h``."""
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    m = round(s / 60)
    if m < 60:
        return f"{m} min"
    h, m = divmod(m, 60)
    if h < 24:
        return f"{h} h {m} min" if m else f"{h} h"
    d, h = divmod(h, 24)
    return f"{d} d {h} h" if h else f"{d} d"


def describe(info: JobInfo, now: datetime) -> tuple[str, tuple[str, ...]]:
    """The task-log line for ``info`` and the key that says when it changed.

    ``Slurm job 123 is PENDING (Resources), estimated start 14:32 UTC, in 12 min``;
    once started, ``Slurm job 123 is RUNNING, after 3 min in the queue``. The
    key holds the state, the reason and the estimate to the minute, not the
    countdown: a line is worth logging only when the key changes.
    """
    from slurm_ray.slurm.fields import slurm_time

    text = f"Slurm job {info.job_id} is {info.state.value}"
    if info.reason and info.reason != "None":
        text += f" ({info.reason})"
    estimate = ""
    # CONFIGURING has its nodes (booting): its StartTime is no estimate
    if info.state in PENDING_STATES and not info.nodelist:
        start = slurm_time(info.start_time)
        if start is not None:
            same_day = start.date() == now.astimezone(UTC).date()
            estimate = start.strftime("%H:%M UTC" if same_day else "%Y-%m-%d %H:%M UTC")
            left = (start - now).total_seconds()
            text += f", estimated start {estimate}, " + (
                f"in {_span(left)}" if left >= 60 else "due now"
            )
    elif (wait := info.queue_wait_s()) is not None:
        text += f", after {_span(wait)} in the queue"
    return text, (info.state.value, info.reason, estimate)
