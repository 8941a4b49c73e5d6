"""Batch-script builder: golden files, validation, and hostile values run for real.

Two readers of a rendered script matter: sbatch (``#SBATCH`` lines) and bash
(everything else). Bash is run for real here; sbatch's directive parser is
modelled by :func:`sbatch_directives` (a port of Slurm 22.05's
``src/sbatch/opt.c:_get_argument``) so every field can be checked without a
cluster, and the ``cluster``-marked test proves the model against the real
sbatch/slurmctld for the fields Slurm lets us submit with any value.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import uuid
from pathlib import Path

import pytest
from slurm_ray.slurm.parsers import parse_scontrol
from slurm_ray.utils.batch import (
    EXTRA_DIRECTIVES,
    JobSpec,
    JobSpecError,
    render_batch_script,
    sbatch_word,
)
from slurm_ray.utils.quoting import quote
from slurm_ray.utils.states import SlurmState

GOLDEN = Path(__file__).resolve().parent.parent / "fixtures" / "golden"

# Free-text fields: any non-empty single-line string is accepted and must reach
# Slurm unchanged. (nodes, mem, time, signal… have formats and are tested apart.)
TEXT_FIELDS = ("job_name", "gres", "partition", "account", "qos", "output", "error")
TEXT_FIELDS += ("constraint", "chdir")
TEXT_EXTRAS = ("comment", "mail-user", "reservation", "licenses", "nodelist", "dependency")

# submitit's weird_tmp_path set and friends; {m} is replaced by a marker path that
# must never be created.
HOSTILE_TEMPLATES = [
    "a 0",
    'a"=0"',
    "a'; echo foo",
    "$(touch {m})",
    "`touch {m}`",
    "a; touch {m}",
    "a && touch {m} #",
    "x'$(touch {m})'y",
    'x"$(touch {m})"y',
    "a\\b",
    "a\\'b",
    "#not a comment",
    " lead and trail ",
    "-dash",
    "ü € *?[]~{{}}|&<>",
]


# --- a model of sbatch's directive parser (Slurm 22.05, src/sbatch/opt.c) -----

_C_SPACE = " \t\n\v\f\r"


def _sbatch_line_args(text: str) -> list[str]:
    """Arguments of one ``#SBATCH`` line after the magic word, as sbatch reads them."""
    args: list[str] = []
    i, n = 0, len(text)
    while True:
        while i < n and text[i] in _C_SPACE:
            i += 1
        arg: list[str] = []
        quoted, q_char, escape = False, "", False
        while i < n and (quoted or text[i] not in _C_SPACE) and text[i] != "\n":
            c = text[i]
            if escape:
                escape = False
            elif c == "\\":
                escape, i = True, i + 1
                continue
            elif quoted:
                if c == q_char:
                    quoted, i = False, i + 1
                    continue
            elif c in "\"'":
                quoted, q_char, i = True, c, i + 1
                continue
            elif c == "#":  # unquoted: the rest of the line is a comment
                break
            arg.append(c)
            i += 1
        if quoted:
            raise AssertionError(f"sbatch would die: unmatched {q_char} in {text!r}")
        if not arg:  # _get_argument returns NULL: nothing more on this line
            return args
        args.append("".join(arg))


def sbatch_directives(script: str) -> list[str]:
    """All options sbatch takes from a script: it stops at the first command line."""
    args: list[str] = []
    for line in script.split("\n"):
        if line.startswith("#SBATCH"):
            args += _sbatch_line_args(line[len("#SBATCH") :])
        elif line.strip() and not line.lstrip().startswith("#"):
            break
    return args


def directive_map(script: str) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for arg in sbatch_directives(script):
        assert arg.startswith("--"), arg
        key, eq, value = arg[2:].partition("=")
        assert key not in out, f"--{key} given twice"
        out[key] = value if eq else None
    return out


def test_sbatch_model_matches_what_sbatch_22_05_recorded() -> None:
    # Observed on the dev cluster (scontrol show job after sbatch --parsable):
    assert _sbatch_line_args(" --job-name='a b'") == ["--job-name=a b"]
    assert _sbatch_line_args(" --job-name='a\\b'") == ["--job-name=ab"]
    assert _sbatch_line_args(" --job-name='a\\\\b'") == ["--job-name=a\\b"]
    assert _sbatch_line_args(" --job-name=a\\\\b\"c d\"'e f'") == ["--job-name=a\\bc de f"]
    assert _sbatch_line_args(" --comment=x #y") == ["--comment=x"]
    assert _sbatch_line_args(" --comment='x#y \\n z'") == ["--comment=x#y n z"]


