"""ClusterEnvOperator / GymSanityCheckOperator: rendered remote commands, no cluster.

The rendered shell text is executed by a local bash against stub ``build_env.sh``,
``python`` and ``srun`` programs that print the argv and environment they were
given: that proves every value arrives byte for byte and nothing is executed.
"""

from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk.exceptions import AirflowException
from slurm_ray.operators.environment import ClusterEnvOperator
from slurm_ray.operators.remote_env import validate_env_id
from slurm_ray.operators.sanity_check import GymSanityCheckOperator
from slurm_ray.slurm.environment import (
    build_env_vars,
    parse_build_output,
    parse_sanity_output,
    render_build_command,
    render_build_stdin,
    render_preamble_check,
    render_sanity_command,
    render_sanity_script,
    sanity_error_reason,
)
from slurm_ray.utils.environment import EnvironmentSpec, EnvironmentSpecError

HOSTILE = [
    "$(touch {marker})",
    "`touch {marker}`",
    "a'; touch {marker}; echo '",
    'a"; touch {marker}; echo "',
    "x; touch {marker}",
    "a b\\c",
    "x\ntouch {marker}",
]

# Prints its argv (one JSON list) and the variables build_env.sh reads.
ARGV_DUMP = r"""exec python3 - "$@" <<'PY'
import json, os, sys
keys = ("PYTHON", "SLURM_RAY_MODULE_LINES", "SLURM_RAY_UNSET_LD_PRELOAD",
        "PIP_FIND_LINKS", "X_EXTRA")
print("ARGV " + json.dumps(sys.argv[1:]))
print("ENV " + json.dumps({k: os.environ[k] for k in keys if k in os.environ}))
PY
"""


def _exe(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def _bash(
    command: str, tmp_path: Path, extra_path: Path | None = None, stdin: bytes = b""
) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if extra_path is not None:
        env["PATH"] = f"{extra_path}:{env['PATH']}"
    proc = subprocess.run(
        ["bash", "-c", command], capture_output=True, input=stdin, env=env, cwd=tmp_path, timeout=30
    )
    return subprocess.CompletedProcess(
        proc.args, proc.returncode, proc.stdout.decode(), proc.stderr.decode()
    )


def _dump(stdout: str, tag: str) -> Any:
    line = next(x for x in stdout.splitlines() if x.startswith(tag + " "))
    return json.loads(line[len(tag) + 1 :])


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / f"PWNED_{uuid.uuid4().hex[:8]}"


# -- validation ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "good", ["CartPole-v1", "ALE/Pong-v5", "my_pkg.envs:Grid-v0", "Pendulum-v1"]
)
def test_valid_env_ids(good: str) -> None:
    assert validate_env_id(good, env_modules=("my_pkg.envs",)) == good


@pytest.mark.parametrize(
    "bad", ["", "Cart Pole", "CartPole-v1;id", "$(touch /tmp/x)", "a'b", 'a"b', "-v1", "x" * 201, 3]
)
def test_invalid_env_ids_name_the_field(bad: object) -> None:
    with pytest.raises(AirflowException, match=r"^env_id: "):
        validate_env_id(bad)


@pytest.mark.parametrize(
    "prefix",
    [
        "/scratch/$(touch /tmp/m)",
        "/scratch/`touch /tmp/m`",
        "/scratch/a'b",
        '/scratch/a"b',
        "/scratch/x;y",
        "/scratch/a b",
        "/scratch/$HOME/env",
        "~/env",
        "relative/env",
        "/a/../etc",
    ],
)
def test_unsafe_prefixes_are_refused(prefix: str) -> None:
    with pytest.raises(EnvironmentSpecError, match=r"^environment\.prefix: "):
        EnvironmentSpec(kind="venv", prefix=prefix)


def test_plain_prefixes_and_user_placeholder_pass() -> None:
    for kind, prefix in (
        ("conda", "/scratch/{user}/conda-envs/slurm-ray"),
        ("venv", "/var/lib/x_y.z+1@host:2/env-3"),
    ):
        env = EnvironmentSpec(kind=kind, prefix=prefix)
        assert env.prefix == prefix  # kept as given, not normalised or stripped
        # ...and reaches build_env.sh as one word
        cmd = render_build_command(env, stage_dir="/s/.stage-1", spec_name="spec.txt")
        assert f"bash build_env.sh {kind} {shlex.quote(prefix)} spec.txt" in cmd, cmd
    assert EnvironmentSpec(kind="modules").prefix is None


