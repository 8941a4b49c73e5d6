"""Pure logic: identities, environment activation, profiles, poll framing, trigger round-trip."""

from __future__ import annotations

import base64
import re
import subprocess

import pytest
from slurm_ray.operators.identity import fill_placeholders, run_identity, sanitize
from slurm_ray.profiles import (
    ClusterProfile,
    ProfileError,
    get_profile,
    profile_names,
    register_profile,
)
from slurm_ray.slurm.poll import (
    MAX_CHUNK,
    MIN_CHUNK,
    POLL_BUDGET,
    TAIL_MARKER,
    TailChunk,
    TailRequest,
    build_poll,
    parse_poll_output,
)
from slurm_ray.triggers.slurm_job import SlurmJobTrigger
from slurm_ray.utils.environment import EnvironmentSpec, EnvironmentSpecError

HOSTILE = ["a 0", 'a"=0"', "a'; echo foo", "$(touch /tmp/PWNED_sr)", "`touch /tmp/PWNED_sr`", "x;y"]


def test_run_identity_is_deterministic_and_safe() -> None:
    a = run_identity("dag", "manual__2026-11-25T12:00:00+00:00", "train", -1, 1)
    b = run_identity("dag", "manual__2026-11-25T12:00:00+00:00", "train", -1, 1)
    c = run_identity("dag", "manual__2026-11-25T12:00:00+00:00", "train", -1, 2)
    m = run_identity("dag", "manual__2026-11-25T12:00:00+00:00", "train", 3, 1)
    assert a == b and a != c and a[0] != m[0]
    name, suffix = a
    assert name.startswith("sr-") and name.endswith("-train-t1")
    # readable, plus a digest of the original (':' and '+' were replaced)
    dag, run, task, tr = suffix.split("/")
    assert (dag, task, tr) == ("dag", "train", "try_1")
    assert re.fullmatch(r"manual__2026-11-25T12_00_00_00_00-[0-9a-f]{16}", run), run
    assert m[1].endswith("train__3/try_1")