# --- golden files --------------------------------------------------------------


def minimal_script() -> str:
    return render_batch_script(JobSpec(job_name="ppo-cartpole"), command="python -u driver.py")


def full_script() -> str:
    spec = JobSpec(
        job_name="airflow.rl_train.manual__2025-01-01T00:00:00+00:00.train.try_1",
        nodes=2,
        ntasks_per_node=1,
        cpus_per_task=4,
        mem="8G",
        gpus_per_node=1,
        gres="gpu:1",
        partition="debug",
        account="my proj",
        qos="normal",
        time="1-02:03:04",
        output="slurm-%j.out",
        error="slurm-%j.err",
        constraint="intel&ib",
        exclusive=True,
        signal="B:USR1@60",
        chdir="/scratch/runs/rl_train/manual__2025-01-01T00:00:00+00:00/train/try_1",
        requeue=False,
        extra={"mail_type": "END,FAIL", "mail-user": "me@example.org", "open-mode": "append"},
    )
    return render_batch_script(
        spec,
        command='exec bash launch_ray.sh python -u driver.py --config "$RUN_DIR/config.json"',
        setup_lines=["module purge", "module load conda", "conda activate rl-env"],
        env={"RUN_DIR": "/scratch/runs/it's here", "RAY_USAGE_STATS_ENABLED": "0"},
        header_comment="Rendered by slurm_ray for rl_train/train\ntry 1",
    )


@pytest.mark.parametrize(("name", "render"), [("minimal", minimal_script), ("full", full_script)])
def test_golden(name: str, render) -> None:
    path = GOLDEN / f"{name}.sbatch"
    text = render()
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.read_text() == text, f"rendered script changed; UPDATE_GOLDEN=1 rewrites {path}"


def test_full_golden_directives_are_all_seen_by_sbatch() -> None:
    # The preamble must come after the last directive, or sbatch would stop early.
    d = directive_map(full_script())
    assert d["job-name"] == "airflow.rl_train.manual__2025-01-01T00:00:00+00:00.train.try_1"
    assert d["account"] == "my proj"
    assert d["exclusive"] is None and d["no-requeue"] is None
    assert d["mail-type"] == "END,FAIL" and d["open-mode"] == "append"
    assert d["time"] == "1-02:03:04" and d["signal"] == "B:USR1@60"
    assert len(d) == 21


def test_minimal_script_runs_in_bash(tmp_path: Path) -> None:
    script = tmp_path / "job.sbatch"
    script.write_text(minimal_script().replace("python -u driver.py", "echo ran"))
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert (proc.returncode, proc.stdout) == (0, "ran\n"), proc.stderr
    assert directive_map(minimal_script()) == {
        "job-name": "ppo-cartpole",
        "nodes": "1",
        "ntasks-per-node": "1",
        "output": "slurm-%j.out",
    }


# --- hostile values -----------------------------------------------------------


def hostile_values(marker: Path) -> list[str]:
    return [t.format(m=marker) for t in HOSTILE_TEMPLATES]


def run_script(tmp_path: Path, script: str) -> subprocess.CompletedProcess[bytes]:
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    # cwd=tmp_path: a relative `touch` would land there too.
    return subprocess.run(["bash", str(path)], capture_output=True, cwd=tmp_path, timeout=30)


@pytest.mark.parametrize("index", range(len(HOSTILE_TEMPLATES)))
def test_hostile_value_in_every_field_is_inert_and_exact(tmp_path: Path, index: int) -> None:
    marker = tmp_path / "PWNED"
    value = hostile_values(marker)[index]
    spec = JobSpec(
        **{name: value for name in TEXT_FIELDS},
        extra={key: value for key in TEXT_EXTRAS},
    )
    env = {"V_ONE": value, "V_TWO": "a\n0", "V_THREE": value + value}
    out_file = tmp_path / "values.bin"
    command = f'printf \'%s\\0\' "$V_ONE" "$V_TWO" "$V_THREE" > {quote(out_file)}'
    script = render_batch_script(spec, command=command, env=env, header_comment=value)

    # what sbatch reads: every value byte for byte, nothing else
    d = directive_map(script)
    for name in TEXT_FIELDS:
        assert d[name.replace("_", "-")] == value, name
    for key in TEXT_EXTRAS:
        assert d[key] == value, key
    assert set(d) == {n.replace("_", "-") for n in TEXT_FIELDS} | set(TEXT_EXTRAS) | {
        "nodes",
        "ntasks-per-node",
    }

    # what bash does: runs only the command, values arrive exactly
    proc = run_script(tmp_path, script)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"" and b"foo" not in proc.stderr
    assert out_file.read_bytes().split(b"\0")[:-1] == [
        v.encode() for v in (value, "a\n0", value + value)
    ]
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.sbatch", "values.bin"]


