"""Slurm job states, the sets that classify them, and parsers for squeue/scontrol/sacct.

Modelled on the Kubernetes provider: a ``str`` Enum plus ``frozenset`` s and
small predicates. ``UNKNOWN`` (unparseable) and ``NOT_FOUND`` (no source knows
the job) belong to no set: they are neither active nor terminal, and never a
success, so a caller cannot mistake a failed query for a finished job.

The parsers accept text exactly as the commands print it (fixtures under
``tests/fixtures/slurm`` were captured from Slurm 22.05) and skip lines that
are not records (error messages mixed in through ``2>&1``).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any, Literal

__all__ = [
    "ACTIVE_STATES",
    "FAILED_STATES",
    "NOT_FOUND_CONFIRMATIONS",
    "PENDING_STATES",
    "RUNNING_STATES",
    "SACCT_FIELDS",
    "SACCT_FORMAT",
    "SQUEUE_FIELDS",
    "SQUEUE_FORMAT",
    "TERMINAL_STATES",
    "JobInfo",
    "JobSource",
    "SlurmState",
    "end_from_run_dir",
    "is_active",
    "is_success",
    "is_terminal",
    "parse_sacct",
    "parse_scontrol",
    "parse_squeue",
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
    """
    Read a state as squeue, scontrol or sacct print it.

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
    """
    What one query said about one job.

    :param job_id: the id as Slurm prints it (``123``, ``123_4``, ``123+1``).
    :param state: the parsed state.
    :param reason: Slurm's reason (``None``, ``BeginTime``, ``NonZeroExitCode``…)
        or, for UNKNOWN/NOT_FOUND, why we could not tell.
    :param name: the job name.
    :param nodelist: allocated nodes in Slurm's compressed form; empty when none.
    :param num_nodes: allocated nodes, or the minimum requested while pending.
    :param exit_code: ``"EXIT:SIGNAL"`` such as ``"3:0"``; squeue does not report it.
    :param elapsed: run time as Slurm prints it (``0:05``, ``00:01:13``, ``1-02:00:00``).
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
    source: JobSource = "none"

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (for trigger events and XCom)."""
        out = asdict(self)
        out["state"] = self.state.value
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JobInfo:
        """Inverse of :meth:`to_dict`."""
        return cls(**{**d, "state": SlurmState(d["state"])})


# Job ids as Slurm prints them: plain, array task (123_4, or a pending range
# 123_[1-9%2]) and het component (123+1).
_JOB_ID_RE = re.compile(r"[0-9]+(?:_[0-9]+|_\[[^\]\s]*\]|\+[0-9]+)?", re.ASCII)
_LEADING_INT_RE = re.compile(r"[0-9]+", re.ASCII)


def _int_or_none(text: str) -> int | None:
    # scontrol prints NumNodes=2-2 (min-max) for a pending job: keep the minimum.
    m = _LEADING_INT_RE.match(text.strip())
    return int(m[0]) if m else None


def _nodelist(text: str) -> str:
    text = text.strip()
    return "" if text in ("", "(null)", "None assigned") else text


#: squeue fields, in order; the job name comes last because it is the only field
#: that may contain the ``|`` delimiter (the parser splits at most 6 times).
SQUEUE_FIELDS: tuple[str, ...] = ("%i", "%T", "%r", "%D", "%M", "%N", "%j")
#: For ``squeue -h -t all -o SQUEUE_FORMAT``: id|state|reason|nodes|elapsed|nodelist|name.
SQUEUE_FORMAT: str = "|".join(SQUEUE_FIELDS)


def parse_squeue(text: str) -> dict[str, JobInfo]:
    """
    Parse ``squeue -h -t all -o SQUEUE_FORMAT`` output into ``{job_id: JobInfo}``.

    Lines that are not records (blank, error messages) are skipped.
    """
    jobs: dict[str, JobInfo] = {}
    for line in text.splitlines():
        parts = line.split("|", len(SQUEUE_FIELDS) - 1)
        if len(parts) != len(SQUEUE_FIELDS) or not _JOB_ID_RE.fullmatch(parts[0]):
            continue
        job_id, state, reason, nnodes, elapsed, nodelist, name = parts
        jobs[job_id] = JobInfo(
            job_id=job_id,
            state=parse_state(state),
            reason=reason,
            name=name,
            nodelist=_nodelist(nodelist),
            num_nodes=_int_or_none(nnodes),
            elapsed=elapsed or None,
            source="squeue",
        )
    return jobs


# scontrol -o prints "Key=value" words separated by single spaces, but several
# values may contain spaces themselves (JobName, Comment, WorkDir, Command,
# StdOut…). The job name is cut out first, anchored on the field that always
# follows it ("UserId=user(uid) GroupId="); in the rest, the FIRST occurrence of
# each key we need is taken: they all come before Comment/WorkDir/Command/StdOut,
# so a hostile name or comment cannot forge JobState=COMPLETED.
_SCONTROL_NAME_RE = re.compile(r"(?:^| )JobName=(?P<name>.*?) UserId=\S*\([0-9]+\) GroupId=")
_SCONTROL_KEY_RE = re.compile(r"(?:^| )(?P<key>[A-Za-z][A-Za-z0-9_:/]*)=(?P<value>\S*)")


