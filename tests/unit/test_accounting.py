"""What a job cost, from real sacct output; promotion by cost (issue 15 §3).

The sacct fixtures are real output of the dev cluster with slurmdbd
(tests/fixtures/slurm/capture_sacct.sh; README there).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from slurm_ray.mlflow.accounting import (
    COST_FIELDS,
    JobCost,
    cost_command,
    job_cost,
    parse_size,
    record_job_cost,
    slurm_efficiency,
)
from slurm_ray.mlflow.compare import _row
from slurm_ray.mlflow.registry import check_promotion_metric, metric_value

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "slurm"


@pytest.mark.parametrize(
    ("text", "size"),
    [("0", 0), ("2116K", 2116 << 10), ("1.50M", 3 << 19), ("2G", 2 << 30), ("", None), ("x", None)],
)
def test_sizes_as_sacct_prints_them(text: str, size: int | None) -> None:
    assert parse_size(text) == size


def test_cost_command_quotes_and_validates() -> None:
    cmd = cost_command("42")
    assert cmd.startswith("TZ=UTC SLURM_TIME_FORMAT=standard sacct -P -j 42 --format=")
    assert " -X " not in cmd and ",".join(COST_FIELDS) in cmd
    with pytest.raises(ValueError, match="invalid Slurm job id"):
        cost_command("42; rm -rf ~")


class SacctHook:
    """The login node as the dev cluster answered (``-X``: allocation lines only)."""

    def __init__(self) -> None:
        self.commands: list[str] = []

    def run(self, command: str, **_: Any) -> Any:
        self.commands.append(command)
        name = "sacct_cost_allocations_only.txt" if " -X " in command else "sacct_cost.txt"
        return SimpleNamespace(exit_code=0, stdout=(FIXTURES / name).read_text())


def test_cost_of_a_real_two_node_job() -> None:
    """Job 25: 2 nodes x 1 CPU, 8 s; its srun step burned CPU holding ~200 MiB per task.

    With ``-X`` (the old command) sacct prints TotalCPU 00:00:00 and no MaxRSS:
    the CPU time and memory are recorded on the steps.
    """
    m = slurm_efficiency(SacctHook(), "25")
    assert m["slurm.elapsed_s"] == 8.0 and m["slurm.nodes"] == 2.0
    assert m["slurm.alloc_cpus"] == 2.0
    assert m["slurm.node_hours"] == pytest.approx(2 * 8 / 3600)
    assert m["slurm.total_cpu_s"] == pytest.approx(7.507)  # 00:07.497 + 00:00.010
    assert m["slurm.cpu_efficiency"] == pytest.approx(7.507 / (8 * 2))
    assert m["slurm.max_rss_mib"] == pytest.approx(213276 / 1024)  # the srun step's
    assert m["slurm.exit_code"] == 0.0
    cost = job_cost((FIXTURES / "sacct_cost.txt").read_text(), "25")
    assert cost is not None and cost.queue_wait_s == 53.0  # 15:21:36 -> 15:22:29
    assert cost.tags() == {"slurm_ray.slurm.state": "COMPLETED", "slurm_ray.slurm.exit_code": "0:0"}


@pytest.mark.parametrize(
    ("job_id", "state", "exit_code", "elapsed"),
    [
        ("26", "FAILED", "3:0", 0.0),
        ("27", "TIMEOUT", "0:0", 81.0),
        ("28", "CANCELLED", "0:15", 3.0),
    ],
)
def test_end_state_of_real_jobs(job_id: str, state: str, exit_code: str, elapsed: float) -> None:
    cost = job_cost((FIXTURES / "sacct_cost.txt").read_text(), job_id)
    assert cost is not None and cost.final
    assert (cost.state, cost.exit_code, cost.elapsed_s) == (state, exit_code, elapsed)
    assert cost.total_cpu_s == pytest.approx(0.001)
    if elapsed:
        assert cost.cpu_efficiency == pytest.approx(0.001 / elapsed)
    else:  # a 0-second job has no efficiency, not a division by zero
        assert cost.cpu_efficiency is None and "slurm.cpu_efficiency" not in cost.metrics()


def test_cost_of_a_real_het_job() -> None:
    """Job 125: component 0 on the gpu partition (n1), 1 on debug (n2); one srun step
    across both. sbatch printed 125; sacct names the components 125+0 and 125+1."""
    cost = job_cost((FIXTURES / "sacct_cost_het.txt").read_text(), "125")
    assert cost is not None and cost.final and cost.state == "COMPLETED"
    assert (cost.nodes, cost.alloc_cpus, cost.elapsed_s) == (2, 2, 4.0)
    assert cost.node_hours == pytest.approx(2 * 4 / 3600)
    # 125+0.batch 00:00.017 + 125+0.0 00:01.388 + 125+1.0 00:01.409
    assert cost.total_cpu_s == pytest.approx(2.814)
    assert cost.cpu_efficiency == pytest.approx(2.814 / 8)
    assert cost.queue_wait_s == 171.0  # 15:35:35 -> 15:38:26
    # steps shorter than JobAcctGatherFrequency (5 s) get no MaxRSS sample
    assert cost.max_rss_bytes is None and "slurm.max_rss_mib" not in cost.metrics()


#: Hand-written, same shape as the real het capture, with MaxRSS on the steps.
HET = (
    "JobID|State|ExitCode|ElapsedRaw|NNodes|AllocCPUS|TotalCPU|MaxRSS|Submit|Start|NodeList\n"
    "50+0|COMPLETED|0:0|100|1|2|00:00:00||2026-12-01T15:00:00|2026-12-01T15:00:30|n1\n"
    "50+0.batch|COMPLETED|0:0|100|1|2|01:40.000|300M|2026-12-01T15:00:30|2026-12-01T15:00:30|n1\n"
    "50+1|COMPLETED|0:0|100|2|4|00:00:00||2026-12-01T15:00:00|2026-12-01T15:00:30|n[1-2]\n"
    "50+1.0|COMPLETED|0:0|90|2|4|05:00.000|500M|2026-12-01T15:00:31|2026-12-01T15:00:31|n[1-2]\n"
    "500|COMPLETED|0:0|7|1|1|00:07.000|1G|2026-12-01T15:00:00|2026-12-01T15:00:00|n1\n"
)


def test_het_job_is_the_sum_of_its_components() -> None:
    cost = job_cost(HET, "50")
    assert cost is not None and cost.final
    assert (cost.nodes, cost.alloc_cpus, cost.elapsed_s) == (3, 6, 100.0)
    assert cost.node_hours == pytest.approx(300 / 3600)
    assert cost.total_cpu_s == 400.0  # the steps', not job 500's
    assert cost.cpu_efficiency == pytest.approx(400 / 600)
    assert cost.max_rss_bytes == 500 << 20 and cost.queue_wait_s == 30.0


def test_no_allocation_line_is_no_cost() -> None:
    assert job_cost(HET, "5") is None
    assert job_cost("sacct: error: Problem talking to the database\n", "50") is None


class Hook:
    """Answers the sacct cost command from a script of outputs; ``states`` as scontrol."""

    def __init__(self, outputs: list[tuple[int, str]], elapsed: str | None = None) -> None:
        self.outputs, self.commands, self.elapsed = outputs, [], elapsed

    def run(self, command: str, **_: Any) -> Any:
        self.commands.append(command)
        rc, out = self.outputs.pop(0) if len(self.outputs) > 1 else self.outputs[0]
        return SimpleNamespace(exit_code=rc, stdout=out)

    def states(self, ids: list[str]) -> dict[str, Any]:
        info = SimpleNamespace(elapsed=self.elapsed, num_nodes=2)
        return {ids[0]: info} if self.elapsed else {}


def test_without_accounting_scontrol_gives_elapsed_and_node_hours() -> None:
    disabled = (1, "")
    assert slurm_efficiency(Hook([disabled], elapsed="00:30:00"), "77") == {
        "slurm.elapsed_s": 1800.0,
        "slurm.node_hours": 1.0,
    }
    assert slurm_efficiency(Hook([disabled]), "77") == {}


def test_a_record_without_its_end_is_asked_again() -> None:
    running = HET.replace("50+1|COMPLETED", "50+1|RUNNING")
    hook = Hook([(0, running), (0, HET)])
    assert slurm_efficiency(hook, "50", wait_s=5)["slurm.nodes"] == 3.0
    assert len(hook.commands) == 2
    # never an unfinished record: elapsed would still be growing
    assert slurm_efficiency(Hook([(0, running)]), "50", wait_s=0) == {}


class Client:
    """The MlflowClient surface record_job_cost uses."""

    def __init__(self, metrics: dict[str, float], tags: dict[str, str]) -> None:
        self.metrics, self.tags, self.batches = dict(metrics), dict(tags), 0

    def get_run(self, run_id: str) -> Any:
        return SimpleNamespace(data=SimpleNamespace(metrics=self.metrics, tags=self.tags))

    def log_batch(self, run_id: str, metrics: list[Any], tags: list[Any]) -> None:
        self.batches += 1
        self.metrics.update({m.key: m.value for m in metrics})
        self.tags.update({t.key: t.value for t in tags})


def test_cost_is_logged_once_per_job_and_queue_wait_only_when_missing() -> None:
    client = Client({"slurm_queue_wait_s": 12.0}, {})
    got = record_job_cost(client, "r", Hook([(0, HET)]), "50")
    assert got["slurm.node_hours"] == pytest.approx(300 / 3600)
    assert client.metrics["slurm_queue_wait_s"] == 12.0  # the operator's, not sacct's 30
    assert client.tags["slurm_ray.slurm.cost_job_id"] == "50"
    assert client.tags["slurm_ray.slurm.state"] == "COMPLETED"
    again = record_job_cost(client, "r", Hook([(1, "")]), "50")
    assert client.batches == 1 and again == got
    forgot = Client({}, {})
    record_job_cost(forgot, "r", Hook([(0, HET)]), "50")
    assert forgot.metrics["slurm_queue_wait_s"] == 30.0  # Slurm forgot: sacct's


def test_cost_failure_is_a_warning_not_an_error(caplog: pytest.LogCaptureFixture) -> None:
    class Broken(Hook):
        def run(self, command: str, **_: Any) -> Any:
            raise OSError("ssh gone")

    assert record_job_cost(Client({}, {}), "r", Broken([(0, "")]), "50") == {}
    assert "could not log the cost of job 50" in caplog.text


# -- promotion by cost ----------------------------------------------------------------


def test_promotion_metric_is_checked_naming_the_field() -> None:
    assert check_promotion_metric("return_per_node_hour") == "return_per_node_hour"
    with pytest.raises(ValueError, match=r"promotion_metric: 'cheapest' is not one of"):
        check_promotion_metric("cheapest")


def test_return_per_node_hour() -> None:
    m = {"eval_return_mean": 400.0, "slurm.node_hours": 0.5, "episode_return_mean": 300.0}
    assert metric_value(m, "return_per_node_hour") == 800.0
    assert metric_value(m, "return_per_node_hour", return_metric="episode_return_mean") == 600.0
    assert metric_value(m, "eval_return_mean") == 400.0
    assert metric_value({"eval_return_mean": 1.0}, "return_per_node_hour") is None
    assert metric_value({**m, "slurm.node_hours": 0.0}, "return_per_node_hour") is None


def _run(run_id: str, **metrics: float) -> Any:
    info = SimpleNamespace(run_id=run_id, run_name=run_id, status="FINISHED")
    return SimpleNamespace(info=info, data=SimpleNamespace(metrics=metrics))


def test_comparison_rows_show_return_and_cost_and_score_by_the_metric() -> None:
    fast = _run("fast", eval_return_mean=300.0, **{"slurm.node_hours": 0.1})
    big = _run("big", eval_return_mean=450.0, **{"slurm.node_hours": 0.5})
    rows = [_row(r, "return_per_node_hour", "episode_return_mean") for r in (fast, big)]
    assert [r["score"] for r in rows] == [3000.0, 900.0]
    assert rows[1]["eval_return_mean"] == 450.0 and rows[1]["slurm.node_hours"] == 0.5
    assert rows[1]["return_per_node_hour"] == 900.0
    by_return = [_row(r, "eval_return_mean", "episode_return_mean") for r in (fast, big)]
    assert [r["score"] for r in by_return] == [300.0, 450.0]
    assert by_return[0]["return_per_node_hour"] == 3000.0  # both figures in the table
    no_eval = _run("n", episode_return_mean=200.0, **{"slurm.node_hours": 0.5})
    assert _row(no_eval, "return_per_node_hour", "episode_return_mean")["score"] == 400.0


def test_comparison_uses_the_tasks_eval_return_mlflow_gets_only_at_finalize() -> None:
    """A sweep's runs have no eval_return_mean in MLflow when compared (finalize logs it
    for the best run only, afterwards): the tasks' results supply it."""
    run = _run("a", episode_return_mean=100.0, **{"slurm.node_hours": 0.5})
    row = _row(run, "return_per_node_hour", "episode_return_mean", {"eval_return_mean": 300.0})
    assert (row["eval_return_mean"], row["return_per_node_hour"], row["score"]) == (
        300.0,
        600.0,
        600.0,
    )
    assert row["score_metric"] == "return_per_node_hour"
    # a task without an evaluation (None) leaves the run's own metrics
    row = _row(run, "return_per_node_hour", "episode_return_mean", {"eval_return_mean": None})
    assert (row["eval_return_mean"], row["score"]) == (None, 200.0)


