"""The training config schema: defaults, validation messages, purity."""

from __future__ import annotations

import ast
import dataclasses
import json
import sys
from typing import Any

import pytest
from slurm_ray import training_config as tc
from slurm_ray.training_config import ConfigError, TrainingConfig, validate_config


def test_defaults_are_valid_and_round_trip() -> None:
    cfg = validate_config({})
    assert cfg == TrainingConfig()
    d = cfg.to_dict()
    assert json.loads(json.dumps(d)) == d  # JSON-ready
    assert validate_config(d) == cfg
    assert d["hidden_sizes"] == [64, 64]
    assert d["stop"] == {
        "iterations": 100,
        "env_steps": None,
        "return_mean": 450.0,
        "minutes": 30.0,
    }


def test_config_is_frozen() -> None:
    cfg: Any = TrainingConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0


@pytest.mark.parametrize(
    ("algorithm", "expected"),
    [
        ("PPO", {"train_batch_size": 4000, "minibatch_size": 128, "num_epochs": 6}),
        ("DQN", {"train_batch_size": 32, "minibatch_size": None, "num_epochs": None}),
    ],
)
def test_resolved_fills_algorithm_defaults(algorithm: str, expected: dict[str, Any]) -> None:
    eff = validate_config({"algorithm": algorithm}).resolved()
    assert {k: getattr(eff, k) for k in expected} == expected
    # Explicit values win over the algorithm defaults.
    small = validate_config({"algorithm": algorithm, "train_batch_size": 64}).resolved()
    assert small.train_batch_size == 64
    if algorithm == "PPO":  # the default minibatch shrinks to fit a small batch
        assert small.minibatch_size == 64