def _scontrol_fields(text: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for m in _SCONTROL_KEY_RE.finditer(text):
        fields.setdefault(m["key"], m["value"])
    return fields


def parse_scontrol(text: str) -> dict[str, JobInfo]:
    """
    Parse ``scontrol show job -o ID`` output (one line per job) into ``{job_id: JobInfo}``.

    An array task is keyed by its own ``JobId`` and by ``ArrayJobId_ArrayTaskId``;
    a het component also by ``HetJobId+HetJobOffset``. Lines that do not start
    with ``JobId=`` (e.g. ``slurm_load_jobs error: Invalid job id specified``)
    are skipped.
    """
    jobs: dict[str, JobInfo] = {}
    for line in text.splitlines():
        if not line.startswith("JobId="):
            continue
        m = _SCONTROL_NAME_RE.search(line)
        if m:
            name, head, rest = m["name"], line[: m.start()], line[m.end("name") :]
        else:  # no JobName field at all: parse the line as is
            name, head, rest = "", line, ""
        fields = _scontrol_fields(head)
        for key, value in _scontrol_fields(rest).items():
            fields.setdefault(key, value)
        job_id = fields.get("JobId", "")
        if not _JOB_ID_RE.fullmatch(job_id):
            continue
        info = JobInfo(
            job_id=job_id,
            state=parse_state(fields.get("JobState")),
            reason=fields.get("Reason", ""),
            name=name,
            nodelist=_nodelist(fields.get("NodeList", "")),
            num_nodes=_int_or_none(fields.get("NumNodes", "")),
            exit_code=fields.get("ExitCode") or None,
            elapsed=fields.get("RunTime") or None,
            source="scontrol",
        )
        jobs[job_id] = info
        array_id, task_id = fields.get("ArrayJobId"), fields.get("ArrayTaskId")
        if array_id and task_id and task_id.isdigit():
            jobs.setdefault(f"{array_id}_{task_id}", info)
        het_id, het_offset = fields.get("HetJobId"), fields.get("HetJobOffset")
        if het_id and het_offset and het_offset.isdigit():
            jobs.setdefault(f"{het_id}+{het_offset}", info)
    return jobs


#: sacct fields, in order. JobName is last for the same reason as in squeue;
#: JobID (``123_4``, ``123+1``) and JobIDRaw (``123``) are both kept so either
#: spelling of an array/het id is found. All exist in Slurm 22.05's sacct(1).
SACCT_FIELDS: tuple[str, ...] = (
    "JobID",
    "JobIDRaw",
    "State",
    "Reason",
    "ExitCode",
    "Elapsed",
    "NNodes",
    "NodeList",
    "JobName",
)
#: For ``sacct -n -P -X -j IDS --format=SACCT_FORMAT``.
SACCT_FORMAT: str = ",".join(SACCT_FIELDS)


def parse_sacct(text: str) -> dict[str, JobInfo]:
    """
    Parse ``sacct -n -P -X --format=SACCT_FORMAT`` output into ``{job_id: JobInfo}``.

    Keyed by JobID and, when it differs, JobIDRaw. Lines that are not records
    are skipped.
    """
    jobs: dict[str, JobInfo] = {}
    for line in text.splitlines():
        parts = line.split("|", len(SACCT_FIELDS) - 1)
        if len(parts) != len(SACCT_FIELDS):
            continue
        job_id, raw_id, state, reason, exit_code, elapsed, nnodes, nodelist, name = parts
        if not _JOB_ID_RE.fullmatch(job_id):
            continue  # also drops job steps (123.batch) should -X be missing
        info = JobInfo(
            job_id=job_id,
            state=parse_state(state),
            reason=reason,
            name=name,
            nodelist=_nodelist(nodelist),
            num_nodes=_int_or_none(nnodes),
            exit_code=exit_code or None,
            elapsed=elapsed or None,
            source="sacct",
        )
        jobs[job_id] = info
        if raw_id != job_id and _JOB_ID_RE.fullmatch(raw_id):
            jobs.setdefault(raw_id, info)
    return jobs


# The launcher's last log line (include/ray_launch.sh, on_exit): its exit status is the job's.
_LAUNCH_EXIT_RE = re.compile(r"^ray_launch: exit (?P<rc>[0-9]+)[ \t]*$", re.M)


def end_from_run_dir(job_id: str, result: dict[str, Any] | None, log_tail: str) -> JobInfo:
    """
    How a job ended that Slurm has forgotten (``NOT_FOUND``: purged after
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
