"""Helpers shared by the fault tests: stop/restore daemons by PID, drive triggers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.conftest import CLUSTER_SCRIPT, DevCluster

SMALL_CONFIG: dict[str, Any] = {
    "env_id": "CartPole-v1",
    "num_env_runners": 1,
    "num_envs_per_env_runner": 4,
    "train_batch_size": 1000,
    "minibatch_size": 250,
    "num_epochs": 2,
}


def cluster_up() -> None:
    """`devcluster.sh up`: restarts whatever is down (idempotent)."""
    proc = subprocess.run(
        ["bash", str(CLUSTER_SCRIPT), "up"], capture_output=True, text=True, timeout=600
    )
    if proc.returncode != 0:
        raise AssertionError(f"devcluster up failed: {proc.stderr[-2000:]}")


def read_pid(path: Path) -> int:
    return int(path.read_text().strip())


def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            out.append(int(entry))
    return out


def kill_sshd(cluster: DevCluster) -> None:
    """Stop the login node's sshd and drop its live sessions (by PID)."""
    pid = read_pid(cluster.state / "run" / "sshd.pid")
    kids = children(pid)
    os.kill(pid, signal.SIGTERM)
    for kid in kids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(kid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        time.sleep(0.2)


def squeue_jobs(cluster: DevCluster, name: str) -> list[str]:
    """Active job ids with exactly this name (any state squeue still shows)."""
    out = cluster.ssh(f"squeue -h --name={name} -o '%i %T'").stdout.split("\n")
    return [line.split()[0] for line in out if line.strip()]


def jobs_ever(
    cluster: DevCluster, *, name: str | None = None, workdir: str | None = None
) -> set[str]:
    """Every job of this name (or run from under this directory) that Slurm can still show.

    ``squeue`` alone hides ended jobs, so this asks ``squeue -t all`` (ended
    jobs stay for MinJobAge), the job-completion log, and ``sacct`` (the dev
    cluster's accounting; all of it, not only today's).
    """
    assert (name is None) != (workdir is None)
    jobcomp = shlex.quote(str(cluster.state / "log" / "jobcomp.txt"))
    if name is not None:
        needle = shlex.quote(f" Name={name} JobState=")
        sacct = f"sacct -n -X -P -S 2020-01-01 --name={shlex.quote(name)} -o JobID 2>/dev/null"
    else:
        needle = shlex.quote(f" WorkDir={workdir.rstrip('/')}")
        sacct = "true"
    out = cluster.ssh(
        "squeue -h -t all -o '%i|%j|%Z'; echo @@jobcomp; "
        f"grep -F -- {needle} {jobcomp} | sed -n 's/^JobId=\\([0-9]*\\) .*/\\1/p'; "
        f"echo @@sacct; {sacct}; true"
    ).stdout
    queue, _, rest = out.partition("@@jobcomp\n")
    comp, _, acct = rest.partition("@@sacct\n")
    found = set(comp.split()) | {j.split(".")[0] for j in acct.split()}
    for line in queue.splitlines():
        job_id, _, rest_ = line.partition("|")
        job_name, _, wd = rest_.partition("|")
        if (name is not None and job_name == name) or (
            workdir is not None and (wd + "/").startswith(workdir.rstrip("/") + "/")
        ):
            found.add(job_id)
    return found


def all_job_names(cluster: DevCluster) -> set[str]:
    out = cluster.ssh("squeue -h -o '%i %j'").stdout.split("\n")
    return {line.strip() for line in out if line.strip()}


async def first_event(trigger: Any, timeout: float) -> Any:
    async def go() -> Any:
        async for event in trigger.run():
            return event
        raise AssertionError("trigger ended without an event")

    return await asyncio.wait_for(go(), timeout)


class LogTap:
    """Wraps an object's structlog logger: records (time, level, message) and forwards."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.records: list[tuple[float, str, str]] = []

    def _make(self, level: str):
        def emit(msg: Any, *args: Any, **kwargs: Any) -> Any:
            text = str(msg) % args if args else str(msg)
            self.records.append((time.time(), level, text))
            return getattr(self.inner, level)(msg, *args, **kwargs)

        return emit

    def __getattr__(self, name: str) -> Any:
        if name in ("debug", "info", "warning", "error", "exception", "critical"):
            return self._make(name)
        return getattr(self.inner, name)

    @property
    def text(self) -> str:
        return "\n".join(f"{level.upper()} {msg}" for _, level, msg in self.records)

    def first(self, needle: str) -> tuple[float, str, str]:
        return next(r for r in self.records if needle in r[2])


def tap(obj: Any) -> LogTap:
    """Install a LogTap on an Airflow LoggingMixin (operator or trigger)."""
    t = LogTap(obj.log)
    # Operators (Airflow 3 DAG nodes) cache their logger in `_cached_logger`,
    # triggers in `_log`: without the right one the tap records nothing.
    if hasattr(type(obj), "_cached_logger"):
        obj._cached_logger = t
    else:
        obj._log = t
    assert obj.log is t, f"the log tap is not installed on {type(obj).__name__}"
    return t
