"""A job slurmctld has purged (MinJobAge) while slurmdbd remembers it: its end comes from sacct.

The fixtures are REAL output of the trigger's poll command and of the states
command, run on the dev cluster (slurmdbd + MariaDB) for jobs 25-28 of
tests/fixtures/slurm/sacct_cost.txt after slurmctld had purged them (MinJobAge
600 s; squeue and ``scontrol show job`` no longer knew them). Captured with
tests/fixtures/slurm/capture_purged.py. There is no honest way to make the
shared controller forget a job on demand (slurm.conf is write-protected, and
waiting out MinJobAge takes 10 minutes), so the trigger and ``execute_complete``
are driven here over that real output.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from slurm_ray.slurm.parsers import parse_states_output
from slurm_ray.slurm.poll import parse_poll_output
from slurm_ray.triggers.slurm_job import SlurmJobTrigger, _HostPoller
from slurm_ray.utils.states import SlurmState

from tests.unit.test_trigger_logic import FakeClient, install

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "slurm"
IDS = ["25", "26", "27", "28"]
POLL = (FIXTURES / "poll_output_purged_25_26_27_28.txt").read_text()
STATES = (FIXTURES / "states_output_purged_25_26_27_28.txt").read_text()
#: What sacct recorded (tests/fixtures/slurm/sacct_states.txt).
ENDS = {
    "25": ("COMPLETED", "0:0"),
    "26": ("FAILED", "3:0"),
    "27": ("TIMEOUT", "0:0"),
    "28": ("CANCELLED", "0:15"),
}


@pytest.fixture(autouse=True)
def _clean_registry():
    _HostPoller.registry.clear()
    yield
    _HostPoller.registry.clear()


def test_the_capture_is_of_purged_jobs() -> None:
    # squeue listed none of them; scontrol answered "Invalid job id" for each
    assert "@@slurm_ray:sacct rc=0" in POLL and "@@slurm_ray:sacct rc=0" in STATES
    for job_id in IDS:
        assert f"@@slurm_ray:scontrol {job_id} rc=1" in STATES
        assert "Invalid job id specified" in STATES


@pytest.mark.parametrize("text", [POLL, STATES], ids=["poll", "states"])
def test_end_states_come_from_sacct(text: str) -> None:
    if text is POLL:
        states, _ = parse_poll_output(text, IDS, 1)
    else:
        states = parse_states_output(text, IDS)
    for job_id, (state, exit_code) in ENDS.items():
        info = states[job_id]
        assert (info.state.value, info.exit_code, info.source) == (state, exit_code, "sacct")
    assert states["25"].nodelist == "n[1-2]" and states["25"].num_nodes == 2


@pytest.mark.parametrize("job_id", IDS)
def test_trigger_ends_with_the_sacct_state_at_the_first_poll(monkeypatch, job_id: str) -> None:
    client = FakeClient([POLL])
    install(monkeypatch, client)
    trig = SlurmJobTrigger(
        job_id=job_id, ssh_conn_id="c", log_path=f"/r/run/slurm-{job_id}.out", poll_interval=0.01
    )

    async def collect() -> list[Any]:
        return [e async for e in trig.run()]

    events = asyncio.run(asyncio.wait_for(collect(), 10))
    state, exit_code = ENDS[job_id]
    assert [(e.payload["status"], e.payload["state"]) for e in events] == [("terminal", state)]
    assert events[0].payload["exit_code"] == exit_code
    assert len(client.commands) == 1  # a sacct answer is final: no NOT_FOUND confirmation


@dataclass
class TI:
    task_id: str = "t"
    dag_id: str = "d"
    run_id: str = "manual__1"
    map_index: int = -1
    try_number: int = 1
    xcom: dict[str, Any] = field(default_factory=dict)

    def xcom_push(self, key: str, value: Any) -> None:
        self.xcom[key] = value


class RunDirHook:
    """The login node: an empty run directory (no result.json, no log)."""

    def read_file(self, path: str) -> bytes | None:
        return None

    def run(self, command: str, *, timeout: float | None = None, check: bool = False) -> Any:
        from slurm_ray.hooks.slurm import CommandResult

        return CommandResult(0, "", "", b"")


@pytest.mark.parametrize(
    ("job_id", "error"),
    [
        ("25", None),
        ("26", r"Slurm job 26 ended FAILED, exit code 3:0"),
        ("27", r"Slurm job 27 reached its time limit \(TIMEOUT; Slurm state TIMEOUT\)"),
        ("28", r"Slurm job 28 ended CANCELLED, exit code 0:15: the job was cancelled"),
    ],
)
def test_execute_complete_decides_from_the_sacct_state(
    monkeypatch, job_id: str, error: str | None
) -> None:
    from airflow.sdk.exceptions import AirflowException
    from slurm_ray import SlurmRayOperator

    install(monkeypatch, FakeClient([POLL]))
    trig = SlurmJobTrigger(
        job_id=job_id, ssh_conn_id="c", log_path=f"/r/run/slurm-{job_id}.out", poll_interval=0.01
    )

    async def first() -> Any:
        async for event in trig.run():
            return event
        raise AssertionError("no event")

    payload = asyncio.run(asyncio.wait_for(first(), 10)).payload
    op = SlurmRayOperator(
        task_id="t", ssh_conn_id="unused", remote_base_dir="/r", entrypoint="true"
    )
    op._hook = RunDirHook()  # type: ignore[assignment]
    context: Any = {"ti": TI()}
    if error is None:
        summary = op.execute_complete(context, payload, run_dir="/r/run")
        assert (summary["state"], summary["job_id"]) == ("COMPLETED", "25")
        assert summary["nodelist"] == "n[1-2]"
    else:
        with pytest.raises(AirflowException, match=error):
            op.execute_complete(context, payload, run_dir="/r/run")
    assert SlurmState(payload["state"]) is not SlurmState.NOT_FOUND
