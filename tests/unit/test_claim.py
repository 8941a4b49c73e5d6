"""The operator's submit path run for real in a shell with fake Slurm tools:
squeue failures are never read as "no job" (issue 12 item 8), and a try adopts,
supersedes or cancels the jobs of its task's other tries (item 2)."""

from __future__ import annotations

import json
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
        self.command_timeout = 120.0

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
        op.manager.submit_once(run_dir(tmp_path), "sr-abc-train-t1")
    assert shell.fake.calls("sbatch") == []


def test_an_active_job_of_the_try_is_adopted(tmp_path: Path, shell: ShellHook) -> None:
    shell.fake.add("squeue", "77", squeue_line("77", "RUNNING", "sr-abc-train-t1"))
    op = make_op(tmp_path, shell)
    assert op.manager.submit_once(run_dir(tmp_path), "sr-abc-train-t1") == ("77", True)
    assert shell.fake.calls("sbatch") == []


def test_no_job_submits(tmp_path: Path, shell: ShellHook) -> None:
    shell.fake.add("squeue", "5", squeue_line("5", "RUNNING", "someone-else"))
    op = make_op(tmp_path, shell)
    assert op.manager.submit_once(run_dir(tmp_path), "sr-abc-train-t1") == ("4242", False)
    assert len(shell.fake.calls("sbatch")) == 1


_SCANCEL = r"""#!{python}
# Fake scancel: the job turns COMPLETING, and leaves the queue 2 s later.
import json, os, sys, time
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps(["scancel", *sys.argv[1:]]) + "\n")
db = os.path.join(os.environ["FAKE_DB"], "squeue")
for job_id in sys.argv[1:]:
    path = os.path.join(db, job_id)
    fields = open(path).read().split("|")
    fields[1] = "COMPLETING"
    open(path, "w").write("|".join(fields))
if os.fork() == 0:
    for fd in (0, 1, 2):
        os.close(fd)
    time.sleep(2)
    for job_id in sys.argv[1:]:
        os.remove(os.path.join(db, job_id))
    os._exit(0)
"""


@pytest.fixture
def cancelling(shell: ShellHook) -> ShellHook:
    import sys

    path = shell.fake.bin / "scancel"
    path.unlink()
    path.write_text(_SCANCEL.format(python=sys.executable))
    path.chmod(0o755)
    return shell


def test_a_retry_cancels_earlier_tries_and_waits_until_they_left(
    tmp_path: Path, cancelling: ShellHook
) -> None:
    """Issue 12 item 2: try 2 must not submit while try 1's job still runs."""
    fake = cancelling.fake
    fake.add("squeue", "70", squeue_line("70", "RUNNING", "sr-abc-train-t1"))
    fake.add("squeue", "71", squeue_line("71", "COMPLETED", "sr-abc-train-t1"))  # ended: left alone
    fake.add("squeue", "72", squeue_line("72", "RUNNING", "sr-abc-other-t1"))  # another task
    fake.add("squeue", "73", squeue_line("73", "RUNNING", "sr-abc-train-t1x"))  # not a try name
    op = make_op(tmp_path, cancelling)
    assert op.manager.submit_once(run_dir(tmp_path, 2), "sr-abc-train-t2") == ("4242", False)
    assert fake.calls("scancel") == [["70"]]
    assert len(fake.calls("sbatch")) == 1
    # sbatch ran only once job 70 had left the queue (not while it was COMPLETING)
    log = [json.loads(line) for line in fake.log.read_text().splitlines()]
    assert log[-1][0] == "sbatch" and not (fake.db / "squeue" / "70").exists()


def test_a_stale_earlier_try_does_not_submit_after_a_later_one(
    tmp_path: Path, shell: ShellHook
) -> None:
    from airflow.sdk.exceptions import AirflowException

    shell.fake.add("squeue", "80", squeue_line("80", "PENDING", "sr-abc-train-t3"))
    op = make_op(tmp_path, shell)
    with pytest.raises(AirflowException, match=r"later try .* Slurm job 80"):
        op.manager.submit_once(run_dir(tmp_path, 2), "sr-abc-train-t2")
    assert shell.fake.calls("sbatch") == [] and shell.fake.calls("scancel") == []


def test_adoption_before_submitting_cancels_older_and_adopts_own(
    tmp_path: Path, cancelling: ShellHook
) -> None:
    fake = cancelling.fake
    fake.add("squeue", "90", squeue_line("90", "RUNNING", "sr-abc-train-t1"))
    fake.add("squeue", "91", squeue_line("91", "PENDING", "sr-abc-train-t2"))
    op = make_op(tmp_path, cancelling)
    assert op.manager.claim(run_dir(tmp_path, 2), "sr-abc-train-t2", submit=False) == (
        "attach",
        "91",
    )
    assert fake.calls("scancel") == [["90"]] and fake.calls("sbatch") == []


def test_nothing_to_adopt_is_clear(tmp_path: Path, shell: ShellHook) -> None:
    op = make_op(tmp_path, shell)
    assert op.manager.claim(run_dir(tmp_path, 1), "sr-abc-train-t1", submit=False) == ("clear", "")


def test_claim_command_runs_in_dash(tmp_path: Path, cancelling: ShellHook) -> None:
    from slurm_ray.slurm.commands import build_claim_command
    from slurm_ray.slurm.parsers import parse_claim_output

    cancelling.fake.add("squeue", "70", squeue_line("70", "RUNNING", "sr-abc-train-t1"))
    d = run_dir(tmp_path, 2)
    cmd = build_claim_command(str(Path(d).parent), d, "sr-abc-train-t", 2, submit=True)
    proc = cancelling.fake.run(cmd, "dash")
    assert proc.returncode == 0, proc.stderr
    assert parse_claim_output(proc.stdout) == ("submitted", "4242", ["70"])


@pytest.mark.parametrize(
    ("key", "try_number"), [("sr-x-t;rm", 1), ("", 1), ("sr-x-t", 0), ("sr-x-t", True)]
)
def test_claim_command_refuses_bad_input(key: str, try_number: int) -> None:
    from slurm_ray.slurm.commands import build_claim_command

    with pytest.raises(ValueError):
        build_claim_command("/t", "/t/try_1", key, try_number, submit=True)