@pytest.mark.parametrize(
    ("config", "field", "fragment"),
    [
        ({"lr": -1}, "lr", "config.lr: must be > 0, got -1"),
        ({"lr": 0}, "lr", "must be > 0"),
        ({"lr": "fast"}, "lr", "must be a number, got 'fast'"),
        ({"lr": float("nan")}, "lr", "must be finite"),
        ({"algorithm": "A2C"}, "algorithm", "must be one of PPO, DQN, got 'A2C'"),
        ({"env_id": "Cart Pole"}, "env_id", "gymnasium env id"),
        ({"env_id": ""}, "env_id", "gymnasium env id"),
        ({"env_id": 3}, "env_id", "gymnasium env id"),
        ({"num_env_runners": -1}, "num_env_runners", "must be >= 0, got -1"),
        ({"num_env_runners": True}, "num_env_runners", "must be an integer, got True"),
        ({"num_env_runners": 1.5}, "num_env_runners", "must be an integer"),
        ({"num_envs_per_env_runner": 0}, "num_envs_per_env_runner", "must be >= 1"),
        ({"num_learners": -2}, "num_learners", "must be >= 0"),
        ({"num_gpus_per_learner": -0.5}, "num_gpus_per_learner", "must be >= 0"),
        ({"train_batch_size": 0}, "train_batch_size", "must be >= 1"),
        ({"minibatch_size": 0}, "minibatch_size", "must be >= 1"),
        ({"num_epochs": 0}, "num_epochs", "must be >= 1"),
        ({"gamma": 1.01}, "gamma", "between 0 and 1"),
        ({"gamma": -0.1}, "gamma", "between 0 and 1"),
        ({"hidden_sizes": []}, "hidden_sizes", "non-empty list"),
        ({"hidden_sizes": "64,64"}, "hidden_sizes", "non-empty list"),
        ({"hidden_sizes": [64, 0]}, "hidden_sizes[1]", "must be >= 1, got 0"),
        ({"seed": -1}, "seed", "must be >= 0"),
        ({"seed": "x"}, "seed", "must be an integer"),
        ({"stop": {}}, "stop", "at least one of iterations, env_steps, return_mean, minutes"),
        ({"stop": {"iterations": None}}, "stop", "at least one of"),
        ({"stop": 5}, "stop", "must be a mapping"),
        ({"stop": {"iterations": 0}}, "stop.iterations", "must be >= 1, got 0"),
        ({"stop": {"env_steps": -5}}, "stop.env_steps", "must be >= 1"),
        ({"stop": {"minutes": 0}}, "stop.minutes", "must be > 0"),
        ({"stop": {"return_mean": float("inf")}}, "stop.return_mean", "must be finite"),
        ({"checkpoint_every": 0}, "checkpoint_every", "must be >= 1"),
        ({"keep_checkpoints": 0}, "keep_checkpoints", "must be >= 1"),
        ({"eval_episodes": -1}, "eval_episodes", "must be >= 0"),
        ({"lr": None}, "lr", "must be a number, got None"),
        ({"algorithm": "dqn", "num_epochs": 3}, "num_epochs", "only applies to PPO, not DQN"),
        ({"algorithm": "DQN", "minibatch_size": 8}, "minibatch_size", "only applies to PPO"),
        ({"minibatch_size": 5000}, "minibatch_size", "must be <= train_batch_size (4000)"),
        (
            {"train_batch_size": 100, "minibatch_size": 128},
            "minibatch_size",
            "must be <= train_batch_size (100), got 128",
        ),
    ],
)
def test_errors_name_the_field(config: dict[str, Any], field: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate_config(config)
    assert info.value.field == field
    assert str(info.value).startswith(f"config.{field}: ")
    assert fragment in str(info.value)
    assert isinstance(info.value, ValueError)  # callers may catch ValueError


def test_unknown_keys_are_listed_with_the_valid_ones() -> None:
    with pytest.raises(ConfigError) as info:
        validate_config({"lr": 1e-3, "learning_rate": 1e-3, "epochs": 3})
    msg = str(info.value)
    assert msg.startswith("config.epochs, config.learning_rate: unknown keys; valid keys: ")
    for name in tc.FIELD_NAMES:
        assert name in msg

    with pytest.raises(ConfigError) as info:
        validate_config({"stop": {"iterations": 3, "hours": 1}})
    assert info.value.field == "stop.hours"
    assert str(info.value) == (
        "config.stop.hours: unknown key; valid keys: iterations, env_steps, return_mean, minutes"
    )


def test_not_a_mapping() -> None:
    not_a_mapping: Any = [("lr", 1)]
    with pytest.raises(ConfigError, match=r"^config: must be a mapping, got list$"):
        validate_config(not_a_mapping)


def test_normalisation() -> None:
    cfg = validate_config(
        {
            "algorithm": "ppo",
            "hidden_sizes": [32.0, 16],
            "stop": {"env_steps": 1e6},
            "num_gpus_per_learner": 0.5,
            "num_env_runners": None,
            "seed": 7,
        }
    )
    assert cfg.algorithm == "PPO"
    assert cfg.hidden_sizes == (32, 16)
    assert cfg.stop == tc.StopCriteria(None, 1_000_000, None, None)
    assert isinstance(cfg.stop.env_steps, int)
    assert cfg.num_gpus_per_learner == 0.5
    assert cfg.num_env_runners is None
    assert cfg.seed == 7


def test_stop_replaces_the_default_as_a_whole() -> None:
    cfg = validate_config({"stop": {"iterations": 3}})
    assert cfg.stop.to_dict() == {
        "iterations": 3,
        "env_steps": None,
        "return_mean": None,
        "minutes": None,
    }


def test_negative_return_target_is_allowed() -> None:
    # Pendulum-like environments have negative returns.
    assert validate_config({"stop": {"return_mean": -200}}).stop.return_mean == -200


@pytest.mark.parametrize(
    "env_id",
    ["CartPole-v1", "CartPole-v0", "LunarLander-v3", "ale_py:ALE/Breakout-v5",
     "my_pkg.envs:Grid-v0", "MountainCarContinuous-v0", "GymV26Environment-v0", "Custom"],
)  # fmt: skip
def test_env_id_patterns_accepted(env_id: str) -> None:
    allowed = ("ale_py", "my_pkg.envs")  # module: ids need the profile's allowance
    assert validate_config({"env_id": env_id}, env_modules=allowed).env_id == env_id


@pytest.mark.parametrize(
    "env_id", ["Cart Pole-v1", "CartPole-v1;rm -rf /", ":Name-v0", "a:b:c-v0", "-v1", "x/"]
)
def test_env_id_patterns_rejected(env_id: str) -> None:
    with pytest.raises(ConfigError, match=r"^config\.env_id: "):
        validate_config({"env_id": env_id})


def test_module_is_pure_stdlib() -> None:
    """It is copied alone next to the driver: no relative imports, nothing third-party
    but jsonschema, which Ray installs on the cluster (tests/cluster_side check that)."""
    with open(tc.__file__) as f:
        tree = ast.parse(f.read())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import"
            imported.add((node.module or "").split(".")[0])
    assert imported <= set(sys.stdlib_module_names) | {"__future__", "jsonschema"}, imported