def test_hostile_test_can_fail_unquoted_rendering_would_execute(tmp_path: Path) -> None:
    # Guard against a vacuous hostile test: the same script with one value
    # pasted unquoted does create the marker.
    marker = tmp_path / "PWNED"
    script = render_batch_script(JobSpec(job_name="x"), command="true", env={"V": "x"})
    script = script.replace("export V=x", f"export V=$(touch {marker})")
    assert run_script(tmp_path, script).returncode == 0
    assert marker.exists()


def test_sbatch_word_doubles_backslashes_for_sbatch_only() -> None:
    assert sbatch_word("a\\b") == "'a\\\\b'"
    word = sbatch_word("a\\b")
    assert _sbatch_line_args(f" --x={word}") == ["--x=a\\b"]
    assert sbatch_word("plain-1") == "plain-1"


@pytest.mark.parametrize("field", [*TEXT_FIELDS, "mem", "time", "signal"])
@pytest.mark.parametrize("bad", ["a\nb", "a\rb", "a\x00b", "a\tb", ""])
def test_control_characters_and_empty_strings_are_rejected_naming_the_field(
    field: str, bad: str
) -> None:
    kwargs = {"job_name": "ok", field: bad}
    with pytest.raises(JobSpecError, match=rf"JobSpec\.{field}: "):
        JobSpec(**kwargs)


@pytest.mark.parametrize("key", ["comment", "mail_type"])
def test_newline_in_extra_value_is_rejected_naming_the_key(key: str) -> None:
    with pytest.raises(JobSpecError, match=rf"JobSpec\.extra\['{key}'\]: .*newline"):
        JobSpec(job_name="x", extra={key: "a\n#SBATCH --partition=evil"})


def test_header_comment_cannot_become_a_directive() -> None:
    script = render_batch_script(
        JobSpec(job_name="x"), command="true", header_comment="hi\n#SBATCH --partition=evil"
    )
    assert "partition" not in directive_map(script)
    assert "# #SBATCH --partition=evil\n" in script


def test_job_name_length_limit() -> None:
    JobSpec(job_name="x" * 200)
    with pytest.raises(JobSpecError, match=r"JobSpec\.job_name: is 201 characters"):
        JobSpec(job_name="x" * 201)


# --- validation of formatted fields --------------------------------------------


@pytest.mark.parametrize(
    "value", ["30", "30:00", "01:30:00", "2-0", "2-12", "2-12:30", "2-12:30:00", "UNLIMITED"]
)
def test_valid_time_formats(value: str) -> None:
    assert JobSpec(job_name="x", time=value).time == value


@pytest.mark.parametrize(
    "value", ["1h", "1:2:3:4", "10:60", "2-24", "-1", "1-", "1 day", "01:30:00\n", "unlimitedx"]
)
def test_invalid_time_formats(value: str) -> None:
    with pytest.raises(JobSpecError, match=r"JobSpec\.time: "):
        JobSpec(job_name="x", time=value)


@pytest.mark.parametrize("value", ["0", "4000", "4000M", "4G", "1t", "512K"])
def test_valid_mem(value: str) -> None:
    spec = JobSpec(job_name="x", mem=value)
    # accepted, kept as given, and what sbatch reads back from the script
    assert spec.mem == value
    assert directive_map(render_batch_script(spec, command="true"))["mem"] == value


@pytest.mark.parametrize("value", ["4 G", "4GB", "-1", "G", "4.5G", "$(id)"])
def test_invalid_mem(value: str) -> None:
    with pytest.raises(JobSpecError, match=r"JobSpec\.mem: "):
        JobSpec(job_name="x", mem=value)


@pytest.mark.parametrize("value", ["B:USR1@60", "USR1", "R:TERM@30", "10", "SIGUSR2@90"])
def test_valid_signal(value: str) -> None:
    spec = JobSpec(job_name="x", signal=value)
    assert spec.signal == value
    assert directive_map(render_batch_script(spec, command="true"))["signal"] == value


