"""Shared fixtures: the real local dev cluster (scripts/devcluster.sh)."""

from __future__ import annotations

import os
import shlex
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.lanes import cluster_lock
from tests.mlflow_fixtures import mlflow_server  # noqa: F401  (session fixture)
from tests.require_cluster import (  # noqa: F401  (hooks: a skip in a real tier fails)
    pytest_make_collect_report,
    pytest_runtest_makereport,
)
from tests.tiers import (  # noqa: F401  (hooks: real tiers in lanes, time per tier)
    _share_the_cluster,
    pytest_collection_modifyitems,
    pytest_runtest_logreport,
    pytest_terminal_summary,
)

ROOT = Path(__file__).resolve().parent.parent
CLUSTER_SCRIPT = ROOT / "scripts" / "devcluster.sh"
STATE = Path(os.environ.get("SLURM_RAY_DEV_STATE", "/var/lib/slurm-ray-dev"))

# Airflow reads its configuration at import time: point it at a throwaway home
# before any test imports it.
if "AIRFLOW_HOME" not in os.environ or os.environ.get("SLURM_RAY_TEST_FRESH_HOME", "1") == "1":
    import atexit
    import shutil
    import tempfile

    os.environ["AIRFLOW_HOME"] = tempfile.mkdtemp(prefix="slurm-ray-airflow-")
    # Each pytest process (xdist: each worker) made one; 800 piled up in /tmp.
    atexit.register(shutil.rmtree, os.environ["AIRFLOW_HOME"], True)
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ.setdefault("AIRFLOW__CORE__UNIT_TEST_MODE", "True")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def load_cluster_env() -> dict[str, str]:
    """Parse .dev/cluster.env (simple `export K='V'` lines) into a dict."""
    env: dict[str, str] = {}
    for line in (STATE / "cluster.env").read_text().splitlines():
        if line.startswith("export "):
            key, _, value = line[len("export ") :].partition("=")
            env[key] = shlex.split(value)[0] if value else ""
    return env


@dataclass
class DevCluster:
    """Handle on the running dev cluster for tests."""

    state: Path
    env: dict[str, str]

    @property
    def ssh_config(self) -> Path:
        return self.state / "ssh_config"

    @property
    def scratch(self) -> Path:
        return self.state / "scratch"

    @property
    def venv(self) -> Path:
        return self.state / "venv"

    def ssh(
        self, command: str, *, timeout: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run `command` on the login node as the job user, through the real sshd."""
        proc = subprocess.run(
            ["ssh", "-F", str(self.ssh_config), "dev-cluster", command],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"ssh command failed rc={proc.returncode}: {command}\n"
                f"stdout: {proc.stdout}\nstderr: {proc.stderr}"
            )
        return proc

    def new_dir(self, prefix: str = "t") -> str:
        """A fresh directory in the shared scratch, owned by the job user."""
        path = f"{self.scratch}/tests/{prefix}-{uuid.uuid4().hex[:10]}"
        self.ssh(f"mkdir -p {shlex.quote(path)}")
        return path


@pytest.fixture(scope="session")
def cluster() -> Iterator[DevCluster]:
    """The real local Slurm cluster with sshd; brought up if needed (idempotent).

    ``SLURM_RAY_DEV_SKIP_UP=1``: use the cluster as it is (several checkouts
    sharing one cluster must not rewrite its configuration with their own script).
    """
    skip_up = os.environ.get("SLURM_RAY_DEV_SKIP_UP") == "1"
    action = "status" if skip_up else "up"
    with cluster_lock(exclusive=False):  # not while another lane's test has it down
        proc = subprocess.run(
            ["bash", str(CLUSTER_SCRIPT), action], capture_output=True, text=True, timeout=900
        )
    if proc.returncode != 0:
        pytest.fail(f"devcluster {action} failed:\n{proc.stderr[-4000:]}")
    env = load_cluster_env()
    for key in ("SLURM_CONF", "AIRFLOW_CONN_SLURM_DEV"):
        os.environ[key] = env[key]
    yield DevCluster(state=STATE, env=env)


# Session fixtures shared by several test folders (imported last: they use `cluster`).
from tests.airflow_fixtures import _no_run_outlives_its_test, airflow  # noqa: E402, F401
from tests.neighbour import neighbour  # noqa: E402, F401
