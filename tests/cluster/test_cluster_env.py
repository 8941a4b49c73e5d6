"""ClusterEnvOperator and GymSanityCheckOperator against the real local cluster.

Driven the way a worker drives them (``op.execute(context)``); the task
instance is a small stand-in. Builds use tiny requirements files (``six``
from PyPI) into fresh prefixes under the cluster's scratch directory, with
Debian's python3, which the job user can execute.
"""

from __future__ import annotations

import json
import shlex
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk.exceptions import AirflowException

from tests.conftest import DevCluster

pytestmark = pytest.mark.cluster

PYTHON = "/usr/bin/python3"


@dataclass
class FakeTI:
    task_id: str = "env"
    xcom: dict[str, Any] = field(default_factory=dict)

    def xcom_push(self, key: str, value: Any) -> None:
        self.xcom[key] = value


def ctx() -> dict[str, Any]:
    return {"ti": FakeTI()}


def env_op(prefix: str, spec: Path, **kwargs: Any):
    from slurm_ray import ClusterEnvOperator

    params: dict[str, Any] = {
        "task_id": "env",
        "ssh_conn_id": "slurm_dev",
        "environment": {"kind": "venv", "prefix": prefix, "python": PYTHON},
        "spec_path": str(spec),
        "build_timeout": 600,
    }
    params.update(kwargs)
    return ClusterEnvOperator(**params)


def sanity_op(cluster: DevCluster, **kwargs: Any):
    from slurm_ray import GymSanityCheckOperator

    params: dict[str, Any] = {
        "task_id": "sanity",
        "ssh_conn_id": "slurm_dev",
        "environment": {"kind": "venv", "prefix": str(cluster.venv)},
        "remote_dir": f"{cluster.scratch}/tests/sanity",
        "quiet": True,
        "timeout": 180,
        # These tests are about the check itself: never a pass recorded by an earlier run.
        "force": True,
    }
    params.update(kwargs)
    return GymSanityCheckOperator(**params)


def remote_sha(cluster: DevCluster, prefix: str) -> str:
    return cluster.ssh(f"cat {shlex.quote(prefix)}/.slurm_ray_spec_sha256").stdout.strip()


@pytest.fixture
def spec(tmp_path: Path) -> Path:
    path = tmp_path / "requirements.txt"
    path.write_text("six==1.16.0\n")
    return path


