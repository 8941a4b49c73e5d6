"""Shell text for the cluster-side environment: its build and the Gym sanity check.

Pure ``render_*`` builders (unit-tested without a cluster; every value in
them goes through :func:`quote`) and the parsers of what the scripts print.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from airflow.sdk.exceptions import AirflowException

from slurm_ray.utils.environment import EnvironmentSpec
from slurm_ray.utils.quoting import quote, quote_args

__all__ = [
    "BUILD_SCRIPT",
    "SANITY_SCRIPT",
    "BuildAction",
    "SanityRecord",
    "Where",
    "build_env_vars",
    "parse_build_output",
    "parse_sanity_output",
    "parse_sanity_reuse",
    "render_build_command",
    "render_build_stdin",
    "render_preamble_check",
    "render_sanity_command",
    "render_sanity_script",
    "sanity_error_reason",
    "sanity_record_key",
]

BuildAction = Literal["up-to-date", "built", "nothing"]
Where = Literal["login", "compute"]

BUILD_SCRIPT = "build_env.sh"
SANITY_SCRIPT = "sanity_check.py"
_SHA_RE = re.compile(r"sha256=([0-9a-f]{64})")
_SUMMARY_PREFIX = "SANITY_SUMMARY "
_ERROR_PREFIX = "SANITY_ERROR:"
_REUSED_PREFIX = "SANITY_REUSED "
#: The spec stamp build_env.sh writes inside a conda/venv prefix.
SPEC_STAMP = ".slurm_ray_spec_sha256"
#: Bytes of a record the reuse lookup prints at most (a record is < 2 KB).
_RECORD_MAX_BYTES = 65536


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
    """The remote command that runs ``build_env.sh`` from a staging directory.

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
    argv = quote_args(("bash", BUILD_SCRIPT, env.kind, env.prefix or "", spec_name))
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


@dataclass(frozen=True)
class SanityRecord:
    """Where a passed sanity check is recorded, and whether one may be reused.

    :param records_dir: the job user's own directory of records (relative paths are
        relative to the remote home); a record there is trusted only when it and
        the directory belong to the job user and are writable by nobody else.
    :param key: :func:`sanity_record_key` of the check; the record's file name is
        ``KEY-SPECSHA256.json`` (the spec stamp read on the cluster).
    :param info: what the record says about the check (env id, partition...).
    :param max_age_s: a record older than this is checked again; 0 never reuses.
    :param force: never reuse (the check runs and records a fresh pass).
    """

    records_dir: str
    key: str
    info: Mapping[str, Any]
    max_age_s: int = 86400
    force: bool = False


def sanity_record_key(env: EnvironmentSpec, script_sha256: str, **check: Any) -> str:
    """The record key: what shapes the check (env, activation, placement, script), hashed.

    The spec's sha256 is not in it: it is read on the cluster, where a rebuild changes it.
    """
    doc = {
        "v": 1,
        "kind": env.kind,
        "prefix": env.prefix,
        "activation": env.activation_lines(),
        "script_sha256": script_sha256,
        **check,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32]


def _remote_path(path: str) -> str:
    """Shell text for ``path``; a relative one is relative to the remote home."""
    return quote(path) if path.startswith("/") else f'"$HOME"/{quote(path)}'


# Prints "SANITY_REUSED AGE SPEC RECORD" and exits 0 when a trusted, fresh record of
# this check and the current spec exists; otherwise says why not and falls through.
# The stamp is read under the environment's shared lock (a build holds it exclusively).
_REUSE_LOOKUP = r"""uid=$(id -u)
_trusted() {
  local o m
  if [ -L "$1" ]; then echo "$1 is a symbolic link"; return 1; fi
  read -r o m < <(stat -c '%u %a' -- "$1" 2>/dev/null) || { echo "cannot stat $1"; return 1; }
  if [ "$o" != "$uid" ]; then echo "$1 belongs to uid $o, not to you ($uid)"; return 1; fi
  if (( (8#$m & 8#022) != 0 )); then echo "$1 is writable by others (mode $m)"; return 1; fi
}
_lookup() {
  local spec rec age why
  if [ -e "$lock" ]; then exec 7<"$lock" && flock -s 7; fi
  spec=$(cat "$stamp" 2>/dev/null || true)
  exec 7<&-
  if ! [[ $spec =~ ^[0-9a-f]{64}$ ]]; then echo "SANITY_RECORD none: no spec stamp in $stamp"; return 1; fi
  rec=$records/$key-$spec.json
  if [ ! -e "$rec" ] && [ ! -L "$rec" ]; then echo "SANITY_RECORD none: no pass recorded for env sha256 $spec"; return 1; fi
  for p in "${records%/*}" "$records" "$rec"; do
    if ! why=$(_trusted "$p"); then echo "SANITY_RECORD ignored: $why"; return 1; fi
  done
  age=$(( $(date +%s) - $(stat -c %Y -- "$rec") ))
  if (( age < -60 || age >= max_age )); then echo "SANITY_RECORD expired: recorded ${age}s ago, max age ${max_age}s"; return 1; fi
  printf 'SANITY_REUSED %s %s ' "$age" "$spec"
  head -c RECORD_MAX "$rec"
  echo
}
if _lookup; then cat >/dev/null; exit 0; fi
""".replace("RECORD_MAX", str(_RECORD_MAX_BYTES))


