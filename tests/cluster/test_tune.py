"""Ray Tune in one Slurm job: nested MLflow runs per trial, relayed once each, best model registered."""

from __future__ import annotations

import asyncio
import json
import shlex
import time
from typing import Any

import pytest
from airflow.sdk.exceptions import AirflowException, TaskDeferred

from tests.cluster.test_operator import FakeTI, make_op, run_deferred
from tests.cluster_side.test_tune_driver import BASE as TUNE_BASE
from tests.conftest import DevCluster
from tests.mlflow_fixtures import MlflowServer

pytestmark = pytest.mark.cluster

#: Small and fast: 1 CPU per trial (no env runners), a few short iterations.
TINY = TUNE_BASE | {"checkpoint_every": 2}
ITERS = 16  # the length of the sweep that a signal interrupts and a retry resumes


def _row(trial: str, step: int, lr: float) -> dict[str, Any]:
    return {
        "trial_id": trial,
        "trial_config": {"lr": lr},
        "iteration": step,
        "episode_return_mean": 10.0 * step + lr,
        "timestamp": 1_700_000_000 + step,
    }


def _children(client: Any, parent: str) -> dict[str, Any]:
    exp = client.get_run(parent).info.experiment_id
    runs = client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    trials = [r.data.tags["slurm_ray.trial_id"] for r in runs]
    assert len(trials) == len(set(trials)), f"a trial has more than one run: {sorted(trials)}"
    return dict(zip(trials, runs, strict=True))


def test_trial_rows_go_to_nested_runs_each_step_once(mlflow_server: MlflowServer) -> None:
    """Interleaved rows of two trials, re-read and relayed again by a new relay object
    (a triggerer restart, then the completion catch-up): each trial's run has each step once."""
    from mlflow.tracking import MlflowClient
    from slurm_ray.mlflow.relay import MetricsRelay, make_relay, relay_rows
    from slurm_ray.mlflow.runs import ensure_run
    from slurm_ray.mlflow.settings import MlflowSettings

    settings = MlflowSettings(mlflow_server.url, f"tune-relay-{time.time_ns()}")
    tags = {"dag_id": "d", "run_id": f"r{time.time_ns()}", "task_id": "tune", "map_index": "-1"}
    parent = ensure_run(settings, tags=tags)
    relay = make_relay(settings, run_id=parent, tags=tags)
    a, b = "abcde_00000", "abcde_00001"
    first = [_row(a, 1, 0.1), _row(b, 1, 0.2), _row(a, 2, 0.1)]
    stats = MetricsRelay(relay).send(first)
    assert stats.error is None and stats.sent == 3
    everything = [*first, _row(b, 2, 0.2), _row(a, 3, 0.1), _row(b, 3, 0.2)]
    again = relay_rows(relay, everything)  # a fresh relay: watermarks come from MLflow
    assert (again.sent, again.skipped) == (3, 3)
    assert set(again.trial_runs) == {a, b}

    client = MlflowClient(mlflow_server.url)
    kids = _children(client, parent)
    assert set(kids) == {a, b}
    for trial, lr in ((a, 0.1), (b, 0.2)):
        run = kids[trial]
        history = client.get_metric_history(run.info.run_id, "episode_return_mean")
        assert sorted(m.step for m in history) == [1, 2, 3], trial
        assert run.data.params["lr"] == str(lr)
        assert run.data.tags["slurm_ray.run_id"] == tags["run_id"]
        assert again.trial_runs[trial] == run.info.run_id
    # Trial rows are not the parent's: it stays free of per-iteration metrics.
    assert client.get_metric_history(parent, "episode_return_mean") == []


