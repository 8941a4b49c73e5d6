"""SlurmRayOperator against the real local cluster, through the real sshd.

The operator is driven the way Airflow drives it (execute → TaskDeferred →
trigger.run() → execute_complete); the context's task instance is a small
stand-in because only its identity and xcom_push are used.
"""

from __future__ import annotations

import asyncio
import json
import shlex
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.conftest import DevCluster

pytestmark = pytest.mark.cluster

ALIVE = (
    'python -c \'import os, ray; ray.init(address=os.environ["RAY_ADDRESS"]); '
    'alive=[n for n in ray.nodes() if n["Alive"]]; '
    'print("ALIVE_NODES", len(alive), sorted(n["NodeManagerHostname"] for n in alive))\''
)


@dataclass
class FakeTI:
    task_id: str
    dag_id: str = "test_slurm_ray"
    run_id: str = field(default_factory=lambda: f"manual__{uuid.uuid4().hex[:8]}:00+00:00")
    map_index: int = -1
    try_number: int = 1
    xcom: dict[str, Any] = field(default_factory=dict)

    def xcom_push(self, key: str, value: Any) -> None:
        self.xcom[key] = value


def make_op(cluster: DevCluster, task_id: str, **kwargs: Any):
    from slurm_ray import SlurmRayOperator

    params: dict[str, Any] = dict(
        task_id=task_id,
        ssh_conn_id="slurm_dev",
        remote_base_dir=f"{cluster.scratch}/tests/runs",
        job_spec={"nodes": 2, "cpus_per_task": 1, "time": "10"},
        environment={"kind": "venv", "prefix": str(cluster.venv)},
        poll_interval=1.0,
        deferrable=True,
    )
    params.update(kwargs)
    return SlurmRayOperator(**params)


def run_deferred(op, context: dict[str, Any], *, timeout: float = 300) -> Any:
    """execute → trigger.run() → execute_complete, as the triggerer would."""
    from airflow.sdk.exceptions import TaskDeferred

    try:
        return op.execute(context)
    except TaskDeferred as deferred:
        trigger = deferred.trigger

        async def first_event():
            async for event in trigger.run():
                return event
            raise AssertionError("trigger ended without an event")

        event = asyncio.run(asyncio.wait_for(first_event(), timeout))
        return getattr(op, deferred.method_name)(context, event.payload, **(deferred.kwargs or {}))


def wait_job_gone(cluster: DevCluster, job_id: str, timeout: float = 15) -> str:
    """Poll squeue until the job is no longer active; returns its last active state ('' if gone)."""
    deadline = time.monotonic() + timeout
    active = ""
    while time.monotonic() < deadline:
        active = cluster.ssh(
            f"squeue -h -j {job_id} -t PD,R,CG,CF -o %T", check=False
        ).stdout.strip()
        if not active:
            break
        time.sleep(0.5)
    return active


def squeue_names(cluster: DevCluster) -> list[str]:
    return cluster.ssh("squeue -h -o '%i %j %T'").stdout.split("\n")


def test_two_node_ray_cluster_entrypoint_succeeds(cluster: DevCluster) -> None:
    op = make_op(cluster, "alive", entrypoint=ALIVE)
    ti = FakeTI(task_id="alive")
    summary = run_deferred(op, {"ti": ti})
    assert summary["state"] == "COMPLETED"
    job_id = ti.xcom["slurm_job_id"]
    run_dir = ti.xcom["run_dir"]
    assert summary["job_id"] == job_id and summary["run_dir"] == run_dir
    assert "/test_slurm_ray/" in run_dir and run_dir.endswith("/alive/try_1")
    log = cluster.ssh(f"cat {shlex.quote(run_dir)}/slurm-{job_id}.out").stdout
    assert "ALIVE_NODES 2 ['n1', 'n2']" in log
    # the rendered script is kept for audit
    script = cluster.ssh(f"cat {shlex.quote(run_dir)}/job.sbatch").stdout
    assert "#SBATCH --nodes=2" in script and "ray_launch.sh" in script


def test_non_deferrable_mode_polls_in_execute(cluster: DevCluster) -> None:
    op = make_op(cluster, "alive_sync", entrypoint=ALIVE, deferrable=False)
    ti = FakeTI(task_id="alive_sync")
    summary = op.execute({"ti": ti})
    assert summary["state"] == "COMPLETED"


def test_failing_entrypoint_fails_with_log_tail(cluster: DevCluster) -> None:
    from airflow.sdk.exceptions import AirflowException

    op = make_op(
        cluster,
        "fails",
        entrypoint="echo 'about to fail: marker-xyz'; exit 7",
        job_spec={"nodes": 2, "time": "5"},
    )
    with pytest.raises(AirflowException) as err:
        run_deferred(op, {"ti": FakeTI(task_id="fails")})
    msg = str(err.value)
    assert "FAILED" in msg and "marker-xyz" in msg and "7" in msg


def test_time_limit_gives_timeout_error(cluster: DevCluster) -> None:
    from airflow.sdk.exceptions import AirflowException

    op = make_op(
        cluster,
        "too_long",
        entrypoint="sleep 600",
        job_spec={"nodes": 1, "time": "1"},
        checkpoint_signal_s=0,
    )
    started = time.monotonic()
    with pytest.raises(AirflowException) as err:
        run_deferred(op, {"ti": FakeTI(task_id="too_long")}, timeout=240)
    assert "TIMEOUT" in str(err.value)
    assert time.monotonic() - started < 200


