"""R6: hostile values in every string Param, job_spec and environment field.

Each value is either refused with a message naming the field (and no job is
submitted), or passed through as inert data; nothing is ever executed and no
marker file appears on either side.  ``entrypoint``, ``environment.module_lines``
and ``environment.conda_setup`` are shell code by design (written by the DAG
author, not a run parameter) and are not in scope.
"""

from __future__ import annotations

import glob
import json
import shlex
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.test_operator import FakeTI, make_op, run_deferred
from tests.conftest import DevCluster
from tests.faults.helpers import jobs_ever
from tests.mlflow_fixtures import MlflowServer

pytestmark = [pytest.mark.faults, pytest.mark.cluster]

MARK = "PWNED_R6"
M = f"/tmp/{MARK}"
HOSTILE: dict[str, str] = {
    "quotes": "a'b\"c",
    "semicolon": f"x; touch {M}",
    "subst": f"$(touch {M})",
    "backticks": f"`touch {M}`",
    "newline": f"x\ntouch {M}",
    "dotdot": f"../../../../tmp/{MARK}",
    "long": "A" * 10_000,
    "non_ascii": "ñ飞🚀",
}
#: one value that combines every trick, for the fields that reach the cluster
COMBINED = f"a'b\"c; $(touch {M}) `touch {M}` ../../{MARK} ñ飞🚀"

JOB_SPEC_TEXT = ("mem", "gres", "partition", "account", "qos", "time", "output", "error",
                 "constraint", "signal", "chdir")  # fmt: skip
ENV_TEXT = ("prefix", "spec_file", "python")


def no_marker(cluster: DevCluster) -> None:
    assert not glob.glob(f"/tmp/{MARK}*"), glob.glob(f"/tmp/{MARK}*")
    found = cluster.ssh(
        f"ls -d /tmp/{MARK}* 2>/dev/null; find {shlex.quote(str(cluster.scratch))} "
        f"-name '{MARK}*' 2>/dev/null | head",
        check=False,
    ).stdout.strip()
    assert not found, found


#: Small-run overrides: an accepted hostile value is run for real, one short iteration.
SMALL_RUN = {"nodes": 1, "cpus_per_node": 2, "num_env_runners": 1, "envs_per_runner": 2,
             "train_batch_size": 500, "stop_iterations": 1}  # fmt: skip


def no_marker_anywhere(cluster: DevCluster, mlflow_dir: Path) -> None:
    no_marker(cluster)
    found = [str(p) for p in mlflow_dir.rglob(f"*{MARK}*")]
    assert not found, found


