"""R5: slurmd of one node killed (SIGKILL) during a 2-node job."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from tests.cluster.test_operator import FakeTI, make_op, run_deferred
from tests.conftest import DevCluster
from tests.faults.helpers import cluster_up, read_pid, tap

pytestmark = [pytest.mark.faults, pytest.mark.cluster]


def restore_node(cluster: DevCluster, node: str) -> None:
    cluster_up()
    deadline = time.monotonic() + 90
    state = ""
    while time.monotonic() < deadline:
        state = cluster.ssh(f"sinfo -h -n {node} -o %T", check=False).stdout.strip()
        if state in ("idle", "mixed", "allocated"):
            return
        if "down" in state or "drain" in state:
            cluster.ssh(f"scontrol update nodename={node} state=resume", check=False)
        time.sleep(2)
    raise AssertionError(f"{node} did not come back: {state!r}")


def test_r5_slurmd_killed_node_fail_then_one_node_retry(cluster: DevCluster, faults) -> None:
    from airflow.sdk.exceptions import AirflowException, TaskDeferred

    def body() -> float:
        ti = FakeTI(task_id="r5_nodefail")
        op = make_op(
            cluster,
            ti.task_id,
            entrypoint="sleep 300",
            # the site requeues by default (JobRequeue=1): this job spec opts out
            job_spec={"nodes": 2, "cpus_per_task": 1, "time": "6", "requeue": False},
            poll_interval=2.0,
        )
        with pytest.raises(TaskDeferred) as deferred:
            op.execute({"ti": ti})
        job_id = ti.xcom["slurm_job_id"]
        trigger = deferred.value.trigger
        logs = tap(trigger)
        killed: dict[str, float] = {}

        async def scenario():
            gen = trigger.run()
            task = asyncio.ensure_future(gen.__anext__())
            t0 = time.monotonic()
            while "is RUNNING" not in logs.text:
                assert not task.done() and time.monotonic() - t0 < 120, logs.text[-2000:]
                await asyncio.sleep(0.5)
            await asyncio.sleep(3)
            pidfile = cluster.state / "run" / "slurmd-n2.pid"
            dead = read_pid(pidfile)
            os.kill(dead, signal.SIGKILL)
            killed["t"] = time.monotonic()
            # Keep n2's slurmd down until the job ends: a concurrent
            # `devcluster.sh up` (another test session) would restart it.
            while not task.done():
                assert time.monotonic() - killed["t"] < 240, logs.text[-2000:]
                try:
                    pid = read_pid(pidfile)
                    if pid != dead and os.path.exists(f"/proc/{pid}"):
                        os.kill(pid, signal.SIGKILL)
                        dead = pid
                except (OSError, ValueError):
                    pass
                await asyncio.sleep(0.5)
            event = task.result()
            await gen.aclose()
            return event

        try:
            event = asyncio.run(scenario())
            ended = time.monotonic() - killed["t"]
            assert event.payload["state"] == "NODE_FAIL", event.payload
            with pytest.raises(AirflowException) as err:
                op.execute_complete({"ti": ti}, event.payload, **(deferred.value.kwargs or {}))
            msg = str(err.value)
            print("error:", msg[:600])
            first = msg.splitlines()[0]
            assert "NODE_FAIL" in first and "n2" in first, first
            assert ended < 150, ended
        finally:
            cluster.ssh(f"scancel {job_id}", check=False)
            restore_node(cluster, "n2")
        recovered = time.monotonic()
        ti2 = FakeTI(task_id=ti.task_id, run_id=ti.run_id, try_number=2)
        op2 = make_op(
            cluster,
            ti.task_id,
            entrypoint="echo retry-ok",
            job_spec={"nodes": 1, "cpus_per_task": 1, "time": "5"},
        )
        summary = run_deferred(op2, {"ti": ti2}, timeout=180)
        assert summary["state"] == "COMPLETED", summary
        return time.monotonic() - recovered

    faults.trial("R5")(body)
