"""A real MLflow tracking server for tests (``from tests.mlflow_fixtures import mlflow_server``).

Started with ``scripts/mlflow_server.sh`` on a free loopback port, with its own
sqlite backend and artifact directory in a temp dir, and stopped (by PID) at
the end of the session. It runs from the cluster-side venv (full mlflow);
set ``MLFLOW_VENV`` to use another one.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SERVER_SCRIPT = ROOT / "scripts" / "mlflow_server.sh"
STATE = Path(os.environ.get("SLURM_RAY_DEV_STATE", "/var/lib/slurm-ray-dev"))


def free_port() -> int:
    """A TCP port nobody listens on right now (loopback)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class MlflowServer:
    """Handle on the test server: its URL, and stop/start for outage tests."""

    port: int
    data_dir: Path
    venv: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _script(self, command: str, timeout: float = 150) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, MLFLOW_DATA_DIR=str(self.data_dir), MLFLOW_VENV=str(self.venv))
        proc = subprocess.run(
            ["bash", str(SERVER_SCRIPT), command, str(self.port)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
        if proc.returncode != 0:
            raise AssertionError(
                f"mlflow_server.sh {command} failed ({proc.returncode}):\n"
                f"{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def start(self) -> None:
        """Start (or keep) the server; returns once /health answers."""
        self._script("start")

    def stop(self) -> None:
        """Stop the server (its data stays)."""
        self._script("stop")


@pytest.fixture(scope="session")
def mlflow_server(request: pytest.FixtureRequest) -> Iterator[MlflowServer]:
    """A running MLflow server with a throwaway backend, for the whole session."""
    venv = Path(os.environ.get("MLFLOW_VENV", STATE / "venv"))
    if not (venv / "bin" / "mlflow").exists():
        # The cluster-side venv (which has the full mlflow) is built by cluster-up.
        request.getfixturevalue("cluster")
    if not (venv / "bin" / "mlflow").exists():
        pytest.fail(f"no mlflow in {venv}/bin: run `make cluster-up` or set MLFLOW_VENV")
    data_dir = Path(tempfile.mkdtemp(prefix="slurm-ray-mlflow-test-"))
    server = MlflowServer(port=free_port(), data_dir=data_dir, venv=venv)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    server.start()
    try:
        yield server
    finally:
        try:
            server.stop()
        finally:
            shutil.rmtree(data_dir, ignore_errors=True)
