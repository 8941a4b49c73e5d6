"""Names derived from a task try (the Slurm job name, the run directory) and the remote user."""

from __future__ import annotations

import hashlib
import posixpath
import re
from typing import TYPE_CHECKING

from slurm_ray.slurm.commands import IDENTITY_COMMAND
from slurm_ray.utils.environment import EnvironmentSpec

if TYPE_CHECKING:
    from slurm_ray.hooks.slurm import SlurmHook

__all__ = ["fill_placeholders", "resolve_remote_paths", "run_identity", "sanitize", "task_key"]

#: Placeholders of a run base dir or environment prefix, filled in on the cluster.
PLACEHOLDERS = ("{user}", "{home}")

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
# 64 bits: finding two run ids with one directory takes ~2**32 hashes.
_DIGEST_LEN = 16
_DIGESTED = re.compile(rf"-[0-9a-f]{{{_DIGEST_LEN}}}\Z")


def sanitize(component: str, max_len: int = 120) -> str:
    """A path/job-name safe version of ``component`` (never ``.``/``..``), injective.

    Readable: a component that is already safe is kept as it is. Any other one
    (characters replaced, cut, or ending like a digest) gets ``-<digest>`` of
    the original, so ``a:b``, ``a+b`` and ``a_b`` never share a run directory.
    """
    text = _SAFE.sub("_", component).strip("_") or "x"
    if set(text) <= {"."}:
        text = text.replace(".", "_")
    if text == component and len(text) <= max_len and not _DIGESTED.search(text):
        return text
    digest = hashlib.sha256(component.encode()).hexdigest()[:_DIGEST_LEN]
    return f"{text[: max_len - _DIGEST_LEN - 1]}-{digest}"


def task_key(dag_id: str, run_id: str, task_id: str, map_index: int) -> str:
    """The job name prefix shared by every try of one task (the try number follows it)."""
    task = task_id if map_index < 0 else f"{task_id}__{map_index}"
    digest = hashlib.sha256(f"{dag_id}\0{run_id}\0{task}".encode()).hexdigest()[:12]
    return f"sr-{digest}-{sanitize(task, 40)}-t"


def run_identity(
    dag_id: str, run_id: str, task_id: str, map_index: int, try_number: int
) -> tuple[str, str]:
    """(job name, run-dir suffix) derived deterministically from the task try."""
    task = task_id if map_index < 0 else f"{task_id}__{map_index}"
    job_name = f"{task_key(dag_id, run_id, task_id, map_index)}{try_number}"
    suffix = posixpath.join(sanitize(dag_id), sanitize(run_id), sanitize(task), f"try_{try_number}")
    return job_name, suffix


def fill_placeholders(text: str, identity: dict[str, str]) -> str:
    """``text`` with each placeholder of ``identity`` replaced by its value."""
    for key, value in identity.items():
        text = text.replace(key, value)
    return text


def resolve_remote_paths(
    hook: SlurmHook, base: str, env: EnvironmentSpec
) -> tuple[str, EnvironmentSpec]:
    """``base`` and the env prefix with ``{user}``/``{home}`` of the remote account.

    One SSH command, and only when a placeholder is used.
    """
    if not any(k in base or k in (env.prefix or "") for k in PLACEHOLDERS):
        return base, env
    out = hook.run(IDENTITY_COMMAND, check=True).stdout.split("\n")
    identity = {"{user}": out[0].strip(), "{home}": out[1].strip().rstrip("/")}
    if env.prefix:
        prefix = fill_placeholders(env.prefix, identity)
        env = EnvironmentSpec.from_dict({**env.to_dict(), "prefix": prefix})
    return fill_placeholders(base, identity), env
