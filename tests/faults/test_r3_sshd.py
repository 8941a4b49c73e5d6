"""R3: sshd stopped for 20 s while a SlurmJobTrigger watches a running job."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.cluster.test_operator import FakeTI, make_op
from tests.conftest import DevCluster
from tests.faults.conftest import trials
from tests.faults.helpers import cluster_up, kill_sshd, tap

pytestmark = [pytest.mark.faults, pytest.mark.cluster, pytest.mark.exclusive]

OUTAGE_S = 20.0


@pytest.mark.parametrize("trial", range(trials()))
def test_r3_sshd_outage_trigger_reconnects(cluster: DevCluster, faults, trial: int) -> None:
    from airflow.sdk.exceptions import TaskDeferred

    def body() -> float:
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
        logs = tap(trigger)
        restarted: dict[str, float] = {}

        async def scenario():
            gen = trigger.run()
            task = asyncio.ensure_future(gen.__anext__())
            # wait until the job runs and the trigger has polled it
            t0 = time.monotonic()
            while "is RUNNING" not in logs.text:
                assert not task.done(), "trigger ended before the outage"
                assert time.monotonic() - t0 < 120, "job never started"
                await asyncio.sleep(0.5)
            await asyncio.to_thread(kill_sshd, cluster)
            try:
                await asyncio.sleep(OUTAGE_S)
            finally:
                await asyncio.to_thread(cluster_up)
            restarted["wall"] = time.time()
            event = await asyncio.wait_for(task, 180)
            await gen.aclose()
            return event

        try:
            event = asyncio.run(scenario())
        finally:
            cluster_up()
            cluster.ssh(f"scancel {job_id}", check=False)
        summary = op.execute_complete({"ti": ti}, event.payload, **(deferred.value.kwargs or {}))
        assert summary["state"] == "COMPLETED", summary
        text = logs.text
        assert "Lost the SSH connection" in text, text[-3000:]
        assert "reconnecting with backoff" in text, text[-3000:]
        assert "Reconnected to" in text, text[-3000:]
        # seconds from sshd back up to the trigger's first good poll
        return max(0.0, logs.first("Reconnected to")[0] - restarted["wall"])

    faults.trial("R3")(body)