@pytest.mark.parametrize("value", ["B:USR1@", "X:USR1", "usr1", "USR1;id", "@60"])
def test_invalid_signal(value: str) -> None:
    with pytest.raises(JobSpecError, match=r"JobSpec\.signal: "):
        JobSpec(job_name="x", signal=value)


@pytest.mark.parametrize("field", ["nodes", "ntasks_per_node", "cpus_per_task", "gpus_per_node"])
@pytest.mark.parametrize("bad", [0, -1, True, "2", 1.5])
def test_integer_fields_must_be_positive_ints(field: str, bad: object) -> None:
    with pytest.raises(JobSpecError, match=rf"JobSpec\.{field}: "):
        JobSpec(job_name="x", **{field: bad})


@pytest.mark.parametrize("field", ["exclusive", "requeue"])
def test_flags_must_be_bools(field: str) -> None:
    with pytest.raises(JobSpecError, match=rf"JobSpec\.{field}: "):
        JobSpec(job_name="x", **{field: "yes"})


def test_mem_options_are_mutually_exclusive() -> None:
    JobSpec(job_name="x", extra={"mem-per-cpu": "2G"})
    with pytest.raises(JobSpecError, match=r"JobSpec\.mem: --mem and --mem-per-cpu"):
        JobSpec(job_name="x", mem="4G", extra={"mem-per-cpu": "2G"})


def test_extra_directives_are_allow_listed() -> None:
    with pytest.raises(JobSpecError, match=r"JobSpec\.extra: unavailable directive\(s\) 'array'"):
        JobSpec(job_name="x", extra={"array": "0-9"})
    with pytest.raises(JobSpecError, match=r"JobSpec\.extra\['time'\]: set it with the field"):
        JobSpec(job_name="x", extra={"time": "10"})
    with pytest.raises(JobSpecError, match="given twice"):
        JobSpec(job_name="x", extra={"mail_type": "END", "mail-type": "FAIL"})
    spec = JobSpec(job_name="x", extra={"mail_type": "END", "nice": 10})
    assert dict(spec.extra) == {"mail-type": "END", "nice": "10"}
    assert {"comment", "mail-type", "reservation", "open-mode"} <= EXTRA_DIRECTIVES


# --- from_dict / to_dict --------------------------------------------------------


def test_from_dict_accepts_both_spellings_and_round_trips() -> None:
    spec = JobSpec.from_dict(
        {"job-name": "x", "cpus-per-task": 2, "ntasks_per_node": 2, "extra": {"tmp": "10G"}}
    )
    assert (spec.job_name, spec.cpus_per_task, spec.ntasks_per_node) == ("x", 2, 2)
    data = spec.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert JobSpec.from_dict(data) == spec
    assert hash(spec) == hash(JobSpec.from_dict(data))


def test_from_dict_unknown_parameter_lists_the_valid_ones() -> None:
    with pytest.raises(JobSpecError) as err:
        JobSpec.from_dict({"job_name": "x", "cpu_per_task": 2, "walltime": "1:00"})
    message = str(err.value)
    assert message.startswith("Unavailable parameter(s) 'cpu_per_task', 'walltime'; ")
    valid = message.split("valid parameters are: ", 1)[1].split(", ")
    assert valid == sorted(JobSpec.parameter_names())
    assert "cpus_per_task" in valid and "job_name" in valid


def test_from_dict_rejects_duplicates_and_missing_job_name() -> None:
    with pytest.raises(JobSpecError, match=r"JobSpec\.cpus_per_task: given twice"):
        JobSpec.from_dict({"job_name": "x", "cpus_per_task": 1, "cpus-per-task": 2})
    with pytest.raises(JobSpecError, match=r"JobSpec\.job_name: is required"):
        JobSpec.from_dict({"nodes": 2})


# --- the preamble, env and setup lines ------------------------------------------


def test_env_names_must_be_identifiers() -> None:
    for bad in ["A-B", "1A", "A B", "A;id", ""]:
        with pytest.raises(ValueError, match="not a valid shell variable name"):
            render_batch_script(JobSpec(job_name="x"), command="true", env={bad: "v"})
    with pytest.raises(ValueError, match="read-only"):
        render_batch_script(JobSpec(job_name="x"), command="true", env={"UID": "0"})
    with pytest.raises(ValueError, match="NUL"):
        render_batch_script(JobSpec(job_name="x"), command="true", env={"A": "a\x00"})


