"""The Tune sweep's spec (tune_space) and the rllib_tune DAG's plan: bad input named, nothing submitted."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from airflow.sdk.exceptions import AirflowFailException
from slurm_ray.tune_plan import TUNE_ENTRYPOINT, plan_tune, tune_files
from slurm_ray.tune_space import TuneSpecError, trial_count, validate_tune

DAGS = Path(__file__).resolve().parents[2] / "dags"
BASE: dict[str, Any] = {"stop": {"iterations": 8}, "train_batch_size": 400, "minibatch_size": 100}


def test_a_good_spec_is_normalised_and_counted() -> None:
    spec = validate_tune(
        {
            "search": {
                "lr": {"loguniform": [1e-4, 1e-2]},
                "hidden_sizes": {"grid": [[32], [64, 64], [16]]},
                "gamma": {"choice": [0.95, 0.99]},
            },
            "num_samples": 2,
            "scheduler": "asha",
        },
        BASE,
    )
    assert spec["trials"] == 6 == trial_count(spec)
    assert spec["search"]["hidden_sizes"] == {"grid": [[32], [64, 64], [16]]}
    assert spec["max_concurrent_trials"] == 0
    assert validate_tune({"search": {"seed": {"grid": [1, 2]}}}, BASE)["scheduler"] == "fifo"


@pytest.mark.parametrize(
    ("tune", "base", "field"),
    [
        ("nope", BASE, "tune:"),
        ({"search": {}}, BASE, "tune.search:"),
        ({"search": {"lr": {"grid": [0.1]}}, "colour": 1}, BASE, "tune.colour:"),
        ({"search": {"env_id": {"grid": ["CartPole-v1"]}}}, BASE, "tune.search.env_id:"),
        ({"search": {"lr": {"uniform": [0.1, 0.2]}}}, BASE, "tune.search.lr:"),
        ({"search": {"lr": {"grid": [0.1, 2.0]}}}, BASE, "tune.search.lr.grid[1]:"),
        ({"search": {"lr": {"grid": []}}}, BASE, "tune.search.lr.grid:"),
        ({"search": {"lr": {"loguniform": [0.01, 0.001]}}}, BASE, "tune.search.lr.loguniform:"),
        ({"search": {"lr": {"loguniform": [0, 0.001]}}}, BASE, "tune.search.lr.loguniform[0]:"),
        ({"search": {"lr": {"loguniform": [0.1]}}}, BASE, "tune.search.lr.loguniform:"),
        (
            {"search": {"num_epochs": {"loguniform": [1, 8]}}},
            BASE,
            "tune.search.num_epochs.loguniform:",
        ),
        ({"search": {"hidden_sizes": {"choice": [[0]]}}}, BASE, "tune.search.hidden_sizes.choice[0]:"),
        # The cross-field rule of the training config holds per value too.
        ({"search": {"minibatch_size": {"grid": [800]}}}, BASE, "tune.search.minibatch_size.grid[0]:"),
        ({"search": {"lr": {"grid": [0.1]}}, "scheduler": "hyperband"}, BASE, "tune.scheduler:"),
        ({"search": {"lr": {"grid": [0.1]}}, "scheduler": "asha"}, {"stop": {"minutes": 5}}, "tune.scheduler:"),
        ({"search": {"hidden_sizes": {"grid": [[8]]}}, "scheduler": "pbt"}, BASE, "tune.search.hidden_sizes:"),
        ({"search": {"lr": {"grid": [0.1]}}, "num_samples": 0}, BASE, "tune.num_samples:"),
        ({"search": {"lr": {"grid": [0.1]}}, "num_samples": True}, BASE, "tune.num_samples:"),
        ({"search": {"seed": {"grid": list(range(64))}}, "num_samples": 5}, BASE, "tune.num_samples:"),
        ({"search": {"lr": {"grid": [0.1]}}, "max_concurrent_trials": -1}, BASE, "tune.max_concurrent_trials:"),
    ],
)  # fmt: skip
def test_bad_spec_names_the_field(tune: Any, base: dict[str, Any], field: str) -> None:
    with pytest.raises(TuneSpecError) as err:
        validate_tune(tune, base)
    assert str(err.value).startswith(field), str(err.value)


def test_plan_fails_naming_the_param_and_sets_the_checkpoint_signal() -> None:
    resolved = {"config": BASE, "job_spec": {"nodes": 2, "time": "00:30:00"}}
    with pytest.raises(AirflowFailException, match=r"invalid Params: search\.lr\.grid\[0\]: "):
        plan_tune(resolved, {"search": {"lr": {"grid": [5]}}, "num_samples": 1})
    plan = plan_tune(resolved, {"search": {"lr": {"grid": [0.001]}}, "scheduler": "pbt", "x": 1})
    assert plan["config"]["base"] == BASE
    assert plan["config"]["tune"]["scheduler"] == "pbt"
    assert plan["job_spec"] == {"nodes": 2, "time": "00:30:00", "signal": "B:USR1@60"}


def test_staged_files_exist_and_entrypoint_uses_them() -> None:
    files = tune_files()
    assert set(files) == {"tune_driver.py", "tune_space.py"}
    assert all(Path(p).is_file() for p in files.values())
    assert "tune_driver.py --config config.json" in TUNE_ENTRYPOINT


def test_tune_dag_shape() -> None:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAGS / "rllib_tune.py"))
    assert bag.import_errors == {}
    dag = bag.dags["rllib_tune"]
    assert {"resolve", "build_env", "sanity_check", "tune", "register_best", "promote"} <= set(
        dag.task_ids
    )
    tune = dag.get_task("tune")
    assert tune.retries >= 1 and tune.entrypoint == TUNE_ENTRYPOINT
    assert "sanity_check" in {t.task_id for t in tune.upstream_list}
    for name in ("search", "num_samples", "scheduler", "max_concurrent_trials", "lr", "nodes"):
        assert dag.params.get_param(name).description, name


def test_a_checked_spec_passes_again_as_the_driver_checks_it() -> None:
    spec = validate_tune({"search": {"lr": {"grid": [0.001, 0.003]}}, "num_samples": 2}, BASE)
    assert validate_tune(spec, BASE) == spec


def test_the_dag_defaults_resolve_to_a_tune_job(monkeypatch: pytest.MonkeyPatch) -> None:
    """The trigger form's defaults pass the resolve task's checks (asha needs stop_iterations)."""
    from airflow.dag_processing.dagbag import DagBag
    from slurm_ray.pipeline import resolve_or_fail
    from slurm_ray.tune_plan import TUNE_PARAMS

    monkeypatch.setenv("SLURM_RAY_MLFLOW_URI", "http://127.0.0.1:5000")
    dag = DagBag(dag_folder=str(DAGS / "rllib_tune.py")).dags["rllib_tune"]
    params = {k: dag.params[k] for k in dag.params}
    resolved = resolve_or_fail({k: v for k, v in params.items() if k not in TUNE_PARAMS})
    plan = plan_tune(resolved, params)
    assert plan["config"]["tune"]["scheduler"] == "asha"
    assert plan["config"]["tune"]["trials"] == params["num_samples"]
    assert plan["config"]["base"]["stop"]["iterations"] == 20
    assert resolved["mlflow"]["experiment_name"] == "rllib_tune"


def test_a_trial_that_cannot_fit_the_job_is_refused_naming_num_env_runners() -> None:
    """Tune would wait until the time limit for a trial bigger than the allocation."""
    spec = {"search": {"lr": {"grid": [0.001, 0.01]}}}
    small = {"nodes": 1, "cpus_per_task": 2, "time": "00:30:00"}
    resolved = {"config": {**BASE, "num_env_runners": 2}, "job_spec": small}
    with pytest.raises(AirflowFailException, match=r"num_env_runners: a trial needs 3 CPUs"):
        plan_tune(resolved, spec)
    fits = {"config": {**BASE, "num_env_runners": 1}, "job_spec": small}
    assert plan_tune(fits, spec)["job_spec"]["cpus_per_task"] == 2
    # the DAG's own default: trials sample in their own process
    assert plan_tune({"config": {**BASE, "num_env_runners": 0}, "job_spec": small}, spec)
