"""Issue 12 item 7 leftovers: error messages quote a log's end capped in bytes."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path
from typing import Any

from slurm_ray.hooks.slurm import CommandResult


class LocalHook:
    """Runs the manager's remote commands in a local bash (the real ``tail``)."""

    def run(self, command: str, *, timeout: float | None = None, check: bool = False) -> Any:
        proc = subprocess.run(["bash", "-c", command], capture_output=True)
        out = proc.stdout.decode("utf-8", "replace")
        return CommandResult(proc.returncode, out, proc.stderr.decode(), proc.stdout)


def test_failure_tail_of_a_log_without_newlines_is_bounded(tmp_path: Path) -> None:
    """The job printed 30 MB of a progress bar and died: the task's error quotes
    at most 64 KiB of it (``tail -n 40`` brought all 30 MB into the worker)."""
    from slurm_ray.operators.job_manager import SlurmJobManager

    (tmp_path / "slurm-12.out").write_bytes(b"\r" + b"p" * (30 << 20) + b"\nboom: exit 7\n")
    manager = SlurmJobManager(LocalHook(), logging.getLogger("t"))  # type: ignore[arg-type]
    tail = manager.log_tail(str(tmp_path), "12")
    assert tail.endswith("boom: exit 7")
    assert len(tail.encode()) <= 64 * 1024


def test_environment_failure_message_is_bounded() -> None:
    """ClusterEnvOperator quotes the build's stderr: one 20 MB line is cut to 64 KiB."""
    from slurm_ray.operators.environment import ClusterEnvOperator
    from slurm_ray.utils.environment import EnvironmentSpec

    op = ClusterEnvOperator(
        task_id="t", ssh_conn_id="c", environment={"kind": "venv", "prefix": "/p"}
    )
    res = CommandResult(1, "", "z" * (20 << 20) + "\npip: no matching distribution\n")
    msg = op._failure_message(EnvironmentSpec(kind="venv", prefix="/p"), res, {})
    assert msg.endswith("pip: no matching distribution")
    assert len(msg) < 65 * 1024
