"""Issue 15's capabilities as a user runs them: DAGs triggered over Airflow's REST API.

The GPU learner job (a heterogeneous Slurm job: learner on the `gpu` partition's
node, env runners on the other) through `rllib_train`, and a Ray Tune sweep in
one allocation through `rllib_tune`, each to its registered model in MLflow.
"""

from __future__ import annotations

import json
import shlex
import time
import uuid
from typing import Any

import pytest

from tests.airflow_fixtures import Airflow, trigger
from tests.conftest import DevCluster
from tests.mlflow_fixtures import MlflowServer

pytestmark = [pytest.mark.cluster, pytest.mark.e2e, pytest.mark.slow]


def run_to_success(airflow: Airflow, dag_id: str, conf: dict[str, Any], tasks: list[str]) -> str:
    airflow.wait_dag(dag_id)
    status, run = trigger(airflow, dag_id, conf)
    assert status == 200, run
    run_id = run["dag_run_id"]
    deadline = time.monotonic() + 900
    state = run["state"]
    while state not in ("success", "failed") and time.monotonic() < deadline:
        time.sleep(2)
        state = airflow.call("GET", f"/dags/{dag_id}/dagRuns/{run_id}")[1]["state"]
    assert state == "success", {t: airflow.ti(dag_id, run_id, t).get("state") for t in tasks}
    return run_id


def xcom(airflow: Airflow, dag_id: str, run_id: str, task: str, key: str = "return_value") -> Any:
    _, body = airflow.call(
        "GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task}/xcomEntries/{key}"
    )
    value = body["value"]
    return json.loads(value) if isinstance(value, str) and value[:1] in "{[" else value


def test_gpu_learner_hetjob_through_rllib_train(
    airflow: Airflow, cluster: DevCluster, mlflow_server: MlflowServer
) -> None:
    from mlflow.tracking import MlflowClient

    tag = uuid.uuid4().hex[:8]
    conf = {
        "nodes": 1,
        "cpus_per_node": 3,
        "learner_gpus": 2,
        "gpu_partition": "gpu",
        "gpu_cpus": 2,
        "stop_iterations": 2,
        "stop_return_mean": 450,
        "train_batch_size": 1000,
        "experiment_name": f"e2e-het-{tag}",
        "register_model_name": f"e2e-het-{tag}",
    }
    run_id = run_to_success(
        airflow, "rllib_train", conf, ["resolve", "build_env", "sanity_check", "train"]
    )
    run_dir = str(xcom(airflow, "rllib_train", run_id, "train", "run_dir")).strip('"')
    script = cluster.ssh(f"cat {shlex.quote(run_dir)}/job.sbatch").stdout
    assert script.count("#SBATCH hetjob") == 1 and "#SBATCH --gres=gpu:2" in script
    assert "#SBATCH --partition=gpu" in script
    result = json.loads(cluster.ssh(f"cat {shlex.quote(run_dir)}/result.json").stdout)
    assert result["ray_gpus"] == 2
    assert result["learner_hostnames"] == ["n1"], result
    assert result["env_runner_hostnames"] == ["n2"], result
    summary = xcom(airflow, "rllib_train", run_id, "train")
    client = MlflowClient(mlflow_server.url)
    history = client.get_metric_history(summary["mlflow_run_id"], "episode_return_mean")
    assert sorted(m.step for m in history) == [1, 2]
    registered = xcom(airflow, "rllib_train", run_id, "register_model")
    version = client.get_model_version(f"e2e-het-{tag}", str(registered["model_version"]))
    assert version.run_id == summary["mlflow_run_id"]


def test_tune_sweep_in_one_job_through_rllib_tune(
    airflow: Airflow, cluster: DevCluster, mlflow_server: MlflowServer
) -> None:
    from mlflow.tracking import MlflowClient

    tag = uuid.uuid4().hex[:8]
    conf = {
        "search": {"lr": {"grid": [0.0003, 0.003]}},
        "num_samples": 1,
        "scheduler": "fifo",
        "nodes": 1,
        "cpus_per_node": 2,
        "stop_iterations": 2,
        "stop_return_mean": 450,
        "train_batch_size": 1000,
        "experiment_name": f"e2e-tune-{tag}",
        "register_model_name": f"e2e-tune-{tag}",
    }
    run_id = run_to_success(
        airflow, "rllib_tune", conf, ["resolve", "build_env", "sanity_check", "tune"]
    )
    job_id = str(xcom(airflow, "rllib_tune", run_id, "tune", "slurm_job_id")).strip('"')
    # one Slurm job for the whole sweep
    jobs = cluster.ssh(f"sacct -n -X -P -j {shlex.quote(job_id)} -o JobID,State").stdout.split()
    assert jobs == [f"{job_id}|COMPLETED"], jobs
    summary = xcom(airflow, "rllib_tune", run_id, "tune")
    parent = summary["mlflow_run_id"]
    client = MlflowClient(mlflow_server.url)
    exp = client.get_experiment_by_name(f"e2e-tune-{tag}").experiment_id
    trials = client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    assert len(trials) == 2, [t.info.run_name for t in trials]
    assert sorted(float(t.data.params["lr"]) for t in trials) == [0.0003, 0.003]
    for trial in trials:
        steps = client.get_metric_history(trial.info.run_id, "episode_return_mean")
        assert sorted(m.step for m in steps) == [1, 2], trial.info.run_name
        assert trial.info.status == "FINISHED"
    best = xcom(airflow, "rllib_tune", run_id, "register_best")
    assert best["slurm_ray.best_trial_run_id"] in {t.info.run_id for t in trials}
    version = client.get_model_version(f"e2e-tune-{tag}", str(best["model_version"]))
    assert version.run_id == parent
    assert xcom(airflow, "rllib_tune", run_id, "promote")["promoted"] is True
