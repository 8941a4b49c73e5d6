"""Upgrades keep running work alive (issue 14 item 7).

A task deferred by the previous release (0.1.0) holds a serialized trigger
(classpath + kwargs) in the database and a run directory on the cluster.
After deploying this release the triggerer must load that trigger and follow
the job to its end, and the worker's ``execute_complete`` must collect the
run directory the old release wrote.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.test_operator import FakeTI
from tests.conftest import DevCluster

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "upgrade" / "trigger_0.1.0.json"
ROOT = Path(__file__).resolve().parents[2]
#: The commit the fixture was frozen from (release 0.1.0 on main).
OLD_COMMIT = "58a5656e0d1a0f823e4d9fc9d81c5b23df3d6766"


def load(classpath: str, kwargs: dict[str, Any]) -> Any:
    """What Airflow's triggerer does with a stored trigger row."""
    from airflow._shared.module_loading import import_string  # what the triggerer uses

    return import_string(classpath)(**kwargs)


def test_frozen_trigger_of_the_previous_release_loads_and_round_trips() -> None:
    doc = json.loads(FIXTURE.read_text())
    trigger = load(doc["classpath"], doc["kwargs"])
    # Serialized again (a triggerer restart), it is the same row.
    assert trigger.serialize() == (doc["classpath"], doc["kwargs"])


def test_old_import_paths_of_dag_files_still_work() -> None:
    """DAG files written against 0.1.0 import these; a resumed task re-parses its DAG file."""
    from slurm_ray import ClusterEnvOperator, GymSanityCheckOperator, SlurmRayOperator
    from slurm_ray.operators.cluster_env import ClusterEnvOperator as OldEnv
    from slurm_ray.operators.cluster_env import GymSanityCheckOperator as OldSanity
    from slurm_ray.operators.slurm_ray import SlurmRayOperator as OldTrain
    from slurm_ray.operators.slurm_ray import run_identity

    assert (OldEnv, OldSanity, OldTrain) == (
        ClusterEnvOperator,
        GymSanityCheckOperator,
        SlurmRayOperator,
    )
    assert run_identity("d", "r", "t", -1, 2)[0].endswith("-t2")


_OLD_DEFER = textwrap.dedent(
    """
    import json, sys, uuid
    import slurm_ray
    from airflow.sdk.exceptions import TaskDeferred
    from slurm_ray.operators.slurm_ray import SlurmRayOperator
    assert slurm_ray.__file__.startswith(sys.argv[1]), slurm_ray.__file__

    class TI:
        dag_id, task_id, map_index, try_number = "test_upgrade", "train", -1, 1
        run_id = sys.argv[2]
        xcom = {}
        def xcom_push(self, key, value):
            self.xcom[key] = value

    ti = TI()
    op = SlurmRayOperator(
        task_id="train", ssh_conn_id="slurm_dev", remote_base_dir=sys.argv[3],
        job_spec={"nodes": 1, "cpus_per_task": 1, "time": "5"},
        environment={"kind": "venv", "prefix": sys.argv[4]},
        entrypoint="echo old-release-was-here; sleep 8; echo upgrade-survived",
        poll_interval=1.0, deferrable=True,
    )
    try:
        op.execute({"ti": ti})
    except TaskDeferred as d:
        classpath, kwargs = d.trigger.serialize()
        print(json.dumps({"classpath": classpath, "kwargs": kwargs, "method": d.method_name,
                          "defer_kwargs": d.kwargs, "xcom": ti.xcom}))
    else:
        raise SystemExit("the old release did not defer")
    """
)


@pytest.mark.cluster
def test_a_task_deferred_by_the_previous_release_resumes(
    cluster: DevCluster, tmp_path: Path
) -> None:
    """The old release submits and defers; this release's trigger and operator finish it."""
    old = tmp_path / "old"
    old.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", OLD_COMMIT, "plugins", "include"],
        capture_output=True,
        check=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
    run_id = f"manual__upgrade-{os.getpid()}-{tmp_path.name[-6:]}"
    base = f"{cluster.scratch}/tests/upgrade"
    env = {**os.environ, "PYTHONPATH": str(old / "plugins"), "SLURM_RAY_INCLUDE_DIR": ""}
    env["SLURM_RAY_INCLUDE_DIR"] = str(old / "include")
    proc = subprocess.run(
        [sys.executable, "-c", _OLD_DEFER, str(old / "plugins"), run_id, base, str(cluster.venv)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    stored = json.loads(proc.stdout.strip().splitlines()[-1])
    job_id = stored["xcom"]["slurm_job_id"]
    try:
        # The row the old release stored has the frozen fixture's shape.
        frozen = json.loads(FIXTURE.read_text())
        assert stored["classpath"] == frozen["classpath"]
        assert set(stored["kwargs"]) == set(frozen["kwargs"])

        trigger = load(stored["classpath"], stored["kwargs"])

        async def first_event() -> Any:
            async for event in trigger.run():
                return event
            raise AssertionError("trigger ended without an event")

        event = asyncio.run(asyncio.wait_for(first_event(), 240))
        assert event.payload["status"] == "terminal", event.payload
        assert event.payload["state"] == "COMPLETED"

        from slurm_ray import SlurmRayOperator

        op = SlurmRayOperator(
            task_id="train",
            ssh_conn_id="slurm_dev",
            remote_base_dir=base,
            job_spec={"nodes": 1, "cpus_per_task": 1, "time": "5"},
            environment={"kind": "venv", "prefix": str(cluster.venv)},
            entrypoint="echo old-release-was-here; sleep 8; echo upgrade-survived",
            poll_interval=1.0,
            deferrable=True,
        )
        ti = FakeTI(task_id="train", dag_id="test_upgrade", run_id=run_id)
        summary = getattr(op, stored["method"])(
            {"ti": ti}, event.payload, **(stored["defer_kwargs"] or {})
        )
        assert summary["state"] == "COMPLETED" and summary["job_id"] == job_id
        assert summary["run_dir"] == stored["xcom"]["run_dir"]
        log = cluster.ssh(f"cat {summary['run_dir']}/slurm-{job_id}.out").stdout
        assert "old-release-was-here" in log and "upgrade-survived" in log
    finally:
        cluster.ssh(f"scancel {job_id}", check=False)
