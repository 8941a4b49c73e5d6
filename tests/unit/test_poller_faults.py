"""Shared-poller interleavings that no real fault causes on demand (issue 12: 1, 4-7, 9).

The poll command runs for real, in a local ``sh``, against real files; only
Slurm's ``squeue`` is a stand-in script that prints what a flag file says.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from slurm_ray.hooks.slurm import CommandResult
from slurm_ray.slurm import follow
from slurm_ray.triggers import host_poller, slurm_job
from slurm_ray.triggers.slurm_job import SlurmJobTrigger, _HostPoller

from tests.faults.helpers import tap


class LocalShell:
    """Runs poll commands in a local shell with a fake ``squeue`` on PATH."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        bin_dir = tmp / "bin"
        bin_dir.mkdir(exist_ok=True)
        squeue = bin_dir / "squeue"
        # every job listed in state/<id> (RUNNING, COMPLETED, ...)
        squeue.write_text(
            "#!/bin/sh\n"
            f'for f in "{tmp}"/state/*; do [ -e "$f" ] || continue; '
            'echo "${f##*/}|$(cat "$f")|None|1|0:05|n1|2026-12-01T13:00:00|2026-12-01T13:00:00|job"; done\n'
        )
        squeue.chmod(0o755)
        (tmp / "state").mkdir(exist_ok=True)
        self.env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
        self.commands = 0
        self.closed = 0
        self._conn = None
        self.block: asyncio.Event | None = None

    def set_state(self, job_id: str, state: str) -> None:
        (self.tmp / "state" / job_id).write_text(state)

    async def run(
        self, command: str, *, timeout: float | None = None, input: bytes | None = None
    ) -> CommandResult:
        self.commands += 1
        if self.block is not None:
            await self.block.wait()
        proc = await asyncio.create_subprocess_exec(
            "sh",
            "-c",
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self.env,
        )
        out, err = await proc.communicate(input or b"")
        return CommandResult(proc.returncode or 0, out.decode(), err.decode(), out)

    async def close(self) -> None:
        self.closed += 1

    async def cancel(self, job_id: str) -> CommandResult:
        self.set_state(job_id, "CANCELLED")
        return CommandResult(0, "", "")

    async def states(self, job_ids: list[str]) -> dict[str, Any]:
        from slurm_ray.utils.states import JobInfo, parse_state

        return {j: JobInfo(j, parse_state((self.tmp / "state" / j).read_text())) for j in job_ids}


@pytest.fixture(autouse=True)
def _clean_registry():
    _HostPoller.registry.clear()
    yield
    _HostPoller.registry.clear()


@pytest.fixture
def shell(tmp_path, monkeypatch) -> LocalShell:
    client = LocalShell(tmp_path)
    monkeypatch.setattr(slurm_job, "AsyncSlurmClient", lambda conn_id: client)
    return client


async def collect(trigger: SlurmJobTrigger) -> list[Any]:
    return [e async for e in trigger.run()]


def test_slow_relay_loses_no_metrics_row(shell: LocalShell, tmp_path: Path) -> None:
    """Item 1: relaying a batch takes longer than several poll intervals."""
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_bytes(b"")
    shell.set_state("7", "RUNNING")
    got: list[int] = []

    class SlowTrigger(SlurmJobTrigger):
        def _make_sink(self):
            async def sink(rows: list[dict[str, Any]]) -> None:
                await asyncio.sleep(0.7)  # a slow MLflow server: > 3 poll intervals
                got.extend(r["training_iteration"] for r in rows)

            return sink

    trig = SlowTrigger(
        job_id="7",
        ssh_conn_id="c",
        log_path=str(tmp_path / "slurm-7.out"),
        metrics_path=str(metrics),
        poll_interval=0.2,
    )

    async def write_rows() -> None:
        for i in range(40):
            with metrics.open("ab") as fh:
                fh.write(json.dumps({"training_iteration": i, "x": "y" * (i * 7)}).encode())
                fh.write(b"\n")
            await asyncio.sleep(0.05)
        shell.set_state("7", "COMPLETED")

    async def main() -> list[Any]:
        writer = asyncio.ensure_future(write_rows())
        events = await asyncio.wait_for(collect(trig), 60)
        await writer
        return events

    events = asyncio.run(main())
    assert events[-1].payload["state"] == "COMPLETED"
    assert got == list(range(40))
    assert events[-1].payload["metrics_offset"] == metrics.stat().st_size


