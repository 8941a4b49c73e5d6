"""Declarative validation (issue 14.5): one schema for the config, one rule per concept.

The training config's JSON Schema is the single source of the config Params;
the env-id and time rules are shared; the pydantic specs refuse unknown keys
and name the field. The cluster-side half is tests/cluster_side/test_config_schema.py.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from airflow.sdk import Param
from airflow.sdk.exceptions import AirflowException, ParamValidationError
from jsonschema import Draft202012Validator
from slurm_ray import params as params_mod
from slurm_ray import training_config as tc
from slurm_ray.params import NOT_PARAMS, RunParamError, check_params, config_params, param_specs
from slurm_ray.validation import validate_env_id

#: Param values the form refuses, with the config field that refuses them too.
REFUSED = [
    ("lr", 5, "lr"),
    ("lr", 0, "lr"),
    ("gamma", 1.5, "gamma"),
    ("seed", -1, "seed"),
    ("envs_per_runner", 0, "num_envs_per_env_runner"),
    ("num_env_runners", True, "num_env_runners"),
    ("stop_iterations", 0, "stop.iterations"),
    ("stop_minutes", 0, "stop.minutes"),
    ("stop_env_steps", 2.5, "stop.env_steps"),
    ("checkpoint_every", 0, "checkpoint_every"),
    ("keep_checkpoints", 0, "keep_checkpoints"),
    ("eval_episodes", -1, "eval_episodes"),
    ("algorithm", "A2C", "algorithm"),
]


def _config_of(param: str, value: Any) -> dict[str, Any]:
    path = config_params()[param]
    return {"stop": {path[1]: value}} if path[0] == "stop" else {path[0]: value}


def test_schema_is_a_valid_json_schema() -> None:
    Draft202012Validator.check_schema(tc.SCHEMA)
    assert json.loads(json.dumps(tc.SCHEMA)) == tc.SCHEMA  # plain JSON, no Python objects
    # the dataclass defaults are the schema's
    defaults = {k: p["default"] for k, p in tc.SCHEMA["properties"].items()}
    assert tc.TrainingConfig().to_dict() == defaults


def test_every_config_field_is_a_param_with_the_schema_rules() -> None:
    specs = param_specs()
    props = tc.SCHEMA["properties"]
    expected = {name for name in props if name not in NOT_PARAMS and name != "stop"}
    expected |= {f"stop_{k}" for k in props["stop"]["properties"]}
    expected = {"envs_per_runner" if n == "num_envs_per_env_runner" else n for n in expected}
    assert set(config_params()) == expected
    assert expected <= set(specs)
    for name, path in config_params().items():
        prop = props[path[0]] if len(path) == 1 else props["stop"]["properties"][path[1]]
        assert specs[name]["description"] == prop["description"]
        for keyword in ("minimum", "maximum", "exclusiveMinimum"):
            assert specs[name]["schema"].get(keyword) == prop.get(keyword), (name, keyword)


@pytest.mark.parametrize(("param", "value", "field"), REFUSED)
def test_form_and_config_refuse_the_same_value_naming_the_field(
    param: str, value: Any, field: str
) -> None:
    spec = param_specs()[param]
    with pytest.raises(ParamValidationError):
        Param(spec["default"], **spec["schema"]).resolve(value)
    with pytest.raises(RunParamError, match=rf"^{param}: "):
        check_params({param: value})
    with pytest.raises(tc.ConfigError) as info:
        tc.validate_config(_config_of(param, value))
    assert info.value.field == field


def test_a_field_added_to_the_schema_is_a_param_checked_on_both_sides(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    schema = copy.deepcopy(tc.SCHEMA)
    schema["properties"]["entropy_coeff"] = {
        "type": "number",
        "minimum": 0,
        "default": 0.0,
        "description": "Entropy bonus.",
    }
    monkeypatch.setattr(tc, "SCHEMA", schema)
    monkeypatch.setattr(params_mod, "SCHEMA", schema)
    spec = param_specs()["entropy_coeff"]
    assert spec == {
        "default": 0.0,
        "schema": {"type": "number", "minimum": 0},
        "description": "Entropy bonus.",
    }
    with pytest.raises(ParamValidationError):
        params_mod.airflow_params()["entropy_coeff"].resolve(-1)
    with pytest.raises(RunParamError, match=r"^entropy_coeff: "):
        check_params({"entropy_coeff": -1})
    with pytest.raises(tc.ConfigError, match=r"^config\.entropy_coeff: must be >= 0, got -1$"):
        tc.validate_config({"entropy_coeff": -1})


# -- one env-id rule -------------------------------------------------------------------

ENV_IDS = ["CartPole-v1", "ALE/Pong-v5", "my_envs:Grid-v0", "Custom", "a:b:c-v0", ":X-v0",
           "x/", "-v1", "Cart Pole", "CartPole-v1\n", "é-v0", "x" * 201, "a/b/c"]  # fmt: skip


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_sanity_check_and_training_accept_the_same_env_ids(env_id: str) -> None:
    modules = ("my_envs",)
    try:
        tc.validate_config({"env_id": env_id}, env_modules=modules)
        config_ok = True
    except tc.ConfigError:
        config_ok = False
    try:
        validate_env_id(env_id, modules)
        sanity_ok = True
    except AirflowException:
        sanity_ok = False
    assert sanity_ok == config_ok, env_id


# -- one time rule ----------------------------------------------------------------------

TIMES = ["30", "30:00", "1:5", "01:30:00", "2-0", "2-12:30", "UNLIMITED", "INFINITE",
         "99:99", "10:60", "2-24", "1h", "01:30:00\n", ""]  # fmt: skip


@pytest.mark.parametrize("value", TIMES)
def test_time_limit_param_and_job_spec_accept_the_same_times(value: str) -> None:
    from slurm_ray.utils.batch import JobSpec, JobSpecError

    spec = param_specs()["time_limit"]
    try:
        Param(spec["default"], **spec["schema"]).resolve(value)
        param_ok = True
    except ParamValidationError:
        param_ok = False
    try:
        JobSpec(job_name="x", time=value)
        job_ok = True
    except JobSpecError:
        job_ok = False
    assert param_ok == job_ok, value


def test_resolve_run_reads_every_accepted_time_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_RAY_MLFLOW_URI", "http://127.0.0.1:1")
    defaults = {name: spec["default"] for name, spec in param_specs().items()}
    for value in ("INFINITE", "2-0", "45"):
        assert (
            params_mod.resolve_run({**defaults, "time_limit": value})["job_spec"]["time"] == value
        )


# -- the pydantic specs ------------------------------------------------------------------


def test_specs_refuse_unknown_keys_naming_them() -> None:
    from slurm_ray.profiles import ClusterProfile, ProfileError
    from slurm_ray.utils.environment import EnvironmentSpec, EnvironmentSpecError

    with pytest.raises(EnvironmentSpecError, match=r"^environment: unknown key\(s\) 'prefx'"):
        EnvironmentSpec(kind="none", prefx="/x")
    with pytest.raises(ProfileError, match=r"^profile 'p': unknown key\(s\) 'cores'; valid"):
        ClusterProfile.from_dict("p", {"ssh_conn_id": "c", "cores": 4})
    with pytest.raises(ProfileError, match=r"^profile 'p': cores_per_node: must be >= 1, got 0"):
        ClusterProfile.from_dict("p", {"ssh_conn_id": "c", "cores_per_node": 0})
    with pytest.raises(ProfileError, match=r"^profile 'p': env_modules\[1\]: 'a b' is not a"):
        ClusterProfile(name="p", ssh_conn_id="c", env_modules=["ok", "a b"])
    with pytest.raises(ProfileError, match=r"^profile 'p': environment\.prefix: required"):
        ClusterProfile(name="p", ssh_conn_id="c", environment={"kind": "venv"})


def test_spec_models_are_frozen_and_compare_by_value() -> None:
    from pydantic import ValidationError
    from slurm_ray.utils.batch import JobSpec

    spec = JobSpec(job_name="x", extra={"nice": 5})
    with pytest.raises(ValidationError):
        spec.nodes = 3  # type: ignore[misc]
    assert spec == JobSpec.from_dict(spec.to_dict())
    with pytest.raises(TypeError):
        spec.extra["nice"] = "1"  # type: ignore[index]


def test_profiles_file_is_validated_naming_profile_and_field(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from slurm_ray.profiles import ProfileError, get_profile

    path = tmp_path / "profiles.json"
    monkeypatch.setenv("SLURM_RAY_PROFILES", str(path))
    site = {
        "ssh_conn_id": "c",
        "cores_per_node": 8,
        "environment": {"kind": "venv", "prefix": "/e"},
    }
    path.write_text(json.dumps({"site": site}))
    assert get_profile("site").environment.prefix == "/e"
    assert get_profile("site", cores_per_node=4).cores_per_node == 4
    with pytest.raises(ProfileError, match=r"^profile 'site': cores_per_node: must be >= 1"):
        get_profile("site", cores_per_node=0)
    path.write_text(json.dumps({"site": {**site, "environment": {"kind": "venv", "prefix": "x"}}}))
    with pytest.raises(ProfileError, match=r"^profile 'site': environment\.prefix: 'x' must be"):
        get_profile("site")