# -- build command ------------------------------------------------------------------


@pytest.mark.parametrize("template", HOSTILE)
def test_build_command_passes_values_verbatim(tmp_path: Path, marker: Path, template: str) -> None:
    hostile = template.replace("{marker}", str(marker))
    parent = tmp_path / "env.spec"
    stage = parent / ".stage-1"
    stage.mkdir(parents=True)
    _exe(stage / "build_env.sh", ARGV_DUMP)
    (stage / "req.txt").write_text("six\n")
    env = EnvironmentSpec(
        kind="venv",
        prefix="/scratch/u/env",
        python="/usr/bin/python3",
        module_lines=("module purge", f"export A={hostile!r}"),
        unset_ld_preload=True,
    )
    extra_env = {"PIP_FIND_LINKS": "/opt/wheels", "X_EXTRA": hostile}
    cmd = render_build_command(env, stage_dir=str(stage), spec_name="req.txt")
    assert hostile not in cmd and "/opt/wheels" not in cmd  # values never in argv
    proc = _bash(cmd, tmp_path, stdin=render_build_stdin(env, extra_env))
    assert proc.returncode == 0, proc.stderr
    assert _dump(proc.stdout, "ARGV") == ["venv", "/scratch/u/env", "req.txt"]
    assert _dump(proc.stdout, "ENV") == {
        "PYTHON": "/usr/bin/python3",
        "SLURM_RAY_MODULE_LINES": f"module purge\nexport A={hostile!r}",
        "SLURM_RAY_UNSET_LD_PRELOAD": "1",
        "PIP_FIND_LINKS": "/opt/wheels",
        "X_EXTRA": hostile,
    }
    assert not marker.exists()
    # staged files kept next to the environment for audit, staging dir gone
    assert sorted(p.name for p in parent.iterdir()) == ["build_env.sh", "req.txt"]


def test_build_command_keeps_the_exit_code(tmp_path: Path) -> None:
    stage = tmp_path / "d" / ".stage-x"
    stage.mkdir(parents=True)
    _exe(stage / "build_env.sh", "echo 'build_env: FAILED' >&2; exit 3\n")
    (stage / "spec.yml").write_text("name: x\n")
    env = EnvironmentSpec(kind="conda", prefix="/p/env", conda_setup="source /opt/c/conda.sh")
    cmd = render_build_command(env, stage_dir=str(stage), spec_name="spec.yml")
    proc = _bash(cmd, tmp_path)
    assert proc.returncode == 3 and "FAILED" in proc.stderr
    assert not stage.exists()


def test_build_command_refuses_a_missing_stage_dir(tmp_path: Path) -> None:
    env = EnvironmentSpec(kind="venv", prefix="/p/env")
    cmd = render_build_command(env, stage_dir=str(tmp_path / "nope"), spec_name="r.txt")
    (tmp_path / "build_env.sh").write_text("touch ran\n")
    assert _bash(cmd, tmp_path).returncode == 2
    assert not (tmp_path / "ran").exists()


def test_build_env_vars() -> None:
    conda = EnvironmentSpec(
        kind="conda", prefix="/p", module_lines=("module load conda",), conda_setup="source /c.sh"
    )
    assert build_env_vars(conda) == {"SLURM_RAY_MODULE_LINES": "module load conda\nsource /c.sh"}
    venv = EnvironmentSpec(kind="venv", prefix="/p", python="/usr/bin/python3")
    assert build_env_vars(venv, {"PYTHON": "/opt/py"}) == {"PYTHON": "/opt/py"}


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "build_env.sh"])
def test_build_command_refuses_odd_spec_names(name: str) -> None:
    with pytest.raises(AirflowException, match="spec_path"):
        render_build_command(
            EnvironmentSpec(kind="venv", prefix="/p"), stage_dir="/s/x", spec_name=name
        )


def test_preamble_check_only_when_there_are_lines(tmp_path: Path) -> None:
    assert render_preamble_check(EnvironmentSpec(kind="none")) == ""
    env = EnvironmentSpec(kind="modules", module_lines=("echo one", "false", "echo never"))
    proc = _bash(render_preamble_check(env), tmp_path)
    assert proc.returncode != 0 and proc.stdout == "one\n"


# -- sanity command -----------------------------------------------------------------

