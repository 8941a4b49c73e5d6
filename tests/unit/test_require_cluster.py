"""SLURM_RAY_REQUIRE_CLUSTER turns a skip in a real tier into a failure (pure: a nested pytest)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SKIPPING = """\
import pytest

@pytest.mark.cluster
def test_marked_cluster():
    pytest.skip("no cluster")

@pytest.fixture
def venv():
    pytest.skip("venv not built")

def test_fixture_skips(venv):
    pass

@pytest.mark.xfail(reason="known")
def test_xfail_stays():
    raise AssertionError

def test_plain_skip_outside_the_tiers():
    pytest.skip("pure test, optional tool missing")
"""


def run_nested(tmp_path: Path, folder: str, require: str | None) -> str:
    (tmp_path / "tests" / folder).mkdir(parents=True)
    (tmp_path / "tests" / folder / "test_x.py").write_text(SKIPPING)
    env = {k: v for k, v in os.environ.items() if k != "SLURM_RAY_REQUIRE_CLUSTER"}
    if require is not None:
        env["SLURM_RAY_REQUIRE_CLUSTER"] = require
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.require_cluster", "-p", "no:cacheprovider",
         "-c", os.devnull, "--rootdir", str(tmp_path), "-rA", "-q", str(tmp_path / "tests")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    return proc.stdout + proc.stderr


def outcomes(out: str) -> dict[str, str]:
    """test name -> PASSED/FAILED/SKIPPED/XFAIL from pytest's -rA summary."""
    found: dict[str, str] = {}
    for line in out.splitlines():
        word, _, rest = line.partition(" ")
        if word in ("PASSED", "FAILED", "SKIPPED", "XFAIL", "ERROR") and "::" in rest:
            found[rest.split("::")[1].split()[0]] = word
        elif word == "SKIPPED" and rest.startswith("["):
            # "SKIPPED [1] tests/x/test_x.py:6: reason" names no test: keep the reason
            found.setdefault(f"skip:{rest.split(': ', 1)[-1]}", word)
    return found


@pytest.mark.parametrize("folder", ["cluster", "cluster_side", "e2e", "faults"])
def test_a_skip_in_a_real_tier_fails_when_required(tmp_path: Path, folder: str) -> None:
    out = run_nested(tmp_path, folder, "1")
    got = outcomes(out)
    assert got.get("test_marked_cluster") == "FAILED", out
    assert got.get("test_fixture_skips") == "ERROR", out  # a fixture skip fails its setup
    assert got.get("test_plain_skip_outside_the_tiers") == "FAILED", out  # by its folder
    assert got.get("test_xfail_stays") == "XFAIL", out
    assert "skipped in a real tier while SLURM_RAY_REQUIRE_CLUSTER is set" in out
    assert "no cluster" in out and "venv not built" in out  # the skip's own reason is kept


def test_outside_the_tiers_only_the_marker_counts(tmp_path: Path) -> None:
    out = run_nested(tmp_path, "unit", "1")
    got = outcomes(out)
    assert got.get("test_marked_cluster") == "FAILED", out
    assert "skip:pure test, optional tool missing" in got, out
    assert "skip:venv not built" in got, out


@pytest.mark.parametrize("value", [None, "0", ""])
def test_without_the_variable_skips_stay_skips(tmp_path: Path, value: str | None) -> None:
    out = run_nested(tmp_path, "faults", value)
    assert "FAILED" not in out and "ERROR" not in out, out
    assert "3 skipped" in out, out
