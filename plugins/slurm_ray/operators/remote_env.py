"""What the environment and sanity-check operators share: their arguments and the remote user."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from airflow.sdk.exceptions import AirflowException

from slurm_ray.hooks.slurm import SlurmHook
from slurm_ray.slurm.commands import IDENTITY_COMMAND
from slurm_ray.utils.environment import EnvironmentSpec

__all__ = ["include_dir", "validate_env_id"]

# gymnasium ids are ``[module:][namespace/]Name[-vN]``; allowing only these
# characters keeps an id from ever meaning anything to a shell, even though
# it is quoted as well.
_ENV_ID_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:/-]{0,199}", re.ASCII)
# venv's and conda's activation scripts paste the prefix into shell code; some
# Python releases did so without quoting (CVE-2024-9287), so a prefix holding
# `$(...)` or a quote would run code on every activation however carefully we
# quote it ourselves. Only plain path characters are accepted; ``{user}`` is
# the remote-user placeholder the cluster profiles use.
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*", re.ASCII)
# Set by the operator itself; an extra_env entry must not replace them silently.
_RESERVED_ENV = frozenset({"SLURM_RAY_MODULE_LINES", "SLURM_RAY_UNSET_LD_PRELOAD"})


def include_dir() -> Path:
    """The local ``include/`` directory (the one :class:`SlurmRayOperator` stages from)."""
    import os

    default = Path(__file__).resolve().parents[3] / "include"
    return Path(os.environ.get("SLURM_RAY_INCLUDE_DIR", str(default)))


def validate_env_id(env_id: object, env_modules: Sequence[str] = ()) -> str:
    """
    Check a Gym environment id before it goes anywhere near a shell.

    :param env_modules: modules a ``module:Name`` id may import (none by default).
    :raises AirflowException: naming the ``env_id`` field.
    """
    if not isinstance(env_id, str) or not _ENV_ID_RE.fullmatch(env_id):
        raise AirflowException(
            f"env_id: {env_id!r} is not a Gym environment id such as 'CartPole-v1' "
            "(letters, digits and _ . : / - only, at most 200 characters)"
        )
    from slurm_ray.training_config import ConfigError, check_env_module

    try:
        check_env_module("env_id", env_id, env_modules)
    except ConfigError as exc:
        raise AirflowException(str(exc).removeprefix("config.")) from exc
    return env_id


def _environment(raw: Mapping[str, Any] | EnvironmentSpec) -> EnvironmentSpec:
    """The validated :class:`EnvironmentSpec` of an operator's ``environment`` argument."""
    try:
        env = raw if isinstance(raw, EnvironmentSpec) else EnvironmentSpec.from_dict(raw)
    except (TypeError, ValueError) as exc:
        raise AirflowException(str(exc)) from exc
    return env


def _validate_extra_env(extra_env: Mapping[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in extra_env.items():
        if not isinstance(key, str) or not _ENV_NAME_RE.fullmatch(key):
            raise AirflowException(f"extra_env: {key!r} is not a valid variable name")
        if key in _RESERVED_ENV:
            raise AirflowException(
                f"extra_env: {key} is set from `environment`; change the environment instead"
            )
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise AirflowException(
                f"extra_env[{key!r}]: expected a string, got {type(value).__name__}"
            )
        text = str(value)
        if "\0" in text:
            raise AirflowException(f"extra_env[{key!r}]: contains a NUL byte")
        out[key] = text
    return out


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
    user = hook.run(IDENTITY_COMMAND, check=True).stdout.split("\n")[0].strip()
    return EnvironmentSpec.from_dict(
        {**env.to_dict(), "prefix": env.prefix.replace("{user}", user)}
    )