def test_rerun_reattaches_instead_of_submitting_twice(cluster: DevCluster) -> None:
    from airflow.sdk.exceptions import TaskDeferred

    ti = FakeTI(task_id="reattach")
    op = make_op(cluster, "reattach", entrypoint="sleep 60", job_spec={"nodes": 1, "time": "5"})
    with pytest.raises(TaskDeferred):
        op.execute({"ti": ti})
    first = ti.xcom["slurm_job_id"]
    ti2 = FakeTI(task_id="reattach", run_id=ti.run_id)
    op2 = make_op(cluster, "reattach", entrypoint="sleep 60", job_spec={"nodes": 1, "time": "5"})
    try:
        with pytest.raises(TaskDeferred) as deferred:
            op2.execute({"ti": ti2})
        assert deferred.value.trigger.job_id == first
        mine = next(line for line in squeue_names(cluster) if line.startswith(first + " "))
        name = mine.split()[1]
        same = [line for line in squeue_names(cluster) if f" {name} " in f" {line} "]
        assert len(same) == 1, same
    finally:
        cluster.ssh(f"scancel {first}")


def test_trigger_on_kill_cancels_deferred_job(cluster: DevCluster) -> None:
    from airflow.sdk.exceptions import TaskDeferred

    ti = FakeTI(task_id="killme")
    op = make_op(cluster, "killme", entrypoint="sleep 300", job_spec={"nodes": 2, "time": "10"})
    with pytest.raises(TaskDeferred) as deferred:
        op.execute({"ti": ti})
    job_id = ti.xcom["slurm_job_id"]
    trigger = deferred.value.trigger

    async def watch_then_kill():
        gen = trigger.run()
        task = asyncio.ensure_future(gen.__anext__())
        await asyncio.sleep(3)
        await trigger.on_kill()
        return await asyncio.wait_for(task, 30)

    started = time.monotonic()
    event = asyncio.run(watch_then_kill())
    assert event.payload["state"] == "CANCELLED"
    active = wait_job_gone(cluster, job_id)
    assert not active, active
    assert time.monotonic() - started < 40


def test_operator_on_kill_cancels_in_non_deferrable_mode(cluster: DevCluster) -> None:
    ti = FakeTI(task_id="killsync")
    op = make_op(cluster, "killsync", entrypoint="sleep 300", deferrable=False)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            op.execute({"ti": ti})
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while "slurm_job_id" not in ti.xcom and time.monotonic() < deadline:
        time.sleep(0.2)
    job_id = ti.xcom["slurm_job_id"]
    op.on_kill()
    active = wait_job_gone(cluster, job_id)
    assert not active
    thread.join(30)
    assert not thread.is_alive(), "execute did not return after its job was cancelled"
    # Failing for its own reason while the job is cancelled by on_kill is not enough.
    assert len(errors) == 1 and "CANCELLED" in str(errors[0]), errors


def test_wrong_host_key_is_refused_before_any_command(cluster: DevCluster, monkeypatch) -> None:
    from slurm_ray.hooks.slurm import HostKeyError

    conn = json.loads(cluster.env["AIRFLOW_CONN_SLURM_DEV"])
    # a valid ed25519 key that is not the server's
    conn["extra"]["host_key"] = (
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"
    )
    monkeypatch.setenv("AIRFLOW_CONN_SLURM_BADKEY", json.dumps(conn))
    marker = f"{cluster.scratch}/tests/badkey-{uuid.uuid4().hex[:8]}"
    op = make_op(
        cluster, "badkey", ssh_conn_id="slurm_badkey", remote_base_dir=marker, entrypoint="true"
    )
    with pytest.raises(HostKeyError) as err:
        op.execute({"ti": FakeTI(task_id="badkey")})
    assert "host key" in str(err.value).lower()
    assert cluster.ssh(f"test -e {shlex.quote(marker)}", check=False).returncode != 0


def test_two_jobs_share_the_nodes_without_collisions(cluster: DevCluster) -> None:
    """Two Ray clusters on the same two nodes at once: a rendezvous proves the overlap."""
    from airflow.sdk.exceptions import TaskDeferred

    rdv = cluster.new_dir("rdv")
    # Each job, once its Ray cluster answered, leaves a marker and waits for the
    # other's: both print RENDEZVOUS_OK only if both clusters were up together.
    rendezvous = (
        f"{ALIVE} && touch {rdv}/ready-$SLURM_JOB_ID && "
        f"for i in $(seq 450); do [ $(ls {rdv} | wc -l) -ge 2 ] && "
        "{ echo RENDEZVOUS_OK; exit 0; }; sleep 0.2; done; echo no rendezvous; exit 1"
    )
    ops = []
    for i in range(2):
        ti = FakeTI(task_id=f"pair{i}")
        op = make_op(
            cluster,
            f"pair{i}",
            entrypoint=rendezvous,
            job_spec={"nodes": 2, "cpus_per_task": 1, "time": "10"},
        )
        with pytest.raises(TaskDeferred) as deferred:
            op.execute({"ti": ti})
        ops.append((op, ti, deferred.value))

    async def both():
        async def one(d):
            async for event in d.trigger.run():
                return event

        return await asyncio.wait_for(asyncio.gather(*(one(d) for _, _, d in ops)), 300)

    events = asyncio.run(both())
    for (op, ti, d), event in zip(ops, events, strict=True):
        summary = op.execute_complete({"ti": ti}, event.payload, **d.kwargs)
        assert summary["state"] == "COMPLETED"
        log = cluster.ssh(f"cat {ti.xcom['run_dir']}/slurm-{ti.xcom['slurm_job_id']}.out").stdout
        assert "ALIVE_NODES 2" in log
        assert "RENDEZVOUS_OK" in log, log
