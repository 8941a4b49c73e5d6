"""R8: the MLflow server stopped for 30 s during a real training job, then restarted.

Through the real Airflow: every metrics row of the job reaches MLflow (once),
the run completes and the model is registered.
"""

from __future__ import annotations

import re
import time

import pytest

from tests.airflow_fixtures import Airflow
from tests.conftest import DevCluster
from tests.faults.airflow_runs import (
    DAG,
    metric_steps,
    start_training,
    stop_run,
    task_log_text,
    wait_run,
)
from tests.faults.conftest import trials
from tests.mlflow_fixtures import MlflowServer

pytestmark = [pytest.mark.faults, pytest.mark.cluster, pytest.mark.e2e]

OUTAGE_S = 30.0
# Stopped by time, not by a count: with 14 iterations the job used to end
# during the outage, so only the completion catch-up could ever send the rows.
# Training runs ~105 s; MLflow is back after ~40 s of it, and the live relay
# (which retries on every 2-s poll) has a minute left to recover by itself.
CONF = {
    "stop_iterations": None,
    "stop_env_steps": None,
    "stop_minutes": 1.75,
    "stop_return_mean": None,
    "experiment_name": "faults_r8",
    "register_model_name": "faults-r8",
}


# Slow (nearly two minutes a trial) and not among the faults the report must repeat 5 times.
@pytest.mark.parametrize("trial", range(trials(limit=3)))
def test_r8_mlflow_down_during_training(
    airflow: Airflow, cluster: DevCluster, mlflow_server: MlflowServer, faults, trial: int
) -> None:
    faults.require_root("R8")
    airflow.wait_dag(DAG)

    def body() -> float:
        from mlflow.tracking import MlflowClient

        run = start_training(airflow, cluster, CONF, mlflow_url=mlflow_server.url, min_steps=1)
        assert run.mlflow_run_id
        try:
            mlflow_server.stop()
            try:
                time.sleep(OUTAGE_S)
                rows_during = cluster.ssh(
                    f"wc -l < {run.run_dir}/metrics.jsonl", check=False
                ).stdout.strip()
            finally:
                mlflow_server.start()
            back = time.monotonic()
            # The job went on training while MLflow was away.
            assert int(rows_during or 0) >= 2, rows_during
            caught_up = None
            while time.monotonic() - back < 300:
                steps = metric_steps(mlflow_server.url, run.mlflow_run_id)
                if len(steps) >= int(rows_during):
                    caught_up = time.monotonic() - back
                    state_then = airflow.ti(DAG, run.run_id, "train")["state"]
                    break
                time.sleep(1)
            assert caught_up is not None, "rows logged during the outage never arrived"
            assert wait_run(airflow, run.run_id) == "success"
            # The live relay (in the triggerer) recovered by itself: its own log line,
            # which the completion catch-up never writes; not merely the catch-up
            # sending every row once the job had ended.
            log = task_log_text(airflow, run.run_id)
            assert "MLflow relay to" in log and "failed" in log, "the outage was not seen"
            assert re.search(r"MLflow relay to \S+ recovered after \d+s", log), (
                f"no live relay recovery in the task log (state when caught up: {state_then})"
            )
            # The finished job was collected by its own try (it waited for MLflow):
            # no retry, no second job.
            assert airflow.ti(DAG, run.run_id, "train")["try_number"] == 1
            rows = cluster.ssh(f"wc -l < {run.run_dir}/metrics.jsonl").stdout.strip()
            assert int(rows) > int(rows_during), (rows, rows_during)  # trained on after
            expected = list(range(1, int(rows) + 1))
            for key in ("episode_return_mean", "env_steps", "episode_len_mean"):
                assert metric_steps(mlflow_server.url, run.mlflow_run_id, key) == expected, key
            mlrun = MlflowClient(mlflow_server.url).get_run(run.mlflow_run_id)
            assert mlrun.info.status == "FINISHED", mlrun.info
            # An outage writes error paths to the logs: none may carry a secret.
            leaks, _, _ = airflow.leaked_secrets(DAG, run.run_id)
            assert not leaks, leaks
            return caught_up
        finally:
            stop_run(airflow, cluster, run.run_id)
            mlflow_server.start()

    faults.trial("R8")(body)
