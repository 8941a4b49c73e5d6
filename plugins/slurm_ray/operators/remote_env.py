"""What the environment and sanity-check operators share: arguments, ``include/``, output."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from airflow.sdk.exceptions import AirflowException

from slurm_ray.hooks.command_output import CommandResult
from slurm_ray.utils.environment import EnvironmentSpec
from slurm_ray.validation import validate_env_id

__all__ = ["include_dir", "validate_env_id"]


def include_dir() -> Path:
    """The local ``include/`` directory (the one :class:`SlurmRayOperator` stages from)."""
    import os

    default = Path(__file__).resolve().parents[3] / "include"
    return Path(os.environ.get("SLURM_RAY_INCLUDE_DIR", str(default)))


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


def log_output(log: Any, res: CommandResult) -> None:
    """A remote command's stdout into the task log, its stderr as warnings."""
    for line in res.stdout.splitlines():
        log.info("%s", line)
    for line in res.stderr.splitlines():
        log.warning("%s", line)
