"""Slurm accounting for real (issue 15 §3): a job's cost in its MLflow run, from slurmdbd."""

from __future__ import annotations

import pytest

from tests.cluster.test_operator import FakeTI, make_op, run_deferred
from tests.conftest import DevCluster
from tests.mlflow_fixtures import MlflowServer

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

#: A few seconds of one busy core on the head node, then done.
BURN = "python -c 'import time; t = time.time()\nwhile time.time() - t < 4: pass'"


def test_job_cost_from_sacct_reaches_the_mlflow_run(
    cluster: DevCluster, mlflow_server: MlflowServer
) -> None:
    from mlflow.tracking import MlflowClient

    ti = FakeTI(task_id="cost")
    op = make_op(
        cluster,
        ti.task_id,
        entrypoint=BURN,
        job_spec={"nodes": 2, "cpus_per_task": 1, "time": "5"},
        mlflow={"tracking_uri": mlflow_server.url, "experiment_name": f"cost-{ti.run_id[8:16]}"},
    )
    try:
        # generous: on the shared cluster the job may queue behind others' jobs
        summary = run_deferred(op, {"ti": ti}, timeout=900)
    finally:
        if "slurm_job_id" in ti.xcom:  # never leave it queued behind a failed test
            cluster.ssh(f"scancel {ti.xcom['slurm_job_id']}", check=False)
    assert summary["state"] == "COMPLETED", summary
    job_id = ti.xcom["slurm_job_id"]
    client = MlflowClient(mlflow_server.url)
    run = client.get_run(ti.xcom["mlflow_run_id"])
    m, tags = run.data.metrics, run.data.tags
    print({k: v for k, v in m.items() if k.startswith("slurm")})
    # what slurmdbd itself says about the allocation
    raw = cluster.ssh(f"sacct -n -P -X -j {job_id} -o ElapsedRaw,NNodes,AllocCPUS").stdout
    elapsed, nodes, cpus = (float(x) for x in raw.strip().split("|"))
    assert (m["slurm.elapsed_s"], m["slurm.nodes"], m["slurm.alloc_cpus"]) == (elapsed, nodes, cpus)
    assert nodes == 2
    assert elapsed >= 4  # the entrypoint alone ran 4 s
    assert m["slurm.node_hours"] == pytest.approx(2 * elapsed / 3600)
    assert 0 < m["slurm.cpu_efficiency"] <= 1
    assert m["slurm.total_cpu_s"] >= 3  # the busy loop's CPU time is in it
    assert m["slurm.max_rss_mib"] > 0
    assert m["slurm.exit_code"] == 0
    assert tags["slurm_ray.slurm.state"] == "COMPLETED"
    assert tags["slurm_ray.slurm.cost_job_id"] == job_id
    # the queue wait is logged once (by the operator), not again from sacct
    assert len(client.get_metric_history(run.info.run_id, "slurm_queue_wait_s")) == 1
