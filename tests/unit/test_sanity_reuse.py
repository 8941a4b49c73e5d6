"""Reuse of a recorded sanity-check pass: the command text and the decision, no cluster.

The rendered command runs in a local bash against a fake venv (its ``python``
prints the argv it was given) and a real records directory: a reused record
prints ``SANITY_REUSED`` and runs nothing; every other case says why and runs
the check, asking it to record the pass under the current spec hash.
"""

from __future__ import annotations

import importlib.util
import json
import os
import stat
import subprocess
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from slurm_ray.operators.sanity_check import GymSanityCheckOperator
from slurm_ray.slurm.environment import (
    SanityRecord,
    parse_sanity_reuse,
    render_sanity_command,
    render_sanity_script,
    sanity_record_key,
)
from slurm_ray.utils.environment import EnvironmentSpec

from tests.conftest import ROOT

SPEC_A = "a" * 64
SPEC_B = "b" * 64
STUB_PYTHON = '#!/usr/bin/env bash\necho "ARGV $*"\n'


@dataclass
class Site:
    home: Path
    prefix: Path
    env: EnvironmentSpec
    record: SanityRecord

    @property
    def records(self) -> Path:
        return self.home / self.record.records_dir

    def path(self, spec: str = SPEC_A) -> Path:
        return self.records / f"{self.record.key}-{spec}.json"

    def write(self, spec: str = SPEC_A, **fields: Any) -> Path:
        """A record as the real check writes it (private dirs, mode 0600)."""
        self.records.mkdir(parents=True, exist_ok=True, mode=0o700)
        for d in (self.records, self.records.parent):
            d.chmod(0o700)
        data = {
            **self.record.info,
            "spec_sha256": spec,
            "passed_at": "2026-12-01T13:02:11Z",
            "summary": {"ok": True, "env_id": "CartPole-v1", "steps": 17, "host": "n1"},
            **fields,
        }
        path = self.path(spec)
        path.write_text(json.dumps(data) + "\n")
        path.chmod(0o600)
        return path

    def check(self, record: SanityRecord | None = None) -> subprocess.CompletedProcess[str]:
        record = record or self.record
        script = render_sanity_script(
            self.env, env_id="CartPole-v1", episodes=1, max_steps=5, record=record
        )
        cmd = render_sanity_command(
            script,
            stage_dir=".slurm_ray/sanity/run-x",
            where="login",
            record=record,
            prefix=str(self.prefix),
        )
        env = {**os.environ, "HOME": str(self.home)}
        return subprocess.run(
            ["bash", "-c", cmd],
            input="print('the staged script')\n",
            capture_output=True,
            text=True,
            cwd=self.home,
            env=env,
            timeout=30,
        )


def _key(env: EnvironmentSpec, **over: Any) -> str:
    check = {"where": "compute", "partition": "debug", "account": None, "env_id": "CartPole-v1"}
    return sanity_record_key(env, "s" * 64, **{**check, **over})


@pytest.fixture
def site(tmp_path: Path) -> Site:
    home = tmp_path / "home"
    prefix = tmp_path / "envs" / "venv"
    (prefix / "bin").mkdir(parents=True)
    home.mkdir()
    (prefix / "bin" / "activate").write_text(f'PATH="{prefix}/bin:$PATH"\n')
    py = prefix / "bin" / "python"
    py.write_text(STUB_PYTHON)
    py.chmod(0o755)
    (prefix / ".slurm_ray_spec_sha256").write_text(SPEC_A + "\n")
    env = EnvironmentSpec(kind="venv", prefix=str(prefix))
    info = {"env_id": "CartPole-v1", "where": "login", "partition": None}
    record = SanityRecord(
        records_dir=".slurm_ray/sanity/records", key=_key(env), info=info, max_age_s=3600
    )
    return Site(home, prefix, env, record)


def ran(proc: subprocess.CompletedProcess[str]) -> list[str]:
    """The argv of the (stub) check, empty if it did not run."""
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("ARGV ")]
    return lines[0].split()[1:] if lines else []


# -- the decision, in the one remote command ----------------------------------------------


def test_no_record_runs_the_check_and_asks_it_to_record(site: Site) -> None:
    proc = site.check()
    assert proc.returncode == 0, proc.stderr
    assert f"SANITY_RECORD none: no pass recorded for env sha256 {SPEC_A}" in proc.stdout
    argv = ran(proc)
    assert argv[argv.index("--record") + 1] == str(site.path(SPEC_A))
    assert argv[argv.index("--record-spec") + 1] == SPEC_A
    assert parse_sanity_reuse(proc.stdout) is None
    # the script came on stdin into a private staging dir, removed afterwards
    assert not (site.home / ".slurm_ray/sanity/run-x").exists()
    assert stat.S_IMODE((site.home / ".slurm_ray/sanity").stat().st_mode) == 0o700


