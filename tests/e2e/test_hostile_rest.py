"""Issue 11, section 3 over REST: hostile confs get HTTP 400 naming the field; no run exists.

Trailing newlines, floats and bools for integers, lists for strings, `module:`
env ids, and the same inside the sweep's per-configuration overrides, sent to
the real Airflow API server the way a user (or a script) would.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.airflow_fixtures import Airflow, trigger
from tests.conftest import DevCluster
from tests.mlflow_fixtures import MlflowServer

pytestmark = [pytest.mark.cluster, pytest.mark.e2e]

TRAIN: list[tuple[dict[str, Any], str]] = [
    ({"partition": "debug\n"}, "partition"),
    ({"account": "proj\n"}, "account"),
    ({"time_limit": "00:30:00\n"}, "time_limit"),
    ({"experiment_name": "rllib_train\n"}, "experiment_name"),
    ({"register_model_name": "rllib-cartpole\n"}, "register_model_name"),
    ({"nodes": 2.5}, "nodes"),
    ({"nodes": True}, "nodes"),
    ({"seed": 1.5}, "seed"),
    ({"stop_iterations": False}, "stop_iterations"),
    ({"partition": ["debug"]}, "partition"),
    ({"experiment_name": ["x"]}, "experiment_name"),
    ({"env_id": "os:Evil-v0"}, "env_id"),
    ({"env_id": "CartPole-v1\n"}, "env_id"),
]
SWEEP: list[tuple[dict[str, Any], str]] = [
    ({"configs": [{"lr": 0.001}, {"nodes": 2.9}]}, "nodes"),
    ({"configs": [{"nodes": True}]}, "nodes"),
    ({"configs": [{"lr": "0.1"}]}, "lr"),
    ({"configs": [{"env_id": "os:Evil-v0"}]}, "env_id"),
    ({"configs": [{"partition": "x\n"}]}, "partition"),
    ({"configs": [{"profile": "local"}]}, "profile"),
    ({"configs": ["lr=0.1"]}, "configs"),
]


def test_hostile_confs_refused_over_rest_and_no_run_created(
    airflow: Airflow, cluster: DevCluster, mlflow_server: MlflowServer
) -> None:
    from mlflow import MlflowClient

    for dag_id, cases in (("rllib_train", TRAIN), ("rllib_sweep", SWEEP)):
        airflow.wait_dag(dag_id)
        _, before = airflow.call("GET", f"/dags/{dag_id}/dagRuns")
        for conf, field in cases:
            status, body = trigger(airflow, dag_id, conf)
            assert status == 400, (dag_id, conf, status, body)
            assert field in json.dumps(body), (dag_id, conf, body)
        _, after = airflow.call("GET", f"/dags/{dag_id}/dagRuns")
        assert after["total_entries"] == before["total_entries"], dag_id
    client = MlflowClient(tracking_uri=mlflow_server.url)
    for name in ("rllib_train\n", "rllib_train\\n"):
        assert client.get_experiment_by_name(name) is None