def count_commands(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every command SlurmHook.run sends from now on (they still run)."""
    from slurm_ray.hooks.slurm import SlurmHook

    commands: list[str] = []
    real_run = SlurmHook.run

    def counting_run(self: SlurmHook, command: str, **kwargs: Any) -> Any:
        commands.append(command)
        return real_run(self, command, **kwargs)

    monkeypatch.setattr(SlurmHook, "run", counting_run)
    return commands


def test_venv_build_noop_and_rebuild(
    cluster: DevCluster, spec: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefix = f"{cluster.new_dir('env')}/venv"

    first = env_op(prefix, spec).execute(ctx())
    assert first["action"] == "built" and first["kind"] == "venv" and first["prefix"] == prefix
    assert remote_sha(cluster, prefix) == first["sha256"]
    out = cluster.ssh(f"{shlex.quote(prefix)}/bin/python -c 'import six; print(six.__version__)'")
    assert out.stdout.strip() == "1.16.0"
    # the staged script and spec stay next to the environment, the staging dir is gone
    staged = cluster.ssh(f"ls -A {shlex.quote(prefix)}.spec").stdout.split()
    assert sorted(staged) == ["build_env.sh", "requirements.txt"]

    # unchanged spec: the staging mkdir and the build command, nothing rebuilt
    # (counted, not timed: the time is printed; bench/ holds speed figures)
    build_log = f"{shlex.quote(prefix)}.build.log"
    before = cluster.ssh(f"stat -c %Y.%s {build_log} && md5sum {build_log}").stdout
    commands = count_commands(monkeypatch)
    started = time.monotonic()
    again = env_op(prefix, spec).execute(ctx())
    print(f"\nno-op ClusterEnvOperator.execute: {time.monotonic() - started:.3f}s")
    assert again == {**first, "action": "up-to-date"}
    assert len(commands) == 2 and "build_env.sh" in commands[1], commands
    monkeypatch.undo()
    assert cluster.ssh(f"stat -c %Y.%s {build_log} && md5sum {build_log}").stdout == before

    # a changed spec (a comment is a change: the stamp is the file's sha256)
    # rebuilds; extra_env reaches the build: pip writes its log where PIP_LOG says
    spec.write_text("six==1.16.0\n# pinned for the test\n")
    pip_log = f"{cluster.new_dir('env')}/pip log.txt"  # a space: the value is quoted
    third = env_op(prefix, spec, extra_env={"PIP_LOG": pip_log}).execute(ctx())
    assert third["action"] == "built" and third["sha256"] != first["sha256"]
    assert remote_sha(cluster, prefix) == third["sha256"]
    logged = cluster.ssh(f"cat {shlex.quote(pip_log)}", check=False)
    assert logged.returncode == 0 and "six" in logged.stdout, logged


def test_concurrent_builds_of_one_prefix(cluster: DevCluster, spec: Path) -> None:
    prefix = f"{cluster.new_dir('env')}/venv"
    barrier = threading.Barrier(2)
    results: list[dict[str, Any]] = []
    errors: list[BaseException] = []

    def build() -> None:
        op = env_op(prefix, spec)
        barrier.wait()
        try:
            results.append(op.execute(ctx()))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not errors, errors
    assert sorted(r["action"] for r in results) == ["built", "up-to-date"]
    assert results[0]["sha256"] == results[1]["sha256"] == remote_sha(cluster, prefix)
    # one build ran: its log (truncated at the start of a build) has one install
    log = cluster.ssh(f"cat {shlex.quote(prefix)}.build.log").stdout
    assert log.count("Successfully installed") == 1


def test_failed_build_raises_with_pip_output(cluster: DevCluster, tmp_path: Path) -> None:
    prefix = f"{cluster.new_dir('env')}/venv"
    bad = tmp_path / "requirements.txt"
    bad.write_text("nonexistent-package-xyz==9.9\n")
    with pytest.raises(AirflowException) as err:
        env_op(prefix, bad).execute(ctx())
    msg = str(err.value)
    assert "build_env: FAILED" in msg
    assert "nonexistent-package-xyz" in msg and "No matching distribution" in msg
    # never stamped: the next run tries again instead of trusting a broken env
    assert cluster.ssh(
        f"test -e {shlex.quote(prefix)}/.slurm_ray_spec_sha256", check=False
    ).returncode


@pytest.mark.parametrize(
    "environment",
    [
        {"kind": "none"},
        {"kind": "modules", "module_lines": ["export SITE_READY=1", 'test -n "$SITE_READY"']},
    ],
)
def test_modules_and_none_build_nothing(cluster: DevCluster, environment: dict) -> None:
    from slurm_ray import ClusterEnvOperator

    op = ClusterEnvOperator(task_id="env", ssh_conn_id="slurm_dev", environment=environment)
    result = op.execute(ctx())
    assert result == {
        "kind": environment["kind"],
        "prefix": None,
        "sha256": None,
        "action": "nothing",
    }


def test_broken_module_line_fails_early(cluster: DevCluster) -> None:
    from slurm_ray import ClusterEnvOperator

    op = ClusterEnvOperator(
        task_id="env",
        ssh_conn_id="slurm_dev",
        environment={"kind": "modules", "module_lines": ["module load no-such-module"]},
    )
    with pytest.raises(AirflowException, match="module_lines failed"):
        op.execute(ctx())


def test_conda_kind_without_conda_is_a_clear_error(cluster: DevCluster, tmp_path: Path) -> None:
    prefix = f"{cluster.new_dir('conda')}/env"
    yml = tmp_path / "environment.yml"
    yml.write_text("name: t\ndependencies:\n  - python=3.11\n")
    op = env_op(prefix, yml, environment={"kind": "conda", "prefix": prefix})
    with pytest.raises(AirflowException) as err:
        op.execute(ctx())
    msg = str(err.value)
    assert msg.startswith("conda was not found on the cluster")
    assert "module_lines" in msg and "conda: command not found" in msg


# -- sanity check -------------------------------------------------------------------


def test_sanity_check_on_login_node(cluster: DevCluster) -> None:
    summary = sanity_op(cluster, episodes=2).execute(ctx())
    assert summary["ok"] is True and summary["api"] == "gymnasium"
    assert summary["env_id"] == "CartPole-v1" and summary["episodes"] == 2
    assert summary["steps"] > 0 and len(summary["returns"]) == 2
    assert summary["versions"]["gymnasium"] == "1.2.2"
    # staging directory removed after the run (the records of passes stay)
    left = cluster.ssh(f"ls -A {cluster.scratch}/tests/sanity").stdout.split()
    assert [name for name in left if name.startswith("run-")] == []


def test_sanity_check_on_compute_node(cluster: DevCluster) -> None:
    summary = sanity_op(cluster, where="compute", time="2").execute(ctx())
    assert summary["ok"] is True and summary["api"] == "gymnasium" and summary["steps"] > 0
    assert summary["host"] in ("n1", "n2")


def test_sanity_check_unknown_env_id(cluster: DevCluster) -> None:
    with pytest.raises(AirflowException) as err:
        sanity_op(cluster, env_id="NoSuchEnv-v0").execute(ctx())
    msg = str(err.value)
    assert "exit 4" in msg and "NoSuchEnv" in msg and "doesn't exist" in msg
    assert "\n" not in msg  # the one-line reason, not a traceback


def test_sanity_check_missing_prefix(cluster: DevCluster) -> None:
    missing = f"{cluster.scratch}/tests/no-such-env-{uuid.uuid4().hex[:6]}"
    op = sanity_op(cluster, environment={"kind": "venv", "prefix": missing})
    with pytest.raises(AirflowException) as err:
        op.execute(ctx())
    assert f"environment.prefix: {missing} does not exist" in str(err.value)


def test_hostile_values_are_refused_or_inert(cluster: DevCluster, spec: Path) -> None:
    marker = f"/tmp/PWNED_{uuid.uuid4().hex[:8]}"
    base = cluster.new_dir("hostile")
    for payload in (f"$(touch {marker})", f"`touch {marker}`", f"x'; touch {marker}; '"):
        with pytest.raises(AirflowException, match=r"^environment\.prefix: "):
            env_op(f"{base}/{payload}", spec).execute(ctx())
        with pytest.raises(AirflowException, match=r"^environment\.prefix: "):
            sanity_op(cluster, environment={"kind": "venv", "prefix": f"{base}/{payload}"}).execute(
                ctx()
            )
        with pytest.raises(AirflowException, match=r"^env_id: "):
            sanity_op(cluster, env_id=f"CartPole-v1{payload}").execute(ctx())
    # values that are allowed reach the cluster quoted and stay inert (without
    # accounting this Slurm may accept any account name: either outcome is fine)
    odd_account = sanity_op(cluster, where="compute", account=f"a'b $(touch {marker}) `id`")
    try:
        odd_account.execute(ctx())
    except AirflowException as exc:
        assert "account" in str(exc).lower()
    prefix = f"{base}/venv"
    hostile_env = {"SLURM_RAY_TEST_VALUE": f"$(touch {marker})'\"`touch {marker}`"}
    assert env_op(prefix, spec, extra_env=hostile_env).execute(ctx())["action"] == "built"
    assert cluster.ssh(f"test -e {marker}", check=False).returncode != 0
    assert not Path(marker).exists()
    # nothing was created outside the test directory either
    assert cluster.ssh(f"ls -A {shlex.quote(base)}").stdout.split() == [
        "venv",
        "venv.build.log",
        "venv.lock",
        "venv.spec",
    ]


# -- reuse of a recorded pass (issue 16 §2) ---------------------------------------------


@dataclass
class ReuseSite:
    """A private environment (the cluster venv behind its own prefix and spec stamp)."""

    cluster: DevCluster
    prefix: str
    remote_dir: str
    job_name: str

    def op(self, **kwargs: Any):
        params = {
            "environment": {"kind": "venv", "prefix": self.prefix},
            "remote_dir": self.remote_dir,
            "where": "compute",
            "partition": "debug",
            "time": "2",
            "job_name": self.job_name,
            "force": False,
            **kwargs,
        }
        return sanity_op(self.cluster, **params)

    def stamp(self, sha: str) -> None:
        """What build_env.sh's (re)build leaves: a new spec sha256 in the prefix."""
        path = shlex.quote(f"{self.prefix}/.slurm_ray_spec_sha256")
        self.cluster.ssh(f"printf '%s\\n' {sha} > {path}")

    def steps(self) -> int:
        """srun steps of this site so far (finished jobs stay in squeue -t all for 10 min)."""
        out = self.cluster.ssh(f"squeue -h -t all -n {self.job_name} -o %i").stdout
        return len(out.split())

    @property
    def records(self) -> str:
        return f"{self.remote_dir}/records"


@pytest.fixture
def reuse_site(cluster: DevCluster) -> ReuseSite:
    base = cluster.new_dir("sanity-reuse")
    prefix = f"{base}/venv"
    activate = shlex.quote(f". {cluster.venv}/bin/activate")
    cluster.ssh(f"mkdir -p {prefix}/bin && echo {activate} > {prefix}/bin/activate")
    site = ReuseSite(cluster, prefix, f"{base}/sanity", f"sanity-{uuid.uuid4().hex[:10]}")
    site.stamp("1" * 64)
    return site


def test_sanity_pass_is_reused_until_env_partition_or_force_change(
    reuse_site: ReuseSite, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture
) -> None:
    site = reuse_site
    first = site.op().execute(ctx())
    assert first["reused"] is False and first["host"] in ("n1", "n2")
    assert site.steps() == 1

    # the same check again: the recorded pass, one SSH command, no srun step
    commands = count_commands(monkeypatch)
    capfd.readouterr()
    started = time.monotonic()
    second = site.op().execute(ctx())
    print(f"\nreused sanity check: {time.monotonic() - started:.3f}s")
    monkeypatch.undo()
    assert len(commands) == 1
    assert second["reused"] is True and second["spec_sha256"] == "1" * 64
    assert {k: second[k] for k in first if k != "reused"} == {
        k: first[k] for k in first if k != "reused"
    }
    assert site.steps() == 1
    log = "".join(capfd.readouterr())
    assert "sanity check reused: passed for CartPole-v1 on partition debug at " in log
    assert "(env sha256 111111111111…, " in log and "force_sanity_check=true runs it again" in log

    # force, another partition value (the site default), a rebuilt env: checked for real
    assert site.op(force=True).execute(ctx())["reused"] is False
    assert site.steps() == 2
    assert site.op(partition=None).execute(ctx())["reused"] is False
    assert site.steps() == 3
    site.stamp("2" * 64)
    rebuilt = site.op().execute(ctx())
    assert rebuilt["reused"] is False and site.steps() == 4
    again = site.op().execute(ctx())
    assert again["reused"] is True and again["spec_sha256"] == "2" * 64 and site.steps() == 4
    # one record per check: the rebuilt env's replaced the old one; all private
    listing = site.cluster.ssh(f"stat -c '%a %U %n' {site.records} {site.records}/*").stdout
    rows = [line.split() for line in listing.splitlines()]
    assert [r[:2] for r in rows] == [["700", "slurmray"]] + [["600", "slurmray"]] * 2, listing
    assert sum(r[2].endswith("2" * 64 + ".json") for r in rows) == 1
    assert not any(r[2].endswith("1" * 64 + ".json") and "debug" in r[2] for r in rows)


def test_sanity_record_others_can_write_or_forge_is_ignored(
    reuse_site: ReuseSite, neighbour: Any, capfd: pytest.CaptureFixture
) -> None:
    site = reuse_site
    assert site.op().execute(ctx())["reused"] is False
    record = site.cluster.ssh(f"ls {site.records}/*.json").stdout.strip()
    assert site.steps() == 1

    # the job user's own record made group-writable: not trusted, checked again
    site.cluster.ssh(f"chmod g+w {shlex.quote(record)}")
    capfd.readouterr()
    assert site.op().execute(ctx())["reused"] is False
    assert "is writable by others (mode 620)" in "".join(capfd.readouterr())
    assert site.steps() == 2

    # a careless shared records directory, and the neighbour puts a forged pass in it
    forged = {
        "env_id": "CartPole-v1",
        "passed_at": "2026-12-01T00:00:00Z",
        "summary": {"ok": True, "host": "forged"},
    }
    site.cluster.ssh(f"chmod 755 {site.remote_dir} && chmod 777 {site.records}")
    neighbour.litter(record)
    payload = shlex.quote(json.dumps(forged))
    neighbour.run(f"rm -f {shlex.quote(record)} && echo {payload} > {shlex.quote(record)}")
    owner = site.cluster.ssh(f"stat -c %U {shlex.quote(record)}").stdout.strip()
    assert owner == neighbour.user
    capfd.readouterr()
    summary = site.op().execute(ctx())
    log = "".join(capfd.readouterr())
    assert summary["reused"] is False and summary["host"] in ("n1", "n2")
    assert site.steps() == 3
    assert "SANITY_RECORD ignored: " in log
    assert "SANITY_RECORD not written: " in log  # nor does the real check write there
    assert site.cluster.ssh(f"stat -c %U {shlex.quote(record)}").stdout.strip() == neighbour.user
