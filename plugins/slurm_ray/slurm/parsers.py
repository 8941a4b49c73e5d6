"""Parsers of what Slurm and our own remote commands print.

They accept text exactly as the commands print it (fixtures under
``tests/fixtures/slurm`` were captured from Slurm 22.05) and skip lines that
are not records (error messages mixed in through ``2>&1``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from slurm_ray.slurm.fields import JOB_ID_RE, int_or_none, node_list, time_or_none
from slurm_ray.slurm.ids import validate_job_id, validate_job_ids
from slurm_ray.slurm.sacct import parse_sacct
from slurm_ray.utils.states import JobInfo, SlurmState, parse_state

__all__ = [
    "MARKER",
    "SQUEUE_FIELDS",
    "SQUEUE_FORMAT",
    "ClaimOutcome",
    "last_lines",
    "parse_claim_output",
    "parse_find_jobs_by_name",
    "parse_node_states",
    "parse_scontrol",
    "parse_squeue",
    "parse_states_output",
]

#: Prefix of the section marker lines printed by the states and poll commands.
MARKER = "@@slurm_ray"
_SECTION_RE = re.compile(
    rf"{re.escape(MARKER)}:(?P<kind>squeue|scontrol|sacct|end)"
    r"(?: (?P<job_id>[0-9][0-9_+]*))?(?: rc=(?P<rc>[0-9]+)| (?P<absent>absent))?",
    re.ASCII,
)
#: slurm_strerror(ESLURM_INVALID_JOB_ID): the controller answered and does not know the id.
INVALID_JOB_ID = "Invalid job id specified"
# sacct on a cluster without slurmdbd: a permanent "no accounting", not a failure.
_NO_ACCOUNTING = "accounting storage is disabled"


#: squeue fields, in order; the job name comes last because it is the only field
#: that may contain the ``|`` delimiter (the parser splits at most len - 1 times).
#: ``%V`` is the submit time; ``%S`` the start time: Slurm's estimate while
#: pending (``N/A`` until the backfill scheduler computed one), the real one after.
SQUEUE_FIELDS: tuple[str, ...] = ("%i", "%T", "%r", "%D", "%M", "%N", "%V", "%S", "%j")
#: For ``squeue -h -t all -o SQUEUE_FORMAT``:
#: id|state|reason|nodes|elapsed|nodelist|submit|start|name.
SQUEUE_FORMAT: str = "|".join(SQUEUE_FIELDS)


def parse_squeue(text: str, fields: Sequence[str] = SQUEUE_FIELDS) -> dict[str, JobInfo]:
    """``squeue -h -t all -o "|".join(fields)`` output as ``{job_id: JobInfo}``.

    Read by field code (an older list without ``%V``/``%S`` still parses); ``fields``
    start with ``%i`` and end with ``%j``. Lines that are not records are skipped.
    """
    if fields[0] != "%i" or fields[-1] != "%j":
        raise ValueError(f"squeue fields {fields!r}: must start with %i and end with %j")
    jobs: dict[str, JobInfo] = {}
    for line in text.splitlines():
        parts = line.split("|", len(fields) - 1)
        if len(parts) != len(fields) or not JOB_ID_RE.fullmatch(parts[0]):
            continue
        f = dict(zip(fields, parts, strict=True))
        job_id = f["%i"]
        jobs[job_id] = JobInfo(
            job_id=job_id,
            state=parse_state(f.get("%T")),
            reason=f.get("%r", ""),
            name=f["%j"],
            nodelist=node_list(f.get("%N", "")),
            num_nodes=int_or_none(f.get("%D", "")),
            elapsed=f.get("%M") or None,
            submit_time=time_or_none(f.get("%V")),
            start_time=time_or_none(f.get("%S")),
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
    """``scontrol show job -o ID`` output (a line per job) as ``{job_id: JobInfo}``.

    An array task is also keyed ``ArrayJobId_ArrayTaskId``, a het component
    ``HetJobId+HetJobOffset``. Lines not starting with ``JobId=`` are skipped.
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
        if not JOB_ID_RE.fullmatch(job_id):
            continue
        info = JobInfo(
            job_id=job_id,
            state=parse_state(fields.get("JobState")),
            reason=fields.get("Reason", ""),
            name=name,
            nodelist=node_list(fields.get("NodeList", "")),
            num_nodes=int_or_none(fields.get("NumNodes", "")),
            exit_code=fields.get("ExitCode") or None,
            elapsed=fields.get("RunTime") or None,
            submit_time=time_or_none(fields.get("SubmitTime")),
            start_time=time_or_none(fields.get("StartTime")),
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


def _brief(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_states_output(
    text: str, job_ids: Sequence[str], squeue_fields: Sequence[str] = SQUEUE_FIELDS
) -> dict[str, JobInfo]:
    """The output of :func:`~slurm_ray.slurm.commands.build_states_command` for ``job_ids``.

    Every requested id gets an entry: the first source that lists it wins
    (squeue, then scontrol, then sacct). An id no source lists is NOT_FOUND
    only when that is proven: scontrol answered "Invalid job id specified"
    and sacct either is absent, has no accounting storage, or succeeded
    without listing it. Otherwise (squeue or sacct failed, output cut short)
    it is UNKNOWN with the evidence in ``reason``: a failed query is never
    read as a finished job. ``squeue_fields``: the field list squeue printed.

    :raises ValueError: for invalid ids, as :func:`~slurm_ray.slurm.commands.build_states_command`.
    """
    ids = validate_job_ids(job_ids)
    found = _StatesSections(squeue_fields)
    for header, body in _sections(text):
        found.add(header, "\n".join(body))
    result: dict[str, JobInfo] = {}
    for job_id in ids:
        info = found.squeue.get(job_id) or found.scontrol.get(job_id) or found.sacct.get(job_id)
        if info is None:
            state, reason = found.missing_state(job_id)
            info = JobInfo(job_id=job_id, state=state, reason=reason, source="none")
        result[job_id] = info
    return result


def _sections(text: str) -> list[tuple[re.Match[str], list[str]]]:
    """The output's sections: each marker line and the lines after it."""
    sections: list[tuple[re.Match[str], list[str]]] = []
    for line in text.splitlines():
        header = _SECTION_RE.fullmatch(line)
        if header:
            sections.append((header, []))
        elif sections:
            sections[-1][1].append(line)
    return sections


@dataclass
class _StatesSections:
    """What the sections of one states command said: records, and evidence of absence."""

    squeue_fields: Sequence[str]
    squeue: dict[str, JobInfo] = field(default_factory=dict)
    scontrol: dict[str, JobInfo] = field(default_factory=dict)
    sacct: dict[str, JobInfo] = field(default_factory=dict)
    squeue_error: str = ""
    scontrol_status: dict[str, tuple[int, str]] = field(default_factory=dict)
    sacct_status: tuple[str, str] | None = None  # ("ok" | "none" | "error", message)
    complete: bool = False

    def add(self, header: re.Match[str], body: str) -> None:
        kind, rc = header["kind"], int(header["rc"] or 0)
        if kind == "squeue":
            # records are trusted even when rc != 0 (other ids may be unknown)
            self.squeue.update(parse_squeue(body, self.squeue_fields))
            if rc != 0 and INVALID_JOB_ID not in body:
                self.squeue_error = f"squeue failed (rc={rc}): {_brief(body)}"
        elif kind == "scontrol":
            self.scontrol.update(parse_scontrol(body))
            if header["job_id"]:
                self.scontrol_status[header["job_id"]] = (rc, body)
        elif kind == "sacct":
            if header["absent"]:
                self.sacct_status = ("none", "sacct is not installed")
            elif rc == 0:
                self.sacct.update(parse_sacct(body))
                self.sacct_status = ("ok", "")
            elif _NO_ACCOUNTING in body:
                self.sacct_status = ("none", "accounting storage is disabled")
            else:
                self.sacct_status = ("error", f"sacct failed (rc={rc}): {_brief(body)}")
        elif kind == "end":
            self.complete = True

    def missing_state(self, job_id: str) -> tuple[SlurmState, str]:
        """NOT_FOUND with proof, else UNKNOWN with the evidence."""
        if not self.complete:
            return SlurmState.UNKNOWN, "state query output was cut short (no end marker)"
        if self.squeue_error:
            return SlurmState.UNKNOWN, self.squeue_error
        rc, message = self.scontrol_status.get(job_id, (-1, "scontrol was not run"))
        if INVALID_JOB_ID not in message:
            return SlurmState.UNKNOWN, f"scontrol rc={rc}: {_brief(message)}"
        if self.sacct_status is None:
            return SlurmState.UNKNOWN, "sacct section missing"
        status, why = self.sacct_status
        if status == "error":
            return SlurmState.UNKNOWN, why
        if status == "none":
            return SlurmState.NOT_FOUND, f"unknown to squeue and scontrol; {why}"
        return SlurmState.NOT_FOUND, "unknown to squeue, scontrol and sacct"


def parse_find_jobs_by_name(text: str, name: str) -> list[JobInfo]:
    """The jobs named exactly ``name`` in the output of the find command, oldest first."""
    jobs = [info for info in parse_squeue(text).values() if info.name == name]
    return sorted(jobs, key=lambda info: [int(p) for p in re.findall(r"[0-9]+", info.job_id)])


#: What the claim command found or did: (action, job id, cancelled ids).
ClaimOutcome = tuple[str, str, list[str]]


def parse_claim_output(text: str) -> ClaimOutcome:
    """``(action, job_id, cancelled_ids)`` from :func:`~slurm_ray.slurm.commands.build_claim_command`'s output.

    ``action`` is ``attach``, ``superseded``, ``submitted`` or ``clear``.

    :raises ValueError: when the output ends without one of them.
    """
    cancelled: list[str] = []
    for line in text.splitlines():
        word, _, rest = line.strip().partition(":")
        if word == "cancelled":
            cancelled = rest.split()
        elif word in ("attach", "superseded", "submitted"):
            job_id = rest.strip().split(";", 1)[0]
            return word, validate_job_id(job_id), cancelled
        elif line.strip() == "clear":
            return "clear", "", cancelled
    raise ValueError(f"the submit command did not say what it did: {text[-500:]!r}")


def last_lines(
    text: str, lines: int = 40, max_chars: int = 64 * 1024, line_chars: int = 1000
) -> str:
    """The last ``lines`` lines of the last ``max_chars`` characters of ``text``.

    Capped in size first: one line without a newline (a progress bar) can be
    as long as the whole output. Each line keeps its last ``line_chars``
    characters (the latest of a progress line), saying how many were cut, so
    an error message stays readable.
    """
    kept = text[-max_chars:].rstrip().splitlines()[-lines:]
    return "\n".join(
        f"[{len(line) - line_chars} characters cut] {line[-line_chars:]}"
        if len(line) > line_chars
        else line
        for line in kept
    )


def parse_node_states(text: str) -> list[str]:
    """Nodes that are down, drained, failed or not responding, from ``node|state`` lines."""
    bad: list[str] = []
    for line in text.splitlines():
        node, _, state = line.strip().partition("|")
        st = state.lower()
        down = "*" in st or st.startswith(("down", "drain", "fail", "no_respond"))
        if node and down and node not in bad:
            bad.append(node)
    return bad
