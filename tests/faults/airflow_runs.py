"""Driving `rllib_train` runs on the real Airflow for the fault tests (R1, R2, R8)."""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.airflow_fixtures import Airflow, trigger
from tests.conftest import DevCluster

DAG = "rllib_train"


@dataclass
class TrainRun:
    """One triggered `rllib_train` run, once its training job runs."""

    run_id: str
    job_id: str
    run_dir: str
    mlflow_run_id: str | None


def xcom(af: Airflow, run_id: str, task_id: str, key: str) -> Any:
    status, body = af.call(
        "GET", f"/dags/{DAG}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/{key}"
    )
    if status != 200:
        return None
    value = body["value"]
    return value.strip('"') if isinstance(value, str) else value


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


def task_log_files(af: Airflow, run_id: str, task_id: str = "train") -> list[Path]:
    """Airflow's own log files of a task (worker attempts and triggerer logs)."""
    root = af.home / "logs"
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and f"run_id={run_id}" in p.parts and f"task_id={task_id}" in str(p)
    )


def task_log_text(af: Airflow, run_id: str, task_id: str = "train") -> str:
    return "\n".join(p.read_text(errors="replace") for p in task_log_files(af, run_id, task_id))


def job_state(cluster: DevCluster, job_id: str) -> str:
    return cluster.ssh(f"squeue -h -j {job_id} -o %T", check=False).stdout.strip()


def metric_steps(mlflow_url: str, run_id: str, key: str = "episode_return_mean") -> list[int]:
    from mlflow.tracking import MlflowClient

    return sorted(m.step for m in MlflowClient(mlflow_url).get_metric_history(run_id, key))


def start_training(
    af: Airflow,
    cluster: DevCluster,
    conf: dict[str, Any],
    *,
    task_state: str = "deferred",
    mlflow_url: str | None = None,
    min_steps: int = 0,
    timeout: float = 600,
) -> TrainRun:
    """Trigger a run; return once `train` is in ``task_state`` with its job RUNNING
    and its processes up on the nodes (and ``min_steps`` metric steps in MLflow)."""
    status, run = trigger(af, DAG, conf)
    assert status == 200, run
    run_id = run["dag_run_id"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ti = af.ti(DAG, run_id, "train")
        state = ti.get("state")
        if state in ("failed", "upstream_failed", "success"):
            raise AssertionError(f"train ended before the fault: {ti}")
        job_id = xcom(af, run_id, "train", "slurm_job_id") if state == task_state else None
        if job_id and job_state(cluster, str(job_id)) == "RUNNING" and job_processes(str(job_id)):
            mlflow_run_id = xcom(af, run_id, "train", "mlflow_run_id")
            if not min_steps or (
                mlflow_url
                and mlflow_run_id
                and len(metric_steps(mlflow_url, mlflow_run_id)) >= min_steps
            ):
                run_dir = xcom(af, run_id, "train", "run_dir")
                return TrainRun(run_id, str(job_id), str(run_dir), mlflow_run_id)
        time.sleep(1)
    raise AssertionError(f"train never reached {task_state!r} with a running job ({run_id})")


def wait_run(af: Airflow, run_id: str, timeout: float = 900) -> str:
    """The DAG run's final state."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = af.call("GET", f"/dags/{DAG}/dagRuns/{run_id}")[1].get("state")
        if state in ("success", "failed"):
            return str(state)
        time.sleep(2)
    raise AssertionError(f"run {run_id} not finished after {timeout:.0f}s")


def jobs_named(cluster: DevCluster, prefix: str) -> list[tuple[str, str]]:
    """(job id, name) of every job Slurm still remembers (MinJobAge) whose name starts so."""
    out = cluster.ssh("scontrol -o show job 2>/dev/null || true", check=False).stdout
    found = []
    for line in out.splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        if fields.get("JobName", "").startswith(prefix):
            found.append((fields["JobId"], fields["JobName"]))
    return found


def run_job_prefix(run_id: str, task_id: str = "train") -> str:
    """Name prefix shared by every try's job of this task (``sr-<digest>-<task>-t``)."""
    from slurm_ray.operators.identity import run_identity

    name, _ = run_identity(DAG, run_id, task_id, -1, 1)
    return name[: -len("1")]


def stop_run(af: Airflow, cluster: DevCluster, run_id: str) -> None:
    """Fail the DAG run unless it has ended, and cancel whatever job any try of it has."""
    if af.call("GET", f"/dags/{DAG}/dagRuns/{run_id}")[1].get("state") not in ("success", "failed"):
        af.call("PATCH", f"/dags/{DAG}/dagRuns/{run_id}", {"state": "failed"})
    for job_id, _ in jobs_named(cluster, run_job_prefix(run_id)):
        cluster.ssh(f"scancel {job_id}", check=False)
