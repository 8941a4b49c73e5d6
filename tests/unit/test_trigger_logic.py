"""SlurmJobTrigger logic with the SSH transport replaced (faults that are hard to cause)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from slurm_ray.hooks.slurm import CommandResult
from slurm_ray.slurm.parsers import SQUEUE_FORMAT
from slurm_ray.triggers import slurm_job
from slurm_ray.triggers.host_poller import _Subscription
from slurm_ray.triggers.slurm_job import SlurmJobTrigger, _HostPoller
from slurm_ray.utils import states


class FakeClient:
    """Answers poll commands from a script of job states; can fail on demand."""

    def __init__(self, plan: list[Any]) -> None:
        self.plan = plan
        self.commands: list[str] = []
        self._conn = None

    async def run(
        self, command: str, *, timeout: float | None = None, input: bytes | None = None
    ) -> CommandResult:
        self.commands.append(command + "\n" + (input or b"").decode())
        step = self.plan.pop(0) if len(self.plan) > 1 else self.plan[0]
        if isinstance(step, BaseException):
            raise step
        return CommandResult(0, step, "", step.encode())

    async def close(self) -> None:
        return None

    async def cancel(self, job_id: str) -> CommandResult:
        self.commands.append(f"scancel {job_id}")
        return CommandResult(0, "", "")

    async def states(self, job_ids: list[str]) -> dict[str, states.JobInfo]:
        state = "CANCELLED" if any(c.startswith("scancel") for c in self.commands) else "RUNNING"
        return {j: states.JobInfo(j, states.SlurmState(state)) for j in job_ids}


def squeue_output(*jobs: tuple[str, str]) -> str:
    """What build_states_command prints when squeue knows every job."""
    assert SQUEUE_FORMAT == "%i|%T|%r|%D|%M|%N|%V|%S|%j"
    rows = "".join(
        f"{job_id}|{state}|None|2|0:05|n[1-2]|2026-12-01T13:00:00|2026-12-01T13:00:00|sr-job\n"
        for job_id, state in jobs
    )
    return f"@@slurm_ray:squeue rc=0\n{rows}@@slurm_ray:end\n"


def squeue_line(job_id: str, state: str) -> str:
    return squeue_output((job_id, state))


@pytest.fixture(autouse=True)
def _clean_registry():
    _HostPoller.registry.clear()
    yield
    _HostPoller.registry.clear()


def install(monkeypatch, client: FakeClient) -> None:
    monkeypatch.setattr(slurm_job, "AsyncSlurmClient", lambda conn_id: client)


async def first_event(trigger: SlurmJobTrigger):
    async for event in trigger.run():
        return event
    raise AssertionError("no event")


def test_terminal_state_yields_exactly_one_event(monkeypatch) -> None:
    client = FakeClient([squeue_line("7", "RUNNING"), squeue_line("7", "COMPLETED")])
    install(monkeypatch, client)
    trig = SlurmJobTrigger(
        job_id="7", ssh_conn_id="c", log_path="/x/slurm-7.out", poll_interval=0.01
    )

    async def collect():
        return [e async for e in trig.run()]

    events = asyncio.run(collect())
    assert len(events) == 1
    assert events[0].payload["status"] == "terminal"
    assert events[0].payload["state"] == "COMPLETED"


def test_connection_errors_back_off_and_recover(monkeypatch) -> None:
    sleeps: list[float] = []
    real_wait_for = asyncio.wait_for

    async def fast_sleep(self, seconds: float) -> None:
        sleeps.append(seconds)
        await asyncio.sleep(0)

    monkeypatch.setattr(_HostPoller, "_sleep", fast_sleep)
    client = FakeClient([OSError("connection refused")] * 4 + [squeue_line("8", "FAILED")])
    install(monkeypatch, client)
    trig = SlurmJobTrigger(job_id="8", ssh_conn_id="c", log_path="/x/l", poll_interval=5)
    event = asyncio.run(real_wait_for(first_event(trig), 10))
    assert event.payload["state"] == "FAILED"
    # exponential (jittered) backoff: later waits are longer than the first
    assert len(sleeps) >= 4 and sleeps[3] > sleeps[0]


def test_unknown_state_is_never_success(monkeypatch) -> None:
    async def fast_sleep(self, seconds: float) -> None:
        await asyncio.sleep(0)

    monkeypatch.setattr(_HostPoller, "_sleep", fast_sleep)
    client = FakeClient(["garbage output\n"])
    install(monkeypatch, client)
    trig = SlurmJobTrigger(job_id="9", ssh_conn_id="c", log_path="/x/l", poll_interval=0.01)

    async def run_a_while():
        task = asyncio.ensure_future(first_event(trig))
        # Wait for the garbage answers themselves, not for a fixed time: with no
        # poll at all there would be nothing to misread.
        while len(client.commands) < 3 and not task.done():
            await asyncio.sleep(0.01)
        await asyncio.sleep(0)  # let the trigger read the third answer
        done = task.done()
        task.cancel()
        return done

    assert asyncio.run(asyncio.wait_for(run_a_while(), 30)) is False
    assert len(client.commands) >= 3 and all("squeue" in c for c in client.commands)


def test_disconnect_longer_than_limit_gives_error_event(monkeypatch) -> None:
    async def fast_sleep(self, seconds: float) -> None:
        await asyncio.sleep(0.01)

    monkeypatch.setattr(_HostPoller, "_sleep", fast_sleep)
    client = FakeClient([OSError("down")])
    install(monkeypatch, client)
    trig = SlurmJobTrigger(job_id="5", ssh_conn_id="c", log_path="/x/l", max_disconnect_s=0.1)
    event = asyncio.run(asyncio.wait_for(first_event(trig), 10))
    assert event.payload["status"] == "error" and "no answer" in event.payload["message"]


def test_hundred_triggers_share_one_command_per_interval(monkeypatch) -> None:
    client = FakeClient([squeue_output(*((str(i), "RUNNING") for i in range(1, 101)))])
    install(monkeypatch, client)

    async def main():
        trigs = [
            SlurmJobTrigger(job_id=str(i), ssh_conn_id="c", log_path=f"/x/{i}", poll_interval=0.2)
            for i in range(1, 101)
        ]
        tasks = [asyncio.ensure_future(first_event(t)) for t in trigs]
        await asyncio.sleep(1.05)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(main())
    # ~5 intervals elapsed: a handful of commands, not hundreds
    assert 2 <= len(client.commands) <= 8, len(client.commands)
    assert all("squeue" in c for c in client.commands)


def test_deadline_cancels_job_and_reports_timeout(monkeypatch) -> None:
    client = FakeClient([squeue_line("11", "RUNNING")])
    install(monkeypatch, client)
    trig = SlurmJobTrigger(
        job_id="11", ssh_conn_id="c", log_path="/x/l", poll_interval=0.01, deadline=1.0
    )
    event = asyncio.run(asyncio.wait_for(first_event(trig), 10))
    assert event.payload["status"] == "timeout"
    assert "scancel 11" in client.commands


def test_invalid_job_id_is_fatal_not_retried(monkeypatch) -> None:
    client = FakeClient([squeue_line("1", "RUNNING")])
    install(monkeypatch, client)
    trig = SlurmJobTrigger(
        job_id="1; rm -rf /", ssh_conn_id="c", log_path="/x/l", poll_interval=0.01
    )
    event = asyncio.run(asyncio.wait_for(first_event(trig), 10))
    assert event.payload["status"] == "error" and "invalid Slurm job id" in event.payload["message"]
    assert client.commands == []


def test_staggered_subscriptions_do_not_add_polls(monkeypatch) -> None:
    client = FakeClient([squeue_output(*((str(i), "RUNNING") for i in range(1, 41)))])
    install(monkeypatch, client)

    async def main():
        tasks = []
        for i in range(1, 41):
            trig = SlurmJobTrigger(
                job_id=str(i), ssh_conn_id="c", log_path=f"/x/{i}", poll_interval=0.5
            )
            tasks.append(asyncio.ensure_future(first_event(trig)))
            await asyncio.sleep(0.05)  # arrivals spread over 2 s
        await asyncio.sleep(0.5)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(main())
    # ~2.5 s at one poll per 0.5 s interval: about 5-6 polls, not one per arrival
    # (and not zero: the jobs were watched all along)
    assert 3 <= len(client.commands) <= 7, len(client.commands)


def test_poller_leaves_the_registry_when_nobody_watches(monkeypatch) -> None:
    client = FakeClient([squeue_line("9", "COMPLETED")])
    install(monkeypatch, client)

    async def one(job_id: str) -> Any:
        trig = SlurmJobTrigger(job_id=job_id, ssh_conn_id="c", log_path="/x/l", poll_interval=0.01)
        event = await first_event(trig)
        await asyncio.sleep(0.05)  # the poll loop notices it has no subscriber left
        return event

    assert asyncio.run(one("9")).payload["state"] == "COMPLETED"
    assert _HostPoller.registry == {}
    # A new event loop (the id of the old one may be reused) gets a fresh poller.
    assert asyncio.run(one("9")).payload["state"] == "COMPLETED"
    assert _HostPoller.registry == {}


def test_hurry_ends_the_current_wait_early() -> None:
    """A subscriber that hurries shortens the wait already under way (issue 16 §2)."""
    poller = _HostPoller("c", None, client=lambda conn_id: FakeClient([""]))
    sub = _Subscription(job_id="1", interval=30.0, files={})
    poller.subs[id(sub)] = sub

    async def main() -> float:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        sleeping = asyncio.ensure_future(poller._sleep())
        await asyncio.sleep(0.05)
        assert not sleeping.done()
        poller.hurry(sub, 0.2)
        await asyncio.wait_for(sleeping, 5)
        return loop.time() - t0

    took = asyncio.run(main())
    assert 0.2 <= took < 1.0, took
    assert sub.interval == 0.2
    poller.hurry(sub, 5.0)  # never slower than asked for at the start
    assert sub.interval == 0.2


def _log_tail(data: bytes, start: int = 0) -> str:
    import base64

    return f"@@slurm_ray:tail 0 {start} {start + len(data)}\n{base64.b64encode(data).decode()}\n"


def test_the_entrypoint_exit_line_makes_the_trigger_poll_faster(monkeypatch) -> None:
    """After ray_launch's "entrypoint exited" line the job's end is noticed within
    half a second, not a whole poll interval later."""
    from slurm_ray.slurm.follow import ENTRYPOINT_EXITED

    line = ENTRYPOINT_EXITED + b" 0\n"
    client = FakeClient(
        [
            squeue_line("12", "RUNNING") + _log_tail(b"training\n"),
            squeue_line("12", "RUNNING") + _log_tail(line, 9),
            squeue_line("12", "RUNNING") + _log_tail(b"", 9 + len(line)),
            squeue_line("12", "COMPLETED") + _log_tail(b"", 9 + len(line)),
        ]
    )
    install(monkeypatch, client)
    trig = SlurmJobTrigger(job_id="12", ssh_conn_id="c", log_path="/x/l", poll_interval=1.0)

    async def main() -> tuple[Any, float]:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        event = await asyncio.wait_for(first_event(trig), 20)
        return event, loop.time() - t0

    event, took = asyncio.run(main())
    assert event.payload["state"] == "COMPLETED"
    # 1 s to the poll that shows the line, then two polls 0.5 s apart (not 1 s).
    assert 1.9 <= took < 2.9, took


async def test_on_kill_cancel_survives_a_second_cancellation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The triggerer may cancel the trigger's task again while on_kill waits
    (and swallows that): the scancel must still run to its end."""
    done: list[str] = []

    async def slow_cancel(self: SlurmJobTrigger) -> tuple[bool, str]:
        await asyncio.sleep(0.3)
        done.append(self.job_id)
        return True, "confirmed"

    monkeypatch.setattr(SlurmJobTrigger, "_cancel", slow_cancel)
    trig = SlurmJobTrigger(job_id="77", ssh_conn_id="c", log_path="/x/l")
    killer = asyncio.ensure_future(trig.on_kill())
    await asyncio.sleep(0.05)
    killer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await killer
    assert done == []
    await asyncio.sleep(0.4)
    assert done == ["77"]
