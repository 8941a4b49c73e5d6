"""Every DAG file imports cleanly and has the shape users rely on."""

from __future__ import annotations

from pathlib import Path

import pytest

DAGS = Path(__file__).resolve().parents[2] / "dags"


@pytest.fixture(scope="module")
def dagbag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS))


def test_no_import_errors(dagbag) -> None:
    assert dagbag.import_errors == {}
    assert {"rllib_train", "rllib_retrain", "rllib_sweep"} <= set(dagbag.dag_ids)


def test_train_dag_chain_and_params(dagbag) -> None:
    dag = dagbag.dags.get("rllib_train")
    assert "NullTimetable" in repr(dag.timetable)
    ids = set(dag.task_ids)
    assert {"resolve", "build_env", "sanity_check", "train", "register_model", "promote"} <= ids
    train = dag.get_task("train")
    assert train.retries >= 1
    upstream = {t.task_id for t in train.upstream_list}
    assert "sanity_check" in upstream
    for name in (
        "profile",
        "env_id",
        "algorithm",
        "nodes",
        "cpus_per_node",
        "gpus_per_node",
        "partition",
        "account",
        "time_limit",
        "stop_return_mean",
        "stop_env_steps",
        "stop_iterations",
        "stop_minutes",
        "lr",
        "train_batch_size",
        "num_env_runners",
        "envs_per_runner",
        "seed",
        "experiment_name",
        "deferrable",
    ):
        param = dag.params.get_param(name)
        assert param.description, name
        assert param.schema, name
    assert train.export_model is True


def test_retrain_is_scheduled_and_publishes_asset(dagbag) -> None:
    dag = dagbag.dags.get("rllib_retrain")
    assert "0 0 * * 0" in repr(dag.timetable)
    publish = dag.get_task("publish_champion")
    assert publish.outlets


def test_sweep_maps_training(dagbag) -> None:
    from airflow.sdk.definitions.mappedoperator import MappedOperator
    from slurm_ray.operators.training import SlurmRayOperator

    dag = dagbag.dags.get("rllib_sweep")
    assert {"train", "compare", "register_best", "promote"} <= set(dag.task_ids)
    train = dag.get_task("train")
    # one mapped SlurmRayOperator, expanded over the planned runs at run time
    assert isinstance(train, MappedOperator) and train.operator_class is SlurmRayOperator
    assert train.expand_input.value.operator.task_id == "plan_runs"
    assert train.partial_kwargs["deferrable"] is True


def test_deferrable_param_reaches_the_operator(dagbag) -> None:
    from airflow.sdk.exceptions import AirflowException
    from slurm_ray.operators.training import _as_bool
    from slurm_ray.params import param_specs, resolve_run

    defaults = {name: spec["default"] for name, spec in param_specs().items()}
    assert resolve_run(defaults)["deferrable"] is True
    assert resolve_run(defaults | {"deferrable": False})["deferrable"] is False
    assert [_as_bool(v, "deferrable") for v in (True, "True", "false", "0", "")] == [
        True,
        True,
        False,
        False,
        False,
    ]
    with pytest.raises(AirflowException, match="deferrable: expected true or false"):
        _as_bool("maybe", "deferrable")
    # ...and the train task takes it from `resolve`, rendered at run time
    train = dagbag.dags.get("rllib_train").get_task("train")
    assert train.deferrable.operator.task_id == "resolve"
    assert train.deferrable.key == "deferrable"
    assert "deferrable" in train.template_fields


def _form_required(schema: dict) -> bool:
    """The Airflow trigger form's rule: a typed field is required unless "null" is a type."""
    kind = schema.get("type")
    return bool(kind) and not (isinstance(kind, list) and "null" in kind)


@pytest.mark.parametrize("dag_id", ["rllib_train", "rllib_retrain", "rllib_sweep"])
def test_trigger_form_accepts_the_defaults(dagbag, dag_id: str) -> None:
    """Left as they are, the form's fields are valid: nothing blocks the Trigger button."""
    import jsonschema

    dag = dagbag.dags.get(dag_id)
    for name in dag.params:
        param = dag.params.get_param(name)
        if _form_required(param.schema):
            assert param.value not in (None, ""), f"{dag_id}.{name}: required with no default"
        jsonschema.validate(param.value, param.schema)
    dag.params.validate()  # Airflow's own check of the whole set


@pytest.mark.parametrize("name", ["partition", "account"])
def test_site_placement_is_optional_and_empty_means_the_profile(name: str) -> None:
    from slurm_ray.params import param_specs, resolve_run

    spec = param_specs()[name]
    assert spec["default"] is None and "null" in spec["schema"]["type"]
    defaults = {n: s["default"] for n, s in param_specs().items()}
    assert resolve_run(defaults)["job_spec"]["partition"] == "debug"  # the local profile's
    for empty in (None, ""):
        assert resolve_run(defaults | {name: empty})["job_spec"].get("partition") == "debug"
    assert resolve_run(defaults | {name: "mine"})["job_spec"][name] == "mine"
