"""Issue 11, section 3: hostile payloads are refused before anything reaches the cluster.

Each payload class goes through the real entry point it would use (the
operators, with the real sshd and MLflow server behind them; the Params and
sweep planning the DAG tasks call); each is refused with the field named, and
afterwards there is no run directory, no Slurm job and no MLflow experiment.
The REST half (HTTP 400 at trigger time) is tests/e2e/test_hostile_rest.py.
"""

from __future__ import annotations

import json
import shlex
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from tests.cluster.test_operator import FakeTI, make_op
from tests.conftest import DevCluster

pytestmark = pytest.mark.cluster

UNSAFE_EXTRAS = (
    {"no_host_key_check": True},
    {"allow_host_key_change": True},
    {"known_hosts": "none"},
)


def _unsafe_conn(cluster: DevCluster, monkeypatch: pytest.MonkeyPatch, extra: dict) -> str:
    """The dev cluster's own connection (key pinned) plus one unsafe extra."""
    conn = json.loads(cluster.env["AIRFLOW_CONN_SLURM_DEV"])
    conn_id = f"sr_unsafe_{uuid.uuid4().hex[:6]}"
    monkeypatch.setenv(
        f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps({**conn, "extra": {**conn["extra"], **extra}})
    )
    return conn_id


def _expect_nothing_created(
    cluster: DevCluster,
    mlflow_server: Any,
    field: str,
    make: Callable[[str, str], Any],
) -> None:
    """``make(base_dir, experiment)`` builds the task; executing it must fail naming ``field``."""
    from mlflow import MlflowClient
    from slurm_ray.operators.identity import run_identity

    base = cluster.new_dir("refused")
    experiment = f"refused-{uuid.uuid4().hex[:10]}"
    task = make(base, experiment)
    ti = FakeTI(task_id=task.task_id)
    with pytest.raises(Exception, match=field) as info:
        task.execute({"ti": ti})
    assert "Traceback" not in str(info.value)
    assert cluster.ssh(f"ls -A {shlex.quote(base)}").stdout.strip() == "", "a run dir was made"
    job_name, _ = run_identity(ti.dag_id, ti.run_id, ti.task_id, -1, 1)
    jobs = cluster.ssh(f"squeue -h -t all --name={shlex.quote(job_name)} -o %i").stdout
    assert not jobs.strip(), jobs
    assert MlflowClient(tracking_uri=mlflow_server.url).get_experiment_by_name(experiment) is None


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"env_id": "os:Evil-v0"}, r"config\.env_id: .*not allowed"),
        ({"env_id": "CartPole-v1\n"}, r"config\.env_id"),
        ({"num_env_runners": 2.5}, r"config\.num_env_runners"),
        ({"seed": True}, r"config\.seed"),
        ({"hidden_sizes": "64,64"}, r"config\.hidden_sizes"),
    ],
)
def test_training_operator_refuses_config_payloads(
    cluster: DevCluster, mlflow_server, config: dict[str, Any], field: str
) -> None:
    _expect_nothing_created(
        cluster,
        mlflow_server,
        field,
        lambda base, exp: make_op(
            cluster,
            "refused_cfg",
            remote_base_dir=base,
            config={"stop": {"iterations": 1}, **config},
            mlflow={"tracking_uri": mlflow_server.url, "experiment_name": exp},
        ),
    )


@pytest.mark.parametrize(
    ("env_vars", "field"),
    [({"A B": "1"}, r"env_vars"), ({"TOKEN": "a\0b"}, r"env_vars\['TOKEN'\]")],
)
def test_training_operator_refuses_env_var_payloads(
    cluster: DevCluster, mlflow_server, env_vars: dict[str, str], field: str
) -> None:
    _expect_nothing_created(
        cluster,
        mlflow_server,
        field,
        lambda base, exp: make_op(
            cluster,
            "refused_env",
            remote_base_dir=base,
            entrypoint="true",
            env_vars=env_vars,
            mlflow={"tracking_uri": mlflow_server.url, "experiment_name": exp},
        ),
    )


@pytest.mark.parametrize("extra", UNSAFE_EXTRAS, ids=lambda e: next(iter(e)))
def test_every_operator_refuses_host_key_disabling_extras(
    cluster: DevCluster, mlflow_server, monkeypatch: pytest.MonkeyPatch, extra: dict
) -> None:
    from slurm_ray import ClusterEnvOperator, GymSanityCheckOperator

    name = next(iter(extra))
    conn_id = _unsafe_conn(cluster, monkeypatch, extra)
    _expect_nothing_created(
        cluster,
        mlflow_server,
        name,
        lambda base, exp: make_op(
            cluster,
            "refused_hk",
            ssh_conn_id=conn_id,
            remote_base_dir=base,
            entrypoint="true",
            mlflow={"tracking_uri": mlflow_server.url, "experiment_name": exp},
        ),
    )
    _expect_nothing_created(
        cluster,
        mlflow_server,
        name,
        lambda base, exp: ClusterEnvOperator(
            task_id="refused_env_build",
            ssh_conn_id=conn_id,
            environment={"kind": "venv", "prefix": f"{base}/venv", "python": "/usr/bin/python3"},
            spec_path=__file__,
            extra_env={"TOKEN": "s3cret"},
        ),
    )
    _expect_nothing_created(
        cluster,
        mlflow_server,
        name,
        lambda base, exp: GymSanityCheckOperator(
            task_id="refused_sanity",
            ssh_conn_id=conn_id,
            environment={"kind": "venv", "prefix": str(cluster.venv)},
            remote_dir=f"{base}/sanity",
        ),
    )


@pytest.mark.parametrize("env_id", ["os:Evil-v0", "CartPole-v1\n"])
def test_sanity_check_refuses_env_id_payloads(cluster: DevCluster, mlflow_server, env_id) -> None:
    from slurm_ray import GymSanityCheckOperator

    _expect_nothing_created(
        cluster,
        mlflow_server,
        "env_id",
        lambda base, exp: GymSanityCheckOperator(
            task_id="refused_sanity_env",
            ssh_conn_id="slurm_dev",
            environment={"kind": "venv", "prefix": str(cluster.venv)},
            env_id=env_id,
            remote_dir=f"{base}/sanity",
        ),
    )
