"""The training config: schema, defaults and validation (pure stdlib).

This one module is shared by both sides of the project. The Airflow side
imports it as ``slurm_ray.training_config`` to reject bad Params before
anything touches the cluster; the same file is uploaded next to
``include/train.py`` into each job's run directory, where the driver imports
it as the top-level module ``training_config``. Hence: no imports beyond the
standard library, no relative imports, Python >= 3.10.

Defaults (chosen for PPO on CartPole-v1; measured on a 2-core machine, 2 env
runners x 8 envs: ~5,000 env steps/s, return 450 after ~76k steps / ~15 s):

=========================  ================  =====================================
field                      default           meaning
=========================  ================  =====================================
algorithm                  "PPO"             "PPO" or "DQN" (case-insensitive)
env_id                     "CartPole-v1"     gymnasium id, ``[module:][ns/]Name[-vN]``
num_env_runners            None              None = every CPU of the Ray cluster
                                             not taken by Learner actors
num_envs_per_env_runner    8                 vectorised envs per runner (>= 1)
num_learners               0                 0 = learn in the driver process
num_gpus_per_learner       0                 >= 0 (fractions allowed)
lr                         3e-4              > 0 (RLlib's PPO default 5e-5 is slow)
train_batch_size           None              >= 1; None = PPO 4000, DQN 32
minibatch_size             None              PPO only; None = min(128, train_batch_size)
num_epochs                 None              PPO only; None = 6 (RLlib's 30 is
                                             ~5x slower per iteration on CPU)
gamma                      0.99              0 <= gamma <= 1
hidden_sizes               [64, 64]          MLP hidden layer sizes
seed                       None              int or None
stop                       iterations 100,   whichever comes first; at least one
                           return_mean 450,  key; iterations/env_steps/minutes > 0,
                           minutes 30        return_mean any finite number
checkpoint_every           10                iterations between checkpoints (>= 1)
keep_checkpoints           3                 newest checkpoints kept (>= 1)
eval_episodes              10                greedy evaluation episodes (>= 0)
=========================  ================  =====================================

A given ``stop`` mapping replaces the default one as a whole (it is not merged).
Counters continue across resumes: ``iterations`` and ``env_steps`` are lifetime
counts, ``minutes`` is training time summed over all attempts of the run.
``None`` is accepted only for the fields whose default is ``None``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

__all__ = [
    "ALGORITHMS",
    "ALGORITHM_DEFAULTS",
    "ConfigError",
    "StopCriteria",
    "TrainingConfig",
    "check_env_module",
    "validate_config",
]

ALGORITHMS = ("PPO", "DQN")

#: What a ``None`` hyperparameter means, per algorithm (see ``TrainingConfig.resolved``).
ALGORITHM_DEFAULTS: dict[str, dict[str, int]] = {
    "PPO": {"train_batch_size": 4000, "minibatch_size": 128, "num_epochs": 6},
    "DQN": {"train_batch_size": 32},
}

#: Fields only PPO understands; giving them for another algorithm is an error
#: rather than being silently ignored.
_PPO_ONLY = ("minibatch_size", "num_epochs")

# gymnasium ids: optional importable module prefix ("ale_py:"), optional
# namespace ("ALE/"), a name, an optional version ("-v5").
# Matched with fullmatch: `$` would accept a trailing newline.
_ENV_ID_RE = re.compile(
    r"(?:([A-Za-z_][\w.]*):)?(?:[A-Za-z0-9_][\w.-]*/)?[A-Za-z0-9_][\w.-]*?(?:-v\d+)?", re.ASCII
)


class ConfigError(ValueError):
    """A config value is invalid; ``field`` names it (e.g. ``"stop.minutes"``)."""

    def __init__(self, field: str, message: str, *, label: str | None = None) -> None:
        self.field = field
        if label is None:
            label = f"config.{field}" if field else "config"
        super().__init__(f"{label}: {message}")


@dataclass(frozen=True)
class StopCriteria:
    """Stop when any given criterion is reached (whichever comes first)."""

    iterations: int | None = 100
    env_steps: int | None = None
    return_mean: float | None = 450.0
    minutes: float | None = 30.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TrainingConfig:
    """A validated training config; build it with :func:`validate_config`."""

    algorithm: str = "PPO"
    env_id: str = "CartPole-v1"
    num_env_runners: int | None = None
    num_envs_per_env_runner: int = 8
    num_learners: int = 0
    num_gpus_per_learner: float = 0
    lr: float = 3e-4
    train_batch_size: int | None = None
    minibatch_size: int | None = None
    num_epochs: int | None = None
    gamma: float = 0.99
    hidden_sizes: tuple[int, ...] = (64, 64)
    seed: int | None = None
    stop: StopCriteria = field(default_factory=StopCriteria)
    checkpoint_every: int = 10
    keep_checkpoints: int = 3
    eval_episodes: int = 10

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; ``validate_config(c.to_dict()) == c``."""
        d = asdict(self)
        d["hidden_sizes"] = list(self.hidden_sizes)
        return d

    def resolved(self) -> TrainingConfig:
        """A copy with algorithm-dependent ``None`` hyperparameters filled in."""
        filled: dict[str, Any] = {
            k: v for k, v in ALGORITHM_DEFAULTS[self.algorithm].items() if getattr(self, k) is None
        }
        batch = filled.get("train_batch_size", self.train_batch_size)
        if "minibatch_size" in filled and batch is not None:
            # A small explicit batch must not clash with the default minibatch.
            filled["minibatch_size"] = min(filled["minibatch_size"], batch)
        return replace(self, **filled)


