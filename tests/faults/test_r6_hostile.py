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
from typing import Any

import pytest

from tests.cluster.test_operator import FakeTI, make_op, run_deferred
from tests.conftest import DevCluster
from tests.faults.helpers import jobs_ever

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


def test_r6_params_refused_naming_the_field_or_inert(cluster: DevCluster, faults) -> None:
    from airflow.sdk import Param
    from slurm_ray.params import RunParamError, param_specs, resolve_run

    specs = param_specs()
    defaults = {name: spec["default"] for name, spec in specs.items()}
    string_params = [n for n, s in specs.items() if "string" in str(s["schema"].get("type"))]
    assert string_params, specs

    def body() -> float:
        started = time.monotonic()
        outcomes: dict[str, str] = {}
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
                outcomes[key] = "inert"
        print(json.dumps(outcomes, indent=0))
        no_marker(cluster)
        return time.monotonic() - started

    faults.trial("R6")(body)


def _expect_refused(cluster: DevCluster, field: str, **kwargs: Any) -> None:
    from airflow.sdk.exceptions import AirflowException
    from slurm_ray.operators.slurm_ray import run_identity

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

    ti = FakeTI(task_id=f"r6_spec_{field}")
    op = make_op(cluster, ti.task_id, entrypoint="true", job_spec=spec)
    try:
        summary = run_deferred(op, {"ti": ti}, timeout=120)
    except AirflowException as exc:
        print("refused by Slurm:", field, str(exc).splitlines()[-1][:200])
        assert "slurm_job_id" not in ti.xcom, (field, ti.xcom)
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
        fields = sorted({(kind, f) for kind, f, _ in accepted})
        for kind, field in fields:
            if kind == "job_spec":
                spec = {"nodes": 1, "time": "2", field: COMBINED}
                if field in ("output", "error", "chdir"):
                    _expect_refused(cluster, f"job_spec.{field}", job_spec=spec)
                    continue
                _refused_by_slurm_or_inert(cluster, field, spec)
            else:
                env = {"kind": "venv", "prefix": str(cluster.venv), field: COMBINED}
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
