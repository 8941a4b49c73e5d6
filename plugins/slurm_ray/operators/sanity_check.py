"""GymSanityCheckOperator: the tutorial's first check ("step CartPole with random actions")."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import posixpath
import uuid
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException

from slurm_ray.hooks.slurm import SlurmHook
from slurm_ray.operators.identity import resolve_remote_paths
from slurm_ray.operators.remote_env import (
    _connection_and_env,
    _environment,
    include_dir,
    log_output,
    validate_env_id,
)
from slurm_ray.profiles import ProfileError, check_account, operator_defaults
from slurm_ray.slurm.environment import (
    SANITY_SCRIPT,
    SanityRecord,
    Where,
    parse_sanity_output,
    parse_sanity_reuse,
    render_sanity_command,
    render_sanity_script,
    sanity_error_reason,
    sanity_record_key,
)
from slurm_ray.slurm.parsers import last_lines
from slurm_ray.utils.environment import EnvironmentSpec

if TYPE_CHECKING:
    from airflow.sdk import Context


class GymSanityCheckOperator(BaseOperator):
    """Step a Gym environment with random actions in the cluster-side environment.

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
    :param force: check for real even when a recorded pass could be reused.
    :param reuse_max_age: seconds a recorded pass stays reusable (default 24 h; 0: never
        reuse). A pass is recorded per environment build (its spec sha256), env id,
        placement and script version in ``remote_dir/records``, and trusted only when
        the record and its directories belong to the job user and nobody else can
        write them. Kinds ``modules`` and ``none`` have no spec hash: always checked.
    :param job_name: name of the ``srun`` step.
    :return: the ``SANITY_SUMMARY`` object (``ok``, ``env_id``, ``api``, ``steps``,
        ``returns``, ``versions``, ``host``, ...) of the check that ran or was
        reused, with ``reused`` and, when reused, ``passed_at`` and ``spec_sha256``.
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
        "force",
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
        force: bool | str = False,
        reuse_max_age: float = 86400.0,
        job_name: str = "slurm_ray-sanity",
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
        self.force = force
        self.reuse_max_age = reuse_max_age
        self.job_name = job_name

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

            # JobSpec knows what Slurm accepts for these; reuse its checks.
            try:
                check_account(self.account)
                JobSpec.from_dict(
                    {
                        "job_name": self.job_name,
                        "time": self.time,
                        "partition": self.partition,
                        "account": self.account,
                    }
                )
            except (JobSpecError, ProfileError) as exc:
                raise AirflowException(str(exc).removeprefix("JobSpec.")) from exc
        if not self.remote_dir or "\0" in self.remote_dir or "\n" in self.remote_dir:
            raise AirflowException(f"remote_dir: {self.remote_dir!r} is not a usable path")
        if isinstance(self.force, str) and self.force.lower() in ("true", "false"):
            self.force = self.force.lower() == "true"  # a rendered template
        if not isinstance(self.force, bool):
            raise AirflowException(f"force: expected true or false, got {self.force!r}")
        age = self.reuse_max_age
        if isinstance(age, bool) or not isinstance(age, (int, float)) or not 0 <= age < 10**9:
            raise AirflowException(f"reuse_max_age: expected seconds >= 0, got {age!r}")
        return _environment(self.environment)

    def _record(self, env: EnvironmentSpec, script: bytes) -> SanityRecord | None:
        """Where and under which key a pass of this check is recorded (conda/venv only)."""
        if env.kind not in ("conda", "venv"):
            return None
        script_sha = hashlib.sha256(script).hexdigest()
        placement = {
            "where": self.where,
            "partition": self.partition if self.where == "compute" else None,
            "account": self.account if self.where == "compute" else None,
        }
        check = {"env_id": self.env_id, "episodes": self.episodes, "max_steps": self.max_steps}
        return SanityRecord(
            records_dir=posixpath.join(self.remote_dir.rstrip("/"), "records"),
            key=sanity_record_key(env, script_sha, **placement, **check),
            info={**placement, **check, "prefix": env.prefix, "script_sha256": script_sha},
            max_age_s=int(self.reuse_max_age),
            force=bool(self.force),
        )

    def execute(self, context: Context) -> dict[str, Any]:
        env = self._validated()
        script_bytes = (include_dir() / SANITY_SCRIPT).read_bytes()
        hook = SlurmHook(self.ssh_conn_id)
        try:
            _, env = resolve_remote_paths(hook, "", env)
            record = self._record(env, script_bytes)
            if record is None:
                self.log.info("No pass is recorded for kind=%s (no spec hash)", env.kind)
            elif record.force:
                self.log.info("force_sanity_check=true: checking for real")
            res = self._run(hook, env, record, script_bytes)
            reused = parse_sanity_reuse(res.stdout) if res.exit_code == 0 else None
            if reused is not None and record is not None:
                summary = self._reused(record, *reused)
                if summary is not None:
                    return summary
                # A record of the job user's own that does not match: check for real.
                res = self._run(hook, env, dataclasses.replace(record, force=True), script_bytes)
        finally:
            hook.close()
        log_output(self.log, res)
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
        return {**summary, "reused": False}

    def _run(
        self, hook: SlurmHook, env: EnvironmentSpec, record: SanityRecord | None, script: bytes
    ) -> Any:
        # A private directory per run: parallel checks (mapped tasks) must not
        # overwrite each other's script, and the directory is removed afterwards.
        stage = posixpath.join(self.remote_dir.rstrip("/"), f"run-{uuid.uuid4().hex[:12]}")
        text = render_sanity_script(
            env,
            env_id=self.env_id,
            episodes=self.episodes,
            max_steps=self.max_steps,
            quiet=self.quiet,
            record=record,
        )
        cmd = render_sanity_command(
            text,
            stage_dir=stage,
            where=self.where,
            partition=self.partition,
            account=self.account,
            time=self.time,
            job_name=self.job_name,
            record=record,
            prefix=env.prefix,
        )
        lookup = record is not None and not record.force and record.max_age_s > 0
        self.log.info(
            "Sanity check of %s on the %s node(s)%s",
            self.env_id,
            self.where,
            " unless a recorded pass can be reused" if lookup else "",
        )
        # The script travels on stdin: no SFTP round trips, and none at all when reused.
        return hook.run(cmd, timeout=self.timeout, stdin=script)

    def _reused(
        self, record: SanityRecord, age: float, spec: str, data: Mapping[str, Any]
    ) -> dict[str, Any] | None:
        """The recorded summary, if the record is the one asked for; logs what was reused."""
        summary = data.get("summary")
        expected = {**record.info, "spec_sha256": spec}
        wrong = sorted(k for k, v in expected.items() if data.get(k) != v)
        if wrong or not isinstance(summary, dict) or summary.get("ok") is not True:
            self.log.warning(
                "sanity record does not match this check (%s): checking for real",
                ", ".join(wrong) or "summary",
            )
            return None
        partition = record.info.get("partition")
        place = (
            f"on partition {partition}"
            if partition
            else ("on the default partition" if self.where == "compute" else "on the login node")
        )
        self.log.info(
            "sanity check reused: passed for %s %s at %s (env sha256 %s…, %s ago); "
            "force_sanity_check=true runs it again",
            self.env_id,
            place,
            _minute(str(data.get("passed_at", "?"))),
            spec[:12],
            _ago(age),
        )
        return {
            **summary,
            "reused": True,
            "passed_at": data.get("passed_at"),
            "spec_sha256": spec,
        }


def _minute(stamp: str) -> str:
    """``2026-12-01T13:02:11Z`` as ``2026-12-01T13:02Z``."""
    try:
        when = datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        return stamp
    return when.strftime("%Y-%m-%dT%H:%MZ")


def _ago(seconds: float) -> str:
    """A rounded age: ``40 s``, ``12 min``, ``1 h``."""
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.0f} h"
