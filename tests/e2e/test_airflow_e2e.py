"""The whole product with real Airflow: REST trigger → deferred Slurm job on two nodes → MLflow.

Airflow runs as `airflow standalone` (api-server, scheduler, dag-processor,
triggerer) in its own temp home and port, started and stopped by
scripts/airflow_local.sh; MLflow is the session's real server.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.airflow_fixtures import Airflow, trigger
from tests.conftest import DevCluster
from tests.mlflow_fixtures import MlflowServer

pytestmark = [pytest.mark.cluster, pytest.mark.e2e]


def test_bad_conf_is_refused_over_rest_naming_the_field(
    airflow: Airflow, cluster: DevCluster
) -> None:
    airflow.wait_dag("rllib_train")
    _, runs_before = airflow.call("GET", "/dags/rllib_train/dagRuns")
    for conf, field in (
        ({"nodes": "two"}, "nodes"),
        ({"nodes": 0}, "nodes"),
        ({"env_id": "NoSuchEnv-v0"}, "env_id"),
        ({"algorithm": "A3C"}, "algorithm"),
        ({"profile": "summit"}, "profile"),
        ({"lr": -1}, "lr"),
        ({"partition": "debug; touch /tmp/PWNED_e2e"}, "partition"),
    ):
        status, body = trigger(airflow, "rllib_train", conf)
        assert status == 400, (conf, status, body)
        assert field in json.dumps(body), (conf, body)
    _, runs_after = airflow.call("GET", "/dags/rllib_train/dagRuns")
    # No dag run, so no task and no job: only a task submits (the queue itself is
    # shared with other users and the other test lane, so it is not compared).
    assert runs_after["total_entries"] == runs_before["total_entries"]
    assert not Path("/tmp/PWNED_e2e").exists()


def test_train_dag_end_to_end(
    airflow: Airflow, cluster: DevCluster, mlflow_server: MlflowServer
) -> None:
    from mlflow.tracking import MlflowClient

    airflow.wait_dag("rllib_train")
    tag = uuid.uuid4().hex[:8]
    conf = {
        "stop_iterations": 4,
        "stop_return_mean": 450,
        "train_batch_size": 2000,
        "experiment_name": f"e2e-{tag}",
        "register_model_name": f"e2e-model-{tag}",
    }
    status, run = trigger(airflow, "rllib_train", conf)
    assert status == 200, run
    run_id = run["dag_run_id"]

    saw_deferred_with_job_running = False
    deadline = time.monotonic() + 900
    state = run["state"]
    while state not in ("success", "failed") and time.monotonic() < deadline:
        ti = airflow.ti("rllib_train", run_id, "train")
        if ti.get("state") == "deferred" and not saw_deferred_with_job_running:
            status, xcom = airflow.call(
                "GET",
                f"/dags/rllib_train/dagRuns/{run_id}/taskInstances/train/xcomEntries/slurm_job_id",
            )
            if status == 200:
                job_id = str(xcom["value"]).strip('"')
                q = cluster.ssh(f"squeue -h -j {job_id} -o '%T %N'", check=False).stdout.split()
                if q and q[0] == "RUNNING":
                    assert q[1] == "n[1-2]", q
                    saw_deferred_with_job_running = True
        time.sleep(1)
        state = airflow.call("GET", f"/dags/rllib_train/dagRuns/{run_id}")[1]["state"]
    assert state == "success", {
        t: airflow.ti("rllib_train", run_id, t).get("state")
        for t in ("resolve", "build_env", "sanity_check", "train", "register_model", "promote")
    }
    assert saw_deferred_with_job_running, "train was never seen deferred while its job ran on n1,n2"

    def xcom(task: str, key: str = "return_value") -> Any:
        _, body = airflow.call(
            "GET", f"/dags/rllib_train/dagRuns/{run_id}/taskInstances/{task}/xcomEntries/{key}"
        )
        value = body["value"]
        return json.loads(value) if isinstance(value, str) and value[:1] in "{[" else value

    summary = xcom("train")
    client = MlflowClient(mlflow_server.url)
    mlrun = client.get_run(summary["mlflow_run_id"])
    history = client.get_metric_history(mlrun.info.run_id, "episode_return_mean")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]
    assert mlrun.data.params["algorithm"] == "PPO"
    registered = xcom("register_model")
    version = client.get_model_version(f"e2e-model-{tag}", str(registered["model_version"]))
    assert version.run_id == mlrun.info.run_id
    assert xcom("promote")["promoted"] is True  # first version becomes champion

    _, links = airflow.call("GET", f"/dags/rllib_train/dagRuns/{run_id}/taskInstances/train/links")
    flat = json.dumps(links)
    assert str(summary["job_id"]) in flat
    assert mlrun.info.run_id in flat and mlflow_server.url in flat

    # The connection carries its secrets inline (tests/airflow_fixtures.py): none
    # is in Airflow's own task-log files or in any XCom the REST API serves.
    leaks, log_files, xcoms = airflow.leaked_secrets("rllib_train", run_id)
    assert log_files >= 6 and xcoms >= 6, (log_files, xcoms)  # there was something to read
    assert not leaks, leaks


# Four single-CPU jobs: the dev cluster's 2 nodes x 4 cores (CR_Core) hold eight
# at once, so all four run together even beside another test's job.
SWEEP_CONFIGS = [
    {"lr": 0.0003, "seed": 1},
    {"lr": 0.001, "seed": 2},
    {"lr": 0.0005, "seed": 3},
    {"lr": 0.002, "seed": 4},
]


def test_sweep_four_configs_train_concurrently(
    airflow: Airflow, cluster: DevCluster, mlflow_server: MlflowServer
) -> None:
    """The sweep's four `train` tasks are active, and their four Slurm jobs RUNNING, at once."""
    from mlflow.tracking import MlflowClient

    airflow.wait_dag("rllib_sweep")
    tag = uuid.uuid4().hex[:8]
    conf = {
        "configs": SWEEP_CONFIGS,
        "nodes": 1,
        "cpus_per_node": 1,
        "num_env_runners": 0,
        "envs_per_runner": 2,
        "stop_iterations": 2,
        "train_batch_size": 500,
        "experiment_name": f"sweep-{tag}",
        "register_model_name": f"sweep-model-{tag}",
        "promotion_metric": "return_per_node_hour",
    }
    status, run = trigger(airflow, "rllib_sweep", conf)
    assert status == 200, run
    run_id = run["dag_run_id"]
    base = f"/dags/rllib_sweep/dagRuns/{run_id}"

    jobs: dict[int, str] = {}
    concurrent: list[str] = []
    state = run["state"]
    deadline = time.monotonic() + 900
    while state not in ("success", "failed") and time.monotonic() < deadline:
        _, mapped = airflow.call("GET", f"{base}/taskInstances/train/listMapped")
        tis = mapped.get("task_instances", [])
        active = {t["map_index"] for t in tis if t["state"] in ("running", "deferred")}
        for i in active - jobs.keys():
            code, body = airflow.call(
                "GET", f"{base}/taskInstances/train/xcomEntries/slurm_job_id?map_index={i}"
            )
            if code == 200:
                jobs[i] = str(body["value"]).strip('"')
        if not concurrent and len(active) == 4 and active <= jobs.keys():
            # One squeue is one snapshot of the controller: all four at the same moment.
            ids = ",".join(jobs[i] for i in sorted(active))
            out = cluster.ssh(f"squeue -h -j {ids} -o '%i %T'", check=False).stdout.split()
            if out[1::2] == ["RUNNING"] * 4:
                concurrent = out
        time.sleep(1)
        state = airflow.call("GET", base)[1]["state"]
    assert state == "success", airflow.call("GET", f"{base}/taskInstances")[1]
    assert concurrent, f"the four train jobs were never RUNNING at the same moment: {jobs}"

    client = MlflowClient(mlflow_server.url)
    exp = client.get_experiment_by_name(f"sweep-{tag}")
    runs = client.search_runs([exp.experiment_id])
    children = [r for r in runs if r.data.params.get("lr")]
    assert len(children) == 4, [r.info.run_name for r in runs]
    assert client.get_registered_model(f"sweep-model-{tag}").latest_versions
    parents = [r for r in runs if "slurm_ray.best_run_id" in r.data.tags]
    assert parents and parents[0].data.tags["slurm_ray.best_run_id"] in {
        r.info.run_id for r in children
    }
    # What each job cost, from Slurm accounting; the best and the champion by return per node-hour
    for child in children:
        m = child.data.metrics
        assert m["slurm.nodes"] == 1 and m["slurm.node_hours"] > 0, m
        # > 1 is possible here: without task/cgroup, torch's threads may outrun 1 CPU
        assert m["slurm.cpu_efficiency"] > 0, m
    assert "best.return_per_node_hour" in parents[0].data.metrics
    best = client.get_run(parents[0].data.tags["slurm_ray.best_run_id"])
    assert best.data.tags["slurm_ray.promotion.metric"] == "return_per_node_hour"
    assert best.data.metrics["promotion.new"] == pytest.approx(
        best.data.metrics["eval_return_mean"] / best.data.metrics["slurm.node_hours"]
    )
