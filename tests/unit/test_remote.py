"""Remote command builders, run for real: in bash and dash with fake Slurm tools on
PATH for the pure logic, and over ssh against the dev cluster (``cluster`` mark)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from slurm_ray.slurm.commands import (
    build_cancel_command,
    build_find_jobs_by_name_command,
    build_states_command,
)
from slurm_ray.slurm.ids import validate_job_id
from slurm_ray.slurm.parsers import SQUEUE_FORMAT, parse_find_jobs_by_name, parse_states_output
from slurm_ray.slurm.poll import MIN_CHUNK, TailChunk, TailRequest, build_poll, parse_poll_output
from slurm_ray.slurm.sacct import SACCT_FORMAT
from slurm_ray.utils.quoting import quote
from slurm_ray.utils.states import SlurmState

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "slurm"
S = SlurmState
SHELLS = ["bash", "dash"]


# --- fake squeue / scontrol / sacct / scancel ------------------------------------

_FAKE = r'''#!{python}
"""Fake {tool}: answers from $FAKE_DB/{tool}/<id>, logs argv to $FAKE_LOG."""
import json, os, sys
tool, args = "{tool}", sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps([tool, *args]) + "\n")
mode = os.environ.get("FAKE_" + tool.upper(), "ok")
db = os.path.join(os.environ["FAKE_DB"], tool)
def known(i):
    return os.path.exists(os.path.join(db, i))
def show(i):
    sys.stdout.write(open(os.path.join(db, i)).read())
def die(msg):
    sys.stderr.write(msg + "\n")
    sys.exit(1)
if mode == "down":
    die("slurm_load_jobs error: Unable to contact slurm controller (connect failure)")
if tool == "squeue":
    assert args[args.index("-o") + 1] == {squeue_format!r}, args
    if "-j" not in args:  # find-by-name: the user's jobs
        for i in sorted(os.listdir(db)):
            show(i)
        sys.exit(0)
    ids = args[args.index("-j") + 1].split(",")
    hits = [i for i in ids if known(i)]
    # Slurm 22.05: one unknown id alone fails; in a list it is just left out.
    # "old": any unknown id fails the whole list.
    if (len(ids) == 1 and not hits) or (mode == "old" and len(hits) < len(ids)):
        die("slurm_load_jobs error: Invalid job id specified")
    for i in hits:
        show(i)
elif tool == "scontrol":
    assert args[:3] == ["show", "job", "-o"], args
    if mode == "timeout":
        die("slurm_load_jobs error: Socket timed out on send/recv operation")
    if not known(args[3]):
        die("slurm_load_jobs error: Invalid job id specified")
    show(args[3])
elif tool == "sacct":
    assert args[-1] == "--format=" + {sacct_format!r}, args
    if mode == "disabled":
        die("Slurm accounting storage is disabled")
    if mode == "dbdown":
        die("sacct: error: Problem talking to the database: Connection refused")
    for i in args[args.index("-j") + 1].split(","):
        if known(i):
            show(i)
'''


class FakeSlurm:
    """A PATH holding only fake Slurm tools and the few real tools the commands use."""

    def __init__(self, root: Path, *, sacct: bool = True) -> None:
        self.bin, self.db, self.log = root / "bin", root / "db", root / "calls.jsonl"
        self.bin.mkdir()
        self.modes: dict[str, str] = {}
        tools = ["squeue", "scontrol", "scancel"] + (["sacct"] if sacct else [])
        for tool in tools:
            (self.db / tool).mkdir(parents=True)
            path = self.bin / tool
            path.write_text(
                _FAKE.format(
                    python=sys.executable,
                    tool=tool,
                    squeue_format=SQUEUE_FORMAT,
                    sacct_format=SACCT_FORMAT,
                )
            )
            path.chmod(0o755)
        for real in ["grep", "id", "tail", "head", "cat"]:
            (self.bin / real).symlink_to(shutil.which(real) or f"/usr/bin/{real}")

    def add(self, tool: str, job_id: str, text: str) -> None:
        (self.db / tool / job_id).write_text(text.rstrip("\n") + "\n")

    def run(self, command: str, shell: str = "bash") -> subprocess.CompletedProcess[str]:
        env = {"PATH": str(self.bin), "FAKE_DB": str(self.db), "FAKE_LOG": str(self.log)}
        env.update({f"FAKE_{k.upper()}": v for k, v in self.modes.items()})
        return subprocess.run(
            [shutil.which(shell) or shell, "-c", command],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )

    def calls(self, tool: str) -> list[list[str]]:
        if not self.log.exists():
            return []
        rows = [json.loads(line) for line in self.log.read_text().splitlines()]
        return [row[1:] for row in rows if row[0] == tool]


@pytest.fixture
def fake(tmp_path: Path) -> FakeSlurm:
    return FakeSlurm(tmp_path)


def squeue_line(job_id: str, state: str, name: str = "job") -> str:
    return f"{job_id}|{state}|None|1|0:01|n1|2026-12-01T13:00:00|N/A|{name}"


def scontrol_line(job_id: str, state: str) -> str:
    line = (FIXTURES / "scontrol_failed.txt").read_text()
    return line.replace("JobId=9 ", f"JobId={job_id} ").replace(
        "JobState=FAILED", f"JobState={state}"
    )


def sacct_line(job_id: str, state: str) -> str:
    return f"{job_id}|{job_id}|{state}|None|0:0|00:00:05|1|n1|job-{job_id}"


def states(result: dict) -> dict[str, tuple[SlurmState, str]]:
    return {k: (v.state, v.source) for k, v in result.items()}


# --- states: real output captured from the dev cluster ----------------------------


#: The squeue fields of the committed states_output capture (fixtures/slurm/README.md).
CAPTURED_FIELDS = ("%i", "%T", "%r", "%D", "%M", "%N", "%j")


def test_parse_real_states_output() -> None:
    text = (FIXTURES / "states_output_8_10_999999_9.txt").read_text()
    result = parse_states_output(text, ["8", "10", "999999", "9"], CAPTURED_FIELDS)
    assert states(result) == {
        "8": (S.COMPLETED, "squeue"),
        "10": (S.COMPLETED, "squeue"),
        "999999": (S.NOT_FOUND, "none"),
        "9": (S.FAILED, "squeue"),
    }
    assert result["999999"].reason == (
        "unknown to squeue and scontrol; accounting storage is disabled"
    )
    assert result["10"].name == "fx name with spaces"


def test_parse_real_single_unknown_id() -> None:
    text = (FIXTURES / "states_output_999999.txt").read_text()
    assert parse_states_output(text, ["999999"], CAPTURED_FIELDS)["999999"].state is S.NOT_FOUND


# --- states: the built command in real shells with fake tools -----------------------


@pytest.mark.parametrize("shell", SHELLS)
def test_each_id_is_resolved_by_the_first_source_that_knows_it(fake: FakeSlurm, shell: str) -> None:
    fake.add("squeue", "1", squeue_line("1", "RUNNING"))
    fake.add("scontrol", "1", scontrol_line("1", "RUNNING"))
    fake.add("scontrol", "2", scontrol_line("2", "COMPLETED"))
    fake.add("sacct", "3", sacct_line("3", "CANCELLED by 1001"))
    ids = ["1", "2", "3", "4", "5_1"]
    proc = fake.run(build_states_command(ids), shell)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    result = parse_states_output(proc.stdout, ids)
    assert states(result) == {
        "1": (S.RUNNING, "squeue"),
        "2": (S.COMPLETED, "scontrol"),
        "3": (S.CANCELLED, "sacct"),
        "4": (S.NOT_FOUND, "none"),
        "5_1": (S.NOT_FOUND, "none"),
    }
    assert result["2"].exit_code == "3:0"  # scontrol reports it, squeue cannot
    # one squeue for all ids, scontrol only for ids squeue lacked, one sacct for the rest
    assert fake.calls("squeue") == [
        ["-h", "-a", "-t", "all", "-j", "1,2,3,4,5_1", "-o", SQUEUE_FORMAT]
    ]
    assert [c[3] for c in fake.calls("scontrol")] == ["2", "3", "4", "5_1"]
    assert [c[c.index("-j") + 1] for c in fake.calls("sacct")] == ["3,4,5_1"]


def test_a_listed_id_does_not_count_for_its_prefix(fake: FakeSlurm) -> None:
    # squeue lists 10 (named "1|x"), not 1: 1 must still go to scontrol
    fake.add("squeue", "10", squeue_line("10", "RUNNING", "1|x"))
    fake.add("scontrol", "1", scontrol_line("1", "COMPLETED"))
    result = parse_states_output(fake.run(build_states_command(["1", "10"])).stdout, ["1", "10"])
    assert states(result) == {"1": (S.COMPLETED, "scontrol"), "10": (S.RUNNING, "squeue")}


def test_an_unknown_id_does_not_hide_the_others_with_an_old_squeue(fake: FakeSlurm) -> None:
    fake.modes["squeue"] = "old"
    fake.add("squeue", "1", squeue_line("1", "RUNNING"))
    fake.add("scontrol", "1", scontrol_line("1", "RUNNING"))
    proc = fake.run(build_states_command(["1", "999"]))
    assert "@@slurm_ray:squeue rc=1" in proc.stdout
    assert states(parse_states_output(proc.stdout, ["1", "999"])) == {
        "1": (S.RUNNING, "scontrol"),
        "999": (S.NOT_FOUND, "none"),
    }


def test_controller_down_is_unknown_never_not_found(fake: FakeSlurm) -> None:
    fake.modes["squeue"] = "down"
    fake.add("sacct", "1", sacct_line("1", "COMPLETED"))
    proc = fake.run(build_states_command(["1", "2"]))
    result = parse_states_output(proc.stdout, ["1", "2"])
    assert result["1"].state is S.COMPLETED  # accounting still answers
    assert result["2"].state is S.UNKNOWN
    assert "Unable to contact slurm controller" in result["2"].reason
    assert fake.calls("scontrol") == []  # each would wait for its own timeout


def test_scontrol_failure_other_than_invalid_id_is_unknown(fake: FakeSlurm) -> None:
    fake.modes["scontrol"] = "timeout"
    proc = fake.run(build_states_command(["1", "2"]))
    result = parse_states_output(proc.stdout, ["1", "2"])
    assert {r.state for r in result.values()} == {S.UNKNOWN}
    assert "Socket timed out" in result["1"].reason


@pytest.mark.parametrize(
    ("sacct", "mode", "expected", "reason"),
    [
        (False, "ok", S.NOT_FOUND, "sacct is not installed"),
        (True, "disabled", S.NOT_FOUND, "accounting storage is disabled"),
        (True, "ok", S.NOT_FOUND, "unknown to squeue, scontrol and sacct"),
        (True, "dbdown", S.UNKNOWN, "Problem talking to the database"),
    ],
)
def test_accounting_decides_between_not_found_and_unknown(
    tmp_path: Path, sacct: bool, mode: str, expected: SlurmState, reason: str
) -> None:
    fake = FakeSlurm(tmp_path, sacct=sacct)
    fake.modes["sacct"] = mode
    for shell in SHELLS:
        proc = fake.run(build_states_command(["7"]), shell)
        info = parse_states_output(proc.stdout, ["7"])["7"]
        assert (info.state, info.source) == (expected, "none")
        assert reason in info.reason


def test_output_cut_short_is_unknown(fake: FakeSlurm) -> None:
    fake.add("squeue", "1", squeue_line("1", "RUNNING"))
    out = fake.run(build_states_command(["1", "2"])).stdout
    assert out.endswith("@@slurm_ray:end\n")
    result = parse_states_output(out.replace("@@slurm_ray:end\n", ""), ["1", "2"])
    assert result["1"].state is S.RUNNING
    assert result["2"].state is S.UNKNOWN and "cut short" in result["2"].reason
    assert parse_states_output("", ["1"])["1"].state is S.UNKNOWN


def test_many_ids_one_command(fake: FakeSlurm) -> None:
    ids = [str(i) for i in range(100, 130)]
    for i in ids[::2]:
        fake.add("squeue", i, squeue_line(i, "PENDING"))
    command = build_states_command(ids)
    assert "\n" not in command  # one command line for one ssh exec
    result = parse_states_output(fake.run(command).stdout, ids)
    assert len(result) == 30
    assert {result[i].state for i in ids[::2]} == {S.PENDING}
    assert {result[i].state for i in ids[1::2]} == {S.NOT_FOUND}
    assert len(fake.calls("squeue")) == 1 and len(fake.calls("sacct")) == 1


def test_squeue_noise_lines_are_not_records(fake: FakeSlurm) -> None:
    text = "@@slurm_ray:squeue rc=0\nsqueue: warning: x\n1|RUNNING|None|1|0:01|n1|2026-12-01T13:00:00|2026-12-01T13:00:00|a\n@@slurm_ray:end\n"
    assert parse_states_output(text, ["1"])["1"].state is S.RUNNING


@pytest.mark.parametrize(
    "bad", ["", "abc", "1;id", "1 2", "-1", "0", "012", "1_", "1.batch", "$(id)", "1\n2"]
)
def test_invalid_job_ids_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid Slurm job id"):
        build_states_command(["1", bad])
    with pytest.raises(ValueError):
        build_cancel_command(bad)


def test_job_id_validation_accepts_slurm_forms() -> None:
    assert [validate_job_id(j) for j in ["1", "123_4", "123+0", "123_0"]] == [
        "1",
        "123_4",
        "123+0",
        "123_0",
    ]
    assert validate_job_id(42) == "42"  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        build_states_command("123")
    with pytest.raises(ValueError, match="empty"):
        build_states_command([])


# --- find by name ------------------------------------------------------------------


@pytest.mark.parametrize("shell", SHELLS)
def test_find_jobs_by_name(fake: FakeSlurm, shell: str) -> None:
    name = "rl a'b $(touch x)|y"
    fake.add("squeue", "30", squeue_line("30", "COMPLETED", name))
    fake.add("squeue", "4", squeue_line("4", "RUNNING", name))
    fake.add("squeue", "5", squeue_line("5", "RUNNING", name + " "))
    fake.add("squeue", "6", squeue_line("6", "RUNNING", "rl"))
    proc = fake.run(build_find_jobs_by_name_command(name), shell)
    assert proc.returncode == 0, proc.stderr
    found = parse_find_jobs_by_name(proc.stdout, name)
    assert [(j.job_id, j.state) for j in found] == [("4", S.RUNNING), ("30", S.COMPLETED)]
    (argv,) = fake.calls("squeue")
    assert argv[argv.index("-n") + 1] == name
    user = subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()
    assert argv[argv.index("-u") + 1] == user


def test_find_by_name_with_comma_filters_locally(fake: FakeSlurm) -> None:
    fake.add("squeue", "4", squeue_line("4", "RUNNING", "a,b"))
    fake.add("squeue", "5", squeue_line("5", "RUNNING", "a"))
    out = fake.run(build_find_jobs_by_name_command("a,b")).stdout
    assert "-n" not in fake.calls("squeue")[0]
    assert [j.job_id for j in parse_find_jobs_by_name(out, "a,b")] == ["4"]


@pytest.mark.parametrize("bad", ["", "a\nb", "a\x00b"])
def test_find_by_name_refuses_bad_names(bad: str) -> None:
    with pytest.raises(ValueError):
        build_find_jobs_by_name_command(bad)


# --- cancel --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "argv"),
    [
        ({}, ["42"]),
        ({"signal": "USR1", "batch": True}, ["--signal=USR1", "--batch", "42"]),
        ({"signal": "SIGTERM", "full": True}, ["--signal=SIGTERM", "--full", "42"]),
        ({"signal": "10"}, ["--signal=10", "42"]),
    ],
)
def test_cancel_command_argv(fake: FakeSlurm, kwargs: dict, argv: list[str]) -> None:
    proc = fake.run(build_cancel_command("42", **kwargs), "dash")
    assert proc.returncode == 0, proc.stderr
    assert fake.calls("scancel") == [argv]


@pytest.mark.parametrize("signal", ["", "usr1", "USR1;id", "-9", "USR 1", "$(id)"])
def test_cancel_refuses_bad_signals(signal: str) -> None:
    with pytest.raises(ValueError, match="invalid signal"):
        build_cancel_command("1", signal)


def test_cancel_batch_and_full_are_exclusive() -> None:
    with pytest.raises(ValueError, match="mutually exclusive"):
        build_cancel_command("1", "USR1", batch=True, full=True)


# --- read from offset: the poll's file tail, the one tail builder ---------------------


def read_chunk(path: str, offset: int, n: int, shell: str, cwd: Path | None = None) -> TailChunk:
    poll = build_poll([], [TailRequest(path, offset, n)], budget=n)
    proc = subprocess.run(
        [shell, "-c", poll.command], input=poll.stdin, capture_output=True, cwd=cwd
    )
    assert proc.returncode == 0, proc.stderr
    return parse_poll_output(proc.stdout.decode(), [], 1)[1][0]


def read_all(path: str, shell: str, chunk: int, cwd: Path) -> bytes:
    data, offset = b"", 0
    while True:
        got = read_chunk(path, offset, chunk, shell, cwd)
        assert got.start == offset and len(got.data) <= max(chunk, MIN_CHUNK)
        if not got.data:
            return data
        data, offset = data + got.data, offset + len(got.data)


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("chunk", [5, 64, 4096])
def test_read_from_offset_reassembles_the_file(tmp_path: Path, shell: str, chunk: int) -> None:
    content = "ü€ line\n".encode() * 10 + bytes(range(256))
    name = "-slurm a'b $(touch PWNED).out"
    (tmp_path / name).write_bytes(content)
    assert read_all(name, shell, chunk, tmp_path) == content
    assert read_all(str(tmp_path / name), shell, chunk, tmp_path) == content
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("shell", SHELLS)
def test_read_from_offset_edge_cases(tmp_path: Path, shell: str) -> None:
    (tmp_path / "f").write_bytes(b"0123456789" * 1000)

    def run(path: str, offset: int, n: int) -> TailChunk:
        return read_chunk(str(tmp_path / path), offset, n, shell)

    assert run("f", 3, 4).data == b"3456"  # max_bytes below MIN_CHUNK is honoured
    assert run("f", 9998, 100).data == b"89"
    assert run("f", 10_000, 5) == TailChunk(start=10_000, size=10_000, data=b"")
    # offset past the end: the file shrank (a requeue), read again from 0
    assert run("f", 99_999, 5) == TailChunk(start=0, size=10_000, data=b"01234")
    assert run("not-yet", 0, 5) == TailChunk(start=0, size=-1, data=b"")


@pytest.mark.parametrize(("offset", "n"), [(-1, 5), (0, 0), (True, 5), (0, 1.5)])
def test_read_from_offset_refuses_bad_numbers(offset: int, n: int) -> None:
    with pytest.raises(ValueError):
        build_poll([], [TailRequest("/x", offset, n)])


# --- the real cluster -------------------------------------------------------------------


@pytest.fixture
def remote_dir(cluster) -> Iterator[str]:
    path = f"{cluster.scratch}/tests/remote-{uuid.uuid4().hex[:10]}"
    cluster.ssh(f"mkdir -p {quote(path)}")
    yield path
    cluster.ssh(f"rm -rf {quote(path)}", check=False)


class Jobs:
    """Submit jobs on the dev cluster and scancel every one of them at the end."""

    def __init__(self, cluster, directory: str) -> None:
        self.cluster, self.dir, self.ids = cluster, directory, []

    def submit(self, *args: str) -> str:
        out = self.cluster.ssh(
            f"cd {quote(self.dir)} && sbatch --parsable --output=/dev/null "
            + " ".join(quote(a) for a in args)
        ).stdout.strip()
        assert out.isdigit(), out
        self.ids.append(out)
        return out

    def wait_for(self, job_id: str, state: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.cluster.ssh(f"squeue -h -t all -j {job_id} -o %T").stdout.strip()
            if got == state:
                return
            time.sleep(0.2)
        raise AssertionError(f"job {job_id} not {state} after {timeout}s (last: {got})")

    def cancel_all(self) -> None:
        if self.ids:
            self.cluster.ssh("scancel " + " ".join(self.ids), check=False)


@pytest.fixture
def jobs(cluster, remote_dir: str) -> Iterator[Jobs]:
    j = Jobs(cluster, remote_dir)
    yield j
    j.cancel_all()


@pytest.mark.cluster
def test_states_on_the_real_cluster_in_one_ssh_command(cluster, jobs: Jobs) -> None:
    done = jobs.submit("--job-name=sr-done", "--wrap=true")
    failed = jobs.submit("--job-name=sr-failed", "--wrap=exit 3")
    running = jobs.submit("--job-name=sr running", "--wrap=sleep 60")
    pending = jobs.submit("--job-name=sr-pending", "--hold", "--wrap=true")
    jobs.wait_for(done, "COMPLETED")
    jobs.wait_for(running, "RUNNING")
    jobs.wait_for(failed, "FAILED")
    missing = [str(i) for i in range(999990, 1000000)]  # never submitted here
    ids = [done, running, missing[0], failed, pending, *missing[1:]]

    proc = cluster.ssh(build_states_command(ids))  # the one ssh command
    result = parse_states_output(proc.stdout, ids)

    assert states(result) == {
        done: (S.COMPLETED, "squeue"),
        running: (S.RUNNING, "squeue"),
        failed: (S.FAILED, "squeue"),
        pending: (S.PENDING, "squeue"),
        **{m: (S.NOT_FOUND, "none") for m in missing},
    }
    assert result[running].name == "sr running" and result[running].nodelist in ("n1", "n2")
    assert result[pending].reason == "JobHeldUser"
    # one squeue for all ids, one scontrol per id squeue did not know (counted, not timed)
    assert proc.stdout.count("@@slurm_ray:squeue") == 1, proc.stdout
    assert proc.stdout.count("@@slurm_ray:scontrol") == len(missing)

    # single-id queries take squeue's "Invalid job id" path and still work
    for job_id, state in [(done, S.COMPLETED), (missing[0], S.NOT_FOUND)]:
        out = cluster.ssh(build_states_command([job_id])).stdout
        assert parse_states_output(out, [job_id])[job_id].state is state


@pytest.mark.cluster
def test_find_jobs_by_name_on_the_real_cluster(cluster, jobs: Jobs) -> None:
    name = f"sr find {uuid.uuid4().hex[:6]} a'b $(touch PWNED)|x"
    first = jobs.submit("--hold", f"--job-name={name}", "--wrap=true")
    jobs.submit("--hold", f"--job-name={name} ", "--wrap=true")  # not the same name
    second = jobs.submit("--hold", f"--job-name={name}", "--wrap=true")
    proc = cluster.ssh(build_find_jobs_by_name_command(name))
    found = parse_find_jobs_by_name(proc.stdout, name)
    assert [(j.job_id, j.state, j.name) for j in found] == [
        (first, S.PENDING, name),
        (second, S.PENDING, name),
    ]
    assert cluster.ssh(f"ls -A {quote(jobs.dir)}").stdout == ""


@pytest.mark.cluster
def test_cancel_and_signal_on_the_real_cluster(cluster, jobs: Jobs, remote_dir: str) -> None:
    held = jobs.submit("--hold", "--job-name=sr-cancel", "--wrap=true")
    cluster.ssh(build_cancel_command(held))
    # the batch shell traps USR1 and exits 0: --signal --batch reaches it
    trapper = jobs.submit(
        "--job-name=sr-signal",
        f"--output={remote_dir}/sig.out",
        "--wrap=trap 'echo got USR1; exit 0' USR1; sleep 60 & wait",
    )
    jobs.wait_for(trapper, "RUNNING")
    time.sleep(0.5)  # let bash install its trap
    cluster.ssh(build_cancel_command(trapper, "USR1", batch=True))
    jobs.wait_for(trapper, "COMPLETED")
    result = parse_states_output(
        cluster.ssh(build_states_command([held, trapper])).stdout, [held, trapper]
    )
    assert result[held].state is S.CANCELLED
    assert result[trapper].state is S.COMPLETED
    assert cluster.ssh(f"cat {quote(remote_dir + '/sig.out')}").stdout == "got USR1\n"


@pytest.mark.cluster
def test_read_from_offset_on_the_real_cluster(cluster, remote_dir: str) -> None:
    path = f"{remote_dir}/slurm a'b.out"
    content = "ü€ line\n".encode() * 100
    subprocess.run(
        ["ssh", "-F", str(cluster.ssh_config), "dev-cluster", f"cat > {quote(path)}"],
        input=content,
        check=True,
        timeout=60,
    )

    def read(p: str, offset: int, n: int) -> TailChunk:
        poll = build_poll([], [TailRequest(p, offset, n)], budget=n)
        argv = ["ssh", "-F", str(cluster.ssh_config), "dev-cluster", poll.command]
        proc = subprocess.run(argv, input=poll.stdin, capture_output=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return parse_poll_output(proc.stdout.decode(), [], 1)[1][0]

    got = read(path, 0, 500).data + read(path, 500, 10_000).data
    assert got == content
    assert read(path, len(content), 10).data == b""
    assert read(f"{remote_dir}/slurm-none.out", 0, 10) == TailChunk(start=0, size=-1, data=b"")
    cluster.ssh(f"chmod 000 {quote(path)}")  # the job user is not root there
    assert read(path, 0, 10).data == b""  # no bytes of a file we may not read


def test_fake_tools_exist_only_on_the_fake_path(fake: FakeSlurm) -> None:
    # Guard: the local machine has real Slurm tools; the fakes must be the ones run.
    proc = fake.run("command -v squeue")
    assert proc.stdout.strip() == str(fake.bin / "squeue")
    assert os.access(fake.bin / "squeue", os.X_OK)
