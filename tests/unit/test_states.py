"""Slurm states and the squeue/scontrol/sacct parsers, on real captured output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from slurm_ray.slurm.parsers import SQUEUE_FORMAT, parse_scontrol, parse_squeue
from slurm_ray.slurm.sacct import SACCT_FORMAT, parse_sacct
from slurm_ray.utils.states import (
    ACTIVE_STATES,
    FAILED_STATES,
    PENDING_STATES,
    RUNNING_STATES,
    TERMINAL_STATES,
    JobInfo,
    SlurmState,
    is_active,
    is_success,
    is_terminal,
    parse_state,
)

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "slurm"
S = SlurmState


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


# --- states ----------------------------------------------------------------


def test_every_state_is_in_exactly_one_class() -> None:
    ours = {S.UNKNOWN, S.NOT_FOUND}
    classes = [PENDING_STATES, RUNNING_STATES, TERMINAL_STATES, ours]
    for state in SlurmState:
        assert sum(state in c for c in classes) == 1, state
    assert ACTIVE_STATES == PENDING_STATES | RUNNING_STATES
    assert TERMINAL_STATES - {S.COMPLETED} == FAILED_STATES
    assert len(SlurmState) == 26


@pytest.mark.parametrize("state", list(SlurmState))
def test_predicates(state: SlurmState) -> None:
    assert is_success(state) == (state is S.COMPLETED)
    assert is_terminal(state) == (state in TERMINAL_STATES)
    assert is_active(state) == (state in ACTIVE_STATES)
    assert not (is_active(state) and is_terminal(state))


@pytest.mark.parametrize("state", [S.UNKNOWN, S.NOT_FOUND])
def test_unknown_and_not_found_are_never_success_nor_finished(state: SlurmState) -> None:
    assert not is_success(state) and not is_terminal(state) and not is_active(state)
    assert state not in FAILED_STATES


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("COMPLETED", S.COMPLETED),
        ("CANCELLED by 1001", S.CANCELLED),
        ("CANCELLED+", S.CANCELLED),
        ("cancelled", S.CANCELLED),
        ("  RUNNING\n", S.RUNNING),
        ("OUT_OF_MEMORY", S.OUT_OF_MEMORY),
        ("REQUEUE_HOLD", S.REQUEUE_HOLD),
        ("CD", S.COMPLETED),
        ("PD", S.PENDING),
        ("OOM", S.OUT_OF_MEMORY),
        ("", S.UNKNOWN),
        (None, S.UNKNOWN),
        ("COMPLETE", S.UNKNOWN),
        ("slurm_load_jobs error", S.UNKNOWN),
        ("0:0", S.UNKNOWN),
    ],
)
def test_parse_state(text: str | None, expected: SlurmState) -> None:
    assert parse_state(text) is expected


def test_predicates_accept_text() -> None:
    assert is_success("COMPLETED") and not is_success("junk")
    assert is_terminal("CANCELLED by 0") and is_active("pd")


def test_state_is_a_str_for_serialisation() -> None:
    assert json.dumps({"s": S.TIMEOUT}) == '{"s": "TIMEOUT"}'
    assert str(S.NODE_FAIL) == "NODE_FAIL"


# --- squeue -------------------------------------------------------------------


#: The squeue fields of the committed 7-field capture (fixtures/slurm/README.md).
CAPTURED_FIELDS = ("%i", "%T", "%r", "%D", "%M", "%N", "%j")


def test_squeue_format_is_what_capture_sh_prints() -> None:
    assert SQUEUE_FORMAT == "%i|%T|%r|%D|%M|%N|%V|%S|%j"
    assert "FMT='" + SQUEUE_FORMAT + "'" in fixture("capture.sh")


def test_parse_squeue_real_mixed_states() -> None:
    jobs = parse_squeue(fixture("squeue_mixed.txt"), CAPTURED_FIELDS)
    assert {k: v.state for k, v in jobs.items()} == {
        "8": S.COMPLETED,
        "9": S.FAILED,
        "10": S.RUNNING,
        "11": S.PENDING,
        "12": S.RUNNING,
        "13": S.CANCELLED,
    }
    assert jobs["9"].reason == "NonZeroExitCode"
    assert jobs["10"] == JobInfo(
        job_id="10",
        state=S.RUNNING,
        reason="None",
        name="fx name with spaces",
        nodelist="n[1-2]",
        num_nodes=2,
        exit_code=None,
        elapsed="0:01",
        source="squeue",
    )
    pending = jobs["11"]
    assert (pending.reason, pending.nodelist, pending.num_nodes) == ("BeginTime", "", 2)
    timeout = parse_squeue(fixture("squeue_timeout.txt"), CAPTURED_FIELDS)["12"]
    assert (timeout.state, timeout.reason, timeout.elapsed) == (S.TIMEOUT, "TimeLimit", "1:13")


def test_parse_squeue_hostile_name_and_array() -> None:
    jobs = parse_squeue(fixture("squeue_hostile_and_array.txt"), CAPTURED_FIELDS)
    assert set(jobs) == {"25", "26_0", "26_1"}
    evil = jobs["25"]
    assert evil.name == "evil| UserId=x(1) JobState=COMPLETED NodeList=zz"
    assert (evil.state, evil.reason, evil.nodelist) == (S.PENDING, "JobHeldUser", "")
    assert jobs["26_1"].state is S.COMPLETED


def test_parse_squeue_skips_noise() -> None:
    t = "2026-12-01T13:00:00"
    text = (
        f"slurm_load_jobs error: Invalid job id specified\n\n7|RUNNING|None|1|0:01|n1|{t}|{t}|x\n"
    )
    text += f"garbage|line\nabc|RUNNING|None|1|0:01|n1|{t}|{t}|x\n8|RUNNING|None|1|0:01|n1|x\n"
    assert list(parse_squeue(text)) == ["7"]
    assert parse_squeue("") == {}


# --- scontrol -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "job_id", "state", "reason", "exit_code", "elapsed", "nodelist", "nodes"),
    [
        ("scontrol_completed.txt", "8", S.COMPLETED, "None", "0:0", "00:00:00", "n1", 1),
        ("scontrol_failed.txt", "9", S.FAILED, "NonZeroExitCode", "3:0", "00:00:00", "n1", 1),
        ("scontrol_running.txt", "10", S.RUNNING, "None", "0:0", "00:00:01", "n[1-2]", 2),
        ("scontrol_pending.txt", "11", S.PENDING, "BeginTime", "0:0", "00:00:00", "", 2),
        ("scontrol_cancelled.txt", "13", S.CANCELLED, "None", "0:15", "00:00:00", "n2", 1),
        ("scontrol_timeout.txt", "12", S.TIMEOUT, "TimeLimit", "0:15", "00:01:13", "n1", 1),
    ],
)
def test_parse_scontrol_real(
    name: str,
    job_id: str,
    state: SlurmState,
    reason: str,
    exit_code: str,
    elapsed: str,
    nodelist: str,
    nodes: int,
) -> None:
    jobs = parse_scontrol(fixture(name))
    assert list(jobs) == [job_id]
    info = jobs[job_id]
    assert (info.state, info.reason, info.exit_code, info.elapsed) == (
        state,
        reason,
        exit_code,
        elapsed,
    )
    assert (info.nodelist, info.num_nodes, info.source) == (nodelist, nodes, "scontrol")


def test_parse_scontrol_name_with_spaces() -> None:
    assert parse_scontrol(fixture("scontrol_running.txt"))["10"].name == "fx name with spaces"


def test_parse_scontrol_hostile_name_cannot_forge_fields() -> None:
    info = parse_scontrol(fixture("scontrol_hostile.txt"))["25"]
    assert info.name == "evil| UserId=x(1) JobState=COMPLETED NodeList=zz"
    assert (info.state, info.reason, info.nodelist) == (S.PENDING, "JobHeldUser", "")


def test_parse_scontrol_hostile_comment_and_workdir_cannot_forge_fields() -> None:
    line = fixture("scontrol_running.txt").replace(
        "WorkDir=", "Comment=x JobState=COMPLETED ExitCode=0:0 WorkDir=/a NodeList=zz "
    )
    info = parse_scontrol(line)["10"]
    assert (info.state, info.nodelist, info.exit_code) == (S.RUNNING, "n[1-2]", "0:0")


def test_parse_scontrol_array_tasks_are_keyed_both_ways() -> None:
    jobs = parse_scontrol(fixture("scontrol_array.txt"))
    assert set(jobs) == {"26", "26_1", "27", "26_0"}
    assert jobs["26_0"] is jobs["27"] and jobs["26_1"] is jobs["26"]
    assert jobs["27"].job_id == "27"


def test_parse_scontrol_invalid_id_is_no_record() -> None:
    assert parse_scontrol(fixture("scontrol_invalid.txt")) == {}


def test_parse_scontrol_het_component() -> None:
    line = fixture("scontrol_completed.txt").replace(
        "JobId=8 JobName=", "JobId=8 HetJobId=7 HetJobOffset=1 JobName="
    )
    assert parse_scontrol(line)["7+1"].job_id == "8"


# --- sacct (format from the Slurm docs; no accounting on the dev cluster) -----


def test_sacct_format_fields() -> None:
    assert SACCT_FORMAT.split(",")[-1] == "JobName"
    assert {"JobIDRaw", "State", "Reason", "ExitCode", "Elapsed", "NNodes", "NodeList"} <= set(
        SACCT_FORMAT.split(",")
    )


def test_parse_sacct_docs_example() -> None:
    jobs = parse_sacct(fixture("sacct_docs_example.txt"))
    assert jobs["101"] == JobInfo(
        job_id="101",
        state=S.COMPLETED,
        reason="None",
        name="ppo-cartpole",
        nodelist="n[1-2]",
        num_nodes=2,
        exit_code="0:0",
        elapsed="00:01:30",
        source="sacct",
    )
    assert jobs["102"].exit_code == "3:0" and jobs["102"].state is S.FAILED
    assert jobs["103"].state is S.CANCELLED
    assert jobs["105"].state is S.OUT_OF_MEMORY
    assert jobs["107"].nodelist == "" and jobs["107"].reason == "BeginTime"
    assert jobs["108_1"] is jobs["109"]
    assert jobs["110+0"] is jobs["110"] and jobs["110"].elapsed == "1-02:03:04"
    assert jobs["111"].name == "name|with|pipes"


def test_parse_sacct_skips_steps_and_noise() -> None:
    jobs = parse_sacct(fixture("sacct_docs_steps_example.txt") + "sacct: error: x\n")
    assert list(jobs) == ["112"]


def test_job_info_round_trips_through_json() -> None:
    info = parse_sacct(fixture("sacct_docs_example.txt"))["103"]
    data = json.loads(json.dumps(info.to_dict()))
    assert data["state"] == "CANCELLED"
    assert JobInfo.from_dict(data) == info
