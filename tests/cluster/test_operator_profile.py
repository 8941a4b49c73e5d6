"""The one-word operator on the real dev cluster: the docstring's example, and no profile at all."""

from __future__ import annotations

import shlex
from typing import Any

import pytest

from tests.cluster.test_operator import FakeTI, run_deferred
from tests.conftest import DevCluster
from tests.unit.test_operator_profile import docstring_example

pytestmark = pytest.mark.cluster


def test_docstring_example_runs_on_both_nodes(cluster: DevCluster) -> None:
    from slurm_ray import SlurmRayOperator

    namespace: dict[str, Any] = {"SlurmRayOperator": SlurmRayOperator}
    exec(docstring_example(), namespace)  # exactly the text users copy
    probe = namespace["probe"]
    probe.poll_interval = 1.0
    ti = FakeTI(task_id="probe")
    summary = run_deferred(probe, {"ti": ti})
    assert summary["state"] == "COMPLETED"
    job_id, run_dir = ti.xcom["slurm_job_id"], ti.xcom["run_dir"]
    assert run_dir.startswith(f"{cluster.scratch}/runs/")  # the local profile's base dir
    log = cluster.ssh(f"cat {shlex.quote(run_dir)}/slurm-{job_id}.out").stdout
    assert "nodes n1 n2" in log and "cluster ready nodes=2" in log, log[-3000:]
    # The entrypoint's own output: one Ray node per Slurm node.
    resources = next(line for line in log.splitlines() if "'CPU'" in line)
    assert resources.count("'node:10.") == 2, resources


def test_without_a_profile_runs_under_the_remote_home(cluster: DevCluster) -> None:
    from slurm_ray import SlurmRayOperator

    op = SlurmRayOperator(
        task_id="home",
        ssh_conn_id="slurm_dev",
        environment={"kind": "venv", "prefix": str(cluster.venv)},
        nodes=1,
        cpus_per_node=1,
        time_limit="5",
        entrypoint="echo RAN_IN $SLURM_RAY_RUN_DIR",
        poll_interval=1.0,
    )
    ti = FakeTI(task_id="home")
    summary = run_deferred(op, {"ti": ti})
    assert summary["state"] == "COMPLETED"
    home = cluster.ssh('printf %s "$HOME"').stdout
    run_dir = ti.xcom["run_dir"]
    assert run_dir.startswith(f"{home}/slurm_ray/runs/test_slurm_ray/"), run_dir
    script = cluster.ssh(f"cat {shlex.quote(run_dir)}/job.sbatch").stdout
    assert "#SBATCH --nodes=1" in script and "#SBATCH --cpus-per-task=1" in script
    assert "#SBATCH --time=5" in script
