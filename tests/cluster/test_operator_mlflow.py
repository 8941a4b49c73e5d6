"""SlurmRayOperator with MLflow: live relay while the job runs, and an unreachable server."""

from __future__ import annotations

import asyncio
import shlex
import time

import pytest
from airflow.sdk.exceptions import AirflowException, TaskDeferred

from tests.cluster.test_operator import FakeTI, make_op
from tests.conftest import DevCluster
from tests.mlflow_fixtures import MlflowServer, free_port

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

SMALL = {
    "num_env_runners": 1,
    "num_envs_per_env_runner": 4,
    "train_batch_size": 1000,
    "minibatch_size": 250,
    "num_epochs": 2,
    "stop": {"iterations": 8, "minutes": 8},
    "checkpoint_every": 4,
    "eval_episodes": 1,
}


def test_metrics_reach_mlflow_while_the_job_runs(
    cluster: DevCluster, mlflow_server: MlflowServer
) -> None:
    from mlflow.tracking import MlflowClient

    ti = FakeTI(task_id="live")
    op = make_op(
        cluster,
        "live",
        config=SMALL,
        job_spec={"nodes": 2, "cpus_per_task": 1, "time": "15"},
        mlflow={"tracking_uri": mlflow_server.url, "experiment_name": f"live-{ti.run_id[8:16]}"},
    )
    with pytest.raises(TaskDeferred) as deferred:
        op.execute({"ti": ti})
    job_id = ti.xcom["slurm_job_id"]
    run_id = ti.xcom["mlflow_run_id"]
    client = MlflowClient(mlflow_server.url)
    seen_while_running: list[int] = []

    async def watch() -> object:
        task = asyncio.ensure_future(anext(deferred.value.trigger.run()))
        while not task.done():
            await asyncio.sleep(1)
            steps = [m.step for m in client.get_metric_history(run_id, "episode_return_mean")]
            state = cluster.ssh(f"squeue -h -j {job_id} -o %T", check=False).stdout.strip()
            if steps and state == "RUNNING":
                seen_while_running.extend(steps)
        return await task

    event = asyncio.run(asyncio.wait_for(watch(), 600))
    assert seen_while_running, "no metric reached MLflow while the job was running"
    summary = op.execute_complete({"ti": ti}, event.payload, **deferred.value.kwargs)
    assert summary["mlflow_run_id"] == run_id
    steps = [m.step for m in client.get_metric_history(run_id, "episode_return_mean")]
    assert sorted(steps) == list(range(1, 9)), steps


def test_unreachable_tracking_server_fails_before_submitting(cluster: DevCluster) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    before = cluster.ssh("squeue -h -t all -o %i").stdout.split()
    ti = FakeTI(task_id="nomlflow")
    op = make_op(
        cluster,
        "nomlflow",
        config=SMALL,
        mlflow={"tracking_uri": dead, "experiment_name": "x", "request_timeout": 2},
    )
    started = time.monotonic()
    with pytest.raises(AirflowException, match=r"127\.0\.0\.1"):
        op.execute({"ti": ti})
    assert time.monotonic() - started < 30
    assert cluster.ssh("squeue -h -t all -o %i").stdout.split() == before
    base = f"{cluster.scratch}/tests/runs/{ti.dag_id}"
    listing = cluster.ssh(f"ls {shlex.quote(base)} 2>/dev/null", check=False).stdout
    assert ti.run_id.replace(":", "_").replace("+", "_") not in listing
