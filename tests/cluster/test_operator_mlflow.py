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
    from slurm_ray.operators.slurm_ray import run_identity

    from tests.faults.helpers import jobs_ever

    dead = f"http://127.0.0.1:{free_port()}"
    ti = FakeTI(task_id="nomlflow")
    job_name, _ = run_identity(ti.dag_id, ti.run_id, ti.task_id, ti.map_index, ti.try_number)
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
    # By this task's job name: other users' jobs come and go on a shared cluster.
    assert jobs_ever(cluster, name=job_name) == set()
    base = f"{cluster.scratch}/tests/runs/{ti.dag_id}"
    listing = cluster.ssh(f"ls {shlex.quote(base)} 2>/dev/null", check=False).stdout
    assert ti.run_id.replace(":", "_").replace("+", "_") not in listing


def test_retry_first_relays_rows_an_earlier_try_left_behind(
    cluster: DevCluster, mlflow_server: MlflowServer
) -> None:
    """Try 1 ended while MLflow was down: try 2 sends its rows before anything else."""
    import json
    import posixpath

    from mlflow.tracking import MlflowClient
    from slurm_ray.operators.identity import run_identity

    ti = FakeTI(task_id="earlier", try_number=2)
    _, suffix1 = run_identity(ti.dag_id, ti.run_id, ti.task_id, -1, 1)
    try1 = posixpath.join(cluster.scratch, "tests", "runs", suffix1)
    rows = "".join(
        json.dumps({"iteration": i, "episode_return_mean": 10.0 * i, "env_steps": 100 * i}) + "\n"
        for i in (1, 2, 3)
    )
    cluster.ssh(
        f"mkdir -p {shlex.quote(try1)} && printf %s {shlex.quote(rows)} > "
        f"{shlex.quote(try1)}/metrics.jsonl"
    )
    op = make_op(
        cluster,
        ti.task_id,
        entrypoint="true",
        job_spec={"nodes": 1, "cpus_per_task": 1, "time": "5"},
        mlflow={"tracking_uri": mlflow_server.url, "experiment_name": f"retry-{ti.run_id[8:16]}"},
    )
    with pytest.raises(TaskDeferred):
        op.execute({"ti": ti})
    cluster.ssh(f"scancel {ti.xcom['slurm_job_id']}", check=False)
    history = MlflowClient(mlflow_server.url).get_metric_history(
        ti.xcom["mlflow_run_id"], "episode_return_mean"
    )
    assert sorted((m.step, m.value) for m in history) == [(1, 10.0), (2, 20.0), (3, 30.0)]