@pytest.mark.parametrize("bad", ["..", ".", "../../etc", "a/b", "x" * 500, "é$(id)"])
def test_sanitize_never_escapes(bad: str) -> None:
    out = sanitize(bad)
    assert "/" not in out and out not in (".", "..") and len(out) <= 120
    assert set(out) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def test_environment_refuses_hostile_prefix_and_reports_missing_venv(tmp_path) -> None:
    for value in HOSTILE:
        with pytest.raises(EnvironmentSpecError, match=r"environment\.prefix"):
            EnvironmentSpec(kind="venv", prefix=str(tmp_path / value))
    lines = EnvironmentSpec(kind="venv", prefix=str(tmp_path / "no-such-venv")).activation_lines()
    proc = subprocess.run(["bash", "-c", "\n".join(lines)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr


def test_environment_spec_errors_name_the_field() -> None:
    with pytest.raises(EnvironmentSpecError, match=r"environment\.kind"):
        EnvironmentSpec(kind="docker")  # type: ignore[arg-type]
    with pytest.raises(EnvironmentSpecError, match=r"environment\.prefix"):
        EnvironmentSpec(kind="conda")
    with pytest.raises(EnvironmentSpecError, match="valid keys are"):
        EnvironmentSpec.from_dict({"kind": "venv", "prefx": "/x"})
    spec = EnvironmentSpec(
        kind="conda", prefix="/p", module_lines=["module purge"], unset_ld_preload=True
    )
    lines = spec.activation_lines()
    assert lines[0] == "module purge" and "unset LD_PRELOAD" in lines
    assert lines[-1] == "conda activate /p"


def test_profiles() -> None:
    assert {"local", "eagle", "kestrel"} <= set(profile_names())
    assert get_profile("eagle").cores_per_node == 36
    assert get_profile("kestrel").cores_per_node == 104
    assert get_profile("eagle").environment.unset_ld_preload
    assert get_profile("local").remote_base_dir.endswith("/scratch/runs")
    kestrel = get_profile("kestrel").remote_base_dir
    assert fill_placeholders(kestrel, {"{user}": "alice"}) == "/scratch/alice/slurm_ray"
    with pytest.raises(ProfileError, match="valid profiles are"):
        get_profile("summit")
    register_profile(ClusterProfile(name="mysite", ssh_conn_id="slurm_mysite", cores_per_node=64))
    assert get_profile("mysite").cores_per_node == 64


def test_poll_command_frames_states_and_tails(tmp_path) -> None:
    f = tmp_path / "log with space's.txt"
    f.write_bytes(b"hello\nwor\xffld\n")
    poll = build_poll(
        [],
        [
            TailRequest(str(f), 6),
            TailRequest(str(tmp_path / "missing"), 0),
            TailRequest(str(f), 100),  # beyond the end: the file shrank, read again from 0
            TailRequest(str(f), 13),  # nothing new
        ],
    )
    out = subprocess.run(
        ["sh", "-c", poll.command], input=poll.stdin, capture_output=True, check=True
    ).stdout.decode()
    assert TAIL_MARKER in out
    _, chunks = parse_poll_output(out, [], 4)
    assert chunks == [
        TailChunk(6, 13, b"wor\xffld\n"),
        TailChunk(0, -1, b""),
        TailChunk(0, 13, b"hello\nwor\xffld\n"),
        TailChunk(13, 13, b""),
    ]


def test_poll_command_text_does_not_grow_with_jobs() -> None:
    small = build_poll(["1"], [TailRequest("/r/slurm-1.out", 0)])
    big = build_poll(
        [str(i) for i in range(1, 5001)],
        [TailRequest(f"/r/slurm-{i}.out", 10 * i) for i in range(1, 5001)],
    )
    assert small.command == big.command and len(big.command) < 8192
    assert b"T 4999 50000 " in big.stdin
    # the per-tail share of the byte budget shrinks with the number of tails
    share = max(MIN_CHUNK, POLL_BUDGET // 5000)
    assert share < MAX_CHUNK and f"T 0 10 {share} /r/slurm-1.out".encode() in big.stdin
    assert f"T 0 0 {MAX_CHUNK} /r/slurm-1.out".encode() in small.stdin
    with pytest.raises(ValueError, match="tail path"):
        build_poll([], [TailRequest("/r/a\nT 0 0 1 /etc/shadow", 0)])
    with pytest.raises(ValueError, match="invalid Slurm job id"):
        build_poll(["123_[1-3]"], [])


def test_poll_output_parser_ignores_garbage() -> None:
    ok = base64.b64encode(b"ok").decode()
    text = f"{TAIL_MARKER} 0 3 5\n{ok}\n{TAIL_MARKER} 9 0 1\nAAAA\n{TAIL_MARKER} 1 0 4\n!!notb64"
    _, chunks = parse_poll_output(text, [], 3)
    assert chunks == [TailChunk(3, 5, b"ok"), TailChunk(0, 4, b""), TailChunk()]


def test_trigger_serialize_round_trip() -> None:
    trig = SlurmJobTrigger(
        job_id="42",
        ssh_conn_id="slurm_dev",
        log_path="/r/slurm-42.out",
        metrics_path="/r/metrics.jsonl",
        poll_interval=3,
        log_offset=10,
        metrics_offset=20,
        deadline=123.0,
        relay={"tracking_uri": "http://127.0.0.1:5000", "run_id": "abc"},
    )
    path, kwargs = trig.serialize()
    assert path == "slurm_ray.triggers.slurm_job.SlurmJobTrigger"
    import importlib

    module, _, cls = path.rpartition(".")
    again = getattr(importlib.import_module(module), cls)(**kwargs)
    assert again.serialize() == (path, kwargs)
