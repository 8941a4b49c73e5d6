"""R2: the triggerer killed (SIGKILL) and restarted while the training job runs.

The deferred `train` task must re-attach through the new triggerer: exactly one
Slurm job for the try, the run completes, and MLflow holds every metric step
once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import pytest

from tests.airflow_fixtures import Airflow
from tests.conftest import DevCluster
from tests.faults.airflow_runs import (
    DAG,
    jobs_named,
    metric_steps,
    run_job_prefix,
    start_training,
    stop_run,
    wait_run,
)
from tests.faults.conftest import trials
from tests.faults.helpers import children
from tests.mlflow_fixtures import MlflowServer

pytestmark = [pytest.mark.faults, pytest.mark.cluster, pytest.mark.e2e]

# Half the default batch: the restart needs training to go on for ~20 s after
# the kill, not the 6 minutes that 16 default iterations took in a busy CI run.
CONF = {
    "stop_iterations": 16,
    "train_batch_size": 2000,
    "stop_return_mean": None,
    "experiment_name": "faults_r2",
    "register_model_name": "faults-r2",
}


def triggerer_pids(home: Path) -> list[int]:
    """`airflow triggerer` processes of this Airflow (by its AIRFLOW_HOME), with children."""
    roots = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            env = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        is_triggerer = b"triggerer" in cmd and any(c.endswith(b"airflow") for c in cmd[:2])
        if is_triggerer and f"AIRFLOW_HOME={home}".encode() in env:
            roots.append(int(entry))
    found: list[int] = []
    todo = list(roots)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.append(pid)
            todo.extend(children(pid))
    return found


def kill_triggerer(home: Path) -> list[int]:
    pids = triggerer_pids(home)
    assert pids, "no triggerer process found"
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
        time.sleep(0.2)
    return pids


@pytest.mark.parametrize("trial", range(trials()))
def test_r2_triggerer_killed_and_restarted(
    airflow: Airflow, cluster: DevCluster, mlflow_server: MlflowServer, faults, trial: int
) -> None:
    faults.require_root("R2")
    airflow.wait_dag(DAG)

    def body() -> float:
        run = start_training(airflow, cluster, CONF, mlflow_url=mlflow_server.url, min_steps=2)
        assert run.mlflow_run_id
        try:
            killed = kill_triggerer(airflow.home)
            steps_at_kill = len(metric_steps(mlflow_server.url, run.mlflow_run_id))
            time.sleep(3)
            assert not triggerer_pids(airflow.home), "the triggerer came back by itself"
            started = airflow.script("component", "triggerer")
            assert started.returncode == 0, started.stderr
            restarted = time.monotonic()
            # Re-attached: the new triggerer relays new steps, or the task moves on.
            recovered = None
            while time.monotonic() - restarted < 300:
                ti = airflow.ti(DAG, run.run_id, "train")
                steps = len(metric_steps(mlflow_server.url, run.mlflow_run_id))
                if steps > steps_at_kill or ti.get("state") not in ("deferred", "scheduled"):
                    recovered = time.monotonic() - restarted
                    break
                time.sleep(1)
            assert recovered is not None, f"nothing moved after the restart (killed {killed})"
            assert wait_run(airflow, run.run_id) == "success"
            ti = airflow.ti(DAG, run.run_id, "train")
            assert ti["try_number"] == 1, ti
            jobs = jobs_named(cluster, run_job_prefix(run.run_id))
            assert [j for j, _ in jobs] == [run.job_id], jobs
            outs = cluster.ssh(f"ls {run.run_dir}", check=True).stdout.split()
            assert [o for o in outs if o.startswith("slurm-")] == [f"slurm-{run.job_id}.out"]
            for key in ("episode_return_mean", "env_steps"):
                steps = metric_steps(mlflow_server.url, run.mlflow_run_id, key)
                assert steps == list(range(1, CONF["stop_iterations"] + 1)), (key, steps)
            return recovered
        finally:
            stop_run(airflow, cluster, run.run_id)
            # The next test needs a triggerer whatever happened here.
            airflow.script("component", "triggerer")

    faults.trial("R2")(body)
