"""How a finished training job is reported: the task's result or its error message.

Pure: the facts (state, result.json, log tail, failed nodes, newest
checkpoint) are gathered by :class:`~slurm_ray.operators.job_manager.SlurmJobManager`.
"""

from __future__ import annotations

from typing import Any

from slurm_ray.utils.states import JobInfo, SlurmState

__all__ = [
    "EXIT_CHECKPOINTED",
    "failure_message",
    "hit_time_limit",
    "info_from_event",
    "summary",
    "time_limit_message",
]

#: Exit code of the driver when it checkpointed on Slurm's pre-timeout signal.
EXIT_CHECKPOINTED = 75
#: result.json keys copied into the task's result.
_SUMMARY_KEYS = (
    "iterations",
    "env_steps",
    "episode_return_mean",
    "eval_return_mean",
    "checkpoint",
    "rl_module_checkpoint",
    "stop_reason",
    "wall_s",
)
_HINTS = {
    SlurmState.TIMEOUT: "the job hit its time limit; a retry resumes from the newest checkpoint",
    SlurmState.OUT_OF_MEMORY: "a step ran out of memory; raise job_spec.mem",
    SlurmState.CANCELLED: "the job was cancelled (scancel, or by an administrator)",
    SlurmState.PREEMPTED: "the job was preempted by a higher-priority job",
    SlurmState.NOT_FOUND: "Slurm no longer knows the job, the site has no accounting, and "
    "neither result.json nor the Slurm log says how it ended",
}


def hit_time_limit(info: JobInfo, result: dict[str, Any] | None) -> bool:
    """Slurm's TIMEOUT, or the driver checkpointed on the pre-timeout signal (exit 75)."""
    if info.state == SlurmState.TIMEOUT:
        return True
    if str(info.exit_code or "").split(":")[0] == str(EXIT_CHECKPOINTED):
        return True
    return bool(result and str(result.get("stop_reason", "")) == "signal:SIGUSR1")


def info_from_event(event: dict[str, Any]) -> JobInfo:
    """The job's end as the trigger's ``terminal`` event reports it."""
    return JobInfo(
        job_id=str(event.get("job_id", "")),
        state=SlurmState(event["state"]),
        reason=event.get("reason") or "",
        nodelist=event.get("nodelist") or "",
        exit_code=event.get("exit_code"),
        source="trigger",
    )


def _log_part(job_id: str, run_dir: str, tail: str) -> str:
    return f"\nrun dir: {run_dir}\n--- last lines of slurm-{job_id}.out ---\n" + tail


def node_fail_hint(nodelist: str, failed: list[str]) -> str:
    """Name the job's node(s) Slurm considers down / not responding."""
    if not nodelist:
        return "a node of the job failed; a retry can run on the remaining nodes"
    if failed:
        return (
            f"node {', '.join(failed)} failed (job nodes: {nodelist}); a retry can run on the "
            "remaining nodes when job_spec allows fewer"
        )
    return f"a node of {nodelist} failed; a retry can run on the remaining nodes"


def failure_message(
    job_id: str, run_dir: str, info: JobInfo, tail: str, *, failed_nodes: list[str] | None = None
) -> str:
    """The error of a job that ended in any state but COMPLETED."""
    state, reason = info.state, info.reason
    hint = _HINTS.get(state, "")
    if state == SlurmState.NODE_FAIL:
        hint = node_fail_hint(info.nodelist, failed_nodes or [])
    return (
        f"Slurm job {job_id} ended {state.value}"
        + (f" (reason: {reason})" if reason and reason != "None" else "")
        + (f", exit code {info.exit_code}" if info.exit_code else "")
        + (f": {hint}" if hint else "")
        + _log_part(job_id, run_dir, tail)
    )


def time_limit_message(
    job_id: str, run_dir: str, info: JobInfo, iteration: int | None, tail: str
) -> str:
    """The error of a job that reached its time limit; says where a retry resumes."""
    how = (
        f"Slurm state {info.state.value}"
        if info.state == SlurmState.TIMEOUT
        else f"Slurm state {info.state.value}, exit code {EXIT_CHECKPOINTED}: the driver "
        "checkpointed on the pre-timeout signal"
    )
    where = (
        f"checkpointed at iteration {iteration}; a retry resumes from it"
        if iteration is not None
        else "no checkpoint was written; a retry starts over"
    )
    return (
        f"Slurm job {job_id} reached its time limit (TIMEOUT; {how}): {where}. "
        "Raise job_spec.time or let the retry continue." + _log_part(job_id, run_dir, tail)
    )


def summary(
    job_id: str,
    run_dir: str,
    info: JobInfo | None,
    result: dict[str, Any] | None,
    *,
    cluster: str,
    mlflow_run_id: str | None,
) -> dict[str, Any]:
    """The task's result (its XCom) for a job that COMPLETED."""
    out: dict[str, Any] = {
        "mlflow_run_id": mlflow_run_id,
        "job_id": job_id,
        "run_dir": run_dir,
        "state": SlurmState.COMPLETED.value,
        "nodelist": info.nodelist if info else "",
        "cluster": cluster,
    }
    out.update({k: result[k] for k in _SUMMARY_KEYS if result and k in result})
    return out
