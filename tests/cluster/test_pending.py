"""A job held behind another one: the pending reason, Slurm's start estimate and the
queue wait in MLflow (issue 15 item 2), for real on the dev cluster through the operator."""

from __future__ import annotations

import asyncio
import re
import shlex
import time
from typing import Any

import pytest
from airflow.sdk.exceptions import TaskDeferred

from tests.cluster.test_operator import FakeTI, make_op
from tests.conftest import DevCluster
from tests.faults.helpers import tap
from tests.mlflow_fixtures import MlflowServer

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

#: The blocker's time limit: the backfill scheduler's start estimate for the job behind it.
BLOCK_MINUTES = 5
#: The least time the job is held behind the blocker.
MIN_HOLD_S = 15


def _squeue(cluster: DevCluster, job_id: str, fmt: str) -> str:
    cmd = f"TZ=UTC SLURM_TIME_FORMAT=standard squeue -h -j {job_id} -o {shlex.quote(fmt)}"
    return cluster.ssh(cmd, check=False).stdout.strip()


def _wait(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(1)


@pytest.mark.exclusive  # holds both nodes: the other test lane's jobs would wait behind it
def test_pending_reason_estimate_and_queue_wait(
    cluster: DevCluster, mlflow_server: MlflowServer
) -> None:
    from mlflow.tracking import MlflowClient

    d = cluster.new_dir("pending")
    blocker = cluster.ssh(
        f"cd {shlex.quote(d)} && sbatch --parsable -o /dev/null -J sr-pending-blocker "
        f"-N2 --exclusive -t {BLOCK_MINUTES} --wrap 'sleep 600'"
    ).stdout.strip()
    jobs = [blocker]
    try:
        # both nodes held (other users' jobs may delay the blocker itself)
        _wait(lambda: _squeue(cluster, blocker, "%T") == "RUNNING", 180, "the blocker to run")
        ti = FakeTI(task_id="pending")
        op = make_op(
            cluster,
            "pending",
            entrypoint="true",
            job_spec={"nodes": 1, "cpus_per_task": 1, "time": "5"},
            mlflow={
                "tracking_uri": mlflow_server.url,
                "experiment_name": f"pend-{ti.run_id[8:16]}",
            },
        )
        with pytest.raises(TaskDeferred) as deferred:
            op.execute({"ti": ti})
        submitted_by = time.time()  # the job was submitted before execute deferred
        job_id = ti.xcom["slurm_job_id"]
        jobs.append(job_id)
        trigger = deferred.value.trigger
        logs = tap(trigger)
        estimate: list[str] = []

        async def follow() -> Any:
            task = asyncio.ensure_future(anext(trigger.run()))
            pending = re.compile(rf"Slurm job {job_id} is PENDING \((Resources|Priority)\)")
            while not pending.search(logs.text):
                assert not task.done(), logs.text[-3000:]
                await asyncio.sleep(0.5)
            # The backfill scheduler computes the estimate (the blocker's end) within
            # its interval; once squeue shows it, the log must say it.
            for _ in range(60):
                start = _squeue(cluster, job_id, "%S")
                if re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", start):
                    estimate.append(start)
                    break
                await asyncio.sleep(1)
            if estimate:
                line = f"estimated start {estimate[0][11:16]} UTC, in "
                for _ in range(20):
                    if line in logs.text:
                        break
                    await asyncio.sleep(0.5)
                assert line in logs.text, logs.text[-3000:]
            # held long enough that the wait is clearly more than scheduling latency
            await asyncio.sleep(max(0.0, MIN_HOLD_S - (time.time() - submitted_by)))
            held = time.time() - submitted_by
            assert _squeue(cluster, job_id, "%T") == "PENDING"
            cluster.ssh(f"scancel {blocker}")
            return held, await asyncio.wait_for(task, 300)

        held, event = asyncio.run(follow())
        text = logs.text
        assert event.payload["status"] == "terminal" and event.payload["state"] == "COMPLETED", text
        # one line per change, not one per poll
        assert len(re.findall(rf"Slurm job {job_id} is PENDING", text)) <= 4, text
        assert re.search(rf"Slurm job {job_id} is (RUNNING|COMPLETED), after .* in the queue", text)
        summary = op.execute_complete({"ti": ti}, event.payload, **deferred.value.kwargs)
        run_id = ti.xcom["mlflow_run_id"]
        assert summary["mlflow_run_id"] == run_id
        waits = MlflowClient(mlflow_server.url).get_metric_history(run_id, "slurm_queue_wait_s")
        assert len(waits) == 1, waits
        # Slurm's times have 1 s resolution
        assert waits[0].value >= int(held) - 1, (waits[0].value, held)
        print(f"held {held:.0f}s, slurm_queue_wait_s={waits[0].value}, estimate={estimate}")
    finally:
        cluster.ssh(f"scancel {' '.join(jobs)}; rm -rf {shlex.quote(d)}", check=False)
