"""R1: the `train` task marked failed or cleared over the Airflow REST API.

Both while deferred (the triggerer watches the job) and while running in
non-deferrable mode (the worker polls it; the DAG's ``deferrable`` Param). The
Slurm job must be cancelled within 15 s, and no Ray, Python or srun process
of the job may be left in either node's namespace.
"""

from __future__ import annotations

import re
import time

import pytest

from tests.airflow_fixtures import Airflow
from tests.conftest import DevCluster
from tests.faults.airflow_runs import (
    DAG,
    job_processes,
    job_state,
    jobs_named,
    run_job_prefix,
    start_training,
    stop_run,
    task_log_text,
)
from tests.faults.conftest import trials

pytestmark = [pytest.mark.faults, pytest.mark.cluster, pytest.mark.e2e]

QUEUED = ("PENDING", "CONFIGURING", "RUNNING", "SUSPENDED")
VARIANTS = [
    ("deferred", "failed"),
    ("deferred", "clear"),
    ("worker", "failed"),
    ("worker", "clear"),
]


def act(airflow: Airflow, run_id: str, action: str) -> None:
    if action == "failed":
        status, body = airflow.call(
            "PATCH", f"/dags/{DAG}/dagRuns/{run_id}/taskInstances/train", {"new_state": "failed"}
        )
    else:
        status, body = airflow.call(
            "POST",
            f"/dags/{DAG}/clearTaskInstances",
            {
                "dry_run": False,
                "dag_run_id": run_id,
                "task_ids": ["train"],
                "only_failed": False,
                "reset_dag_runs": True,
            },
        )
    assert status == 200, body


@pytest.mark.parametrize("trial", range(trials()))
@pytest.mark.parametrize(("mode", "action"), VARIANTS, ids=[f"{m}-{a}" for m, a in VARIANTS])
def test_r1_train_failed_or_cleared_cancels_job(
    airflow: Airflow, cluster: DevCluster, faults, mode: str, action: str, trial: int
) -> None:
    faults.require_root(f"R1 {mode} {action}")
    airflow.wait_dag(DAG)

    def body() -> float:
        conf = {"stop_iterations": 1000, "stop_return_mean": None, "deferrable": mode == "deferred"}
        run = start_training(
            airflow, cluster, conf, task_state="deferred" if mode == "deferred" else "running"
        )
        try:
            time.sleep(3)  # Ray is up and training
            acted = time.monotonic()
            act(airflow, run.run_id, action)
            gone = None
            while time.monotonic() - acted < 15:
                active = cluster.ssh(
                    f"squeue -h -j {run.job_id} -t PD,R,CG,CF,S -o %T", check=False
                ).stdout.strip()
                if not active:
                    gone = time.monotonic() - acted
                    break
                time.sleep(0.5)
            assert gone is not None, (
                f"job {run.job_id} still active 15 s after the task was {action} ({mode})"
            )
            # Processes may need a moment after Slurm released the job.
            t0 = time.monotonic()
            left = job_processes(run.job_id)
            while left and time.monotonic() - t0 < 15:
                time.sleep(1)
                left = job_processes(run.job_id)
            assert not left, left
            return gone
        finally:
            # A cleared task runs again (a new try, a new job): stop the whole run.
            stop_run(airflow, cluster, run.run_id)
            cluster.ssh(f"scancel {run.job_id}", check=False)

    faults.trial(f"R1 {mode} {action}")(body)


@pytest.mark.parametrize("trial", range(trials()))
def test_r1_marked_failed_while_a_retry_submits_leaves_no_job(
    airflow: Airflow, cluster: DevCluster, faults, trial: int
) -> None:
    """The window between a try's sbatch and its deferral: the task is marked
    failed there. The supervisor then refuses the deferral and the task process
    just exits; its job must still be cancelled (seen once in a CI run: a
    cleared task's retry submitted while its run was being failed, and the
    job trained unwatched for 3 minutes).

    The retry of a cleared task first cancels the earlier try's job and waits
    until it has left the queue, then submits within a second: the test marks
    the task failed the moment the earlier job is gone, so the retry submits
    into a failed task (or, if the worker's heartbeat sees it first, is killed:
    either way no job may stay)."""
    faults.require_root("R1 marked failed between submit and defer")
    airflow.wait_dag(DAG)

    def body() -> float:
        conf = {"stop_iterations": 1000, "stop_return_mean": None, "deferrable": True}
        run = start_training(airflow, cluster, conf, task_state="deferred")
        prefix = run_job_prefix(run.run_id)
        try:
            act(airflow, run.run_id, "clear")
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                ti = airflow.ti(DAG, run.run_id, "train")
                if ti.get("try_number", 0) >= 2 and ti.get("state") == "running":
                    break
                time.sleep(0.2)
            while job_state(cluster, run.job_id) and time.monotonic() < deadline:
                time.sleep(0.1)
            act(airflow, run.run_id, "failed")
            acted = time.monotonic()
            # Until the retry's job (if it got to submit) is gone again, or long
            # enough for the worker's heartbeat (5 s) to have stopped the retry.
            later: list[str] = []
            while time.monotonic() - acted < 20:
                later = [j for j, name in jobs_named(cluster, prefix) if not name.endswith("-t1")]
                if later and not any(job_state(cluster, j) in QUEUED for j in later):
                    break
                time.sleep(0.5)
            active = [j for j, _ in jobs_named(cluster, prefix) if job_state(cluster, j) in QUEUED]
            log = task_log_text(airflow, run.run_id)
            assert not active, (
                f"jobs {active} of {prefix}* still queued or running after the task was "
                f"failed between submit and defer:\n{log[-3000:]}"
            )
            how = re.findall(r"(the task [^:]*): cancelling Slurm job", log)
            print(
                f"retry's jobs {later}; cancelled before deferring because: {how or 'not needed'}"
            )
            return time.monotonic() - acted
        finally:
            stop_run(airflow, cluster, run.run_id)

    faults.trial("R1 marked failed between submit and defer")(body)
