"""What a finished job cost: elapsed time, node-hours, CPU efficiency (sacct / scontrol)."""

from __future__ import annotations

from typing import Any

from slurm_ray.slurm.sacct import build_sacct_command, read_sacct
from slurm_ray.slurm.timefmt import parse_elapsed
from slurm_ray.utils.quoting import quote

#: The allocation's cost columns (read by header name).
_COST_FIELDS = ("JobID", "ElapsedRaw", "NNodes", "AllocCPUS", "TotalCPU")


def _from_sacct(hook: Any, job_id: str) -> dict[str, float] | None:
    res = hook.run(f"{build_sacct_command(quote(job_id), _COST_FIELDS)} 2>/dev/null")
    if res.exit_code != 0:
        return None
    for row in read_sacct(res.stdout or "", _COST_FIELDS):
        if row.get("JobID") != str(job_id):
            continue
        try:
            elapsed, nodes = float(row["ElapsedRaw"]), int(row["NNodes"])
            cpus = int(row["AllocCPUS"])
        except (KeyError, ValueError):
            return None
        out = {"slurm.elapsed_s": elapsed, "slurm.node_hours": elapsed * nodes / 3600}
        total_cpu = parse_elapsed(row.get("TotalCPU"))
        if total_cpu is not None and elapsed > 0 and cpus > 0:
            out["slurm.cpu_efficiency"] = total_cpu / (elapsed * cpus)
        return out
    return None


def slurm_efficiency(hook: Any, job_id: str) -> dict[str, float]:
    """
    Elapsed time, node-hours and CPU efficiency of a finished job.

    From ``sacct`` where the site has accounting; otherwise elapsed time and
    node-hours from ``scontrol`` (via the hook's ``states``) while Slurm still
    remembers the job; otherwise nothing.
    """
    from_sacct = _from_sacct(hook, job_id)
    if from_sacct is not None:
        return from_sacct
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
    out = {"slurm.elapsed_s": elapsed_s}
    if info is not None and info.num_nodes:
        out["slurm.node_hours"] = elapsed_s * info.num_nodes / 3600
    return out
