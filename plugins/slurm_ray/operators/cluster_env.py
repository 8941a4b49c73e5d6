"""Environment setup and the Gym sanity check, as two small operators.

:class:`ClusterEnvOperator` makes sure the cluster-side Python environment
(conda or venv) exists and matches its spec file: it stages
``include/build_env.sh`` and the spec next to the environment and runs the
script over SSH, which rebuilds only when the spec's sha256 changed.

:class:`GymSanityCheckOperator` is the tutorial's first check ("step CartPole
with random actions") as a task: ``include/sanity_check.py`` runs in the
activated environment, on the login node or in a one-task ``srun`` step, and its
``SANITY_SUMMARY`` line becomes the task's XCom.

The shell text is rendered by the pure ``render_*`` functions below (unit-tested
without a cluster); every value in it goes through :func:`quote`.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException

from slurm_ray.hooks.slurm import CommandResult, SlurmHook
from slurm_ray.profiles import operator_defaults
from slurm_ray.utils.environment import EnvironmentSpec
from slurm_ray.utils.quoting import quote
from slurm_ray.validation import validate_env_id
from slurm_ray.validation import validate_extra_env as _validate_extra_env

if TYPE_CHECKING:
    from airflow.sdk import Context

__all__ = [
    "BuildAction",
    "ClusterEnvOperator",
    "GymSanityCheckOperator",
    "build_env_vars",
    "parse_build_output",
    "parse_sanity_output",
    "render_build_command",
    "render_build_stdin",
    "render_preamble_check",
    "render_sanity_command",
    "render_sanity_script",
    "sanity_error_reason",
    "validate_env_id",
]

BuildAction = Literal["up-to-date", "built", "nothing"]
Where = Literal["login", "compute"]

BUILD_SCRIPT = "build_env.sh"
SANITY_SCRIPT = "sanity_check.py"

_SHA_RE = re.compile(r"sha256=([0-9a-f]{64})")
_SUMMARY_PREFIX = "SANITY_SUMMARY "
_ERROR_PREFIX = "SANITY_ERROR:"
# Lines of remote output quoted in an error message.
_TAIL_LINES = 40


def include_dir() -> Path:
    """The local ``include/`` directory (the same one :class:`SlurmRayOperator` stages from)."""
    # Imported here: the training operator's module pulls in the trigger and
    # links, which these two small operators do not need.
    from slurm_ray.operators.slurm_ray import include_dir as _include_dir

    return _include_dir()


# -- validation ------------------------------------------------------------------


def _environment(raw: Mapping[str, Any] | EnvironmentSpec) -> EnvironmentSpec:
    """The validated :class:`EnvironmentSpec` of an operator's ``environment`` argument."""
    try:
        env = raw if isinstance(raw, EnvironmentSpec) else EnvironmentSpec.from_dict(raw)
    except (TypeError, ValueError) as exc:
        raise AirflowException(str(exc)) from exc
    return env


def _connection_and_env(
    ssh_conn_id: str | None, environment: Mapping[str, Any] | None, site: Mapping[str, Any]
) -> tuple[str, Mapping[str, Any]]:
    """``ssh_conn_id`` and ``environment``: the explicit ones, else the profile's."""
    conn = ssh_conn_id if ssh_conn_id is not None else site.get("ssh_conn_id")
    env = environment if environment is not None else site.get("environment")
    if not conn:
        raise ValueError("ssh_conn_id: give ssh_conn_id or profile")
    if env is None:
        raise ValueError("environment: give environment or profile")
    return conn, env


def _resolve_user(env: EnvironmentSpec, hook: SlurmHook) -> EnvironmentSpec:
    """Fill in the ``{user}`` placeholder of the prefix with the remote user (one SSH call)."""
    if not env.prefix or "{user}" not in env.prefix:
        return env
    user = hook.run("id -un", check=True).stdout.strip()
    return EnvironmentSpec.from_dict(
        {**env.to_dict(), "prefix": env.prefix.replace("{user}", user)}
    )


# -- rendering (pure) --------------------------------------------------------------


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


def _tail(text: str, lines: int = _TAIL_LINES) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


# -- operators ------------------------------------------------------------------------