def test_r6_params_refused_naming_the_field_or_inert(
    cluster: DevCluster, mlflow_server: MlflowServer, faults
) -> None:
    from airflow.sdk import Param
    from slurm_ray.operators.training import SlurmRayOperator
    from slurm_ray.params import RunParamError, param_specs, resolve_run

    specs = param_specs()
    defaults = {name: spec["default"] for name, spec in specs.items()}
    string_params = [n for n, s in specs.items() if "string" in str(s["schema"].get("type"))]
    assert string_params, specs

    def body() -> float:
        started = time.monotonic()
        outcomes: dict[str, str] = {}
        accepted: list[tuple[str, str]] = []
        for name in string_params:
            spec = specs[name]
            for label, value in HOSTILE.items():
                key = f"{name}/{label}"
                try:
                    Param(spec["default"], **spec["schema"]).resolve(value)
                except Exception:
                    outcomes[key] = "schema"  # the trigger form refuses it
                    continue
                try:
                    resolved = resolve_run({**defaults, name: value})
                except RunParamError as exc:
                    assert name in str(exc), (name, str(exc))
                    outcomes[key] = "refused"
                    continue
                # accepted: must be carried verbatim as data, never into shell text
                blob = json.dumps(resolved)
                assert json.dumps(value)[1:-1] in blob, (key, resolved)
                assert value not in resolved["job_spec"].values(), (key, resolved["job_spec"])
                outcomes[key] = "accepted"
                accepted.append((name, label))
        print(json.dumps(outcomes, indent=0))
        # Every accepted value, run for real: through the operator, a Slurm job
        # with the driver and MLflow. Values of different params share a run.
        rounds: list[dict[str, str]] = []
        for name, label in accepted:
            target = next((r for r in rounds if name not in r), None)
            if target is None:
                rounds.append(target := {})
            target[name] = label
        for i, round_ in enumerate(rounds):
            values = {name: HOSTILE[label] for name, label in round_.items()}
            resolved = resolve_run({**defaults, **SMALL_RUN, **values})
            resolved["mlflow"]["tracking_uri"] = mlflow_server.url
            ti = FakeTI(task_id=f"r6_params_{i}")
            op = SlurmRayOperator(
                task_id=ti.task_id,
                ssh_conn_id=resolved["ssh_conn_id"],
                remote_base_dir=resolved["remote_base_dir"],
                job_spec=resolved["job_spec"],
                environment=resolved["environment"],
                config=resolved["config"],
                mlflow=resolved["mlflow"],
                cluster_name=resolved["profile"],
                deferrable=True,
                poll_interval=1.0,
            )
            try:
                summary = run_deferred(op, {"ti": ti}, timeout=300)
            finally:
                if ti.xcom.get("slurm_job_id"):
                    cluster.ssh(f"scancel {ti.xcom['slurm_job_id']}", check=False)
            assert summary["state"] == "COMPLETED", (round_, summary)
            if "experiment_name" in values:  # carried as data: the experiment has that name
                from mlflow import MlflowClient

                run = MlflowClient(mlflow_server.url).get_run(ti.xcom["mlflow_run_id"])
                exp = MlflowClient(mlflow_server.url).get_experiment(run.info.experiment_id)
                assert exp.name == values["experiment_name"], exp.name
            print("inert after a real run:", round_)
            outcomes.update({f"{n}/{lb}": "inert (ran)" for n, lb in round_.items()})
        no_marker_anywhere(cluster, mlflow_server.data_dir)
        return time.monotonic() - started

    faults.trial("R6")(body)


def _expect_refused(cluster: DevCluster, field: str, **kwargs: Any) -> None:
    from airflow.sdk.exceptions import AirflowException
    from slurm_ray.operators.identity import run_identity

    task_id = f"r6_{uuid.uuid4().hex[:6]}"
    ti = FakeTI(task_id=task_id)
    job_name, _ = run_identity(ti.dag_id, ti.run_id, task_id, -1, 1)
    kwargs.setdefault("entrypoint", "true")
    op = make_op(cluster, task_id, job_spec=kwargs.pop("job_spec", {}), **kwargs)
    try:
        with pytest.raises(AirflowException) as err:
            op.execute({"ti": ti})
    finally:
        if ti.xcom.get("slurm_job_id"):
            cluster.ssh(f"scancel {ti.xcom['slurm_job_id']}", check=False)
    assert field in str(err.value), (field, str(err.value)[:300])
    print("refused:", field or kwargs, str(err.value).splitlines()[0][:200])
    assert "slurm_job_id" not in ti.xcom, (field, ti.xcom)
    assert jobs_ever(cluster, name=job_name) == set()


def _refused_by_slurm_or_inert(cluster: DevCluster, field: str, spec: dict[str, Any]) -> None:
    """sbatch refuses the value (nothing queued), or the job runs with it as plain data."""
    from airflow.sdk.exceptions import AirflowException
    from slurm_ray.operators.identity import run_identity

    ti = FakeTI(task_id=f"r6_spec_{field}")
    job_name, _ = run_identity(ti.dag_id, ti.run_id, ti.task_id, -1, 1)
    op = make_op(cluster, ti.task_id, entrypoint="true", job_spec=spec)
    try:
        summary = run_deferred(op, {"ti": ti}, timeout=120)
    except AirflowException as exc:
        # Slurm's own refusal: sbatch's "sbatch: error: ..." text, nothing queued.
        # Any other failure (a crash before sbatch, a failed job) is not a refusal.
        assert "sbatch: error:" in str(exc), (field, str(exc)[-500:])
        print("refused by Slurm:", field, str(exc).splitlines()[-1][:200])
        assert "slurm_job_id" not in ti.xcom, (field, ti.xcom)
        assert jobs_ever(cluster, name=job_name) == set(), field
        return
    finally:
        if ti.xcom.get("slurm_job_id"):
            cluster.ssh(f"scancel {ti.xcom['slurm_job_id']}", check=False)
    assert summary["state"] == "COMPLETED", (field, summary)
    print("inert:", field)