def test_subscribe_while_the_poller_closes_does_not_hang(monkeypatch) -> None:
    """Item 4: a trigger subscribes while the last one's poll loop closes its connection."""
    from tests.unit.test_trigger_logic import FakeClient, squeue_line

    release = asyncio.Event
    client = FakeClient([squeue_line("1", "COMPLETED")])
    closing = {"started": None, "release": None}

    async def slow_close() -> None:
        closing["started"].set()
        await closing["release"].wait()

    client.close = slow_close  # type: ignore[method-assign]
    monkeypatch.setattr(slurm_job, "AsyncSlurmClient", lambda conn_id: client)

    async def main() -> list[Any]:
        closing["started"], closing["release"] = release(), release()
        first = SlurmJobTrigger(job_id="1", ssh_conn_id="c", log_path="/x/1", poll_interval=0.05)
        await asyncio.wait_for(collect(first), 10)
        await asyncio.wait_for(closing["started"].wait(), 10)  # the loop is in its _reset()
        second = SlurmJobTrigger(job_id="1", ssh_conn_id="c", log_path="/x/1", poll_interval=0.05)
        task = asyncio.ensure_future(collect(second))
        await asyncio.sleep(0.1)  # subscribed while the connection closes
        closing["release"].set()
        return await asyncio.wait_for(task, 10)

    events = asyncio.run(main())
    assert [e.payload["state"] for e in events] == ["COMPLETED"]


def test_deadline_passes_while_no_poll_result_comes(shell: LocalShell, monkeypatch) -> None:
    """Item 4: the deadline is kept even when the poller never answers."""
    shell.set_state("3", "RUNNING")
    monkeypatch.setattr(SlurmJobTrigger, "CANCEL_BACKOFF", 0.01, raising=False)

    async def main() -> list[Any]:
        shell.block = asyncio.Event()  # every poll hangs
        trig = SlurmJobTrigger(
            job_id="3",
            ssh_conn_id="c",
            log_path="/x/3",
            poll_interval=0.05,
            deadline=time.time() + 0.5,
        )
        task = asyncio.ensure_future(collect(trig))
        done, _ = await asyncio.wait({task}, timeout=10)
        pollers = list(_HostPoller.registry.values())
        shell.block.set()
        await asyncio.wait_for(asyncio.gather(*(p.task for p in pollers if p.task)), 10)
        if not done:
            task.cancel()
            return []
        return task.result()

    events = asyncio.run(main())
    assert [e.payload["status"] for e in events] == ["timeout"]


def test_one_bad_subscription_fails_only_its_own_job(shell: LocalShell, tmp_path) -> None:
    """Item 5: an `attach:` id squeue printed for a pending array is not a job id."""
    shell.set_state("7", "COMPLETED")

    async def main() -> tuple[list[Any], list[Any]]:
        good = SlurmJobTrigger(job_id="7", ssh_conn_id="c", log_path=str(tmp_path / "7.out"))
        bad = SlurmJobTrigger(job_id="123_[1-3]", ssh_conn_id="c", log_path=str(tmp_path / "b"))
        good.poll_interval = bad.poll_interval = 0.05
        return await asyncio.wait_for(asyncio.gather(collect(good), collect(bad)), 20)

    good_events, bad_events = asyncio.run(main())
    assert [e.payload["status"] for e in good_events] == ["terminal"]
    assert good_events[0].payload["state"] == "COMPLETED"
    assert [e.payload["status"] for e in bad_events] == ["error"]
    assert "invalid Slurm job id" in bad_events[0].payload["message"]


