"""Pure logic: identities, environment activation, profiles, poll framing, trigger round-trip."""

from __future__ import annotations

import base64
import re
import subprocess

import pytest
from slurm_ray.operators.slurm_ray import run_identity, sanitize
from slurm_ray.profiles import (
    ClusterProfile,
    ProfileError,
    get_profile,
    profile_names,
    register_profile,
)
from slurm_ray.triggers.slurm_job import SlurmJobTrigger
from slurm_ray.utils.environment import EnvironmentSpec, EnvironmentSpecError
from slurm_ray.utils.poll import TAIL_MARKER, TailRequest, build_poll_command, parse_poll_output

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
    assert get_profile("local").base_dir_for("u").endswith("/scratch/runs")
    assert get_profile("kestrel").base_dir_for("alice") == "/scratch/alice/slurm_ray"
    with pytest.raises(ProfileError, match="valid profiles are"):
        get_profile("summit")
    register_profile(ClusterProfile(name="mysite", ssh_conn_id="slurm_mysite", cores_per_node=64))
    assert get_profile("mysite").cores_per_node == 64


def test_poll_command_frames_states_and_tails(tmp_path) -> None:
    f = tmp_path / "log with space's.txt"
    f.write_bytes(b"hello\nwor\xffld\n")
    cmd = build_poll_command(
        [], [TailRequest(str(f), 6), TailRequest(str(tmp_path / "missing"), 0)]
    )
    out = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, check=True).stdout
    assert TAIL_MARKER in out
    _, chunks = parse_poll_output(out, [], 2)
    assert chunks == [b"wor\xffld\n", b""]


def test_poll_output_parser_ignores_garbage() -> None:
    text = f"\n{TAIL_MARKER} 0\n{base64.b64encode(b'ok').decode()}\n{TAIL_MARKER} 9\nAAAA\n{TAIL_MARKER} 1\n!!notb64"
    _, chunks = parse_poll_output(text, [], 2)
    assert chunks == [b"ok", b""]


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