@pytest.mark.slow
def test_tune_job_nested_runs_and_best_model_registered(
    cluster: DevCluster, mlflow_server: MlflowServer
) -> None:
    """Through the operator and its trigger: one job, 2 trials, metrics live, best registered."""
    from mlflow.tracking import MlflowClient
    from slurm_ray.pipeline import register_trained_model
    from slurm_ray.tune_plan import TUNE_ENTRYPOINT, plan_tune, tag_best_trial, tune_files

    ti = FakeTI(task_id="tune", dag_id="test_tune")
    experiment = f"tune-{ti.run_id[8:16]}"
    mlflow = {
        "tracking_uri": mlflow_server.url,
        "experiment_name": experiment,
        "registered_model_name": f"tune-model-{ti.run_id[8:16]}",
    }
    # long enough that the live relay is seen while the job still runs (1-s polls)
    base = TINY | {"stop": {"iterations": 6}}
    plan = plan_tune(
        {"config": base, "job_spec": {"nodes": 2, "cpus_per_task": 1, "time": "15"}},
        {"search": {"lr": {"grid": [0.001, 0.003]}}, "num_samples": 1, "scheduler": "fifo"},
    )
    op = make_op(
        cluster,
        "tune",
        entrypoint=TUNE_ENTRYPOINT,
        extra_files=tune_files(),
        config=plan["config"],
        job_spec=plan["job_spec"],
        mlflow=mlflow,
    )
    with pytest.raises(TaskDeferred) as deferred:
        op.execute({"ti": ti})
    job_id, parent = ti.xcom["slurm_job_id"], ti.xcom["mlflow_run_id"]
    client = MlflowClient(mlflow_server.url)
    seen_live: set[str] = set()

    async def watch() -> Any:
        task = asyncio.ensure_future(anext(deferred.value.trigger.run()))
        while not task.done():
            await asyncio.sleep(0.5)
            state = cluster.ssh(f"squeue -h -j {job_id} -o %T", check=False).stdout.strip()
            if state == "RUNNING":
                seen_live.update(
                    t
                    for t, r in _children(client, parent).items()
                    if client.get_metric_history(r.info.run_id, "episode_return_mean")
                )
        return await task

    try:
        event = asyncio.run(asyncio.wait_for(watch(), 600))
    finally:
        cluster.ssh(f"scancel {shlex.quote(job_id)}", check=False)
    assert seen_live, "no trial's metrics reached MLflow while the job ran"
    summary = op.execute_complete({"ti": ti}, event.payload, **deferred.value.kwargs)
    assert summary["mlflow_run_id"] == parent

    result = json.loads(cluster.ssh(f"cat {shlex.quote(summary['run_dir'])}/result.json").stdout)
    assert result["status"] == "succeeded"
    trials = {t["trial_id"]: t for t in result["tune"]["trials"]}
    assert len(trials) == 2 and {t["status"] for t in trials.values()} == {"TERMINATED"}
    kids = _children(client, parent)
    assert set(kids) == set(trials)
    for trial, run in kids.items():
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "episode_return_mean")]
        assert sorted(steps) == [1, 2, 3, 4, 5, 6], trial
        assert run.data.params["lr"] == str(trials[trial]["config"]["lr"])
        assert client.get_run(run.info.run_id).info.status == "FINISHED"

    best = tag_best_trial(summary, mlflow, "slurm_dev", ti.dag_id)
    assert best["slurm_ray.best_trial_id"] == result["tune"]["best_trial_id"]
    assert best["slurm_ray.best_trial_run_id"] == kids[best["slurm_ray.best_trial_id"]].info.run_id
    registered = register_trained_model(summary, mlflow, "slurm_dev", ti.dag_id, op.environment)
    version = client.get_model_version(registered["model_name"], registered["model_version"])
    assert version.run_id == parent
    assert result["rl_module_checkpoint"].startswith(summary["run_dir"] + "/tune/")


@pytest.mark.slow
def test_on_kill_cancels_the_one_tune_job(cluster: DevCluster) -> None:
    """Killing the task cancels the single job that holds every trial; nothing keeps running."""
    from slurm_ray.tune_plan import TUNE_ENTRYPOINT, plan_tune, tune_files

    ti = FakeTI(task_id="tune_kill", dag_id="test_tune")
    plan = plan_tune(
        {"config": TINY | {"stop": {"iterations": 500}}, "job_spec": {"nodes": 2, "time": "15"}},
        {"search": {"lr": {"grid": [0.001, 0.003]}}, "num_samples": 1},
    )
    op = make_op(
        cluster,
        "tune_kill",
        entrypoint=TUNE_ENTRYPOINT,
        extra_files=tune_files(),
        config=plan["config"],
        job_spec=plan["job_spec"] | {"cpus_per_task": 1},
    )
    with pytest.raises(TaskDeferred):
        op.execute({"ti": ti})
    job_id, run_dir = ti.xcom["slurm_job_id"], ti.xcom["run_dir"]
    stream = f"{shlex.quote(run_dir)}/metrics.jsonl"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            rows = cluster.ssh(f"cat {stream} 2>/dev/null", check=False).stdout.splitlines()
            if len({json.loads(ln)["trial_id"] for ln in rows if ln.strip()}) == 2:
                break
            time.sleep(2)
        else:
            pytest.fail("the two trials did not both report within 300 s")
        op.on_kill()
        deadline = time.monotonic() + 120
        state = ""
        while time.monotonic() < deadline:
            state = cluster.ssh(f"squeue -h -j {job_id} -o %T", check=False).stdout.strip()
            if not state:
                break
            time.sleep(2)
        assert not state, f"job {job_id} still {state} after on_kill"
        acct = cluster.ssh(f"sacct -n -X -P -j {job_id} -o State", check=False).stdout
        assert "CANCELLED" in acct, acct
        # No trial went on writing after the job was gone.
        before = cluster.ssh(f"cat {stream}").stdout
        time.sleep(5)
        assert cluster.ssh(f"cat {stream}").stdout == before
    finally:
        cluster.ssh(f"scancel {shlex.quote(job_id)}", check=False)


