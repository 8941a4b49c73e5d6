"""RLlib training through SlurmRayOperator on the two real nodes: learning, metrics, resume."""

from __future__ import annotations

import json
import pwd
import shlex
import time
from pathlib import Path

import pytest
from airflow.sdk.exceptions import AirflowException, TaskDeferred

from tests.cluster.test_operator import FakeTI, make_op, run_deferred
from tests.conftest import DevCluster
from tests.faults.helpers import jobs_ever

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def read_json(cluster: DevCluster, path: str) -> dict:
    return json.loads(cluster.ssh(f"cat {shlex.quote(path)}").stdout)


def metrics_rows(cluster: DevCluster, run_dir: str) -> list[dict]:
    text = cluster.ssh(f"cat {shlex.quote(run_dir)}/metrics.jsonl").stdout
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_ppo_learns_on_both_nodes(cluster: DevCluster) -> None:
    config = {
        "algorithm": "PPO",
        "env_id": "CartPole-v1",
        "num_env_runners": 2,
        "num_envs_per_env_runner": 8,
        "train_batch_size": 4000,
        "seed": 3,
        "stop": {"return_mean": 150, "iterations": 40, "minutes": 8},
        "checkpoint_every": 5,
        "eval_episodes": 3,
    }
    op = make_op(
        cluster,
        "ppo",
        config=config,
        job_spec={"nodes": 2, "cpus_per_task": 4, "time": "15"},
        poll_interval=2,
    )
    ti = FakeTI(task_id="ppo")
    summary = run_deferred(op, {"ti": ti}, timeout=900)
    run_dir = ti.xcom["run_dir"]
    result = read_json(cluster, f"{run_dir}/result.json")
    assert result["status"] == "succeeded"
    assert result["episode_return_mean"] >= 150, result["episode_return_mean"]
    assert summary["episode_return_mean"] == result["episode_return_mean"]
    # one metrics line per iteration, in order
    rows = metrics_rows(cluster, run_dir)
    assert [r["iteration"] for r in rows] == list(range(1, result["iterations"] + 1))
    assert all(r["env_steps_per_s"] > 0 for r in rows)
    # env runners spread over both nodes of the allocation
    assert set(result["env_runner_hostnames"]) == {"n1", "n2"}, result["env_runner_hostnames"]
    assert result["ray_nodes"] == 2
    # the RLModule checkpoint for serving exists
    cluster.ssh(f"test -d {shlex.quote(result['rl_module_checkpoint'])}")


def rllib_dirs() -> set[Path]:
    """RLlib log dirs of the job user left in /tmp (the nodes' /tmp is this machine's)."""
    uid = pwd.getpwnam("slurmray").pw_uid
    return {p for p in Path("/tmp").glob("rs-rllib-*") if p.stat().st_uid == uid}


def test_retry_resumes_from_checkpoint_of_cancelled_try(cluster: DevCluster) -> None:
    config = {
        "num_env_runners": 1,
        "num_envs_per_env_runner": 4,
        "train_batch_size": 1000,
        "minibatch_size": 250,
        "num_epochs": 2,
        "stop": {"iterations": 15, "minutes": 8},
        "checkpoint_every": 1,
        "keep_checkpoints": 20,
        "eval_episodes": 1,
    }
    spec = {"nodes": 2, "cpus_per_task": 1, "time": "15"}
    before = rllib_dirs()
    ti1 = FakeTI(task_id="resume")
    op1 = make_op(cluster, "resume", config=config, job_spec=spec)
    with pytest.raises(TaskDeferred):
        op1.execute({"ti": ti1})
    job1, run_dir1 = ti1.xcom["slurm_job_id"], ti1.xcom["run_dir"]
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        found = cluster.ssh(f"ls {shlex.quote(run_dir1)}/checkpoints 2>/dev/null", check=False)
        if "iter_000002" in found.stdout:
            break
        state = cluster.ssh(f"squeue -h -j {job1} -o %T", check=False).stdout.strip()
        if state not in ("PENDING", "RUNNING", "CONFIGURING"):
            log = cluster.ssh(f"tail -30 {shlex.quote(run_dir1)}/slurm-{job1}.out", check=False)
            pytest.fail(f"job {job1} ended ({state}) before checkpointing:\n{log.stdout}")
        time.sleep(1)
    else:
        pytest.fail("no checkpoint of iteration 2 appeared")
    cluster.ssh(f"scancel {job1}")
    time.sleep(2)

    # The task's retry: a new try in its own run directory.
    ti2 = FakeTI(task_id="resume", run_id=ti1.run_id, try_number=2)
    op2 = make_op(cluster, "resume", config=config, job_spec=spec)
    run_deferred(op2, {"ti": ti2}, timeout=900)
    run_dir2 = ti2.xcom["run_dir"]
    assert run_dir2.endswith("/try_2")
    result = read_json(cluster, f"{run_dir2}/result.json")
    assert result["resumed_from"], result
    rows = metrics_rows(cluster, run_dir2)
    first = rows[0]["iteration"]
    assert first >= 3, "the retry started from scratch instead of the checkpoint"
    assert rows[-1]["iteration"] == result["iterations"] == 15
    # Neither the cancelled try nor the finished one left a dir in the node's
    # /tmp (a cancelled job's train.py never reaches its own cleanup).
    assert rllib_dirs() - before == set()


def test_bad_config_is_refused_before_submission(cluster: DevCluster) -> None:
    # Its own run root: other users' (and the other test lane's) jobs come and go.
    base = cluster.new_dir("badcfg")
    op = make_op(cluster, "badcfg", config={"algorithm": "A3C"}, remote_base_dir=base)
    with pytest.raises(AirflowException, match="algorithm"):
        op.execute({"ti": FakeTI(task_id="badcfg")})
    op = make_op(cluster, "badcfg2", config={"lr": -1}, remote_base_dir=base)
    with pytest.raises(AirflowException, match="lr"):
        op.execute({"ti": FakeTI(task_id="badcfg2")})
    op = make_op(
        cluster,
        "badspec",
        entrypoint="true",
        job_spec={"nodes": 2, "partiton": "x"},
        remote_base_dir=base,
    )
    with pytest.raises(AirflowException, match="valid parameters are"):
        op.execute({"ti": FakeTI(task_id="badspec")})
    assert jobs_ever(cluster, workdir=base) == set()
