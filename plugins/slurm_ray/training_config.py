"""The training config: its JSON Schema, defaults and validation.

This one module is shared by both sides of the project. The Airflow side
imports it as ``slurm_ray.training_config`` to reject bad Params (which are
generated from :data:`SCHEMA`) before anything touches the cluster; the same
file is uploaded next to ``include/train.py`` into each job's run directory,
where the driver imports it as the top-level module ``training_config`` and
checks ``config.json`` against the same schema. Hence: the standard library
plus ``jsonschema`` (Airflow ships it; the cluster venv has it through Ray),
imported only to validate; no relative imports; Python >= 3.10.

Fields, types, ranges and defaults: :data:`SCHEMA`, one description each. The
defaults suit PPO on CartPole-v1 (measured on a 2-core machine, 2 env runners x
8 envs: ~5,000 env steps/s, return 450 after ~76k steps / ~15 s).
A given ``stop`` mapping replaces the default one as a whole (it is not merged).
Counters continue across resumes: ``iterations`` and ``env_steps`` are lifetime
counts, ``minutes`` is training time summed over all attempts of the run.
``None`` is accepted only for the fields whose default is ``None``.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

__all__ = [
    "ALGORITHMS",
    "ALGORITHM_DEFAULTS",
    "ENV_ID_PATTERN",
    "SCHEMA",
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

#: gymnasium ids: optional importable module prefix ("ale_py:"), optional
#: namespace ("ALE/"), a name (with an optional version "-v5"). Written for
#: Python, JSON Schema and JavaScript alike: `$` alone would accept a trailing newline.
ENV_ID_PATTERN = (
    r"^(?:[A-Za-z_][A-Za-z0-9_.]*:)?(?:[A-Za-z0-9_][A-Za-z0-9_.-]*/)?"
    r"[A-Za-z0-9_][A-Za-z0-9_.-]*$(?!\n)"
)


def _field(kind: str, default: Any, description: str, **rules: Any) -> dict[str, Any]:
    """One property of JSON type ``kind``; a ``None`` default also allows null."""
    nullable = [kind, "null"] if default is None else kind
    return {"type": nullable, "default": default, "description": description, **rules}


_BETWEEN_0_1 = {"minimum": "must be between 0 and 1", "maximum": "must be between 0 and 1"}
_SIZES = "must be a non-empty list of positive integers"
_STOP_PROPERTIES: dict[str, Any] = {
    "iterations": _field(
        "integer", None, "Stop after this many training iterations.", minimum=1, maximum=1_000_000
    ),
    "env_steps": _field("integer", None, "Stop after this many environment steps.", minimum=1),
    # Returns may be negative (Pendulum, MountainCar): only finiteness matters.
    "return_mean": _field("number", None, "Stop when the mean episode return reaches this."),
    "minutes": _field(
        "number", None, "Stop after this many minutes of training (wall clock).", exclusiveMinimum=0
    ),
}
_STOP_KEYS = ", ".join(_STOP_PROPERTIES)

#: The training config's JSON Schema (Draft 2020-12): the one source of its
#: fields, types, ranges and defaults. The DAG Params are generated from it
#: (:mod:`slurm_ray.params`); :func:`validate_config` checks it on both sides.
#: ``errorMessage`` (the ajv-errors convention; validators ignore it) words an
#: error of the keyword it names.
SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "slurm_ray training config",
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "algorithm": _field(
            "string", "PPO", "RLlib algorithm (current API stack); any case.", enum=list(ALGORITHMS)
        ),
        "env_id": _field(
            "string",
            "CartPole-v1",
            "Gymnasium environment id.",
            maxLength=200,
            pattern=ENV_ID_PATTERN,
            errorMessage="must be a gymnasium env id like 'CartPole-v1' or 'module:Name-v0'",
        ),
        "num_env_runners": _field(
            "integer",
            None,
            "Ray env-runner actors (spread over the nodes); null = all CPUs.",
            minimum=0,
            maximum=100_000,
        ),
        "num_envs_per_env_runner": _field(
            "integer", 8, "Vectorised environments per env runner.", minimum=1, maximum=1024
        ),
        "num_learners": _field("integer", 0, "Learner actors; 0 = learn in the driver.", minimum=0),
        "num_gpus_per_learner": _field(
            "number", 0, "GPUs per learner (fractions allowed).", minimum=0
        ),
        "lr": _field(
            "number",
            3e-4,
            "Learning rate (RLlib's PPO default 5e-5 learns slowly).",
            exclusiveMinimum=0,
            maximum=1,
        ),
        "train_batch_size": _field(
            "integer",
            None,
            "Env steps per training iteration; null = PPO 4000, DQN 32.",
            minimum=1,
            maximum=10_000_000,
        ),
        "minibatch_size": _field(
            "integer", None, "PPO only; null = min(128, train_batch_size).", minimum=1
        ),
        "num_epochs": _field(
            "integer", None, "PPO only; null = 6 (RLlib's 30 is ~5x slower on CPU).", minimum=1
        ),
        "gamma": _field(
            "number", 0.99, "Discount factor.", minimum=0, maximum=1, errorMessage=_BETWEEN_0_1
        ),
        "hidden_sizes": _field(
            "array",
            [64, 64],
            "MLP hidden layer sizes.",
            minItems=1,
            items={"type": "integer", "minimum": 1},
            errorMessage={"type": _SIZES, "minItems": _SIZES},
        ),
        "seed": _field("integer", None, "Random seed (null: random).", minimum=0),
        "stop": _field(
            "object",
            {"iterations": 100, "env_steps": None, "return_mean": 450.0, "minutes": 30.0},
            "Stop when any criterion is reached; replaces the default as a whole.",
            additionalProperties=False,
            properties=_STOP_PROPERTIES,
            anyOf=[
                {"required": [k], "properties": {k: {"not": {"type": "null"}}}}
                for k in _STOP_PROPERTIES
            ],
            errorMessage={
                "type": f"must be a mapping with keys {_STOP_KEYS}",
                "anyOf": f"at least one of {_STOP_KEYS} is required",
            },
        ),
        "checkpoint_every": _field("integer", 10, "Checkpoint every k iterations.", minimum=1),
        "keep_checkpoints": _field("integer", 3, "Newest checkpoints kept.", minimum=1),
        "eval_episodes": _field("integer", 10, "Greedy evaluation episodes.", minimum=0),
    },
}

_PROPS: dict[str, Any] = SCHEMA["properties"]
_STOP_DEFAULT: dict[str, Any] = _PROPS["stop"]["default"]


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

    iterations: int | None = _STOP_DEFAULT["iterations"]
    env_steps: int | None = _STOP_DEFAULT["env_steps"]
    return_mean: float | None = _STOP_DEFAULT["return_mean"]
    minutes: float | None = _STOP_DEFAULT["minutes"]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _default(name: str) -> Any:
    return _PROPS[name]["default"]


@dataclass(frozen=True)
class TrainingConfig:
    """A validated training config; build it with :func:`validate_config`."""

    algorithm: str = _default("algorithm")
    env_id: str = _default("env_id")
    num_env_runners: int | None = _default("num_env_runners")
    num_envs_per_env_runner: int = _default("num_envs_per_env_runner")
    num_learners: int = _default("num_learners")
    num_gpus_per_learner: float = _default("num_gpus_per_learner")
    lr: float = _default("lr")
    train_batch_size: int | None = _default("train_batch_size")
    minibatch_size: int | None = _default("minibatch_size")
    num_epochs: int | None = _default("num_epochs")
    gamma: float = _default("gamma")
    hidden_sizes: tuple[int, ...] = tuple(_default("hidden_sizes"))
    seed: int | None = _default("seed")
    stop: StopCriteria = field(default_factory=StopCriteria)
    checkpoint_every: int = _default("checkpoint_every")
    keep_checkpoints: int = _default("keep_checkpoints")
    eval_episodes: int = _default("eval_episodes")

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


# --- schema errors -> ConfigError ----------------------------------------------

_TYPE_WORDS = {"integer": "an integer", "number": "a number", "string": "a string"}


def _path(parts: Any) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).lstrip(".")


def config_error(error: Any) -> ConfigError:
    """The :class:`ConfigError` for a ``jsonschema`` error, worded as the field's checks."""
    name, value, keyword = _path(error.absolute_path), error.instance, error.validator
    schema, limit = error.schema, error.validator_value
    if keyword == "additionalProperties":
        valid = tuple(schema["properties"])
        unknown = sorted(str(k) for k in value if k not in valid)
        prefix = f"{name}." if name else ""
        what = "unknown key" if len(unknown) == 1 else "unknown keys"
        label = ", ".join(f"config.{prefix}{k}" for k in unknown)
        return ConfigError(
            f"{prefix}{unknown[0]}", f"{what}; valid keys: {', '.join(valid)}", label=label
        )
    custom = schema.get("errorMessage")
    custom = custom.get(keyword) if isinstance(custom, dict) else custom
    if custom:
        message = custom if keyword == "anyOf" else f"{custom}, got {value!r}"
    elif keyword == "type":
        kinds = [limit] if isinstance(limit, str) else [k for k in limit if k != "null"]
        message = f"must be {_TYPE_WORDS.get(kinds[0], kinds[0])}, got {value!r}"
    elif keyword == "enum":
        message = f"must be one of {', '.join(map(str, limit))}, got {value!r}"
    else:
        op = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=", "exclusiveMaximum": "<"}
        message = (
            f"must be {op[keyword]} {limit}, got {value!r}" if keyword in op else error.message
        )
    return ConfigError(name, message)