FIELD_NAMES = tuple(f.name for f in fields(TrainingConfig))
STOP_NAMES = tuple(f.name for f in fields(StopCriteria))


# --- checkers: each returns the normalised value or raises ConfigError ---------


def _int(name: str, value: Any, minimum: int) -> int:
    # bool is an int subclass: `true` in a form must not become 1.
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # JSON/UI forms may send 1e6 or 3.0
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(name, f"must be an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(name, f"must be >= {minimum}, got {value!r}")
    return value


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(name, f"must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(name, f"must be finite, got {value!r}")
    return value


def _positive(name: str, value: Any) -> float:
    value = _number(name, value)
    if value <= 0:
        raise ConfigError(name, f"must be > 0, got {value!r}")
    return value


def _algorithm(name: str, value: Any) -> str:
    if not isinstance(value, str) or value.upper() not in ALGORITHMS:
        raise ConfigError(name, f"must be one of {', '.join(ALGORITHMS)}, got {value!r}")
    return value.upper()


def check_env_module(name: str, env_id: str, env_modules: Collection[str]) -> None:
    """Refuse a ``module:Name`` id unless ``module`` is allowed (gymnasium imports it)."""
    module, sep, _ = env_id.partition(":")
    if sep and module not in env_modules:
        allowed = ", ".join(sorted(env_modules)) or "none"
        raise ConfigError(
            name,
            f"module {module!r} of {env_id!r} is not allowed: gymnasium would import it on the "
            f"cluster; a profile's env_modules must list it (allowed: {allowed})",
        )


def _env_id(name: str, value: Any) -> str:
    if not isinstance(value, str) or not _ENV_ID_RE.fullmatch(value):
        raise ConfigError(
            name,
            f"must be a gymnasium env id like 'CartPole-v1' or 'module:Name-v0', got {value!r}",
        )
    return value


def _gamma(name: str, value: Any) -> float:
    value = _number(name, value)
    if not 0 <= value <= 1:
        raise ConfigError(name, f"must be between 0 and 1, got {value!r}")
    return value


def _gpus(name: str, value: Any) -> float:
    value = _number(name, value)
    if value < 0:
        raise ConfigError(name, f"must be >= 0, got {value!r}")
    return value


def _hidden_sizes(name: str, value: Any) -> tuple[int, ...]:
    if isinstance(value, str | bytes) or not isinstance(value, list | tuple) or not value:
        raise ConfigError(name, f"must be a non-empty list of positive integers, got {value!r}")
    return tuple(_int(f"{name}[{i}]", v, 1) for i, v in enumerate(value))


def _seed(name: str, value: Any) -> int:
    return _int(name, value, 0)


def _stop(name: str, value: Any) -> StopCriteria:
    if not isinstance(value, Mapping):
        raise ConfigError(name, f"must be a mapping with keys {', '.join(STOP_NAMES)}")
    _reject_unknown(value, STOP_NAMES, prefix=f"{name}.")
    out: dict[str, Any] = dict.fromkeys(STOP_NAMES)
    for key, raw in value.items():
        if raw is None:
            continue
        if key in ("iterations", "env_steps"):
            out[key] = _int(f"{name}.{key}", raw, 1)
        elif key == "minutes":
            out[key] = _positive(f"{name}.{key}", raw)
        else:
            # Returns may be negative (Pendulum, MountainCar): only finiteness matters.
            out[key] = _number(f"{name}.{key}", raw)
    if all(v is None for v in out.values()):
        raise ConfigError(name, f"at least one of {', '.join(STOP_NAMES)} is required")
    return StopCriteria(**out)


def _ge(minimum: int) -> Any:
    return lambda name, value: _int(name, value, minimum)


_CHECKS: dict[str, Any] = {
    "algorithm": _algorithm,
    "env_id": _env_id,
    "num_env_runners": _ge(0),
    "num_envs_per_env_runner": _ge(1),
    "num_learners": _ge(0),
    "num_gpus_per_learner": _gpus,
    "lr": _positive,
    "train_batch_size": _ge(1),
    "minibatch_size": _ge(1),
    "num_epochs": _ge(1),
    "gamma": _gamma,
    "hidden_sizes": _hidden_sizes,
    "seed": _seed,
    "stop": _stop,
    "checkpoint_every": _ge(1),
    "keep_checkpoints": _ge(1),
    "eval_episodes": _ge(0),
}
_NULLABLE = frozenset(
    f.name for f in fields(TrainingConfig) if f.default is None and f.name != "stop"
)


def _reject_unknown(d: Mapping[str, Any], valid: tuple[str, ...], prefix: str = "") -> None:
    unknown = sorted(str(k) for k in d if k not in valid)
    if unknown:
        what = "unknown key" if len(unknown) == 1 else "unknown keys"
        raise ConfigError(
            f"{prefix}{unknown[0]}",
            f"{what}; valid keys: {', '.join(valid)}",
            label=", ".join(f"config.{prefix}{k}" for k in unknown),
        )


def validate_config(d: Mapping[str, Any], *, env_modules: Collection[str] = ()) -> TrainingConfig:
    """Check ``d`` field by field and return the :class:`TrainingConfig`.

    Missing keys take their defaults. Raises :class:`ConfigError` whose message
    starts with ``config.<field>:``.

    :param env_modules: modules a ``module:Name`` env id may import (none by default).
    """
    if not isinstance(d, Mapping):
        raise ConfigError("", f"must be a mapping, got {type(d).__name__}")
    _reject_unknown(d, FIELD_NAMES)
    values: dict[str, Any] = {}
    for key, raw in d.items():
        if raw is None and key in _NULLABLE:
            values[key] = None
        else:
            values[key] = _CHECKS[key](key, raw)
    cfg = TrainingConfig(**values)
    check_env_module("env_id", cfg.env_id, env_modules)

    if cfg.algorithm != "PPO":
        for key in _PPO_ONLY:
            if getattr(cfg, key) is not None:
                raise ConfigError(key, f"only applies to PPO, not {cfg.algorithm}")
    eff = cfg.resolved()
    if (
        eff.minibatch_size is not None
        and eff.train_batch_size is not None
        and eff.minibatch_size > eff.train_batch_size
    ):
        raise ConfigError(
            "minibatch_size",
            f"must be <= train_batch_size ({eff.train_batch_size}), got {eff.minibatch_size}",
        )
    return cfg
