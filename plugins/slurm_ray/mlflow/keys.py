"""MLflow's naming rules applied to our params, tags and metric keys.

The limits come from the installed MLflow (``mlflow.utils.validation``),
imported when first needed so that importing this package stays cheap for
the triggerer.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
from collections.abc import Mapping
from typing import Any

TAG_PREFIX = "slurm_ray."
TASK_KEY_TAG = "slurm_ray.task_key"

_BAD_KEY_CHARS = re.compile(r"[^\w.\- :]")


@functools.cache
def limits() -> Any:
    """``mlflow.utils.validation`` (its ``MAX_*`` constants)."""
    from mlflow.utils import validation

    return validation


def finite(value: Any) -> float | None:
    """``value`` as a float if it is a finite real number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def safe_key(key: str) -> str:
    """A key MLflow accepts (its name rules: ``[/\\w.\\- :]``, no path tricks, ≤ 250)."""
    # Slashes are replaced too: "a//b" or "a/../b" would be rejected as paths.
    out = _BAD_KEY_CHARS.sub("_", str(key)) or "_"
    if out in {".", ".."} or out.startswith(".."):
        out = "_" + out
    longest = limits().MAX_ENTITY_KEY_LENGTH
    if len(out) > longest:
        digest = hashlib.sha256(out.encode()).hexdigest()[:10]
        out = f"{out[: longest - 11]}-{digest}"
    return out


def _param_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None or isinstance(value, bool | int | float):
        return str(value)
    return json.dumps(value, sort_keys=True, default=str)


def flatten_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten a nested config into MLflow params: ``{"a": {"b": 1}}`` → ``{"a.b": "1"}``.

    Lists and other non-dict values become one param (JSON text); empty dicts too.
    """
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, prefix=f"{name}."))
        else:
            flat[name] = _param_value(value if not isinstance(value, Mapping) else {})
    return flat


def truncate(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, marked as cut."""
    marker = "...[truncated]"
    return text if len(text) <= limit else text[: limit - len(marker)] + marker


def limit_params(params: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    """Params fit to MLflow's limits (keys sanitised, values cut), and the keys changed."""
    out: dict[str, str] = {}
    changed: list[str] = []
    for key, value in params.items():
        key_ok = safe_key(key)
        value_ok = truncate(str(value), limits().MAX_PARAM_VAL_LENGTH)
        if key_ok != key or value_ok != value or key_ok in out:
            changed.append(key)
        while key_ok in out:  # two keys that sanitise alike: keep both
            key_ok = safe_key(key_ok + "_")
        out[key_ok] = value_ok
    return out, changed


def tag_items(tags: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Tags as MLflow takes them: keys sanitised, values stringified and cut; None → ""."""
    longest = limits().MAX_TAG_VAL_LENGTH
    return [(safe_key(k), truncate("" if v is None else str(v), longest)) for k, v in tags.items()]


def prefixed(key: str) -> str:
    """``key`` in our tag namespace (``slurm_ray.``)."""
    return key if key.startswith(TAG_PREFIX) else TAG_PREFIX + key


def task_identity_tags(
    dag_id: str, run_id: str, task_id: str, map_index: int | str | None = None
) -> dict[str, str]:
    """The tags that identify one training task across its retries (no try number)."""
    return {
        "dag_id": str(dag_id),
        "run_id": str(run_id),
        "task_id": str(task_id),
        "map_index": "-1" if map_index is None else str(map_index),
    }


def task_key(tags: Mapping[str, str]) -> str:
    """A digest of the identity tags: safe inside a search filter whatever the run id holds."""
    text = json.dumps({str(k): str(v) for k, v in tags.items()}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]
