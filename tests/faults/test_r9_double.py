"""R9: the same task try executed twice at once, and re-executed while its job runs."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from tests.cluster.test_operator import FakeTI, make_op
from tests.conftest import DevCluster
from tests.faults.conftest import trials
from tests.faults.helpers import jobs_ever, squeue_jobs

pytestmark = [pytest.mark.faults, pytest.mark.cluster]


@pytest.mark.parametrize("trial", range(trials()))
def test_r9_double_execute_one_job(cluster: DevCluster, faults, trial: int) -> None:
    from airflow.sdk.exceptions import TaskDeferred
    from slurm_ray.operators.identity import run_identity

    def body() -> float:
        task_id = f"r9_{trial}"
        first = FakeTI(task_id=task_id)
        job_name, _ = run_identity(first.dag_id, first.run_id, task_id, -1, 1)
        kwargs: dict[str, Any] = dict(
            entrypoint="sleep 60", job_spec={"nodes": 1, "cpus_per_task": 1, "time": "5"}
        )
        tis = [first, FakeTI(task_id=task_id, run_id=first.run_id)]
        outcomes: list[Any] = [None, None]
        barrier = threading.Barrier(2)

        def go(i: int) -> None:
            op = make_op(cluster, task_id, **kwargs)
            barrier.wait()
            try:
                op.execute({"ti": tis[i]})
            except BaseException as exc:  # TaskDeferred is the expected outcome
                outcomes[i] = exc

        started = time.monotonic()
        threads = [threading.Thread(target=go, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        took = time.monotonic() - started
        ids = [ti.xcom.get("slurm_job_id") for ti in tis]
        try:
            assert all(isinstance(o, TaskDeferred) for o in outcomes), outcomes
            assert ids[0] and ids[0] == ids[1], ids
            assert [o.trigger.job_id for o in outcomes] == ids
            assert squeue_jobs(cluster, job_name) == [ids[0]]
            # the same try again while the job runs (a retry / scheduler race)
            again = FakeTI(task_id=task_id, run_id=first.run_id)
            with pytest.raises(TaskDeferred) as deferred:
                make_op(cluster, task_id, **kwargs).execute({"ti": again})
            assert deferred.value.trigger.job_id == ids[0]
            assert again.xcom["slurm_job_id"] == ids[0]
            assert squeue_jobs(cluster, job_name) == [ids[0]]
            # ...and no second job of this name ever ran, even one that already ended
            assert jobs_ever(cluster, name=job_name) == {ids[0]}
        finally:
            for job in {i for i in ids if i}:
                cluster.ssh(f"scancel {job}", check=False)
        return took

    faults.trial("R9")(body)
