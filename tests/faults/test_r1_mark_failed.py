"""R1: the deferred `train` task marked failed over the Airflow REST API.

The Slurm job must be cancelled within 15 s, and no Ray, Python or srun
process of the job may be left in either node's namespace.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.airflow_fixtures import Airflow, trigger
from tests.conftest import DevCluster

pytestmark = [pytest.mark.faults, pytest.mark.cluster, pytest.mark.e2e]

DAG = "rllib_train"


def job_processes(job_id: str) -> list[str]:
    """Processes of the job in the node namespaces (cmdline or environment mention it)."""
    left: list[str] = []
    for ns in ("sr-n1", "sr-n2"):
        pids = subprocess.run(
            ["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=30
        ).stdout.split()
        for pid in pids:
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if "slurmd" in cmd.split(" ")[0]:
                continue
            if f"rs-{job_id}" in cmd or f"SLURM_JOB_ID={job_id}".encode() in env:
                left.append(f"{ns} {pid} {cmd[:120]}")
    return left


def test_r1_mark_deferred_train_failed_cancels_job(
    airflow: Airflow,
    cluster: DevCluster,
    faults,
) -> None:
    airflow.wait_dag(DAG)

    def body() -> float:
        status, run = trigger(airflow, DAG, {"stop_iterations": 1000})
        assert status == 200, run
        run_id = run["dag_run_id"]
        job_id = ""
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            ti = airflow.ti(DAG, run_id, "train")
            if ti.get("state") == "deferred":
                status, xcom = airflow.call(
                    "GET",
                    f"/dags/{DAG}/dagRuns/{run_id}/taskInstances/train/xcomEntries/slurm_job_id",
                )
                if status == 200:
                    job_id = str(xcom["value"]).strip('"')
                    q = cluster.ssh(f"squeue -h -j {job_id} -o %T", check=False).stdout.strip()
                    if q == "RUNNING" and job_processes(job_id):
                        break
            if ti.get("state") in ("failed", "upstream_failed", "success"):
                raise AssertionError(f"train ended before the fault: {ti}")
            time.sleep(1)
        else:
            raise AssertionError("train never deferred with a running job")
        time.sleep(5)  # Ray is up and training
        try:
            marked = time.monotonic()
            status, body = airflow.call(
                "PATCH",
                f"/dags/{DAG}/dagRuns/{run_id}/taskInstances/train",
                {"new_state": "failed"},
            )
            assert status == 200, body
            gone = None
            while time.monotonic() - marked < 15:
                active = cluster.ssh(
                    f"squeue -h -j {job_id} -t PD,R,CG,CF,S -o %T", check=False
                ).stdout.strip()
                if not active:
                    gone = time.monotonic() - marked
                    break
                time.sleep(0.5)
            assert gone is not None, f"job {job_id} still active 15 s after the task was failed"
            # processes may need a moment after Slurm released the job
            t0 = time.monotonic()
            left = job_processes(job_id)
            while left and time.monotonic() - t0 < 15:
                time.sleep(1)
                left = job_processes(job_id)
            assert not left, left
            return gone
        finally:
            if job_id:
                cluster.ssh(f"scancel {job_id}", check=False)

    if os.geteuid() != 0:
        pytest.skip("reading the node namespaces' processes needs root")
    faults.trial("R1")(body)
