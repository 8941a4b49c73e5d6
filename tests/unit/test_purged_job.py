"""A job Slurm has forgotten (purged after MinJobAge, no accounting): issue 12 item 3.

The decision table from the run directory, and the trigger ending on a
confirmed NOT_FOUND instead of polling until its deadline. The real purge is
in tests/faults/test_r12_purged.py.
"""

from __future__ import annotations

import asyncio

import pytest
from slurm_ray.triggers.slurm_job import SlurmJobTrigger, _HostPoller
from slurm_ray.utils.states import SlurmState, end_from_run_dir

from tests.unit.test_trigger_logic import FakeClient, install, squeue_line

S = SlurmState
OK = {"status": "succeeded", "stop_reason": "iterations"}
EXIT0 = "iteration 3 ...\nray_launch: exit 0\n"
EXIT1 = "Traceback ...\nray_launch: exit 1\n"


@pytest.mark.parametrize(
    ("result", "log", "state", "exit_code"),
    [
        (OK, EXIT0, S.COMPLETED, "0:0"),
        (None, EXIT0, S.COMPLETED, "0:0"),  # an entrypoint that writes no result.json
        (OK, EXIT1, S.FAILED, "1:0"),  # the batch script's status is the job's
        ({"status": "failed"}, EXIT1, S.FAILED, "1:0"),
        (
            {"status": "interrupted", "stop_reason": "signal:SIGUSR1"},
            "ray_launch: exit 75\n",
            S.FAILED,
            "75:0",
        ),
        (OK, "killed before the exit trap ran\n", S.COMPLETED, None),
        ({"status": "config_error"}, "", S.FAILED, None),
        (None, "", S.NOT_FOUND, None),  # nothing certain: never a success
        (None, "ray_launch: exit 0 and more\n", S.NOT_FOUND, None),  # not the launcher's line
    ],
)
def test_end_of_a_purged_job_from_the_run_dir(result, log, state, exit_code) -> None:
    info = end_from_run_dir("12", result, log)
    assert (info.state, info.exit_code, info.source) == (state, exit_code, "run_dir")
    assert info.reason


def test_the_last_exit_line_counts(tmp_path) -> None:
    # a requeued job appends a second run to the same log
    assert (
        end_from_run_dir("1", None, "ray_launch: exit 1\nray_launch: exit 0\n").state is S.COMPLETED
    )


def not_found(job_id: str) -> str:
    """build_states_command's output for a job Slurm has purged, on a site without sacct."""
    return (
        "@@slurm_ray:squeue rc=1\nslurm_load_jobs error: Invalid job id specified\n"
        f"@@slurm_ray:scontrol {job_id} rc=1\nslurm_load_jobs error: Invalid job id specified\n"
        "@@slurm_ray:sacct absent\n@@slurm_ray:end\n"
    )


@pytest.fixture(autouse=True)
def _clean_registry():
    _HostPoller.registry.clear()
    yield
    _HostPoller.registry.clear()


def test_trigger_ends_on_a_confirmed_not_found(monkeypatch) -> None:
    """The job ended and was purged while nobody watched: one terminal event
    (state NOT_FOUND) after two polls in a row, not polling until the deadline."""
    client = FakeClient([squeue_line("7", "RUNNING"), not_found("7"), not_found("7")])
    install(monkeypatch, client)
    trig = SlurmJobTrigger(
        job_id="7", ssh_conn_id="c", log_path="/x/slurm-7.out", poll_interval=0.01
    )

    async def collect():
        return [e async for e in trig.run()]

    events = asyncio.run(asyncio.wait_for(collect(), 10))
    assert [(e.payload["status"], e.payload["state"]) for e in events] == [
        ("terminal", "NOT_FOUND")
    ]
    assert len(client.commands) == 3


def test_one_not_found_answer_is_not_yet_the_end(monkeypatch) -> None:
    client = FakeClient(
        [not_found("7"), squeue_line("7", "RUNNING"), not_found("7"), squeue_line("7", "COMPLETED")]
    )
    install(monkeypatch, client)
    trig = SlurmJobTrigger(
        job_id="7", ssh_conn_id="c", log_path="/x/slurm-7.out", poll_interval=0.01
    )

    async def collect():
        return [e async for e in trig.run()]

    events = asyncio.run(asyncio.wait_for(collect(), 10))
    assert [e.payload["state"] for e in events] == ["COMPLETED"]


class PurgedHook:
    """A login node where job 12 ended (result.json, log) and Slurm forgot it."""

    command_timeout = 120.0

    def __init__(self, result: bytes | None, log: str) -> None:
        self.result, self.log, self.polls = result, log, 0

    def poll(self, job_ids, tails):
        from slurm_ray.slurm.poll import TailChunk
        from slurm_ray.utils.states import JobInfo

        self.polls += 1
        states = {"12": JobInfo("12", S.NOT_FOUND, reason="unknown to squeue and scontrol")}
        return states, [TailChunk()] * len(tails)

    def read_file(self, path):
        return self.result if path.endswith("result.json") else None

    def run(self, command, *, timeout=None, check=False):
        from slurm_ray.hooks.slurm import CommandResult

        out = self.log if command.startswith("tail ") else ""
        return CommandResult(0, out, "", out.encode())


@pytest.mark.parametrize(
    ("result", "log", "ok"),
    [(b'{"status": "succeeded"}', "ray_launch: exit 0\n", True), (None, "", False)],
)
def test_non_deferrable_wait_ends_on_a_confirmed_not_found(result, log, ok) -> None:
    from airflow.sdk.exceptions import AirflowException
    from slurm_ray import SlurmRayOperator

    op = SlurmRayOperator(
        task_id="t",
        ssh_conn_id="unused",
        remote_base_dir="/r",
        entrypoint="true",
        poll_interval=0,
    )
    from slurm_ray.operators.run_state import RunState

    op._hook = hook = PurgedHook(result, log)  # type: ignore[assignment]
    run = RunState(context={}, run_dir="/r/run", job_id="12")  # type: ignore[arg-type]
    if ok:
        summary = op._follow(run)
        assert summary["state"] == "COMPLETED" and summary["job_id"] == "12"
    else:
        with pytest.raises(AirflowException, match=r"ended NOT_FOUND.*neither result\.json"):
            op._follow(run)
    assert hook.polls == 2
