"""What a finished job cost: elapsed time, node-hours, CPU efficiency (sacct / scontrol)."""

from __future__ import annotations

from typing import Any

from slurm_ray.utils.quoting import quote


def _elapsed_seconds(text: str | None) -> float | None:
    """Slurm durations: ``MM:SS(.mmm)``, ``HH:MM:SS``, ``D-HH:MM:SS``."""
    if not text:
        return None
    days = 0
    if "-" in text:
        day_text, text = text.split("-", 1)
        if not day_text.isdigit():
            return None
        days = int(day_text)
    try:
        parts = [float(p) for p in text.split(":")]
    except ValueError:
        return None
    seconds = 0.0
    for part in parts:
        seconds = seconds * 60 + part
    return days * 86400 + seconds


def _from_sacct(hook: Any, job_id: str) -> dict[str, float] | None:
    cmd = (
        f"sacct -j {quote(job_id)} -n -P -o JobID,ElapsedRaw,NNodes,AllocCPUS,TotalCPU 2>/dev/null"
    )
    res = hook.run(cmd)
    for line in (res.stdout or "").splitlines() if res.exit_code == 0 else []:
        parts = line.split("|")
        if len(parts) >= 5 and parts[0] == str(job_id):
            try:
                elapsed, nodes, cpus = float(parts[1]), int(parts[2]), int(parts[3])
            except ValueError:
                return None
            out = {"slurm.elapsed_s": elapsed, "slurm.node_hours": elapsed * nodes / 3600}
            total_cpu = _elapsed_seconds(parts[4])
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
    elapsed_s = _elapsed_seconds(getattr(info, "elapsed", None)) if info else None
    if elapsed_s is None:
        return {}
    out = {"slurm.elapsed_s": elapsed_s}
    if info is not None and info.num_nodes:
        out["slurm.node_hours"] = elapsed_s * info.num_nodes / 3600
    return out
