"""R1: the `train` task marked failed or cleared over the Airflow REST API.

Both while deferred (the triggerer watches the job) and while running in
non-deferrable mode (the worker polls it; the DAG's ``deferrable`` Param). The
Slurm job must be cancelled within 15 s, and no Ray, Python or srun process
of the job may be left in either node's namespace.
"""

from __future__ import annotations

import time

import pytest

from tests.airflow_fixtures import Airflow
from tests.conftest import DevCluster
from tests.faults.airflow_runs import DAG, job_processes, start_training, stop_run
from tests.faults.conftest import trials

pytestmark = [pytest.mark.faults, pytest.mark.cluster, pytest.mark.e2e]

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