def test_r6_operator_fields_refused_or_inert(cluster: DevCluster, faults) -> None:
    """Every job_spec / environment text field through the operator, on the real cluster."""
    from slurm_ray.utils.batch import JobSpec
    from slurm_ray.utils.environment import EnvironmentSpec

    def body() -> float:
        started = time.monotonic()
        accepted: list[tuple[str, str, str]] = []
        for field in JOB_SPEC_TEXT:
            for label, value in {**HOSTILE, "combined": COMBINED}.items():
                try:
                    JobSpec.from_dict({"job_name": "x", field: value})
                except ValueError as exc:
                    assert field in str(exc), (field, label, str(exc)[:200])
                    continue
                accepted.append(("job_spec", field, label))
        for field in ENV_TEXT:
            for label, value in {**HOSTILE, "combined": COMBINED}.items():
                try:
                    EnvironmentSpec.from_dict({"kind": "venv", "prefix": "/opt/v", field: value})
                except ValueError as exc:
                    assert field in str(exc), (field, label, str(exc)[:200])
                    continue
                accepted.append(("environment", field, label))
        # the values the specs accept, through the operator on the real cluster
        # (one execute per field with the value that combines every trick)
        # (the combined value where the spec accepted it, else one it accepted)
        labels: dict[tuple[str, str], list[str]] = {}
        for kind, f, label in accepted:
            labels.setdefault((kind, f), []).append(label)
        for (kind, field), ok in sorted(labels.items()):
            value = COMBINED if "combined" in ok else HOSTILE[ok[0]]
            if kind == "job_spec":
                spec = {"nodes": 1, "time": "2", field: value}
                if field in ("output", "error", "chdir"):
                    _expect_refused(cluster, f"job_spec.{field}", job_spec=spec)
                    continue
                _refused_by_slurm_or_inert(cluster, field, spec)
            else:
                env = {"kind": "venv", "prefix": str(cluster.venv), field: value}
                ti = FakeTI(task_id=f"r6_env_{field}")
                op = make_op(
                    cluster, ti.task_id, entrypoint="true", environment=env,
                    job_spec={"nodes": 1, "time": "2"},
                )  # fmt: skip
                assert run_deferred(op, {"ti": ti}, timeout=120)["state"] == "COMPLETED"
        no_marker(cluster)
        return time.monotonic() - started

    faults.trial("R6")(body)


def test_r6_env_vars_and_config_are_inert(cluster: DevCluster, faults) -> None:
    """A hostile env var value reaches the job byte for byte; a hostile config string is refused."""

    def body() -> float:
        started = time.monotonic()
        value = COMBINED + "\n" + HOSTILE["long"][:2000]
        ti = FakeTI(task_id="r6_envvar")
        op = make_op(
            cluster,
            ti.task_id,
            entrypoint='printenv R6VAL > "$SLURM_RAY_RUN_DIR/r6val.txt"',
            env_vars={"R6VAL": value},
            job_spec={"nodes": 1, "time": "2"},
        )
        assert run_deferred(op, {"ti": ti}, timeout=120)["state"] == "COMPLETED"
        got = cluster.ssh(f"cat {shlex.quote(ti.xcom['run_dir'])}/r6val.txt").stdout
        assert got == value + "\n", got[:200]
        for key in ("env_id", "algorithm"):
            _expect_refused(
                cluster, f"config.{key}", entrypoint=None,
                config={"env_id": "CartPole-v1", key: COMBINED},
            )  # fmt: skip
        _expect_refused(cluster, "env_vars", env_vars={f"X; touch {M}": "1"})
        no_marker(cluster)
        return time.monotonic() - started

    faults.trial("R6")(body)
