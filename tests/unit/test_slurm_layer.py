"""The Slurm layer's pure pieces: the one time grammar, the header-name sacct
parser, and the bytes-capped log tail (issue 14 item 3, issue 12 item 7)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import jsonschema
import pytest
from slurm_ray.slurm.commands import LOG_TAIL_BYTES, build_log_tail_command
from slurm_ray.slurm.parsers import last_lines
from slurm_ray.slurm.sacct import SACCT_FIELDS, parse_sacct, read_sacct
from slurm_ray.slurm.timefmt import TIME_PATTERN, parse_elapsed, parse_time_limit
from slurm_ray.utils.states import SlurmState

GOOD_TIMES = {
    "5": 300,
    "90": 5400,
    "5:30": 330,
    "1:02:03": 3723,
    "00:30:00": 1800,
    "2-0": 172800,
    "1-12": 129600,
    "1-2:03": 93780,
    "1-02:03:04": 93784,
    "UNLIMITED": None,
    "infinite": None,
}
BAD_TIMES = ["", "1:2:3:4", "1-24", "5:60", "-1", "1-", "abc", "5\n", "5 ", "1.5", "1-2-3"]


@pytest.mark.parametrize(("text", "seconds"), GOOD_TIMES.items())
def test_time_limits_parse_and_pass_the_json_schema(text: str, seconds: int | None) -> None:
    assert parse_time_limit(text) == seconds
    jsonschema.validate(text, {"type": "string", "pattern": TIME_PATTERN})


@pytest.mark.parametrize("text", BAD_TIMES)
def test_bad_time_limits_are_refused_by_both(text: str) -> None:
    with pytest.raises(ValueError, match="expected MM, MM:SS"):
        parse_time_limit(text)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(text, {"type": "string", "pattern": TIME_PATTERN})


def test_the_grammar_agrees_with_the_job_spec_check() -> None:
    """JobSpec.time (utils/batch.py, h-valid's) still has its own regex; both accept the same."""
    from slurm_ray.utils.batch import JobSpec, JobSpecError

    for text in [*GOOD_TIMES, *BAD_TIMES]:
        try:
            JobSpec.from_dict({"job_name": "x", "time": text})
            spec_ok = True
        except JobSpecError:
            spec_ok = False
        try:
            parse_time_limit(text)
            ours = True
        except ValueError:
            ours = False
        assert spec_ok == ours, text


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0:05", 5.0),
        ("05:30", 330.0),
        ("12:34.567", 754.567),
        ("01:02:03", 3723.0),
        ("1-02:03:04", 93784.0),
        ("", None),
        (None, None),
        ("INVALID", None),
    ],
)
def test_elapsed_times_as_slurm_prints_them(text: str | None, seconds: float | None) -> None:
    assert parse_elapsed(text) == pytest.approx(seconds) if seconds else parse_elapsed(text) is None


def test_sacct_columns_are_read_by_header_name() -> None:
    """A site's sacct with the columns in another order is read right."""
    names = ["JobName", "State", "JobID", "NNodes", "JobIDRaw", "ExitCode"]
    names = [*names[1:], names[0]]  # JobName last: it may hold '|'
    text = (
        "|".join(names)
        + "\nCOMPLETED|101|2|101|0:0|ppo|cart\nsacct: error: noise\nFAILED|108_1|1|109|3:0|arr\n"
    )
    jobs = parse_sacct(text)
    assert jobs["101"].state is SlurmState.COMPLETED and jobs["101"].name == "ppo|cart"
    assert jobs["101"].num_nodes == 2 and jobs["101"].exit_code == "0:0"
    assert jobs["108_1"] is jobs["109"] and jobs["109"].state is SlurmState.FAILED
    # Without a header (sacct -n) the columns are the ones asked for, in order.
    line = "|".join(["7", "7", "TIMEOUT", "None", "0:0", "00:01:00", "1", "n1", "job"])
    assert parse_sacct(line + "\n")["7"].state is SlurmState.TIMEOUT
    assert len(SACCT_FIELDS) == 9


def test_read_sacct_serves_other_columns() -> None:
    """The cost columns (mlflow's slurm_efficiency) through the same parser."""
    fields = ("JobID", "ElapsedRaw", "NNodes", "AllocCPUS", "TotalCPU")
    text = "JobID|ElapsedRaw|NNodes|AllocCPUS|TotalCPU\n42|120|2|4|07:59.500\n42.batch|120|1|2|x\n"
    rows = read_sacct(text, fields)
    assert rows[0] == {
        "JobID": "42",
        "ElapsedRaw": "120",
        "NNodes": "2",
        "AllocCPUS": "4",
        "TotalCPU": "07:59.500",
    }
    assert parse_elapsed(rows[0]["TotalCPU"]) == pytest.approx(479.5)


@pytest.mark.parametrize("shell", ["bash", "dash"])
def test_log_tail_is_capped_in_bytes(tmp_path: Path, shell: str) -> None:
    """Issue 12 item 7: ``tail -n 40`` of a log without newlines is the whole log."""
    log = tmp_path / "slurm a'b.out"
    log.write_bytes(b"x" * (20 << 20) + b"\nlast line\n")
    proc = subprocess.run([shell, "-c", build_log_tail_command(str(log))], capture_output=True)
    assert proc.returncode == 0
    assert len(proc.stdout) == LOG_TAIL_BYTES and proc.stdout.endswith(b"\nlast line\n")
    tail = last_lines(proc.stdout.decode(), 40)
    assert tail.endswith("last line") and len(tail) <= LOG_TAIL_BYTES


def test_last_lines_caps_one_huge_line() -> None:
    text = "start\n" + "y" * (10 << 20)
    assert len(last_lines(text, 40, line_chars=10 << 20)) == 64 * 1024
    # each line keeps its end and says how much was cut: a readable error message
    tail = last_lines(text + "z\nend", 40)
    assert tail == f"[{64 * 1024 - 4 - 1000} characters cut] {'y' * 999}z\nend", tail[:80]
    assert last_lines("a\nb\nc\n", 2) == "b\nc"
