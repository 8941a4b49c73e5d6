"""R10: run directory not writable, environment missing, sanity check failing.

Each fails early with a one-line reason and nothing is submitted.
"""

from __future__ import annotations

import shlex
import time
import uuid
from typing import Any

import pytest

from tests.cluster.test_operator import FakeTI, make_op
from tests.conftest import DevCluster
from tests.faults.helpers import jobs_ever, squeue_jobs

pytestmark = [pytest.mark.faults, pytest.mark.cluster]


def never_submitted(cluster: DevCluster, job_name: str) -> None:
    assert jobs_ever(cluster, name=job_name) == set()


def test_finished_jobs_are_seen_by_the_nothing_submitted_check(cluster: DevCluster) -> None:
    """Positive control: a job that ran and ended is found (plain squeue no longer shows it)."""
    workdir = cluster.new_dir("r10-control")
    name = f"sr-r10-control-{uuid.uuid4().hex[:8]}"
    job_id = cluster.ssh(
        f"cd {shlex.quote(workdir)} && sbatch --parsable --job-name={name} --time=1 --wrap=true"
    ).stdout.strip()
    assert job_id.isdigit(), job_id
    deadline = time.monotonic() + 120
    while squeue_jobs(cluster, name):  # active: wait for it to end
        assert time.monotonic() < deadline, f"job {job_id} still active"
        time.sleep(0.5)
    assert jobs_ever(cluster, name=name) == {job_id}
    assert jobs_ever(cluster, workdir=workdir) == {job_id}
    assert jobs_ever(cluster, name=name + "-other") == set()


def fail_early(cluster: DevCluster, task_id: str, needle: str, **kwargs: Any) -> float:
    from airflow.sdk.exceptions import AirflowException
    from slurm_ray.operators.identity import run_identity

    ti = FakeTI(task_id=task_id)
    job_name, _ = run_identity(ti.dag_id, ti.run_id, task_id, -1, 1)
    op = make_op(cluster, task_id, entrypoint="echo should-not-run", **kwargs)
    started = time.monotonic()
    with pytest.raises(AirflowException) as err:
        op.execute({"ti": ti})
    took = time.monotonic() - started
    msg = str(err.value)
    assert "\n" not in msg.strip(), msg
    assert needle in msg, msg
    assert "slurm_job_id" not in ti.xcom
    never_submitted(cluster, job_name)
    assert took < 30, took
    return took


def test_r10_run_dir_not_writable(cluster: DevCluster, faults) -> None:
    # root-owned and not writable by the job user
    base = f"{cluster.state}/etc/r10-not-writable"
    faults.trial("R10")(
        lambda: fail_early(cluster, "r10_dir", "not writable", remote_base_dir=base)
    )


def test_r10_environment_missing(cluster: DevCluster, faults) -> None:
    env = {"kind": "venv", "prefix": f"{cluster.scratch}/no-such-venv-r10"}
    faults.trial("R10")(
        lambda: fail_early(cluster, "r10_env", "environment.prefix", environment=env)
    )


def test_r10_sanity_check_fails(cluster: DevCluster, faults) -> None:
    from airflow.sdk.exceptions import AirflowException
    from slurm_ray.operators.sanity_check import GymSanityCheckOperator

    def body() -> float:
        # its own directory: a job run from there would be this check's (other
        # developers' jobs share the queue)
        remote_dir = cluster.new_dir("r10-sanity")
        op = GymSanityCheckOperator(
            task_id="r10_sanity",
            ssh_conn_id="slurm_dev",
            environment={"kind": "venv", "prefix": str(cluster.venv)},
            env_id="NoSuchEnv-v0",
            remote_dir=remote_dir,
        )
        started = time.monotonic()
        with pytest.raises(AirflowException) as err:
            op.execute({})
        took = time.monotonic() - started
        msg = str(err.value)
        assert "\n" not in msg.strip(), msg
        assert "NoSuchEnv-v0" in msg, msg
        assert jobs_ever(cluster, workdir=remote_dir) == set()
        return took

    faults.trial("R10")(body)
