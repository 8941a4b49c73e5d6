"""R3: sshd stopped for 20 s while a SlurmJobTrigger watches a running job."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from tests.cluster.test_operator import FakeTI, make_op
from tests.conftest import DevCluster
from tests.faults.conftest import trials
from tests.faults.helpers import cluster_up, kill_sshd, squeue_jobs

pytestmark = [pytest.mark.faults, pytest.mark.cluster]

OUTAGE_S = 20.0


@pytest.mark.parametrize("trial", range(trials()))
def test_r3_sshd_outage_trigger_reconnects(
    cluster: DevCluster, faults, caplog: pytest.LogCaptureFixture, trial: int
) -> None:
    from airflow.sdk.exceptions import TaskDeferred

    def body() -> float:
        caplog.clear()
        caplog.set_level(logging.INFO)
        ti = FakeTI(task_id=f"r3_{trial}")
        op = make_op(
            cluster,
            ti.task_id,
            entrypoint="sleep 45",
            job_spec={"nodes": 1, "cpus_per_task": 1, "time": "5"},
        )
        with pytest.raises(TaskDeferred) as deferred:
            op.execute({"ti": ti})
        job_id = ti.xcom["slurm_job_id"]
        trigger = deferred.value.trigger
        restarted: dict[str, float] = {}

        async def scenario():
            gen = trigger.run()
            task = asyncio.ensure_future(gen.__anext__())
            # wait until the job runs and the trigger has polled it
            t0 = time.monotonic()
            while "is RUNNING" not in caplog.text:
                assert not task.done(), "trigger ended before the outage"
                assert time.monotonic() - t0 < 120, "job never started"
                await asyncio.sleep(0.5)
            await asyncio.to_thread(kill_sshd, cluster)
            try:
                await asyncio.sleep(OUTAGE_S)
            finally:
                await asyncio.to_thread(cluster_up)
            restarted["t"] = time.monotonic()
            event = await asyncio.wait_for(task, 180)
            await gen.aclose()
            return event

        try:
            event = asyncio.run(scenario())
        finally:
            cluster_up()
            if squeue_jobs(cluster, f"{job_id}"):
                pass
        summary = op.execute_complete({"ti": ti}, event.payload, **(deferred.value.kwargs or {}))
        assert summary["state"] == "COMPLETED", summary
        text = caplog.text
        assert "Lost the SSH connection" in text, text[-3000:]
        assert "Reconnected to" in text, text[-3000:]
        rec = next(r for r in caplog.records if "Reconnected to" in r.getMessage())
        # seconds from sshd back up to the trigger's first good poll
        lost = next(r for r in caplog.records if "Lost the SSH connection" in r.getMessage())
        return max(0.0, rec.created - lost.created - OUTAGE_S)

    faults.trial("R3")(body)
