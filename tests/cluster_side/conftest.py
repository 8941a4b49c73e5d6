"""Fixtures for the cluster-side files (include/): their own Python environments.

These tests run under the Airflow venv's pytest, which has no ray, torch or
gymnasium: every cluster-side script runs as a subprocess of the cluster venv
(or of a legacy-gym venv built here once and cached).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, STATE

INCLUDE = ROOT / "include"
CLUSTER_PYTHON = STATE / "venv" / "bin" / "python"
SPEC_STAMP = STATE / "venv" / ".slurm_ray_spec_sha256"

# The legacy gym venv: the pinned spec and the interpreter key its cache dir, so a
# change to either builds a new one; an unchanged spec is built once per machine.
LEGACY_PYTHON = "/usr/bin/python3"
LEGACY_REQUIREMENTS = ("gym==0.26.2", "numpy")
STAMP = ".built"


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for cluster-side subprocesses: no telemetry, never a shared Ray."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        RAY_USAGE_STATS_ENABLED="0",
        MLFLOW_DISABLE_TELEMETRY="true",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def cluster_python() -> Path:
    """The cluster venv's interpreter (ray[rllib], torch, gymnasium), built if missing.

    The same build_env.sh that `devcluster.sh up` runs: a no-op when the spec is
    unchanged, locked against concurrent builds; no cluster daemon is needed.
    """
    proc = subprocess.run(
        ["bash", str(INCLUDE / "build_env.sh"), "venv", str(STATE / "venv"),
         str(INCLUDE / "requirements-cluster.txt")],
        capture_output=True, text=True, timeout=1800,
        env={**os.environ, "PYTHON": LEGACY_PYTHON},
    )  # fmt: skip
    if proc.returncode != 0 or not SPEC_STAMP.is_file():
        pytest.fail(f"building the cluster venv failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    if "up-to-date" not in proc.stdout:
        # The job user runs this venv on the nodes too (devcluster.sh does the same).
        subprocess.run(["chmod", "-R", "a+rX", str(STATE / "venv")], check=True, timeout=300)
    return CLUSTER_PYTHON


def _build_legacy_venv(target: Path) -> None:
    shutil.rmtree(target, ignore_errors=True)
    subprocess.run([LEGACY_PYTHON, "-m", "venv", str(target)], check=True, timeout=300)
    subprocess.run(
        [
            str(target / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "-q",
            *LEGACY_REQUIREMENTS,
        ],
        check=True,
        timeout=900,
        env=subprocess_env(),
    )
    (target / STAMP).write_text(" ".join(LEGACY_REQUIREMENTS) + "\n")


@pytest.fixture(scope="session")
def legacy_gym_python() -> Iterator[Path]:
    """A venv with legacy ``gym`` 0.26.2 and no gymnasium, built once and cached."""
    if not os.access(LEGACY_PYTHON, os.X_OK):
        pytest.skip(f"{LEGACY_PYTHON} not available")
    version = subprocess.run(
        [LEGACY_PYTHON, "-c", "import sys; print(sys.version)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    key = hashlib.sha256(("\n".join(LEGACY_REQUIREMENTS) + version).encode()).hexdigest()[:12]
    target = STATE / f"legacy-gym-venv-{key}"
    STATE.mkdir(parents=True, exist_ok=True)
    # The lock keeps parallel test sessions from building over each other; the
    # stamp, written last, marks a complete build.
    with open(STATE / f"legacy-gym-venv-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / STAMP).is_file():
            _build_legacy_venv(target)
    yield target / "bin" / "python"


def run_script(python: Path, script: str, *args: str, timeout: float = 300, **env: str):
    """Run include/<script> with ``python``; returns the CompletedProcess."""
    return subprocess.run(
        [str(python), str(INCLUDE / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=subprocess_env(**env),
    )


def _own_temp_dirs() -> set[Path]:
    uid = os.getuid()
    found = set()
    for path in Path("/tmp").glob("rs-*"):
        with contextlib.suppress(OSError):
            if path.lstat().st_uid == uid:
                found.add(path)
    return found


@pytest.fixture(autouse=True)
def _no_temp_dir_left_in_tmp() -> Iterator[None]:
    """A local driver leaves no dir of its own (Ray's, RLlib's: `rs-*`) in the
    shared /tmp, even when it or its actors were ended by a signal."""
    before = _own_temp_dirs()
    yield
    left = _own_temp_dirs() - before
    for path in left:  # one leak must not fail the next test too
        shutil.rmtree(path, ignore_errors=True)
    assert not left, f"left in /tmp: {sorted(map(str, left))}"
