"""Why a job is pending and when it will start (issue 15 item 2): parsers and log lines."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from slurm_ray.slurm.fields import SLURM_TIME_ENV, slurm_time, time_or_none
from slurm_ray.slurm.parsers import SQUEUE_FIELDS, parse_scontrol, parse_squeue
from slurm_ray.slurm.poll import build_poll
from slurm_ray.triggers.slurm_job import SlurmJobTrigger
from slurm_ray.utils.states import JobInfo, SlurmState, describe

from tests.faults.helpers import tap
from tests.unit.test_trigger_logic import (  # noqa: F401 (autouse fixture)
    FakeClient,
    _clean_registry,
    install,
)

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "slurm"
S = SlurmState


def captured() -> list[JobInfo]:
    """The real pending-behind-a-blocker capture, one JobInfo per line, in order."""
    lines = (FIXTURES / "squeue_pending_estimate.txt").read_text().splitlines()
    return [next(iter(parse_squeue(line).values())) for line in lines]


def test_squeue_reads_reason_submit_and_start_estimate() -> None:
    prio, res, blk, est, blk_end, done = captured()
    assert (prio.state, prio.reason, prio.start_time) == (S.PENDING, "Priority", None)
    assert (res.reason, res.start_time) == ("Resources", None)  # N/A: no estimate yet
    assert (est.reason, est.start_time) == ("Resources", "2026-12-01T13:28:56")
    assert est.submit_time == "2026-12-01T13:23:56"
    assert est.name == "hpend-probe-pend" and blk.nodelist == "n[1-2]"
    # a pending job has not waited yet, whatever its estimate says
    assert est.queue_wait_s() is None
    assert blk.queue_wait_s() == 0.0 and blk_end.queue_wait_s() == 0.0
    assert done.queue_wait_s() == 40.0


def test_queue_wait_needs_a_real_start() -> None:
    t0, t1 = "2026-12-01T10:00:00", "2026-12-01T10:05:00"
    # cancelled while pending: Slurm sets StartTime to the cancel time, no nodes
    never_ran = JobInfo("1", S.CANCELLED, submit_time=t0, start_time=t1)
    assert never_ran.queue_wait_s() is None
    assert (
        JobInfo("1", S.FAILED, nodelist="n1", submit_time=t0, start_time=t1).queue_wait_s() == 300
    )
    assert JobInfo("1", S.RUNNING, submit_time=t0, start_time=None).queue_wait_s() is None
    assert JobInfo("1", S.RUNNING, submit_time=t1, start_time=t0).queue_wait_s() is None


def test_scontrol_reads_submit_and_start_time() -> None:
    info = parse_scontrol((FIXTURES / "scontrol_pending.txt").read_text())["11"]
    assert (info.submit_time, info.start_time) == ("2026-11-25T12:03:27", "2026-11-25T13:03:27")
    running = parse_scontrol((FIXTURES / "scontrol_running.txt").read_text())["10"]
    assert running.queue_wait_s() is not None and running.queue_wait_s() >= 0


@pytest.mark.parametrize(
    "text", ["N/A", "Unknown", "None", "", "  ", "2026-13-01T00:00:00", "1764600000", None]
)
def test_not_a_slurm_time(text: str | None) -> None:
    assert slurm_time(text) is None and time_or_none(text) is None


def test_field_list_must_keep_the_name_last() -> None:
    assert SQUEUE_FIELDS[0] == "%i" and SQUEUE_FIELDS[-1] == "%j"
    with pytest.raises(ValueError, match="end with %j"):
        parse_squeue("1|x", ("%i", "%j", "%T"))
    # a name containing "|" and fields that look like times stays the name
    line = "5|PENDING|None|1|0:00||2026-12-01T13:23:56|N/A|a|2026-12-01T13:23:56|b"
    assert parse_squeue(line)["5"].name == "a|2026-12-01T13:23:56|b"


def test_poll_reads_times_in_utc_and_stays_constant() -> None:
    one, many = build_poll(["1"], []), build_poll([str(i) for i in range(1, 500)], [])
    assert one.command == many.command
    assert one.command.lstrip().startswith(f"export {SLURM_TIME_ENV}\n")
    assert "%V|%S|%j" in one.command


NOW = datetime(2026, 12, 1, 14, 20, 5, tzinfo=UTC)


@pytest.mark.parametrize(
    ("info", "text"),
    [
        (
            JobInfo("123", S.PENDING, reason="Resources", start_time="2026-12-01T14:32:00"),
            "Slurm job 123 is PENDING (Resources), estimated start 14:32 UTC, in 12 min",
        ),
        (JobInfo("123", S.PENDING, reason="Priority"), "Slurm job 123 is PENDING (Priority)"),
        (
            JobInfo("123", S.CONFIGURING, nodelist="n1", start_time="2026-12-01T14:19:00"),
            "Slurm job 123 is CONFIGURING",
        ),
        (
            JobInfo("123", S.PENDING, reason="Resources", start_time="2026-12-02T09:00:00"),
            "Slurm job 123 is PENDING (Resources), estimated start 2026-12-02 09:00 UTC, "
            "in 18 h 40 min",
        ),
        (
            JobInfo("123", S.PENDING, reason="Resources", start_time="2026-12-01T14:19:00"),
            "Slurm job 123 is PENDING (Resources), estimated start 14:19 UTC, due now",
        ),
        (
            JobInfo(
                "123",
                S.RUNNING,
                reason="None",
                nodelist="n1",
                submit_time="2026-12-01T14:00:00",
                start_time="2026-12-01T14:03:10",
            ),
            "Slurm job 123 is RUNNING, after 3 min in the queue",
        ),
    ],
)
def test_describe(info: JobInfo, text: str) -> None:
    assert describe(info, NOW)[0] == text


def test_describe_key_ignores_the_countdown() -> None:
    info = JobInfo("1", S.PENDING, reason="Resources", start_time="2026-12-01T14:32:00")
    later = datetime(2026, 12, 1, 14, 25, tzinfo=UTC)
    assert describe(info, NOW)[1] == describe(info, later)[1]
    moved = JobInfo("1", S.PENDING, reason="Resources", start_time="2026-12-01T14:40:00")
    assert describe(moved, NOW)[1] != describe(info, NOW)[1]


def poll_output(*rows: str) -> str:
    return "@@slurm_ray:squeue rc=0\n" + "".join(r + "\n" for r in rows) + "@@slurm_ray:end\n"


def test_trigger_logs_pending_only_when_it_changes(monkeypatch) -> None:
    sub = "2026-12-01T13:00:00"
    pend = f"7|PENDING|{{}}|1|0:00||{sub}|{{}}|sr-job"
    plan = [
        poll_output(pend.format("Priority", "N/A")),
        poll_output(pend.format("Priority", "N/A")),
        poll_output(pend.format("Resources", "N/A")),
        poll_output(pend.format("Resources", "2099-12-01T13:28:56")),
        poll_output(pend.format("Resources", "2099-12-01T13:28:56")),
        poll_output(pend.format("Resources", "2099-12-01T13:28:56")),
        poll_output(f"7|RUNNING|None|1|0:01|n1|{sub}|2026-12-01T13:00:40|sr-job"),
        poll_output(f"7|RUNNING|None|1|0:02|n1|{sub}|2026-12-01T13:00:40|sr-job"),
        poll_output(f"7|COMPLETED|None|1|0:03|n1|{sub}|2026-12-01T13:00:40|sr-job"),
    ]
    install(monkeypatch, FakeClient(plan))
    trig = SlurmJobTrigger(
        job_id="7", ssh_conn_id="c", log_path="/x/slurm-7.out", poll_interval=0.01
    )
    logs = tap(trig)

    async def collect():
        return [e.payload async for e in trig.run()]

    events = asyncio.run(collect())
    assert events[-1]["state"] == "COMPLETED"
    lines = [line for line in logs.text.splitlines() if "Slurm job 7 is" in line]
    assert len(lines) == 5, lines
    assert lines[0].endswith("Slurm job 7 is PENDING (Priority)")
    assert lines[1].endswith("Slurm job 7 is PENDING (Resources)")
    assert (
        "Slurm job 7 is PENDING (Resources), estimated start 2099-12-01 13:28 UTC, in " in lines[2]
    )
    assert lines[3].endswith("Slurm job 7 is RUNNING, after 40 s in the queue")
    assert lines[4].endswith("Slurm job 7 is COMPLETED, after 40 s in the queue")


def test_worker_wait_logs_pending_only_when_it_changes(caplog, monkeypatch) -> None:
    """The non-deferrable wait (SlurmJobManager.follow) logs as the trigger does."""
    import logging

    from slurm_ray.operators import job_manager
    from slurm_ray.operators.job_manager import SlurmJobManager
    from slurm_ray.slurm.parsers import parse_states_output
    from slurm_ray.slurm.poll import TailChunk

    sub = "2026-12-01T13:00:00"
    pend = f"7|PENDING|Resources|1|0:00||{sub}|{{}}|sr-job"
    plan = [
        pend.format("N/A"),
        pend.format("2099-12-01T13:28:56"),
        pend.format("2099-12-01T13:28:56"),
        f"7|RUNNING|None|1|0:01|n1|{sub}|2026-12-01T13:02:00|sr-job",
        f"7|COMPLETED|None|1|0:02|n1|{sub}|2026-12-01T13:02:00|sr-job",
    ]

    class Hook:
        def poll(self, job_ids: list[str], tails: list[Any]) -> tuple[dict, list[TailChunk]]:
            states = parse_states_output(poll_output(plan.pop(0)), job_ids)
            return states, [TailChunk(0, 0, b"")] * len(tails)

    monkeypatch.setattr(job_manager.time, "sleep", lambda s: None)
    manager = SlurmJobManager(Hook(), logging.getLogger("t.follow"))  # type: ignore[arg-type]
    with caplog.at_level(logging.INFO, logger="t.follow"):
        ended = manager.follow("7", "/x/slurm-7.out", 0.01)
    assert ended.state is S.COMPLETED and ended.queue_wait_s() == 120
    lines = [r.getMessage() for r in caplog.records if "Slurm job 7 is" in r.getMessage()]
    assert lines == [
        "Slurm job 7 is PENDING (Resources)",
        lines[1],
        "Slurm job 7 is RUNNING, after 2 min in the queue",
        "Slurm job 7 is COMPLETED, after 2 min in the queue",
    ]
    assert lines[1].startswith(
        "Slurm job 7 is PENDING (Resources), estimated start 2099-12-01 13:28 UTC, in "
    )