def test_completion_reads_every_trial_file_past_the_output_cap(cluster: DevCluster) -> None:
    """The catch-up's one command keeps only the tail of a big output: then every
    trial file is read on its own, and no row is lost."""
    import logging

    from slurm_ray.hooks.slurm import SlurmHook
    from slurm_ray.operators.tracking import MlflowTracking

    run_dir = cluster.new_dir("tune-cap")
    trials = [f"abcde_{i:05d}" for i in range(3)]
    for t in trials:
        text = "".join(json.dumps(_row(t, s, 0.1)) + "\n" for s in range(1, 21))
        path = f"{run_dir}/trials/{t}/metrics.jsonl"
        cluster.ssh(f"mkdir -p {run_dir}/trials/{t} && printf %s {shlex.quote(text)} > {path}")
    wanted = {(t, s) for t in trials for s in range(1, 21)}
    for cap in (1 << 20, 2000):  # room for all, then far less than one file
        hook = SlurmHook("slurm_dev", max_output=cap)
        try:
            tracking = MlflowTracking(None, hook, logging.getLogger("t"), wait_s=1)
            rows = tracking._trial_rows(run_dir)
        finally:
            hook.close()
        assert {(r["trial_id"], r["iteration"]) for r in rows} == wanted, cap
        assert len(rows) == len(wanted), cap


@pytest.mark.slow
def test_pre_timeout_signal_then_retry_resumes_the_sweep(
    cluster: DevCluster, mlflow_server: MlflowServer
) -> None:
    """Slurm's pre-timeout SIGUSR1 (sent here with scancel) ends try 1 with Tune's state
    saved; try 2's job restores the same trials and finishes them; every step is in
    its trial's nested run once."""
    from mlflow.tracking import MlflowClient
    from slurm_ray.tune_plan import TUNE_ENTRYPOINT, plan_tune, tune_files

    ti = FakeTI(task_id="tune_resume", dag_id="test_tune")
    mlflow = {"tracking_uri": mlflow_server.url, "experiment_name": f"resume-{ti.run_id[8:16]}"}
    plan = plan_tune(
        # 16 iterations: a trial runs 2 a second on a quiet machine, and 6 had all
        # ended before the loop below saw iteration 2 (the signal came too late).
        {"config": TINY | {"stop": {"iterations": ITERS}, "checkpoint_every": 1},
         "job_spec": {"nodes": 2, "cpus_per_task": 1, "time": "15"}},
        {"search": {"lr": {"grid": [0.001, 0.003]}}, "num_samples": 1},
    )  # fmt: skip

    def op() -> Any:
        return make_op(cluster, "tune_resume", entrypoint=TUNE_ENTRYPOINT, mlflow=mlflow,
                       extra_files=tune_files(), config=plan["config"], job_spec=plan["job_spec"])  # fmt: skip

    first = op()
    with pytest.raises(TaskDeferred) as deferred:
        first.execute({"ti": ti})
    job_id, run_dir = ti.xcom["slurm_job_id"], ti.xcom["run_dir"]
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            rows = cluster.ssh(f"cat {run_dir}/metrics.jsonl 2>/dev/null", check=False).stdout
            done = [json.loads(ln) for ln in rows.splitlines() if ln.strip()]
            if len({r["trial_id"] for r in done if r["iteration"] >= 2}) == 2:
                break
            time.sleep(0.3)
        else:
            pytest.fail("the trials did not reach iteration 2 within 300 s")
        cluster.ssh(f"scancel --batch --signal=USR1 {shlex.quote(job_id)}")
        event = asyncio.run(asyncio.wait_for(anext(deferred.value.trigger.run()), 300))
    finally:
        cluster.ssh(f"scancel {shlex.quote(job_id)}", check=False)
    with pytest.raises(AirflowException):
        first.execute_complete({"ti": ti}, event.payload, **deferred.value.kwargs)
    interrupted = json.loads(cluster.ssh(f"cat {run_dir}/result.json").stdout)
    assert interrupted["status"] == "interrupted" and interrupted["exit_code"] == 75
    trial_ids = {t["trial_id"] for t in interrupted["tune"]["trials"]}

    ti.try_number = 2
    summary = run_deferred(op(), {"ti": ti}, timeout=600)
    result = json.loads(cluster.ssh(f"cat {summary['run_dir']}/result.json").stdout)
    assert result["status"] == "succeeded", result
    assert {t["trial_id"] for t in result["tune"]["trials"]} == trial_ids
    log = cluster.ssh(f"cat {summary['run_dir']}/slurm-*.out").stdout
    assert f"continuing the experiment of {run_dir}" in log
    client = MlflowClient(mlflow_server.url)
    kids = _children(client, summary["mlflow_run_id"])
    assert set(kids) == trial_ids
    for trial, run in kids.items():
        history = client.get_metric_history(run.info.run_id, "episode_return_mean")
        assert sorted(m.step for m in history) == list(range(1, ITERS + 1)), trial