def render_sanity_script(
    env: EnvironmentSpec,
    *,
    env_id: str,
    episodes: int,
    max_steps: int,
    quiet: bool = False,
    record: SanityRecord | None = None,
) -> str:
    """The bash script that activates the environment and runs the sanity check.

    It runs in the staging directory (the caller ``cd``-s there; ``srun`` keeps
    the working directory). With ``record`` (conda/venv only), a pass is
    recorded for :func:`render_sanity_command`'s reuse lookup: the spec stamp is
    read after the activation took the environment's shared lock, which the
    script still holds while it writes the record, so a rebuild can come
    neither between the check and its record nor under them.
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
    run = "exec " + " ".join(quote(a) for a in argv)
    if record is not None and env.kind in ("conda", "venv"):
        assert env.prefix is not None
        stamp = quote(posixpath.join(env.prefix, SPEC_STAMP))
        lines.append(f"spec=$(cat {stamp} 2>/dev/null || true)")
        info = quote(json.dumps(record.info, sort_keys=True))
        # No stamp (an environment not built by build_env.sh): nothing to key a record on.
        lines.append(
            "rec=(); if [[ $spec =~ ^[0-9a-f]{64}$ ]]; then "
            f'rec=(--record {_remote_path(record.records_dir)}/{quote(record.key)}-"$spec".json '
            f'--record-spec "$spec" --record-info {info}); fi'
        )
        run += ' "${rec[@]}"'
    lines.append(run)
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
    record: SanityRecord | None = None,
    prefix: str | None = None,
) -> str:
    """The remote command: ``bash -c SCRIPT`` on the login node or in an ``srun`` step.

    ``sanity_check.py`` arrives on stdin and is written into the staging directory
    (no SFTP round trips). With ``record`` (and the environment's ``prefix``) and
    neither ``force`` nor a zero max age, a trusted, fresh record of a pass of
    this check on the current spec is printed (``SANITY_REUSED``) instead, in
    the same command, and nothing is staged or run. The staging directory is
    removed afterwards; the exit code is the script's (``srun`` passes the
    task's exit code through).
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
    lookup = ""
    if record is not None and prefix and not record.force and record.max_age_s > 0:
        lookup = (
            f"records={_remote_path(record.records_dir)}\n"
            f"key={quote(record.key)}\n"
            f"max_age={int(record.max_age_s)}\n"
            f"stamp={quote(posixpath.join(prefix, SPEC_STAMP))}\n"
            f"lock={quote(prefix + '.lock')}\n"
            f"{_REUSE_LOOKUP}"
        )
    return (
        f"{lookup}"
        # umask 077: the directories made here hold the records, trusted only when private.
        f"(umask 077 && mkdir -p -- {quote(stage_dir)} && cat >{quote(stage_dir)}/{SANITY_SCRIPT})"
        " || exit 2\n"
        f"cd {quote(stage_dir)} || exit 2\n"
        # Absolute: a stage relative to the home would not be found from `/`.
        "stage=$PWD\n"
        f"{run}\n"
        "rc=$?\n"
        'cd / && rm -rf -- "$stage"\n'
        'exit "$rc"'
    )


# -- parsing (pure) -----------------------------------------------------------------


def parse_build_output(stdout: str) -> tuple[BuildAction, str | None]:
    """``(action, sha256)`` from the ``build_env:`` lines of a successful run.

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


def parse_sanity_reuse(stdout: str) -> tuple[float, str, dict[str, Any]] | None:
    """``(age in seconds, spec sha256, record)`` from a ``SANITY_REUSED`` line, or None."""
    for line in stdout.splitlines():
        if not line.startswith(_REUSED_PREFIX):
            continue
        parts = line[len(_REUSED_PREFIX) :].split(" ", 2)
        if len(parts) != 3 or not re.fullmatch(r"-?[0-9]+", parts[0]):
            return None
        try:
            data = json.loads(parts[2])
        except json.JSONDecodeError:
            return None
        return (float(parts[0]), parts[1], data) if isinstance(data, dict) else None
    return None


def sanity_error_reason(stderr: str, stdout: str = "") -> str | None:
    """The one-line reason from the ``SANITY_ERROR:`` line, if there is one."""
    for line in reversed((stderr + "\n" + stdout).splitlines()):
        if line.startswith(_ERROR_PREFIX):
            return line[len(_ERROR_PREFIX) :].strip()
    return None