STUB_PYTHON = r"""#!/usr/bin/env python3
import json, os, sys
print("ARGV " + json.dumps(sys.argv[1:]))
print("CWD " + json.dumps(os.getcwd()))
"""

# `srun OPTS... bash -c SCRIPT`: print the options, then run the step locally.
STUB_SRUN = r"""#!/usr/bin/env bash
opts=()
while [[ $1 == --* ]]; do opts+=("$1"); shift; done
python3 -c 'import json,sys; print("SRUN " + json.dumps(sys.argv[1:]))' "${opts[@]}"
exec "$@"
"""


@pytest.fixture
def stubs(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _exe(bin_dir / "python", STUB_PYTHON)
    _exe(bin_dir / "srun", STUB_SRUN)
    return bin_dir


def test_sanity_script_on_login_node(tmp_path: Path, stubs: Path) -> None:
    stage = tmp_path / "stage"
    stage.mkdir()
    script = render_sanity_script(
        EnvironmentSpec(kind="none"), env_id="ALE/Pong-v5", episodes=2, max_steps=10, quiet=True
    )
    proc = _bash(
        render_sanity_command(script, stage_dir=str(stage), where="login"), tmp_path, stubs
    )
    assert proc.returncode == 0, proc.stderr
    assert _dump(proc.stdout, "ARGV") == [
        "-u", "sanity_check.py", "--env-id", "ALE/Pong-v5", "--episodes", "2",
        "--max-steps", "10", "--quiet",
    ]  # fmt: skip
    assert _dump(proc.stdout, "CWD") == str(stage)
    assert "SRUN" not in proc.stdout
    assert not stage.exists()


def test_sanity_srun_options_are_quoted(tmp_path: Path, stubs: Path, marker: Path) -> None:
    stage = tmp_path / "st"
    stage.mkdir()
    account = f"acc'x $(touch {marker}) `touch {marker}`"
    script = render_sanity_script(
        EnvironmentSpec(kind="none"), env_id="CartPole-v1", episodes=1, max_steps=5
    )
    cmd = render_sanity_command(
        script, stage_dir=str(stage), where="compute", partition="debug", account=account, time="2"
    )
    proc = _bash(cmd, tmp_path, stubs)
    assert proc.returncode == 0, proc.stderr
    assert _dump(proc.stdout, "SRUN") == [
        "--nodes=1", "--ntasks=1", "--time=2", "--job-name=slurm_ray-sanity", "--export=ALL",
        "--partition=debug", f"--account={account}",
    ]  # fmt: skip
    assert _dump(proc.stdout, "ARGV")[3] == "CartPole-v1"
    assert not marker.exists()


def test_sanity_script_reports_a_missing_prefix(tmp_path: Path, stubs: Path) -> None:
    stage = tmp_path / "s"
    stage.mkdir()
    env = EnvironmentSpec(kind="venv", prefix=str(tmp_path / "no-such-env"))
    script = render_sanity_script(env, env_id="CartPole-v1", episodes=1, max_steps=5)
    proc = _bash(
        render_sanity_command(script, stage_dir=str(stage), where="login"), tmp_path, stubs
    )
    assert proc.returncode == 5
    reason = sanity_error_reason(proc.stderr)
    assert reason is not None and reason.startswith("environment.prefix: ")
    assert "no-such-env does not exist on " in reason
    assert "ARGV" not in proc.stdout


def test_sanity_script_activates_a_venv(tmp_path: Path) -> None:
    prefix = tmp_path / "venv"
    (prefix / "bin").mkdir(parents=True)
    (prefix / "bin" / "activate").write_text(f'PATH="{prefix}/bin:$PATH"\n')
    _exe(prefix / "bin" / "python", STUB_PYTHON)
    stage = tmp_path / "s"
    stage.mkdir()
    script = render_sanity_script(
        EnvironmentSpec(kind="venv", prefix=str(prefix), module_lines=("export SITE=1",)),
        env_id="CartPole-v1",
        episodes=1,
        max_steps=5,
    )
    proc = _bash(render_sanity_command(script, stage_dir=str(stage), where="login"), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert _dump(proc.stdout, "ARGV")[:2] == ["-u", "sanity_check.py"]


def test_where_must_be_login_or_compute() -> None:
    with pytest.raises(AirflowException, match=r"^where: "):
        where: Any = "gpu"
        render_sanity_command("true", stage_dir="/s", where=where)


# -- parsing ------------------------------------------------------------------------

SHA = "a" * 64


@pytest.mark.parametrize(
    ("stdout", "action", "sha"),
    [
        (f"build_env: up-to-date prefix=/p sha256={SHA}\n", "up-to-date", SHA),
        (
            "build_env: another build of /p is running; waiting for it\n"
            f"build_env: up-to-date prefix=/p sha256={SHA} (built concurrently)\n",
            "up-to-date",
            SHA,
        ),
        (
            f"build_env: building kind=venv prefix=/p sha256={SHA} (log: /p.build.log)\n"
            f"build_env: built prefix=/p sha256={SHA} in 4s\n",
            "built",
            SHA,
        ),
        ("build_env: kind=modules, nothing to build\n", "nothing", None),
    ],
)
def test_parse_build_output(stdout: str, action: str, sha: str | None) -> None:
    assert parse_build_output("module noise\n" + stdout) == (action, sha)


def test_parse_build_output_without_a_verdict() -> None:
    with pytest.raises(AirflowException, match="without saying"):
        parse_build_output("build_env: building kind=venv prefix=/p\n")


def test_parse_sanity_output() -> None:
    out = '0 [0.1] 1.0 False\nSANITY_SUMMARY {"ok": true, "steps": 3}\n'
    assert parse_sanity_output(out) == {"ok": True, "steps": 3}
    assert parse_sanity_output("SANITY_SUMMARY {broken\n") is None
    assert parse_sanity_output("nothing\n") is None
    err = "noise\nSANITY_ERROR: cannot make env 'X-v0': NameNotFound: nope\nsrun: error: n1\n"
    assert sanity_error_reason(err) == "cannot make env 'X-v0': NameNotFound: nope"
    assert sanity_error_reason("srun: error\n") is None


# -- operators without a cluster ---------------------------------------------------------


def test_constructors_are_cheap_and_templated() -> None:
    env_op = ClusterEnvOperator(
        task_id="env", ssh_conn_id="does_not_exist", environment={"kind": "venv", "prefix": "/p"}
    )
    assert {"environment", "spec_path", "remote_dir", "extra_env"} <= set(env_op.template_fields)
    sanity = GymSanityCheckOperator(
        task_id="s", ssh_conn_id="does_not_exist", environment={"kind": "none"}
    )
    assert {"env_id", "episodes", "environment", "where"} <= set(sanity.template_fields)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"env_id": "CartPole-v1$(touch /tmp/x)"}, "env_id"),
        ({"episodes": 0}, "episodes"),
        ({"where": "gpu"}, "where"),
        ({"where": "compute", "time": "soon"}, "time"),
        ({"where": "compute", "partition": "a\nb"}, "partition"),
        ({"environment": {"kind": "venv", "prefix": "/x/$(id)"}}, "environment.prefix"),
        ({"environment": {"kind": "venv"}}, "environment.prefix"),
        ({"environment": {"kind": "docker"}}, "environment.kind"),
    ],
)
def test_sanity_operator_validates_before_connecting(kwargs: dict, field: str) -> None:
    params: dict = {"environment": {"kind": "none"}, **kwargs}
    op = GymSanityCheckOperator(task_id="s", ssh_conn_id="does_not_exist", **params)
    with pytest.raises(AirflowException) as err:
        op.execute({})
    assert str(err.value).startswith(f"{field}: ")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"extra_env": {"BAD-NAME": "x"}}, "extra_env"),
        ({"extra_env": {"SLURM_RAY_MODULE_LINES": "x"}}, "extra_env"),
        ({"extra_env": {"A": None}}, "extra_env['A']"),
        ({"environment": {"kind": "conda", "prefix": "/p/'x'"}}, "environment.prefix"),
        ({"environment": {"kind": "venv", "prefix": "/p", "colour": 1}}, "environment"),
    ],
)
def test_env_operator_validates_before_connecting(kwargs: dict, field: str) -> None:
    params: dict = {"environment": {"kind": "venv", "prefix": "/p"}, **kwargs}
    op = ClusterEnvOperator(task_id="e", ssh_conn_id="does_not_exist", **params)
    with pytest.raises(AirflowException) as err:
        op.execute({})
    assert str(err.value).startswith(f"{field}: ") or str(err.value).startswith(f"{field}:")
