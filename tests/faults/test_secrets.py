"""Secrets (private key, passwords in the connection) never reach the task log,
the rendered batch script, XCom or the MLflow run's params/tags.

This test drives the operator in-process; the real Airflow's task-log files and
REST XCom are searched after every end-to-end run instead (the e2e and R8
tests: tests/airflow_fixtures.py gives that Airflow a connection with its
secrets inline, and Airflow.leaked_secrets searches).
"""

from __future__ import annotations

import json
import shlex
import time

import pytest

from tests.cluster.test_operator import FakeTI, make_op
from tests.conftest import DevCluster
from tests.faults.helpers import SMALL_CONFIG, first_event, tap

pytestmark = [pytest.mark.faults, pytest.mark.cluster]

PASSWORD = "s3cr3t-R8x-password"
PASSPHRASE = "s3cr3t-R8x-passphrase"
TOKEN = "s3cr3t-R8x-token"


def test_secrets_never_leak(
    cluster: DevCluster,
    faults,
    mlflow_server,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    import asyncio

    from airflow.sdk.exceptions import TaskDeferred
    from mlflow import MlflowClient

    key_text = (cluster.state / "ssh" / "id_ed25519").read_text()
    key_lines = [
        line.strip() for line in key_text.splitlines() if line.strip() and "-----" not in line
    ]
    assert key_lines
    conn = json.loads(cluster.env["AIRFLOW_CONN_SLURM_DEV"])
    extra = dict(conn["extra"])
    extra.pop("key_file", None)
    extra["private_key"] = key_text  # the key itself lives in the connection
    extra["mlflow_token"] = TOKEN
    extra["api_password"] = PASSWORD
    conn["extra"] = extra
    conn["password"] = PASSPHRASE  # unused by key auth, still a secret
    monkeypatch.setenv("AIRFLOW_CONN_SLURM_SECRET", json.dumps(conn))
    secrets = [PASSWORD, PASSPHRASE, TOKEN, *key_lines]

    def body() -> float:
        started = time.monotonic()
        capfd.readouterr()
        ti = FakeTI(task_id="secrets")
        op = make_op(
            cluster,
            ti.task_id,
            ssh_conn_id="slurm_secret",
            config={**SMALL_CONFIG, "stop": {"iterations": 2}, "eval_episodes": 1},
            job_spec={"nodes": 1, "cpus_per_task": 2, "time": "5"},
            mlflow={"tracking_uri": mlflow_server.url, "experiment_name": "faults-secrets"},
            env_vars={"HARMLESS": "1"},
        )
        op_log = tap(op)
        with pytest.raises(TaskDeferred) as deferred:
            op.execute({"ti": ti})
        trigger = deferred.value.trigger
        trig_log = tap(trigger)
        event = asyncio.run(first_event(trigger, 300))
        summary = op.execute_complete({"ti": ti}, event.payload, **(deferred.value.kwargs or {}))
        assert summary["state"] == "COMPLETED", summary
        out = capfd.readouterr()
        # The taps saw the task's own lines: an empty log would hide any leak.
        assert op_log.records and trig_log.records, (op_log.text, trig_log.text)
        places: dict[str, str] = {
            "task log (operator)": op_log.text,
            "task log (trigger)": trig_log.text,
            "task log (stdout/stderr)": out.out + out.err,
            "job.sbatch": cluster.ssh(f"cat {shlex.quote(ti.xcom['run_dir'])}/job.sbatch").stdout,
            "config.json": cluster.ssh(f"cat {shlex.quote(ti.xcom['run_dir'])}/config.json").stdout,
            "xcom": json.dumps(ti.xcom, default=str) + json.dumps(summary, default=str),
            "trigger kwargs": json.dumps(trigger.serialize(), default=str),
        }
        run_id = ti.xcom.get("mlflow_run_id")
        assert run_id, ti.xcom
        run = MlflowClient(tracking_uri=mlflow_server.url).get_run(run_id)
        places["mlflow params"] = json.dumps(run.data.params)
        places["mlflow tags"] = json.dumps(run.data.tags)
        assert run.data.params, "the run logged no params: nothing was checked"
        leaks: list[tuple[str, str]] = [
            (where, s[:12] + "…") for where, text in places.items() for s in secrets if s in text
        ]
        assert not leaks, leaks
        return time.monotonic() - started

    faults.trial("S")(body)
