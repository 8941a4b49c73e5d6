"""R4: a training job hits its time limit after writing checkpoints; the retry resumes."""

from __future__ import annotations

import json
import re
import shlex
import time
from typing import Any

import pytest

from tests.cluster.test_operator import FakeTI, make_op, run_deferred
from tests.conftest import DevCluster
from tests.faults.helpers import SMALL_CONFIG

pytestmark = [pytest.mark.faults, pytest.mark.cluster, pytest.mark.slow]


def metrics_iterations(cluster: DevCluster, run_dir: str) -> list[int]:
    out = cluster.ssh(f"cat {shlex.quote(run_dir)}/metrics.jsonl", check=False).stdout
    return [json.loads(line)["iteration"] for line in out.splitlines() if line.strip()]


def test_r4_time_limit_then_retry_resumes_same_mlflow_run(
    cluster: DevCluster, faults, mlflow_server
) -> None:
    from airflow.sdk.exceptions import AirflowException
    from mlflow import MlflowClient

    config: dict[str, Any] = {
        **SMALL_CONFIG,
        # more training than fits before the pre-timeout signal of a 2-minute job
        "stop": {"iterations": None, "env_steps": None, "return_mean": None, "minutes": 1.5},
        "checkpoint_every": 1,
        "eval_episodes": 2,
    }
    mlflow = {"tracking_uri": mlflow_server.url, "experiment_name": "r4-faults"}
    task_id = "r4_train"

    def body() -> float:
        ti1 = FakeTI(task_id=task_id)
        op1 = make_op(
            cluster,
            task_id,
            config=config,
            job_spec={"nodes": 1, "cpus_per_task": 4, "time": "2"},
            mlflow=mlflow,
            poll_interval=2.0,
        )
        with pytest.raises(AirflowException) as err:
            run_deferred(op1, {"ti": ti1}, timeout=300)
        failed_at = time.monotonic()
        msg = str(err.value)
        print("try 1 error:", msg[:800])
        assert "TIMEOUT" in msg, msg
        m = re.search(r"checkpointed at iteration (\d+)", msg)
        assert m, msg
        ckpt_iter = int(m.group(1))
        assert ckpt_iter >= 1
        run1 = ti1.xcom["run_dir"]
        assert metrics_iterations(cluster, run1), "try 1 wrote no metrics"

        ti2 = FakeTI(task_id=task_id, run_id=ti1.run_id, try_number=2)
        op2 = make_op(
            cluster,
            task_id,
            config=config,
            job_spec={"nodes": 1, "cpus_per_task": 4, "time": "4"},
            mlflow=mlflow,
            poll_interval=2.0,
        )
        summary = run_deferred(op2, {"ti": ti2}, timeout=300)
        assert summary["state"] == "COMPLETED", summary
        run2 = ti2.xcom["run_dir"]
        assert run2.endswith("/try_2") and run1.endswith("/try_1")
        iters2 = metrics_iterations(cluster, run2)
        assert iters2 and iters2[0] == ckpt_iter + 1, (ckpt_iter, iters2[:5])
        log2 = cluster.ssh(f"cat {shlex.quote(run2)}/slurm-*.out").stdout
        assert "resumed from" in log2, log2[-2000:]
        rid1 = ti1.xcom.get("mlflow_run_id")
        rid2 = ti2.xcom.get("mlflow_run_id")
        assert rid1 and rid1 == rid2 == summary["mlflow_run_id"], (rid1, rid2, summary)
        client = MlflowClient(tracking_uri=mlflow_server.url)
        steps = sorted(m.step for m in client.get_metric_history(rid1, "env_steps"))
        assert steps == sorted(set(steps)), "duplicated metric steps"
        assert max(steps) == summary["iterations"], (steps[-3:], summary)
        return time.monotonic() - failed_at

    faults.trial("R4")(body)