def test_setup_lines_may_read_unset_variables_but_the_command_may_not(tmp_path: Path) -> None:
    spec = JobSpec(job_name="x")
    ok = render_batch_script(
        spec, command="echo done", setup_lines=['echo "setup ${NOT_SET_ANYWHERE}"']
    )
    proc = run_script(tmp_path, ok)
    assert (proc.returncode, proc.stdout) == (0, b"setup \ndone\n"), proc.stderr
    bad = render_batch_script(spec, command='echo "$NOT_SET_ANYWHERE"')
    proc = run_script(tmp_path, bad)
    assert proc.returncode != 0 and b"unbound variable" in proc.stderr


def test_a_failing_setup_line_stops_the_job(tmp_path: Path) -> None:
    script = render_batch_script(
        JobSpec(job_name="x"),
        command="echo trained",
        setup_lines=["false | cat", "echo never"],  # pipefail makes the pipeline fail
    )
    proc = run_script(tmp_path, script)
    assert proc.returncode == 1 and proc.stdout == b""


# --- the real cluster ---------------------------------------------------------------


def _ssh_bytes(cluster, command: str, stdin: bytes | None = None) -> bytes:
    proc = subprocess.run(
        ["ssh", "-F", str(cluster.ssh_config), "dev-cluster", command],
        input=stdin,
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == 0, (command, proc.stdout, proc.stderr)
    return proc.stdout


@pytest.mark.cluster
def test_hostile_script_on_the_real_cluster(cluster) -> None:
    base = f"{cluster.scratch}/tests/batch-{uuid.uuid4().hex[:10]}"
    marker = f"{base}/PWNED"
    # the run dir itself has a hostile name: chdir and output go through sbatch
    dir_name = "run a'b $(touch PWNED) `touch PWNED`"
    run_dir = f"{base}/{dir_name}"
    job_name = f'a 0|a"=0"|a\'; echo foo|$(touch {marker})|`touch {marker}`|a\\b #c'
    comment = f"x'$(touch {marker})'y \"; touch {marker}; echo \" ü"
    values = [job_name, comment, "a\n0"]
    spec = JobSpec(
        job_name=job_name, chdir=run_dir, output="out-%j.txt", extra={"comment": comment}
    )
    script = render_batch_script(
        spec,
        command='printf \'%s\\0\' "$V0" "$V1" "$V2" > values.bin',
        env={f"V{i}": v for i, v in enumerate(values)},
    )
    _ssh_bytes(
        cluster,
        f"mkdir -p {quote(run_dir)} && cat > {quote(run_dir + '/job.sbatch')}",
        stdin=script.encode(),
    )
    job_id = ""
    try:
        out = _ssh_bytes(cluster, f"cd {quote(run_dir)} && sbatch --parsable --wait job.sbatch")
        job_id = out.decode().strip()
        assert job_id.isdigit(), out
        line = _ssh_bytes(cluster, f"scontrol show job -o {quote(job_id)}").decode()
        info = parse_scontrol(line)[job_id]
        assert info.name == job_name
        assert info.state is SlurmState.COMPLETED and info.exit_code == "0:0"
        # scontrol prints two spaces after the comment
        assert re.search(" Comment=" + re.escape(comment) + " +StdErr=", line), line
        assert f" WorkDir={run_dir} " in line
        got = _ssh_bytes(cluster, f"cat {quote(run_dir + '/values.bin')}")
        assert got.split(b"\0")[:-1] == [v.encode() for v in values]
        assert _ssh_bytes(cluster, f"ls -A {quote(base)}").decode().splitlines() == [dir_name]
        listing = _ssh_bytes(cluster, f"ls -A {quote(run_dir)}").decode().splitlines()
        assert sorted(listing) == sorted(["job.sbatch", "values.bin", f"out-{job_id}.txt"])
        assert _ssh_bytes(cluster, f"find {quote(base)} -name 'PWNED*'") == b""
    finally:
        if job_id.isdigit():
            subprocess.run(
                ["ssh", "-F", str(cluster.ssh_config), "dev-cluster", f"scancel {job_id}"],
                capture_output=True,
                timeout=60,
            )
        _ssh_bytes(cluster, f"rm -rf {quote(base)}")


@pytest.mark.parametrize("value", [None, b"x", "a\x00b"])
def test_sbatch_word_validates_like_quote(value: object) -> None:
    with pytest.raises((TypeError, ValueError)):
        sbatch_word(value)