def _schema_check(d: Mapping[str, Any]) -> None:
    from jsonschema import Draft202012Validator

    errors = list(Draft202012Validator(SCHEMA).iter_errors(d))
    if errors:
        # Unknown keys first, then the first field in the config's order.
        order = {k: i for i, k in enumerate(d)}
        errors.sort(
            key=lambda e: (
                e.validator != "additionalProperties",
                order.get(e.path[0], -1) if e.path else -1,
            )
        )
        raise config_error(errors[0])


def _integers(value: Any, schema: Mapping[str, Any]) -> Any:
    """JSON and UI forms may send 1e6 or 3.0 for an integer: make it an int."""
    kind = schema.get("type")
    if isinstance(value, float) and (kind == "integer" or "integer" in (kind or ())):
        return int(value)
    if isinstance(value, list) and "items" in schema:
        return tuple(_integers(v, schema["items"]) for v in value)
    if isinstance(value, Mapping) and "properties" in schema:
        return {k: _integers(v, schema["properties"][k]) for k, v in value.items()}
    return value


def _check_finite(values: Mapping[str, Any], prefix: str = "") -> None:
    for key, value in values.items():
        if isinstance(value, Mapping):
            _check_finite(value, f"{prefix}{key}.")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{prefix}{key}", f"must be finite, got {value!r}")


