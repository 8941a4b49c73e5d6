"""``sacct``: the command and the one parser, which maps columns by header name.

``sacct -P`` prints a header line naming its columns; rows are read through
it, so a site's sacct that orders or adds columns differently is still read
right. Output without a header (``-n``) is read in the order asked for.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from slurm_ray.slurm.fields import JOB_ID_RE, int_or_none, node_list
from slurm_ray.utils.quoting import quote
from slurm_ray.utils.states import JobInfo, parse_state

__all__ = ["SACCT_FIELDS", "SACCT_FORMAT", "build_sacct_command", "parse_sacct", "read_sacct"]

#: sacct fields for job states. JobName is last: the only column that may hold
#: the ``|`` delimiter. JobID (``123_4``, ``123+1``) and JobIDRaw (``123``) are
#: both kept so either spelling of an array/het id is found. All exist in
#: Slurm 22.05's sacct(1).
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
#: For ``sacct -P -X -j IDS --format=SACCT_FORMAT``.
SACCT_FORMAT: str = ",".join(SACCT_FIELDS)
_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]*", re.ASCII)


def build_sacct_command(
    ids: str, fields: Sequence[str] = SACCT_FIELDS, *, steps: bool = False
) -> str:
    """``sacct`` of the jobs ``ids`` (header line kept).

    :param ids: shell text giving comma-separated job ids: validated ids, or a
        variable such as ``"$left"`` that holds them.
    :param steps: also the job steps' lines (``123.batch``, ``123.0``): usage
        such as ``MaxRSS`` is recorded per step, and with ``-X`` the
        allocation's ``TotalCPU`` reads 0 (it is the sum of its steps).
    """
    return f"sacct -P{'' if steps else ' -X'} -j {ids} --format={quote(','.join(fields))}"


def read_sacct(text: str, fields: Sequence[str] = SACCT_FIELDS) -> list[dict[str, str]]:
    """Rows of ``sacct -P`` output as ``{column name: value}``.

    A line naming the columns (``JobID|...``) sets their order from there on;
    before one, columns are ``fields`` in order. The last column takes the rest
    of the line (a ``|`` in a job name). Lines with too few columns (error
    messages mixed in through ``2>&1``) are skipped.
    """
    names = list(fields)
    rows: list[dict[str, str]] = []
    for line in text.splitlines():
        parts = line.split("|")
        # A header: column names only, JobID among them (a record holds an id).
        if "jobid" in {p.lower() for p in parts} and all(_NAME_RE.fullmatch(p) for p in parts):
            names = parts
            continue
        parts = line.split("|", len(names) - 1)
        if len(parts) == len(names):
            rows.append(dict(zip(names, parts, strict=True)))
    return rows


def parse_sacct(text: str) -> dict[str, JobInfo]:
    """
    ``sacct -P -X --format=SACCT_FORMAT`` output as ``{job_id: JobInfo}``.

    Keyed by JobID and, when it differs, JobIDRaw. Job steps (``123.batch``)
    and lines that are not records are skipped.
    """
    jobs: dict[str, JobInfo] = {}
    for row in read_sacct(text):
        job_id, raw_id = row.get("JobID", ""), row.get("JobIDRaw", "")
        if not JOB_ID_RE.fullmatch(job_id):
            continue
        info = JobInfo(
            job_id=job_id,
            state=parse_state(row.get("State")),
            reason=row.get("Reason", ""),
            name=row.get("JobName", ""),
            nodelist=node_list(row.get("NodeList", "")),
            num_nodes=int_or_none(row.get("NNodes", "")),
            exit_code=row.get("ExitCode") or None,
            elapsed=row.get("Elapsed") or None,
            source="sacct",
        )
        jobs[job_id] = info
        if raw_id != job_id and JOB_ID_RE.fullmatch(raw_id):
            jobs.setdefault(raw_id, info)
    return jobs