def test_tracking_server_from_an_airflow_connection(
    cluster: DevCluster,
    mlflow_server: MlflowServer,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """mlflow_conn_id alone: the URI comes from the connection, its password stays in it.

    The worker, the trigger and the completion each start without the
    credentials (as separate processes would) and read the connection again.
    """
    import json
    import uuid

    from mlflow.tracking import MlflowClient
    from slurm_ray.mlflow.hook import _CREDENTIALS, credentialed_uri

    from tests.faults.helpers import first_event, tap

    password = f"SRCANARYCONN{uuid.uuid4().hex[:12]}"
    monkeypatch.delenv("SLURM_RAY_MLFLOW_URI", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv(
        "AIRFLOW_CONN_MLFLOW_TEST",
        json.dumps(
            {
                "conn_type": "mlflow",
                "host": "127.0.0.1",
                "port": mlflow_server.port,
                "login": "sruser",
                "password": password,
            }
        ),
    )
    rows = "".join(
        json.dumps({"iteration": i, "episode_return_mean": 5.0 * i, "env_steps": 10 * i}) + "\n"
        for i in (1, 2, 3)
    )
    ti = FakeTI(task_id="connmlflow")
    op = make_op(
        cluster,
        ti.task_id,
        entrypoint=f'printf %s {shlex.quote(rows)} > "$SLURM_RAY_RUN_DIR/metrics.jsonl"',
        job_spec={"nodes": 1, "cpus_per_task": 1, "time": "5"},
        mlflow={"experiment_name": f"conn-{ti.run_id[8:16]}"},
        mlflow_conn_id="mlflow_test",
    )
    capfd.readouterr()
    op_log = tap(op)
    _CREDENTIALS.clear()
    with pytest.raises(TaskDeferred) as deferred:
        op.execute({"ti": ti})
    trigger = deferred.value.trigger
    trig_log = tap(trigger)
    kwargs_json = json.dumps(trigger.serialize(), default=str)
    _CREDENTIALS.clear()  # the triggerer: another process
    event = asyncio.run(first_event(trigger, 300))
    _CREDENTIALS.clear()  # the worker that runs execute_complete
    summary = op.execute_complete({"ti": ti}, event.payload, **(deferred.value.kwargs or {}))
    assert summary["state"] == "COMPLETED", summary
    assert ti.xcom["mlflow_tracking_uri"] == mlflow_server.url
    client = MlflowClient(mlflow_server.url)
    run_id = ti.xcom["mlflow_run_id"]
    history = client.get_metric_history(run_id, "episode_return_mean")
    assert sorted((m.step, m.value) for m in history) == [(1, 5.0), (2, 10.0), (3, 15.0)]
    assert credentialed_uri(mlflow_server.url, "mlflow_test") == (
        f"http://sruser:{password}@127.0.0.1:{mlflow_server.port}"
    )
    run = client.get_run(run_id)
    out = capfd.readouterr()
    places = {
        "operator log": op_log.text,
        "trigger log": trig_log.text,
        "stdout/stderr": out.out + out.err,
        "xcom": json.dumps(ti.xcom, default=str) + json.dumps(summary, default=str),
        "trigger kwargs": kwargs_json,
        "mlflow params": json.dumps(run.data.params),
        "mlflow tags": json.dumps(run.data.tags),
    }
    assert not [where for where, text in places.items() if password in text or "sruser" in text]
    assert '"conn_id": "mlflow_test"' in kwargs_json  # what the triggerer reads again


def test_completion_waits_for_the_tracking_server_then_sends_every_row(
    cluster: DevCluster, mlflow_server: MlflowServer, capfd: pytest.CaptureFixture[str]
) -> None:
    """MLflow is down for the whole job and for a while after: the completion waits (backoff)."""
    import json
    import threading

    from mlflow.tracking import MlflowClient

    from tests.faults.helpers import first_event

    rows = "".join(json.dumps({"iteration": i, "env_steps": 7 * i}) + "\n" for i in (1, 2, 3, 4))
    ti = FakeTI(task_id="waitmlflow")
    op = make_op(
        cluster,
        ti.task_id,
        entrypoint=f'printf %s {shlex.quote(rows)} > "$SLURM_RAY_RUN_DIR/metrics.jsonl"',
        job_spec={"nodes": 1, "cpus_per_task": 1, "time": "5"},
        mlflow={"tracking_uri": mlflow_server.url, "experiment_name": f"wait-{ti.run_id[8:16]}"},
        mlflow_wait_s=300,
    )
    with pytest.raises(TaskDeferred) as deferred:
        op.execute({"ti": ti})
    mlflow_server.stop()
    restarted = threading.Timer(8.0, mlflow_server.start)
    try:
        event = asyncio.run(first_event(deferred.value.trigger, 300))
        restarted.start()
        summary = op.execute_complete({"ti": ti}, event.payload, **(deferred.value.kwargs or {}))
    finally:
        restarted.join()
        mlflow_server.start()  # a no-op when it is up
    assert summary["state"] == "COMPLETED"
    out = capfd.readouterr()
    assert "does not answer" in out.out + out.err  # it waited (tenacity), logging each retry
    history = MlflowClient(mlflow_server.url).get_metric_history(
        ti.xcom["mlflow_run_id"], "env_steps"
    )
    assert sorted((m.step, m.value) for m in history) == [(1, 7.0), (2, 14.0), (3, 21.0), (4, 28.0)]
