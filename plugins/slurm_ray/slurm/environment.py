"""Shell text for the cluster-side environment: its build and the Gym sanity check.

Pure ``render_*`` builders (unit-tested without a cluster; every value in
them goes through :func:`quote`) and the parsers of what the scripts print.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Mapping
from typing import Any, Literal

from airflow.sdk.exceptions import AirflowException

from slurm_ray.utils.environment import EnvironmentSpec
from slurm_ray.utils.quoting import quote

__all__ = [
    "BUILD_SCRIPT",
    "SANITY_SCRIPT",
    "BuildAction",
    "Where",
    "build_env_vars",
    "parse_build_output",
    "parse_sanity_output",
    "render_build_command",
    "render_build_stdin",
    "render_preamble_check",
    "render_sanity_command",
    "render_sanity_script",
    "sanity_error_reason",
]

BuildAction = Literal["up-to-date", "built", "nothing"]
Where = Literal["login", "compute"]

BUILD_SCRIPT = "build_env.sh"
SANITY_SCRIPT = "sanity_check.py"
_SHA_RE = re.compile(r"sha256=([0-9a-f]{64})")
_SUMMARY_PREFIX = "SANITY_SUMMARY "
_ERROR_PREFIX = "SANITY_ERROR:"


def build_env_vars(
    env: EnvironmentSpec, extra_env: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The variables ``build_env.sh`` reads, derived from the environment spec."""
    lines = list(env.module_lines)
    if env.kind == "conda" and env.conda_setup:
        # A site may make conda callable only through its setup line
        # (`source .../conda.sh` defines a `conda` function); the build needs it too.
        lines.append(env.conda_setup)
    out: dict[str, str] = {}
    if env.kind == "venv":
        out["PYTHON"] = env.python
    if lines:
        out["SLURM_RAY_MODULE_LINES"] = "\n".join(lines)
    if env.unset_ld_preload:
        out["SLURM_RAY_UNSET_LD_PRELOAD"] = "1"
    # extra_env comes last so that e.g. CONDA=mamba or PYTHON=... overrides.
    out.update(extra_env or {})
    return out


def render_build_stdin(env: EnvironmentSpec, extra_env: Mapping[str, str] | None = None) -> bytes:
    """The build's variables as NUL-terminated ``KEY=VALUE`` records for its stdin.

    Values travel on stdin, never in the command line: `ps` shows every
    user's argv on a shared login node for the whole build (tokens in
    ``extra_env`` such as ``PIP_INDEX_URL`` with a password).
    """
    return b"".join(
        f"{key}={value}".encode() + b"\0" for key, value in build_env_vars(env, extra_env).items()
    )


def render_build_command(env: EnvironmentSpec, *, stage_dir: str, spec_name: str) -> str:
    """
    The remote command that runs ``build_env.sh`` from a staging directory.

    It reads the variables from stdin (:func:`render_build_stdin`) and exports
    them; a record whose name is not a variable name stops the build. The
    staged script and spec are then moved up into the staging directory's
    parent (an atomic rename: concurrent runs never see a half-written copy),
    where they stay for audit, and the staging directory is removed.

    :param stage_dir: absolute directory holding ``build_env.sh`` and ``spec_name``.
    :param spec_name: file name of the spec inside ``stage_dir``.
    """
    if "/" in spec_name or spec_name in ("", ".", "..", BUILD_SCRIPT):
        raise AirflowException(f"spec_path: {spec_name!r} must name a file")
    parent = posixpath.dirname(stage_dir.rstrip("/"))
    argv = " ".join(quote(a) for a in ("bash", BUILD_SCRIPT, env.kind, env.prefix or "", spec_name))
    return (
        f"cd {quote(stage_dir)} || exit 2\n"
        "while IFS= read -r -d '' kv; do\n"
        '  case "${kv%%=*}" in [A-Za-z_]*) ;; *) echo "bad variable record" >&2; exit 2 ;; esac\n'
        '  case "${kv%%=*}" in *[!A-Za-z0-9_]*) echo "bad variable record" >&2; exit 2 ;; esac\n'
        '  export "$kv"\n'
        "done\n"
        f"{argv} </dev/null\n"
        "rc=$?\n"
        f"mv -f -- {quote(BUILD_SCRIPT)} {quote(spec_name)} {quote(parent)}/ 2>/dev/null\n"
        f"cd / && rm -rf -- {quote(stage_dir)}\n"
        'exit "$rc"'
    )


