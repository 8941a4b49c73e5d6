"""A Ray Tune sweep's spec: search space, scheduler, samples (checked on both sides).

The ``rllib_tune`` DAG checks the spec here before anything is submitted; the
same file is staged next to ``include/tune_driver.py``, which checks it again
(standard library plus ``training_config``, no Airflow, no Ray). Every error
names its field: ``tune.search.lr.loguniform: ...``.

Spec (``config.json`` holds ``{"base": <training config>, "tune": <this>}``)::

    {"search": {"lr": {"loguniform": [1e-4, 1e-2]},
                "hidden_sizes": {"grid": [[32], [64, 64]]},
                "gamma": {"choice": [0.95, 0.99]}},
     "num_samples": 2, "scheduler": "asha", "max_concurrent_trials": 0}

``grid`` values are all tried (each ``num_samples`` times); ``choice`` and
``loguniform`` are sampled once per trial. Trials = ``num_samples`` times the
product of the grid sizes.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from typing import Any

if "training_config" in sys.modules:  # cluster side: loaded by train.py, staged beside us
    tc = sys.modules["training_config"]
else:  # Airflow side
    from slurm_ray import training_config as tc

__all__ = [
    "KINDS",
    "MAX_TRIALS",
    "METRIC",
    "SCHEDULERS",
    "TUNABLE",
    "TuneSpecError",
    "trial_count",
    "validate_tune",
]

SCHEDULERS = ("fifo", "asha", "pbt")
KINDS = ("grid", "choice", "loguniform")
#: Training-config keys a sweep may vary (resources, env and stop stay per sweep).
TUNABLE = (
    "lr",
    "gamma",
    "train_batch_size",
    "minibatch_size",
    "num_epochs",
    "hidden_sizes",
    "num_envs_per_env_runner",
    "seed",
)
#: PBT hands one trial's checkpoint to another with mutated values: only keys
#: that leave the network and the env layout as they are.
PBT_MUTABLE = ("lr", "gamma", "train_batch_size", "minibatch_size", "num_epochs")
#: The metric every scheduler and the best-trial choice use (maximised).
METRIC = "episode_return_mean"
MAX_TRIALS = 256
MAX_VALUES = 64


class TuneSpecError(ValueError):
    """The Tune spec is invalid; the message starts with the field (``tune.<...>:``)."""


def _int(value: Any, field: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise TuneSpecError(f"{field}: must be an integer from {low} to {high}, got {value!r}")
    return value


def _check_value(base: Mapping[str, Any], key: str, value: Any, field: str) -> Any:
    """``value`` for config key ``key``, checked by the training config's own schema."""
    try:
        checked = tc.validate_config({**base, key: value})
    except tc.ConfigError as exc:
        # The schema's own words, under the sweep's field name.
        raise TuneSpecError(f"{field}: {str(exc).partition(': ')[2]}") from exc
    out = getattr(checked, key)
    return list(out) if isinstance(out, tuple) else out


def _check_dimension(base: Mapping[str, Any], key: str, dim: Any, field: str) -> dict[str, Any]:
    if not isinstance(dim, Mapping) or len(dim) != 1 or next(iter(dim)) not in KINDS:
        raise TuneSpecError(
            f"{field}: must be one of {{'grid': [...]}}, {{'choice': [...]}}, "
            f"{{'loguniform': [low, high]}}, got {dim!r}"[:300]
        )
    kind, values = next(iter(dim.items()))
    where = f"{field}.{kind}"
    if kind == "loguniform":
        if tc.SCHEMA["properties"][key]["type"] != "number":
            raise TuneSpecError(f"{where}: {key} is not a real number; use grid or choice")
        if not isinstance(values, list | tuple) or len(values) != 2:
            raise TuneSpecError(f"{where}: must be [low, high], got {values!r}")
        low, high = (_check_value(base, key, v, f"{where}[{i}]") for i, v in enumerate(values))
        if not 0 < low < high:
            raise TuneSpecError(f"{where}: needs 0 < low < high, got [{low!r}, {high!r}]")
        return {"loguniform": [float(low), float(high)]}
    if not isinstance(values, list | tuple) or not 1 <= len(values) <= MAX_VALUES:
        raise TuneSpecError(f"{where}: must be a list of 1 to {MAX_VALUES} values, got {values!r}")
    checked = [_check_value(base, key, v, f"{where}[{i}]") for i, v in enumerate(values)]
    return {kind: checked}


def _check_search(base: Mapping[str, Any], search: Any, scheduler: str) -> dict[str, Any]:
    if not isinstance(search, Mapping) or not search:
        raise TuneSpecError(
            f"tune.search: must be a non-empty mapping of config keys ({', '.join(TUNABLE)}) "
            "to {'grid'|'choice'|'loguniform': ...}"
        )
    out: dict[str, Any] = {}
    for key, dim in search.items():
        field = f"tune.search.{key}"
        if key not in TUNABLE:
            raise TuneSpecError(f"{field}: not a tunable key; tunable: {', '.join(TUNABLE)}")
        if scheduler == "pbt" and key not in PBT_MUTABLE:
            raise TuneSpecError(
                f"{field}: pbt cannot mutate {key} (a checkpoint moves between trials); "
                f"pbt can vary: {', '.join(PBT_MUTABLE)}"
            )
        out[key] = _check_dimension(base, key, dim, field)
    return out


def validate_tune(tune: Any, base: Mapping[str, Any]) -> dict[str, Any]:
    """The checked, normalised spec (``trials``: how many trials it makes).

    ``base`` is the training config the trials share (already valid); a
    searched key replaces its value there.

    :raises TuneSpecError: naming the field.
    """
    if not isinstance(tune, Mapping):
        raise TuneSpecError(f"tune: must be a mapping, got {type(tune).__name__}")
    # "trials" is ours (a checked spec is checked again on the cluster); recomputed.
    known = {"search", "num_samples", "scheduler", "max_concurrent_trials", "trials"}
    unknown = sorted(set(tune) - known)
    if unknown:
        raise TuneSpecError(f"tune.{unknown[0]}: unknown field")
    scheduler = tune.get("scheduler", "fifo")
    if scheduler not in SCHEDULERS:
        raise TuneSpecError(
            f"tune.scheduler: must be one of {', '.join(SCHEDULERS)}, got {scheduler!r}"
        )
    stop = base.get("stop") or {}
    if scheduler == "asha" and not stop.get("iterations"):
        # ASHA's rungs are iteration counts up to max_t.
        raise TuneSpecError("tune.scheduler: asha needs stop.iterations (its max_t)")
    spec = {
        "search": _check_search(base, tune.get("search"), scheduler),
        "num_samples": _int(tune.get("num_samples", 1), "tune.num_samples", 1, MAX_TRIALS),
        "scheduler": scheduler,
        "max_concurrent_trials": _int(
            tune.get("max_concurrent_trials", 0), "tune.max_concurrent_trials", 0, MAX_TRIALS
        ),
    }
    spec["trials"] = trial_count(spec)
    if spec["trials"] > MAX_TRIALS:
        raise TuneSpecError(
            f"tune.num_samples: {spec['num_samples']} samples x the grid make "
            f"{spec['trials']} trials, more than {MAX_TRIALS}"
        )
    return spec


def trial_count(spec: Mapping[str, Any]) -> int:
    """Trials of a checked spec: ``num_samples`` times the product of the grid sizes."""
    grids = [len(d["grid"]) for d in spec["search"].values() if "grid" in d]
    return int(spec["num_samples"]) * math.prod(grids)