def test_a_trusted_fresh_record_is_reused_and_nothing_runs(site: Site) -> None:
    site.write()
    proc = site.check()
    assert proc.returncode == 0, proc.stderr
    assert "ARGV" not in proc.stdout
    reused = parse_sanity_reuse(proc.stdout)
    assert reused is not None
    age, spec, data = reused
    assert 0 <= age < 60 and spec == SPEC_A and data["summary"]["steps"] == 17
    assert not (site.home / ".slurm_ray/sanity/run-x").exists()  # nothing staged


@pytest.mark.parametrize(
    ("spoil", "why"),
    [
        (lambda s, p: p.chmod(0o620), "is writable by others (mode 620)"),
        (lambda s, p: p.chmod(0o602), "is writable by others (mode 602)"),
        (lambda s, p: s.records.chmod(0o777), "is writable by others (mode 777)"),
        (lambda s, p: s.records.parent.chmod(0o770), "is writable by others (mode 770)"),
    ],
)
def test_a_record_others_can_write_is_ignored(site: Site, spoil: Any, why: str) -> None:
    spoil(site, site.write())
    proc = site.check()
    assert "SANITY_RECORD ignored: " in proc.stdout and why in proc.stdout, proc.stdout
    assert parse_sanity_reuse(proc.stdout) is None and ran(proc)


def test_a_symlinked_record_is_ignored(site: Site, tmp_path: Path) -> None:
    real = site.write()
    other = tmp_path / "elsewhere.json"
    real.rename(other)
    site.path().symlink_to(other)
    proc = site.check()
    assert "is a symbolic link" in proc.stdout and ran(proc)


def test_an_expired_record_is_checked_again(site: Site) -> None:
    path = site.write()
    old = time.time() - 3700
    os.utime(path, (old, old))
    proc = site.check()
    assert "SANITY_RECORD expired: recorded 37" in proc.stdout and "max age 3600s" in proc.stdout
    assert ran(proc)


def test_a_rebuilt_environment_is_checked_again(site: Site) -> None:
    site.write(SPEC_A)
    (site.prefix / ".slurm_ray_spec_sha256").write_text(SPEC_B + "\n")  # what a rebuild does
    proc = site.check()
    assert f"no pass recorded for env sha256 {SPEC_B}" in proc.stdout
    argv = ran(proc)
    assert argv[argv.index("--record") + 1] == str(site.path(SPEC_B))


def test_no_stamp_no_record(site: Site) -> None:
    (site.prefix / ".slurm_ray_spec_sha256").unlink()
    proc = site.check()
    assert "no spec stamp" in proc.stdout
    assert "--record" not in ran(proc)


@pytest.mark.parametrize("record", [{"force": True}, {"max_age_s": 0}])
def test_force_or_no_max_age_skips_the_lookup(site: Site, record: dict) -> None:
    site.write()
    proc = site.check(replace(site.record, **record))
    assert "SANITY_RECORD" not in proc.stdout and "SANITY_REUSED" not in proc.stdout
    assert "--record" in ran(proc)  # a forced check records its fresh pass


def test_the_key_follows_what_shapes_the_check() -> None:
    env = EnvironmentSpec(kind="venv", prefix="/p/venv")
    base = _key(env)
    assert base == _key(env)
    assert len({base, _key(env, partition="gpu"), _key(env, env_id="Acrobot-v1")}) == 3
    assert base != _key(env, where="login", partition=None)
    assert base != sanity_record_key(env, "t" * 64, where="compute", partition="debug")
    assert base != _key(EnvironmentSpec(kind="venv", prefix="/p/other"))
    assert base != _key(EnvironmentSpec(kind="venv", prefix="/p/venv", module_lines=("x=1",)))


