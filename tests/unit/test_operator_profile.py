"""The one-word operator: ``profile=`` and plain placement keywords (pure: no cluster)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest


def docstring_example() -> str:
    """The code block that opens SlurmRayOperator's docstring, exactly as written there."""
    from slurm_ray.operators.training import SlurmRayOperator

    doc = SlurmRayOperator.__doc__ or ""
    head, sep, rest = doc.partition("Minimal example")
    assert sep and len(head.strip().splitlines()) <= 1, "the docstring must open with the example"
    block = rest.split("::", 1)[1].split("\n\n    The job starts", 1)[0]
    return textwrap.dedent(block).strip()


def test_docstring_example_parses_as_a_user_dag(tmp_path: Path) -> None:
    from airflow.dag_processing.dagbag import DagBag

    code = docstring_example()
    assert 'profile="local"' in code and "nodes=2" in code
    body = textwrap.indent(code, "    ")
    (tmp_path / "probe_dag.py").write_text(
        "from datetime import datetime\n"
        "from airflow.sdk import DAG\n"
        "from slurm_ray import SlurmRayOperator\n\n"
        'with DAG(dag_id="probe_dag", schedule=None, start_date=datetime(2026, 1, 1)):\n'
        f"{body}\n"
    )
    bag = DagBag(dag_folder=str(tmp_path))
    assert bag.import_errors == {}
    probe = bag.dags["probe_dag"].get_task("probe")
    assert probe.ssh_conn_id == "slurm_dev" and probe.cluster_name == "local"
    assert probe.environment["kind"] == "venv"


def _spec(op):
    from slurm_ray.operators.training_job import validate_job

    spec, env, _ = validate_job(op, "job", "slurm-%j.out")
    return spec, env


def test_profile_supplies_connection_base_dir_environment_and_placement() -> None:
    from slurm_ray.operators.training import SlurmRayOperator
    from slurm_ray.profiles import get_profile

    local = get_profile("local")
    op = SlurmRayOperator(task_id="t", profile="local", entrypoint="true")
    assert op.ssh_conn_id == local.ssh_conn_id
    assert op.remote_base_dir == local.remote_base_dir
    assert op.environment == local.environment.to_dict()
    spec, env = _spec(op)
    assert spec.partition == "debug" and env.kind == "venv"


def test_explicit_arguments_override_the_profile() -> None:
    from slurm_ray.operators.training import SlurmRayOperator

    op = SlurmRayOperator(
        task_id="t",
        profile="local",
        ssh_conn_id="other",
        remote_base_dir="/data/runs",
        environment={"kind": "none"},
        partition="gpu",
        nodes=3,
        cpus_per_node=2,
        time_limit="10",
        account="proj",
        entrypoint="true",
    )
    assert (op.ssh_conn_id, op.remote_base_dir) == ("other", "/data/runs")
    spec, env = _spec(op)
    assert env.kind == "none"
    assert (spec.partition, spec.nodes, spec.cpus_per_task, spec.time, spec.account) == (
        "gpu",
        3,
        2,
        "10",
        "proj",
    )


def test_plain_keywords_and_job_spec_agree_or_fail_naming_the_field() -> None:
    from airflow.sdk.exceptions import AirflowException
    from slurm_ray.operators.training import SlurmRayOperator

    same = SlurmRayOperator(
        task_id="t", ssh_conn_id="c", nodes=2, job_spec={"nodes": 2, "mem": "1G"}, entrypoint="x"
    )
    spec, _ = _spec(same)
    assert spec.nodes == 2 and spec.mem == "1G"
    clash = SlurmRayOperator(
        task_id="t", ssh_conn_id="c", nodes=2, job_spec={"nodes": 3}, entrypoint="x"
    )
    with pytest.raises(AirflowException, match=r"nodes: given as nodes=2 and as job_spec"):
        _spec(clash)


def test_without_a_profile_runs_go_under_the_remote_home() -> None:
    from slurm_ray.operators.identity import fill_placeholders
    from slurm_ray.operators.training import SlurmRayOperator

    op = SlurmRayOperator(task_id="t", ssh_conn_id="c", entrypoint="true")
    assert op.remote_base_dir == "{home}/slurm_ray/runs"
    assert fill_placeholders(op.remote_base_dir, {"{home}": "/home/u", "{user}": "u"}) == (
        "/home/u/slurm_ray/runs"
    )
    with pytest.raises(ValueError, match="ssh_conn_id: give ssh_conn_id or profile"):
        SlurmRayOperator(task_id="t", entrypoint="true")


def test_unknown_profile_and_placeholder_account_are_named() -> None:
    from airflow.sdk.exceptions import AirflowException
    from slurm_ray.operators.training import SlurmRayOperator
    from slurm_ray.profiles import ProfileError

    with pytest.raises(ProfileError, match="profile: unknown cluster profile 'summit'"):
        SlurmRayOperator(task_id="t", profile="summit", entrypoint="true")
    kestrel = SlurmRayOperator(task_id="t", profile="kestrel", entrypoint="true")
    with pytest.raises(AirflowException, match="account: the kestrel profile needs"):
        _spec(kestrel)
    spec, _ = _spec(SlurmRayOperator(task_id="t", profile="kestrel", account="p", entrypoint="x"))
    assert (spec.account, spec.partition) == ("p", "short")


def test_environment_and_sanity_operators_take_the_profile() -> None:
    from slurm_ray.operators.environment import ClusterEnvOperator
    from slurm_ray.operators.sanity_check import GymSanityCheckOperator
    from slurm_ray.profiles import get_profile

    local = get_profile("local")
    env = ClusterEnvOperator(task_id="env", profile="local")
    assert env.ssh_conn_id == "slurm_dev" and env.remote_dir == local.env_stage_dir
    assert env.environment == local.environment.to_dict()
    sanity = GymSanityCheckOperator(task_id="s", profile="local", where="compute")
    assert (sanity.ssh_conn_id, sanity.partition) == ("slurm_dev", "debug")
    assert GymSanityCheckOperator(task_id="s", profile="local", partition="p").partition == "p"
    with pytest.raises(ValueError, match="environment: give environment or profile"):
        ClusterEnvOperator(task_id="env", ssh_conn_id="c")
