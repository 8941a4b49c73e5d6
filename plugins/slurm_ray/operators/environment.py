"""ClusterEnvOperator: build the cluster-side Python environment, or confirm it is current."""

from __future__ import annotations

import hashlib
import posixpath
import re
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException

from slurm_ray.hooks.slurm import CommandResult, SlurmHook
from slurm_ray.operators.identity import resolve_remote_paths
from slurm_ray.operators.remote_env import (
    _connection_and_env,
    _environment,
    include_dir,
    log_output,
)
from slurm_ray.profiles import operator_defaults
from slurm_ray.slurm.environment import (
    BUILD_SCRIPT,
    parse_build_output,
    render_build_command,
    render_build_stdin,
    render_preamble_check,
)
from slurm_ray.slurm.parsers import last_lines
from slurm_ray.utils.environment import EnvironmentSpec
from slurm_ray.validation import validate_extra_env

if TYPE_CHECKING:
    from airflow.sdk import Context


class ClusterEnvOperator(BaseOperator):
    """Build the cluster-side Python environment, or confirm it is up to date.

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
        extra_env = validate_extra_env(self.extra_env)
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
            log_output(self.log, res)
            if res.exit_code != 0:
                raise AirflowException(
                    f"environment.module_lines failed on the login node (exit {res.exit_code}):\n"
                    + last_lines(res.stderr or res.stdout)
                )
        self.log.info("environment kind=%s: nothing to build", env.kind)
        return {"kind": env.kind, "prefix": env.prefix, "sha256": None, "action": "nothing"}

    def _build(
        self, hook: SlurmHook, env: EnvironmentSpec, extra_env: dict[str, str]
    ) -> dict[str, Any]:
        spec_name, spec_bytes = self._spec(env)
        want = hashlib.sha256(spec_bytes).hexdigest()
        _, env = resolve_remote_paths(hook, "", env)
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
        log_output(self.log, res)
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
        return f"{head}:\n{last_lines(res.stderr.strip() or res.stdout)}"
