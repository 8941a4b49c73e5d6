"""GymSanityCheckOperator: the tutorial's first check ("step CartPole with random actions").

``include/sanity_check.py`` runs in the activated environment, on the login
node or in a one-task ``srun`` step, and its ``SANITY_SUMMARY`` line becomes
the task's XCom.
"""

from __future__ import annotations

import posixpath
import uuid
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException

from slurm_ray.hooks.slurm import SlurmHook
from slurm_ray.operators.remote_env import (
    _connection_and_env,
    _environment,
    _resolve_user,
    include_dir,
    validate_env_id,
)
from slurm_ray.profiles import operator_defaults
from slurm_ray.slurm.environment import (
    SANITY_SCRIPT,
    Where,
    parse_sanity_output,
    render_sanity_command,
    render_sanity_script,
    sanity_error_reason,
)
from slurm_ray.slurm.parsers import last_lines
from slurm_ray.utils.environment import EnvironmentSpec

if TYPE_CHECKING:
    from airflow.sdk import Context


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
                f"without a SANITY_ERROR line:\n{last_lines(res.stderr.strip() or res.stdout)}"
            )
        self.log.info(
            "Sanity check ok: %s steps of %s with %s on %s",
            summary.get("steps"),
            summary.get("env_id"),
            summary.get("api"),
            summary.get("host", "?"),
        )
        return summary