class ClusterEnvOperator(BaseOperator):
    """
    Build the cluster-side Python environment, or confirm it is up to date.

    Stages ``include/build_env.sh`` and the spec file into ``remote_dir`` and
    runs ``bash build_env.sh KIND PREFIX SPEC`` on the login node. The script
    stamps the spec's sha256 into the environment, so an unchanged spec costs
    one SSH round trip, and takes an exclusive lock on ``PREFIX.lock`` so two
    concurrent builds of one prefix run one after the other (the second finds
    it up to date). Kinds ``modules`` and ``none`` build nothing; their module
    lines are run once so that a broken line fails here.

    :param profile: cluster profile giving ``ssh_conn_id``, ``environment``, ``remote_dir``
        and ``extra_env``; explicit arguments override it.
    :param ssh_conn_id: SSH connection of the cluster's login node.
    :param environment: :class:`~slurm_ray.utils.environment.EnvironmentSpec` fields;
        ``{user}`` in ``prefix`` is replaced by the remote user.
    :param spec_path: local path of the environment.yml / requirements file;
        default ``include/<environment.spec_file>``.
    :param remote_dir: absolute directory on the cluster for the staged script and
        spec; default ``<prefix>.spec``.
    :param build_timeout: seconds the whole remote build may take.
    :param extra_env: extra variables for the build (sent on stdin, never in argv), e.g.
        ``{"PIP_FIND_LINKS": "/opt/wheels"}`` or ``{"CONDA": "mamba"}``.
    :return: ``{"kind", "prefix", "sha256", "action"}`` with action ``built``,
        ``up-to-date`` or ``nothing``.
    """

    template_fields: Sequence[str] = (
        "ssh_conn_id",
        "environment",
        "spec_path",
        "remote_dir",
        "extra_env",
    )
    template_fields_renderers = {"environment": "json", "extra_env": "json"}
    ui_color = "#e3f1d4"

    def __init__(
        self,
        *,
        ssh_conn_id: str | None = None,
        environment: Mapping[str, Any] | None = None,
        profile: str | None = None,
        spec_path: str | None = None,
        remote_dir: str | None = None,
        build_timeout: float = 3600.0,
        extra_env: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        site = operator_defaults(profile)
        self.ssh_conn_id, environment = _connection_and_env(ssh_conn_id, environment, site)
        # Kept as given: a template or an XComArg resolves only at run time.
        self.environment = environment
        self.spec_path = spec_path
        self.remote_dir = remote_dir if remote_dir is not None else site.get("env_stage_dir")
        self.build_timeout = build_timeout
        if extra_env is None:
            extra_env = site.get("env_build_vars", {})
        self.extra_env = extra_env

    def _spec(self, env: EnvironmentSpec) -> tuple[str, bytes]:
        """(file name, content) of the local spec file."""
        if self.spec_path:
            path = Path(self.spec_path)
        elif env.spec_file:
            path = include_dir() / env.spec_file
        else:
            raise AirflowException(
                f"environment.spec_file: required to build kind={env.kind} (or pass spec_path)"
            )
        try:
            return path.name, path.read_bytes()
        except OSError as exc:
            raise AirflowException(f"spec_path: cannot read {str(path)!r}: {exc}") from exc

    def execute(self, context: Context) -> dict[str, Any]:
        env = _environment(self.environment)
        extra_env = _validate_extra_env(self.extra_env)
        hook = SlurmHook(self.ssh_conn_id)
        try:
            if env.kind in ("modules", "none"):
                return self._check_preamble(hook, env)
            return self._build(hook, env, extra_env)
        finally:
            hook.close()

    def _check_preamble(self, hook: SlurmHook, env: EnvironmentSpec) -> dict[str, Any]:
        cmd = render_preamble_check(env)
        if cmd:
            res = hook.run(cmd, timeout=self.build_timeout)
            self._log_output(res)
            if res.exit_code != 0:
                raise AirflowException(
                    f"environment.module_lines failed on the login node (exit {res.exit_code}):\n"
                    + _tail(res.stderr or res.stdout)
                )
        self.log.info("environment kind=%s: nothing to build", env.kind)
        return {"kind": env.kind, "prefix": env.prefix, "sha256": None, "action": "nothing"}

    def _build(
        self, hook: SlurmHook, env: EnvironmentSpec, extra_env: dict[str, str]
    ) -> dict[str, Any]:
        spec_name, spec_bytes = self._spec(env)
        want = hashlib.sha256(spec_bytes).hexdigest()
        env = _resolve_user(env, hook)
        assert env.prefix is not None  # validated: conda/venv need one
        remote_dir = (self.remote_dir or f"{env.prefix}.spec").rstrip("/")
        if not remote_dir.startswith("/"):
            raise AirflowException(f"remote_dir: {remote_dir!r} must be an absolute path")
        # A private staging directory per run: concurrent builds of one prefix
        # must not overwrite each other's half-uploaded files.
        stage = posixpath.join(remote_dir, f".stage-{uuid.uuid4().hex[:12]}")
        hook.makedirs(stage)
        hook.upload_bytes(
            (include_dir() / BUILD_SCRIPT).read_bytes(),
            posixpath.join(stage, BUILD_SCRIPT),
            mode=0o755,
        )
        hook.upload_bytes(spec_bytes, posixpath.join(stage, spec_name))
        cmd = render_build_command(env, stage_dir=stage, spec_name=spec_name)
        self.log.info(
            "Building kind=%s prefix=%s from %s (sha256 %s)", env.kind, env.prefix, spec_name, want
        )
        res = hook.run(cmd, timeout=self.build_timeout, stdin=render_build_stdin(env, extra_env))
        self._log_output(res)
        if res.exit_code != 0:
            raise AirflowException(self._failure_message(env, res, extra_env))
        action, sha = parse_build_output(res.stdout)
        if sha is not None and sha != want:
            # Would mean the staged spec is not the local one: never report success then.
            raise AirflowException(
                f"build_env.sh reports sha256 {sha} but the local spec {spec_name} is {want}"
            )
        self.log.info("environment %s: %s", env.prefix, action)
        return {"kind": env.kind, "prefix": env.prefix, "sha256": want, "action": action}

    def _failure_message(
        self, env: EnvironmentSpec, res: CommandResult, extra_env: Mapping[str, str]
    ) -> str:
        output = f"{res.stdout}\n{res.stderr}"
        head = f"building the {env.kind} environment {env.prefix} failed (exit {res.exit_code})"
        if env.kind == "conda":
            conda = extra_env.get("CONDA", "conda")
            name = re.escape(posixpath.basename(conda))
            if re.search(rf"\b{name}\b[^\n]*(command not found|No such file or directory)", output):
                head = (
                    f"conda was not found on the cluster ({conda!r} is not on PATH): load it with "
                    "environment.module_lines (e.g. 'module load conda'), make it callable with "
                    "environment.conda_setup, or set extra_env CONDA to its full path; " + head
                )
        return f"{head}:\n{_tail(res.stderr.strip() or res.stdout)}"

    def _log_output(self, res: CommandResult) -> None:
        for line in res.stdout.splitlines():
            self.log.info("%s", line)
        for line in res.stderr.splitlines():
            self.log.warning("%s", line)


class GymSanityCheckOperator(BaseOperator):
    """
    Step a Gym environment with random actions in the cluster-side environment.

    Runs ``include/sanity_check.py`` (gymnasium, or legacy gym) after the
    environment's activation lines, on the login node or as a one-task ``srun``
    step on a compute node, logs its output and returns its summary.

    :param profile: cluster profile giving ``ssh_conn_id``, ``environment``, ``partition``
        and ``account``; explicit arguments override it.
    :param ssh_conn_id: SSH connection of the cluster's login node.
    :param environment: :class:`~slurm_ray.utils.environment.EnvironmentSpec` fields.
    :param env_id: Gym environment id, e.g. ``CartPole-v1``.
    :param episodes: episodes to run.
    :param max_steps: step limit per episode.
    :param where: ``login`` (the login node) or ``compute`` (``srun`` on a compute node).
    :param partition: partition of the ``srun`` step (default: the site default).
    :param account: account of the ``srun`` step, where the site requires one.
    :param time: time limit of the ``srun`` step (Slurm format, e.g. ``5`` minutes).
    :param remote_dir: directory on the cluster (shared with the compute nodes) to stage
        the script in; relative paths are relative to the remote home directory.
    :param timeout: seconds the remote command may take (queue wait included).
    :param quiet: print only the summary, not a line per step.
    :param env_modules: modules a ``module:Name`` env id may import (the profile's).
    :return: the ``SANITY_SUMMARY`` object (``ok``, ``env_id``, ``api``, ``steps``,
        ``returns``, ``versions``, ``host``, ...).
    """

    template_fields: Sequence[str] = (
        "ssh_conn_id",
        "environment",
        "env_id",
        "episodes",
        "where",
        "partition",
        "account",
        "time",
        "remote_dir",
        "env_modules",
    )
    template_fields_renderers = {"environment": "json"}
    ui_color = "#f3ecd2"

    def __init__(
        self,
        *,
        ssh_conn_id: str | None = None,
        environment: Mapping[str, Any] | None = None,
        profile: str | None = None,
        env_id: str = "CartPole-v1",
        episodes: int = 1,
        max_steps: int = 500,
        where: Where = "login",
        partition: str | None = None,
        account: str | None = None,
        time: str = "5",
        remote_dir: str = ".slurm_ray/sanity",
        timeout: float = 600.0,
        quiet: bool = False,
        env_modules: Sequence[str] = (),
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        site = operator_defaults(profile)
        # Templated (an XComArg in the DAGs); a profile's list when none is given.
        self.env_modules = env_modules or site.get("env_modules", ())
        self.ssh_conn_id, environment = _connection_and_env(ssh_conn_id, environment, site)
        # Kept as given: a template or an XComArg resolves only at run time.
        self.environment = environment
        self.env_id = env_id
        self.episodes = episodes
        self.max_steps = max_steps
        self.where = where
        # "is None", not "or": an XComArg or a template is kept as given.
        placement = site.get("placement", {})
        self.partition = partition if partition is not None else placement.get("partition")
        self.account = account if account is not None else placement.get("account")
        self.time = time
        self.remote_dir = remote_dir
        self.timeout = timeout
        self.quiet = quiet

    def _validated(self) -> EnvironmentSpec:
        """Check every field before the cluster is touched; errors name the field."""
        validate_env_id(self.env_id, list(self.env_modules))
        for name in ("episodes", "max_steps"):
            value = getattr(self, name)
            if isinstance(value, str) and value.isdigit():  # a rendered template
                value = int(value)
                setattr(self, name, value)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise AirflowException(f"{name}: expected a positive integer, got {value!r}")
        if self.where not in ("login", "compute"):
            raise AirflowException(f"where: {self.where!r} must be 'login' or 'compute'")
        if self.where == "compute":
            from slurm_ray.utils.batch import JobSpec, JobSpecError

            if self.account == "CHANGE_ME":
                raise AirflowException(
                    "account: the profile needs your Slurm account (account=...)"
                )

            # JobSpec knows what Slurm accepts for these; reuse its checks.
            try:
                JobSpec.from_dict(
                    {
                        "job_name": "slurm_ray-sanity",
                        "time": self.time,
                        "partition": self.partition,
                        "account": self.account,
                    }
                )
            except JobSpecError as exc:
                raise AirflowException(str(exc).removeprefix("JobSpec.")) from exc
        if not self.remote_dir or "\0" in self.remote_dir or "\n" in self.remote_dir:
            raise AirflowException(f"remote_dir: {self.remote_dir!r} is not a usable path")
        return _environment(self.environment)

    def execute(self, context: Context) -> dict[str, Any]:
        env = self._validated()
        hook = SlurmHook(self.ssh_conn_id)
        try:
            env = _resolve_user(env, hook)
            # A private directory per run: parallel checks (mapped tasks) must not
            # overwrite each other's upload, and the directory is removed afterwards.
            stage = posixpath.join(self.remote_dir.rstrip("/"), f"run-{uuid.uuid4().hex[:12]}")
            hook.makedirs(stage)
            hook.upload_bytes(
                (include_dir() / SANITY_SCRIPT).read_bytes(), posixpath.join(stage, SANITY_SCRIPT)
            )
            script = render_sanity_script(
                env,
                env_id=self.env_id,
                episodes=self.episodes,
                max_steps=self.max_steps,
                quiet=self.quiet,
            )
            cmd = render_sanity_command(
                script,
                stage_dir=stage,
                where=self.where,
                partition=self.partition,
                account=self.account,
                time=self.time,
            )
            self.log.info("Sanity check of %s on the %s node(s)", self.env_id, self.where)
            res = hook.run(cmd, timeout=self.timeout)
        finally:
            hook.close()
        for line in res.stdout.splitlines():
            self.log.info("%s", line)
        for line in res.stderr.splitlines():
            self.log.warning("%s", line)
        summary = parse_sanity_output(res.stdout)
        if res.exit_code != 0 or summary is None:
            reason = sanity_error_reason(res.stderr, res.stdout)
            where = f"{self.where} node" + (" (srun)" if self.where == "compute" else "")
            if reason is not None:
                raise AirflowException(
                    f"sanity check of {self.env_id!r} failed on the {where} "
                    f"(exit {res.exit_code}): {reason}"
                )
            raise AirflowException(
                f"sanity check of {self.env_id!r} failed on the {where} (exit {res.exit_code}) "
                f"without a SANITY_ERROR line:\n{_tail(res.stderr.strip() or res.stdout)}"
            )
        self.log.info(
            "Sanity check ok: %s steps of %s with %s on %s",
            summary.get("steps"),
            summary.get("env_id"),
            summary.get("api"),
            summary.get("host", "?"),
        )
        return summary