def test_sweep_refuses_an_unknown_promotion_metric_before_anything_runs() -> None:
    from airflow.dag_processing.dagbag import DagBag
    from airflow.sdk.exceptions import AirflowFailException

    dags = Path(__file__).resolve().parents[2] / "dags" / "rllib_sweep.py"
    dag = DagBag(dag_folder=str(dags)).dags["rllib_sweep"]
    param = dag.params.get_param("promotion_metric")
    assert param.value == "eval_return_mean"
    assert param.schema["enum"] == ["eval_return_mean", "return_per_node_hour"]
    resolve = dag.get_task("resolve").python_callable
    with pytest.raises(AirflowFailException, match=r"invalid Params: promotion_metric: 'x'"):
        resolve(params={"promotion_metric": "x"})
    # resolve feeds build_env, which gates sanity_check -> train: nothing is submitted
    assert "resolve" in dag.get_task("build_env").upstream_task_ids


def test_job_cost_dataclass_fields() -> None:
    cost = JobCost("COMPLETED", "0:0", 10.0, 2, 4, 20 / 3600, None, None, None, True, 40.0)
    assert cost.cpu_efficiency is None
    assert "slurm.cpu_efficiency" not in cost.metrics()
    assert cost.metrics()["slurm.exit_code"] == 0.0


@pytest.mark.parametrize("dag_file", ["rllib_sweep", "rllib_retrain"])
def test_trigger_refuses_an_unknown_promotion_metric(dag_file: str) -> None:
    """Airflow checks a trigger's conf against the Param before the run exists."""
    import copy

    from airflow.dag_processing.dagbag import DagBag
    from airflow.sdk.exceptions import ParamValidationError

    path = Path(__file__).resolve().parents[2] / "dags" / f"{dag_file}.py"
    dag = DagBag(dag_folder=str(path)).dags[dag_file]
    params = copy.deepcopy(dag.params)
    params.update({"promotion_metric": "return_per_node_hour"})
    params.validate()
    with pytest.raises(ParamValidationError, match="param promotion_metric: 'cheapest'"):
        params.update({"promotion_metric": "cheapest"})


def test_promote_task_refuses_an_unknown_metric() -> None:
    from airflow.sdk.exceptions import AirflowFailException
    from slurm_ray.pipeline import promote_model

    with pytest.raises(AirflowFailException, match=r"promotion_metric: 'x' is not one of"):
        promote_model({"model_name": "m", "model_version": "1"}, {}, "d", "x")
