"""The operator's submit path run for real in a shell with fake Slurm tools:
squeue failures are never read as "no job" (issue 12 item 8), and a try adopts,
supersedes or cancels the jobs of its task's other tries (item 2)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from slurm_ray.hooks.slurm import CommandResult

from tests.unit.test_remote import FakeSlurm, squeue_line

_SBATCH = r"""#!{python}
import json, os, sys
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps(["sbatch", *sys.argv[1:]]) + "\n")
print("4242")
"""


class ShellHook:
    """Runs the operator's remote commands in a local shell with the fake tools."""

    def __init__(self, fake: FakeSlurm) -> None:
        self.fake = fake
        self.commands: list[str] = []

    def run(self, command: str, *, timeout: float | None = None, check: bool = False) -> Any:
        self.commands.append(command)
        proc = self.fake.run(command)
        res = CommandResult(proc.returncode, proc.stdout, proc.stderr, proc.stdout.encode())
        return res.check(command) if check else res


@pytest.fixture
def shell(tmp_path: Path) -> ShellHook:
    import sys

    fake = FakeSlurm(tmp_path)
    for real in ["flock", "awk", "sed", "sleep", "mkdir", "tr"]:
        target = fake.bin / real
        if not target.exists():
            target.symlink_to(shutil.which(real) or f"/usr/bin/{real}")
    sbatch = fake.bin / "sbatch"
    sbatch.write_text(_SBATCH.format(python=sys.executable))
    sbatch.chmod(0o755)
    return ShellHook(fake)


def make_op(tmp_path: Path, hook: ShellHook) -> Any:
    from slurm_ray import SlurmRayOperator

    op = SlurmRayOperator(
        task_id="train", ssh_conn_id="unused", remote_base_dir=str(tmp_path), entrypoint="true"
    )
    op._hook = hook
    return op


def run_dir(tmp_path: Path, try_number: int = 1) -> str:
    path = tmp_path / "dag" / "run" / "train" / f"try_{try_number}"
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def test_a_failing_squeue_is_not_read_as_no_job(tmp_path: Path, shell: ShellHook) -> None:
    """Issue 12 item 8: the re-attach look-up's squeue fails (controller busy):
    the submit must stop, never submit a second job for the try."""
    from slurm_ray.hooks.slurm import SlurmSSHError

    shell.fake.modes["squeue"] = "down"
    op = make_op(tmp_path, shell)
    with pytest.raises(SlurmSSHError, match="squeue"):
        op._submit_once(run_dir(tmp_path), "sr-abc-train-t1")
    assert shell.fake.calls("sbatch") == []


def test_an_active_job_of_the_try_is_adopted(tmp_path: Path, shell: ShellHook) -> None:
    shell.fake.add("squeue", "77", squeue_line("77", "RUNNING", "sr-abc-train-t1"))
    op = make_op(tmp_path, shell)
    assert op._submit_once(run_dir(tmp_path), "sr-abc-train-t1") == ("77", True)
    assert shell.fake.calls("sbatch") == []


def test_no_job_submits(tmp_path: Path, shell: ShellHook) -> None:
    shell.fake.add("squeue", "5", squeue_line("5", "RUNNING", "someone-else"))
    op = make_op(tmp_path, shell)
    assert op._submit_once(run_dir(tmp_path), "sr-abc-train-t1") == ("4242", False)
    assert len(shell.fake.calls("sbatch")) == 1