def test_reuse_command_values_are_quoted(site: Site, tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    hostile = replace(site.record, records_dir=f"rec $(touch {marker}) `touch {marker}`'\"")
    proc = site.check(hostile)
    assert proc.returncode == 0, proc.stderr
    assert not marker.exists()


# -- the writer (include/sanity_check.py) ------------------------------------------------


def _writer() -> Any:
    spec = importlib.util.spec_from_file_location("sanity_writer", ROOT / "include/sanity_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_writer_records_privately_and_keeps_one_record_per_check(tmp_path: Path) -> None:
    write = _writer().write_record
    base = tmp_path / "sanity"
    base.mkdir(mode=0o755)
    old = base / "records" / f"k-{SPEC_A}.json"
    line = write(str(old), SPEC_A, {"env_id": "E"}, {"ok": True})
    assert line == f"SANITY_RECORD written: {old}"
    assert stat.S_IMODE((base / "records").stat().st_mode) == 0o700
    assert stat.S_IMODE(old.stat().st_mode) == 0o600
    new = base / "records" / f"k-{SPEC_B}.json"
    other = base / "records" / f"j-{SPEC_A}.json"
    write(str(other), SPEC_A, {}, {"ok": True})
    write(str(new), SPEC_B, {"env_id": "E"}, {"ok": True})
    data = json.loads(new.read_text())
    assert data["spec_sha256"] == SPEC_B and data["env_id"] == "E" and data["summary"]["ok"]
    assert data["passed_at"].endswith("Z")
    assert sorted(p.name for p in (base / "records").iterdir()) == [other.name, new.name]


@pytest.mark.parametrize("which", ["records", "parent"])
def test_writer_refuses_a_directory_others_can_write(tmp_path: Path, which: str) -> None:
    base = tmp_path / "sanity"
    (base / "records").mkdir(parents=True)
    (base / "records" if which == "records" else base).chmod(0o777)
    line = _writer().write_record(str(base / "records" / "k-x.json"), SPEC_A, {}, {"ok": True})
    assert line.startswith("SANITY_RECORD not written: ") and "writable by others" in line
    assert not (base / "records" / "k-x.json").exists()


# -- the operator's side ------------------------------------------------------------------


def _op(**kwargs: Any) -> GymSanityCheckOperator:
    params: dict[str, Any] = {
        "task_id": "s",
        "ssh_conn_id": "x",
        "environment": {"kind": "venv", "prefix": "/p/venv"},
        "where": "compute",
        "partition": "debug",
        **kwargs,
    }
    return GymSanityCheckOperator(**params)


def test_operator_reuses_a_matching_record_and_says_so(capfd: pytest.CaptureFixture) -> None:
    op = _op()
    env = op._validated()
    record = op._record(env, b"script")
    assert record is not None and record.info["partition"] == "debug"
    data = {**record.info, "spec_sha256": SPEC_A, "passed_at": "2026-12-01T13:02:11Z"}
    data["summary"] = {"ok": True, "steps": 9}
    out = op._reused(record, 3700, SPEC_A, data)
    assert out == {
        "ok": True,
        "steps": 9,
        "reused": True,
        "passed_at": "2026-12-01T13:02:11Z",
        "spec_sha256": SPEC_A,
    }
    assert (
        "sanity check reused: passed for CartPole-v1 on partition debug at 2026-12-01T13:02Z "
        f"(env sha256 {SPEC_A[:12]}…, 1 h ago); force_sanity_check=true runs it again"
    ) in "".join(capfd.readouterr())
    # a record that is not this check's (another env id or spec) is never reused
    assert op._reused(record, 10, SPEC_B, data) is None
    assert op._reused(record, 10, SPEC_A, {**data, "env_id": "Acrobot-v1"}) is None
    assert op._reused(record, 10, SPEC_A, {**data, "summary": {"ok": False}}) is None


def test_operator_records_only_environments_with_a_spec_hash() -> None:
    assert (
        _op(environment={"kind": "modules", "module_lines": ["true"]})._record(
            EnvironmentSpec(kind="modules"), b"s"
        )
        is None
    )
    forced = _op(force="true")
    record = forced._record(forced._validated(), b"s")
    assert record is not None and record.force is True
    with pytest.raises(Exception, match=r"^force: "):
        _op(force="maybe")._validated()
    with pytest.raises(Exception, match=r"^reuse_max_age: "):
        _op(reuse_max_age=-1)._validated()


def test_force_sanity_check_param_reaches_the_operator() -> None:
    from slurm_ray.params import param_specs, resolve_run
    from slurm_ray.pipeline import SWEEP_FIXED

    spec = param_specs()["force_sanity_check"]
    assert spec["default"] is False and spec["schema"] == {"type": "boolean"}
    defaults = {name: s["default"] for name, s in param_specs().items()}
    assert resolve_run(defaults)["force_sanity_check"] is False
    forced = resolve_run({**defaults, "force_sanity_check": True})
    assert forced["force_sanity_check"] is True
    assert "force_sanity_check" in SWEEP_FIXED  # one sanity check per sweep
