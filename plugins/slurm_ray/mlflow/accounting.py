"""What a finished job cost, from Slurm accounting (``sacct``), logged to its MLflow run.

Read from the allocation's lines and its steps' lines (``sacct`` without
``-X``): Slurm records usage per step, so ``MaxRSS`` is the largest of the
steps' and the CPU time is the sum of the steps'. A heterogeneous job
(``123+0``, ``123+1``) is the sum of its components. Without accounting
storage, elapsed time and node-hours come from ``scontrol`` while Slurm still
remembers the job.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from slurm_ray.slurm.fields import SLURM_TIME_ENV, node_list, slurm_time
from slurm_ray.slurm.ids import validate_job_id
from slurm_ray.slurm.sacct import build_sacct_command, read_sacct
from slurm_ray.slurm.timefmt import parse_elapsed
from slurm_ray.utils.quoting import quote
from slurm_ray.utils.states import is_terminal, parse_state

__all__ = [
    "COST_FIELDS",
    "JobCost",
    "cost_command",
    "job_cost",
    "parse_size",
    "record_job_cost",
    "slurm_efficiency",
]

_log = logging.getLogger(__name__)

#: sacct columns read (by header name). NodeList tells a job that ran from one
#: cancelled while pending (both have a Start time).
COST_FIELDS = (
    "JobID",
    "State",
    "ExitCode",
    "ElapsedRaw",
    "NNodes",
    "AllocCPUS",
    "TotalCPU",
    "MaxRSS",
    "Submit",
    "Start",
    "NodeList",
)
ELAPSED = "slurm.elapsed_s"
NODE_HOURS = "slurm.node_hours"
CPU_EFFICIENCY = "slurm.cpu_efficiency"
TOTAL_CPU = "slurm.total_cpu_s"
MAX_RSS = "slurm.max_rss_mib"
ALLOC_CPUS = "slurm.alloc_cpus"
NODES = "slurm.nodes"
EXIT_CODE = "slurm.exit_code"
#: Already logged by the operator from squeue/scontrol; sacct fills it in when Slurm forgot.
QUEUE_WAIT = "slurm_queue_wait_s"
#: Tags: the job's end state as accounting has it, and which job the cost metrics are of.
STATE_TAG = "slurm_ray.slurm.state"
EXIT_TAG = "slurm_ray.slurm.exit_code"
COST_JOB_TAG = "slurm_ray.slurm.cost_job_id"

_SIZE_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)([KMGTP]?)", re.ASCII)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


def parse_size(text: str | None) -> int | None:
    """Bytes of a size as sacct prints it (``123456K``, ``1.50G``, ``0``); None if empty."""
    m = _SIZE_RE.fullmatch((text or "").strip())
    return round(float(m[1]) * _UNITS[m[2]]) if m else None


@dataclass(frozen=True)
class JobCost:
    """One job's usage as accounting recorded it (summed over het components).

    :param final: accounting has the job's end (a terminal state); until then
        the elapsed time still grows.
    """

    state: str
    exit_code: str
    elapsed_s: float
    nodes: int
    alloc_cpus: int
    node_hours: float
    total_cpu_s: float | None
    max_rss_bytes: int | None
    queue_wait_s: float | None
    final: bool
    cpu_s: float  # elapsed * allocated CPUs, summed over het components

    @property
    def cpu_efficiency(self) -> float | None:
        """TotalCPU / (Elapsed * allocated CPUs); None when either is unknown or zero."""
        return None if self.total_cpu_s is None or not self.cpu_s else self.total_cpu_s / self.cpu_s

    def metrics(self) -> dict[str, float]:
        """MLflow metrics (names: the module's constants)."""
        out = {
            ELAPSED: self.elapsed_s,
            NODE_HOURS: self.node_hours,
            NODES: float(self.nodes),
            ALLOC_CPUS: float(self.alloc_cpus),
        }
        optional = {
            TOTAL_CPU: self.total_cpu_s,
            CPU_EFFICIENCY: self.cpu_efficiency,
            MAX_RSS: None if self.max_rss_bytes is None else self.max_rss_bytes / (1 << 20),
            EXIT_CODE: _exit_status(self.exit_code),
        }
        out.update({k: float(v) for k, v in optional.items() if v is not None})
        return out

    def tags(self) -> dict[str, str]:
        return {STATE_TAG: self.state, EXIT_TAG: self.exit_code}


def _exit_status(exit_code: str) -> int | None:
    """The exit status of ``EXIT:SIGNAL`` (``3:0`` -> 3); None when not that shape."""
    status, _, _ = exit_code.partition(":")
    return int(status) if status.isdigit() else None


def _component(
    alloc: Mapping[str, str], steps: Sequence[Mapping[str, str]]
) -> tuple[float, int, int, float | None, int | None]:
    """(elapsed, nodes, cpus, total CPU s, max RSS bytes) of one allocation line."""
    elapsed = float(alloc["ElapsedRaw"])
    nodes, cpus = int(alloc["NNodes"]), int(alloc["AllocCPUS"])
    cpu_times = [parse_elapsed(s.get("TotalCPU")) for s in steps] or [
        parse_elapsed(alloc.get("TotalCPU"))
    ]
    total = None if any(t is None for t in cpu_times) else sum(t or 0.0 for t in cpu_times)
    sizes = [b for s in (*steps, alloc) if (b := parse_size(s.get("MaxRSS"))) is not None]
    return elapsed, nodes, cpus, total, max(sizes) if sizes else None


def _queue_wait(alloc: Mapping[str, str]) -> float | None:
    submit, start = slurm_time(alloc.get("Submit")), slurm_time(alloc.get("Start"))
    if not node_list(alloc.get("NodeList", "")) or submit is None or start is None:
        return None  # never ran (cancelled while pending)
    return (start - submit).total_seconds() if start >= submit else None


def job_cost(text: str, job_id: str) -> JobCost | None:
    """The cost of ``job_id`` from ``sacct -P`` output with steps (:func:`cost_command`).

    None when accounting has no allocation line for it (not yet, or never).
    """
    rows = read_sacct(text, COST_FIELDS)
    alloc_re = re.compile(rf"{re.escape(job_id)}(?:\+[0-9]+)?", re.ASCII)
    allocs = [r for r in rows if alloc_re.fullmatch(r.get("JobID", ""))]
    try:
        parts = [
            _component(a, [r for r in rows if r.get("JobID", "").startswith(a["JobID"] + ".")])
            for a in allocs
        ]
    except (KeyError, ValueError):
        return None
    if not parts:
        return None
    totals = [p[3] for p in parts]
    sizes = [p[4] for p in parts if p[4] is not None]
    leader = allocs[0]
    return JobCost(
        state=leader.get("State", ""),
        exit_code=leader.get("ExitCode", ""),
        elapsed_s=max(p[0] for p in parts),
        nodes=sum(p[1] for p in parts),
        alloc_cpus=sum(p[2] for p in parts),
        node_hours=sum(p[0] * p[1] for p in parts) / 3600,
        total_cpu_s=None if None in totals else sum(t or 0.0 for t in totals),
        max_rss_bytes=max(sizes) if sizes else None,
        queue_wait_s=_queue_wait(leader),
        final=all(is_terminal(parse_state(a.get("State"))) for a in allocs),
        cpu_s=sum(p[0] * p[2] for p in parts),
    )


def cost_command(job_id: str) -> str:
    """The sacct command :func:`job_cost` reads (times in UTC, steps included)."""
    ids = quote(validate_job_id(job_id))
    return f"{SLURM_TIME_ENV} {build_sacct_command(ids, COST_FIELDS, steps=True)}"


def _sacct_cost(hook: Any, job_id: str, *, wait_s: float) -> JobCost | None:
    """Ask sacct until it has the job's end (slurmdbd records it a moment after squeue)."""
    deadline = time.monotonic() + wait_s
    while True:
        res = hook.run(f"{cost_command(job_id)} 2>/dev/null")
        if res.exit_code != 0:
            return None  # no accounting storage on this site
        cost = job_cost(res.stdout or "", job_id)
        if cost is None or cost.final:
            return cost  # None: accounting never recorded the job (it does at start)
        if time.monotonic() >= deadline:
            return None  # never an unfinished record: its elapsed time still grows
        time.sleep(1.0)


def _scontrol_metrics(hook: Any, job_id: str) -> dict[str, float]:
    states = getattr(hook, "states", None)
    if states is None:
        return {}
    try:
        info = states([job_id]).get(job_id)
    except Exception:  # best effort: accounting is a nice-to-have
        return {}
    elapsed_s = parse_elapsed(getattr(info, "elapsed", None)) if info else None
    if elapsed_s is None:
        return {}
    out = {ELAPSED: elapsed_s}
    if info is not None and info.num_nodes:
        out[NODE_HOURS] = elapsed_s * info.num_nodes / 3600
    return out


def slurm_efficiency(hook: Any, job_id: str, *, wait_s: float = 0.0) -> dict[str, float]:
    """
    The cost metrics of a finished job (see :class:`JobCost`).

    From ``sacct`` where the site has accounting (asked again for up to
    ``wait_s`` until it has the job's end); otherwise elapsed time and
    node-hours from ``scontrol`` while Slurm still remembers the job;
    otherwise nothing.
    """
    cost = _sacct_cost(hook, job_id, wait_s=wait_s)
    return cost.metrics() if cost is not None else _scontrol_metrics(hook, job_id)


def record_job_cost(
    client: Any, run_id: str, hook: Any, job_id: str, *, wait_s: float = 15.0, log: Any = None
) -> dict[str, float]:
    """Log what ``job_id`` cost to the MLflow run ``run_id`` once; returns the cost metrics.

    A run that already holds the cost of this job (tag ``slurm_ray.slurm.cost_job_id``)
    is not logged again: the operator logs at completion, ``finalize_run`` later.
    ``slurm_queue_wait_s`` is added only where the run lacks it. Best effort:
    a failure is logged as a warning, never raised (the job's result stands).
    """
    log = log or _log
    try:
        return _record(client, run_id, hook, job_id, wait_s, log)
    except Exception as exc:
        log.warning("MLflow: could not log the cost of job %s: %s", job_id, exc)
        return {}


def _record(
    client: Any, run_id: str, hook: Any, job_id: str, wait_s: float, log: Any
) -> dict[str, float]:
    from mlflow.entities import Metric, RunTag

    data = client.get_run(run_id).data
    if data.tags.get(COST_JOB_TAG) == str(job_id):
        return {k: v for k, v in data.metrics.items() if k.startswith("slurm.")}
    cost = _sacct_cost(hook, job_id, wait_s=wait_s)
    metrics = cost.metrics() if cost is not None else _scontrol_metrics(hook, job_id)
    if not metrics:
        log.info("MLflow: no cost for job %s (no accounting, and Slurm forgot it)", job_id)
        return {}
    logged = dict(metrics)
    if cost is not None and cost.queue_wait_s is not None and QUEUE_WAIT not in data.metrics:
        logged[QUEUE_WAIT] = cost.queue_wait_s
    tags = {**(cost.tags() if cost else {}), COST_JOB_TAG: str(job_id)}
    now_ms = int(time.time() * 1000)
    client.log_batch(
        run_id,
        metrics=[Metric(k, v, now_ms, 0) for k, v in logged.items()],
        tags=[RunTag(k, v) for k, v in tags.items()],
    )
    log.info(
        "MLflow: job %s cost %s",
        job_id,
        ", ".join(f"{k.removeprefix('slurm.')}={v:.4g}" for k, v in logged.items()),
    )
    return metrics