def validate_config(d: Mapping[str, Any], *, env_modules: Collection[str] = ()) -> TrainingConfig:
    """Check ``d`` against :data:`SCHEMA` and the cross-field rules; return the config.

    Missing keys take their defaults. Raises :class:`ConfigError` whose message
    starts with ``config.<field>:``.

    :param env_modules: modules a ``module:Name`` env id may import (none by default).
    """
    if not isinstance(d, Mapping):
        raise ConfigError("", f"must be a mapping, got {type(d).__name__}")
    d = dict(d)
    if isinstance(d.get("algorithm"), str):
        d["algorithm"] = d["algorithm"].upper()
    _schema_check(d)
    values = _integers(d, SCHEMA)
    _check_finite(values)
    if "stop" in values:
        values["stop"] = StopCriteria(**{k: values["stop"].get(k) for k in STOP_NAMES})
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


def learners_for_gpus(config: Mapping[str, Any], learner_gpus: int) -> dict[str, Any]:
    """``config`` with its learners on the ``learner_gpus`` GPUs of a GPU hetjob.

    Learner fields left at 0 become one learner per GPU; learners given
    explicitly must fit in, and use, those GPUs. Raises :class:`ConfigError`.
    """
    out = dict(config)
    if learner_gpus <= 0:
        return out
    learners, per = int(out.get("num_learners") or 0), float(out.get("num_gpus_per_learner") or 0)
    if learners == 0 and per == 0:
        return out | {"num_learners": learner_gpus, "num_gpus_per_learner": 1}
    if per == 0:
        raise ConfigError(
            "num_gpus_per_learner", f"0 leaves the learner_gpus={learner_gpus} GPUs unused"
        )
    if per * max(1, learners) > learner_gpus:
        raise ConfigError(
            "num_gpus_per_learner",
            f"{max(1, learners)} learner(s) x {per:g} GPUs exceed learner_gpus={learner_gpus}",
        )
    return out