def render_preamble_check(env: EnvironmentSpec) -> str:
    """Run the site's module lines once (kinds modules/none) so a broken line fails early."""
    lines = env.preamble_lines()
    return "bash -c " + quote("set -e\n" + "\n".join(lines)) if lines else ""


def render_sanity_script(
    env: EnvironmentSpec,
    *,
    env_id: str,
    episodes: int,
    max_steps: int,
    quiet: bool = False,
) -> str:
    """
    The bash script that activates the environment and runs the sanity check.

    It runs in the staging directory (the caller ``cd``-s there; ``srun`` keeps
    the working directory).
    """
    lines = ["set -e -o pipefail"]
    if env.kind in ("conda", "venv"):
        missing = f"{_ERROR_PREFIX} environment.prefix: {env.prefix} does not exist on "
        # Checked before activating: conda's and venv's own messages for a
        # missing prefix are long or misleading ("conda: command not found").
        lines.append(
            f'[ -d {quote(env.prefix)} ] || {{ echo {quote(missing)}"$(hostname)" >&2; exit 5; }}'
        )
    lines.extend(env.activation_lines())
    argv = [
        "python",
        "-u",
        SANITY_SCRIPT,
        "--env-id",
        env_id,
        "--episodes",
        str(int(episodes)),
        "--max-steps",
        str(int(max_steps)),
    ]
    if quiet:
        argv.append("--quiet")
    lines.append("exec " + " ".join(quote(a) for a in argv))
    return "\n".join(lines)


def render_sanity_command(
    script: str,
    *,
    stage_dir: str,
    where: Where,
    partition: str | None = None,
    account: str | None = None,
    time: str = "5",
    job_name: str = "slurm_ray-sanity",
) -> str:
    """
    The remote command: ``bash -c SCRIPT`` on the login node or in an ``srun`` step.

    The staging directory is removed afterwards; the exit code is the script's
    (``srun`` passes the task's exit code through).
    """
    run = "bash -c " + quote(script)
    if where == "compute":
        opts = ["srun", "--nodes=1", "--ntasks=1", f"--time={time}", f"--job-name={job_name}"]
        # Slurm's default is ALL, but sites may set SLURM_EXPORT_ENV=NONE, which
        # leaves the step without PATH/HOME.
        opts.append("--export=ALL")
        if partition:
            opts.append(f"--partition={partition}")
        if account:
            opts.append(f"--account={account}")
        run = " ".join(quote(o) for o in opts) + " " + run
    elif where != "login":
        raise AirflowException(f"where: {where!r} must be 'login' or 'compute'")
    return (
        f"cd {quote(stage_dir)} || exit 2\n"
        f"{run}\n"
        "rc=$?\n"
        f"cd / && rm -rf -- {quote(stage_dir)}\n"
        'exit "$rc"'
    )


# -- parsing (pure) -----------------------------------------------------------------


def parse_build_output(stdout: str) -> tuple[BuildAction, str | None]:
    """
    ``(action, sha256)`` from the ``build_env:`` lines of a successful run.

    :raises AirflowException: when no line says what happened.
    """
    for line in reversed(stdout.splitlines()):
        if not line.startswith("build_env: "):
            continue
        match = _SHA_RE.search(line)
        sha = match.group(1) if match else None
        words = line.split()
        if len(words) > 1 and words[1] == "up-to-date":
            return "up-to-date", sha
        if len(words) > 1 and words[1] == "built":
            return "built", sha
        if "nothing to build" in line:
            return "nothing", None
    raise AirflowException(f"build_env.sh finished without saying what it did:\n{stdout[-2000:]}")


def parse_sanity_output(stdout: str) -> dict[str, Any] | None:
    """The ``SANITY_SUMMARY`` object in ``stdout`` (the last one), or None."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(_SUMMARY_PREFIX):
            try:
                data = json.loads(line[len(_SUMMARY_PREFIX) :])
            except json.JSONDecodeError:
                return None
            return data if isinstance(data, dict) else None
    return None


def sanity_error_reason(stderr: str, stdout: str = "") -> str | None:
    """The one-line reason from the ``SANITY_ERROR:`` line, if there is one."""
    for line in reversed((stderr + "\n" + stdout).splitlines()):
        if line.startswith(_ERROR_PREFIX):
            return line[len(_ERROR_PREFIX) :].strip()
    return None
