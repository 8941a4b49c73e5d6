"""A job is never left to a task that can no longer watch it.

Between the submission and the deferral someone may mark the task (or its
run) failed. If the worker's heartbeat sees that first, the supervisor sends
SIGTERM, whose handler only calls ``on_kill`` and lets ``execute`` go on; if
not, the supervisor refuses the deferral ("Failed to report terminal task
state to supervisor") and the task process simply exits. Either way no
trigger and no later try would ever watch or cancel the job. So the operator
asks before it defers, and cancels the job when the answer is no.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from airflow.sdk.exceptions import AirflowException


def task_state(ti: Any) -> str | None:
    """The task instance's state as the API server has it now."""
    from airflow.sdk.execution_time.task_runner import RuntimeTaskInstance

    states = RuntimeTaskInstance.get_task_states(
        dag_id=ti.dag_id, task_ids=[ti.task_id], run_ids=[ti.run_id], map_index=ti.map_index
    )
    key = ti.task_id if ti.map_index is None or ti.map_index < 0 else f"{ti.task_id}_{ti.map_index}"
    state = states.get(ti.run_id, {}).get(key)
    return None if state is None else str(getattr(state, "value", state))


def ensure_still_running(
    ti: Any, job_id: str, cancel: Callable[[str], None], log: Any, *, killed: bool
) -> None:
    """Cancel ``job_id`` and raise when the task was stopped, or is no longer running."""
    if killed:
        why = "the task was stopped (SIGTERM) while it submitted"
    else:
        try:
            state = task_state(ti)
        except Exception as exc:  # an older supervisor: defer, as before this check
            log.warning("Could not read the task's state before deferring: %s", exc)
            return
        if state in (None, "running"):
            return
        why = f"the task is {state} now (marked so while it submitted)"
    log.warning("%s: cancelling Slurm job %s, which nothing would watch", why, job_id)
    cancel(job_id)
    raise AirflowException(f"{why}; Slurm job {job_id} was cancelled")