def test_parse_error_is_not_connection_trouble(shell: LocalShell, monkeypatch) -> None:
    """Item 5: a parser bug makes the jobs UNKNOWN for a round; no reconnect, no error event."""
    shell.set_state("8", "RUNNING")
    real = host_poller.parse_poll_output
    calls = {"n": 0}

    def flaky(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:
            raise IndexError("parser bug")
        if calls["n"] == 3:
            shell.set_state("8", "COMPLETED")
        return real(*args, **kwargs)

    monkeypatch.setattr(host_poller, "parse_poll_output", flaky)
    trig = SlurmJobTrigger(job_id="8", ssh_conn_id="c", log_path="/x/8", poll_interval=0.05)
    logs = tap(trig)
    events = asyncio.run(asyncio.wait_for(collect(trig), 20))
    assert [e.payload["status"] for e in events] == ["terminal"]
    assert events[0].payload["state"] == "COMPLETED"
    assert calls["n"] >= 3 and "is RUNNING" in logs.text
    assert "Lost the SSH connection" not in logs.text
    assert shell.closed <= 1  # only when the poller ends, not for the parse error


def test_deadline_cancel_that_fails_still_sends_an_event(shell: LocalShell, monkeypatch) -> None:
    """Item 6: SSH is down at the deadline: retries, then an event saying it is unconfirmed."""
    shell.set_state("9", "RUNNING")
    attempts = {"n": 0}

    async def down(job_id: str) -> CommandResult:
        attempts["n"] += 1
        raise OSError("connection refused")

    shell.cancel = down  # type: ignore[method-assign]
    monkeypatch.setattr(SlurmJobTrigger, "CANCEL_BACKOFF", 0.01, raising=False)
    trig = SlurmJobTrigger(
        job_id="9", ssh_conn_id="c", log_path="/x/9", poll_interval=0.05, deadline=1.0
    )
    events = asyncio.run(asyncio.wait_for(collect(trig), 30))
    assert [e.payload["status"] for e in events] == ["timeout"]
    assert events[0].payload["cancel_confirmed"] is False
    assert "NOT confirmed" in events[0].payload["message"]
    assert attempts["n"] == getattr(SlurmJobTrigger, "CANCEL_ATTEMPTS", 0)


def test_deadline_cancel_confirmed(shell: LocalShell, monkeypatch) -> None:
    shell.set_state("9", "RUNNING")
    trig = SlurmJobTrigger(
        job_id="9", ssh_conn_id="c", log_path="/x/9", poll_interval=0.05, deadline=1.0
    )
    events = asyncio.run(asyncio.wait_for(collect(trig), 30))
    assert events[0].payload["status"] == "timeout"
    assert events[0].payload["cancel_confirmed"] is True


def test_truncated_log_is_read_again(shell: LocalShell, tmp_path) -> None:
    """Item 9: a requeue truncates slurm-%j.out; the new run's log is streamed, marked."""
    log = tmp_path / "slurm-5.out"
    log.write_bytes(b"".join(b"first run line %d\n" % i for i in range(50)))
    shell.set_state("5", "RUNNING")
    trig = SlurmJobTrigger(job_id="5", ssh_conn_id="c", log_path=str(log), poll_interval=0.05)
    logs = tap(trig)

    async def main() -> list[Any]:
        task = asyncio.ensure_future(collect(trig))
        for _ in range(200):
            if "first run line 49" in logs.text:
                break
            await asyncio.sleep(0.05)
        log.write_bytes(b"second run\n")  # requeued: Slurm truncates the file
        for _ in range(100):
            if "second run" in logs.text or task.done():
                break
            await asyncio.sleep(0.05)
        shell.set_state("5", "COMPLETED")
        return await asyncio.wait_for(task, 20)

    asyncio.run(asyncio.wait_for(main(), 30))
    assert "[slurm 5] second run" in logs.text
    assert "shrank from" in logs.text and "log restarted" in logs.text


def test_line_without_newline_is_cut_and_others_keep_streaming(shell: LocalShell, tmp_path) -> None:
    """Item 7: 6 MB without a newline; the buffer stays under its cap, the log says what was cut."""
    big, other = tmp_path / "slurm-1.out", tmp_path / "slurm-2.out"
    with big.open("wb") as fh:
        fh.write(b"start\n")
        for _ in range(6):
            fh.write(b"\r" + b"=" * (1 << 20))
        fh.write(b"\nafter the bar\n")
    other.write_bytes(b"")
    for j in ("1", "2"):
        shell.set_state(j, "RUNNING")
    taps: list[Any] = []

    def text() -> str:
        return "\n".join(t.text for t in taps)

    async def main() -> None:
        trigs = [
            SlurmJobTrigger(job_id=j, ssh_conn_id="c", log_path=str(p), poll_interval=0.02)
            for j, p in (("1", big), ("2", other))
        ]
        taps.extend(tap(t) for t in trigs)
        tasks = [asyncio.ensure_future(collect(t)) for t in trigs]
        for i in range(5):
            with other.open("ab") as fh:
                fh.write(b"other line %d\n" % i)
            await asyncio.sleep(0.1)
        for _ in range(1200):
            if "after the bar" in text():
                break
            await asyncio.sleep(0.05)
        for j in ("1", "2"):
            shell.set_state(j, "COMPLETED")
        await asyncio.wait_for(asyncio.gather(*tasks), 20)

    tracemalloc.start()
    try:
        asyncio.run(asyncio.wait_for(main(), 120))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # 6 MiB went through; what is held at once is a few polls' worth (256 KiB each)
    assert peak < 4 * 1024 * 1024, peak
    assert all(f"[slurm 2] other line {i}" in text() for i in range(5))
    assert "[slurm 1] after the bar" in text()
    assert f"cut {6 * (1 << 20) + 6 - follow.LOG_LINE_MAX} bytes" in text()


def test_asyncssh_is_quiet_and_one_line_per_poll(shell: LocalShell, caplog) -> None:
    """Issue 17: asyncssh logs whole commands at INFO; the poller logs one short line."""
    logging.getLogger("asyncssh").setLevel(logging.NOTSET)
    shell.set_state("4", "COMPLETED")
    caplog.set_level(logging.INFO)
    trig = SlurmJobTrigger(job_id="4", ssh_conn_id="c", log_path="/x/4", poll_interval=0.05)
    asyncio.run(asyncio.wait_for(collect(trig), 10))
    assert logging.getLogger("asyncssh").getEffectiveLevel() == logging.WARNING
    polls = [r.getMessage() for r in caplog.records if r.getMessage().startswith("poll c:")]
    assert len(polls) == shell.commands and all(len(p) < 200 for p in polls)
