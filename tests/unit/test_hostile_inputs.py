"""Hostile inputs that used to pass a loose check (issue 11, holes 5-7, section 3).

Pure tests: each payload class is refused with the field named, by the same
functions the DAGs and operators call before anything reaches the cluster.
The real-cluster half ("nothing created") is tests/cluster/test_shared_site_secrets.py.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk.exceptions import ParamValidationError
from slurm_ray.params import RunParamError, check_params, param_specs, resolve_run
from slurm_ray.training_config import ConfigError, validate_config

DEFAULTS = {name: spec["default"] for name, spec in param_specs().items()}
PATTERNED = sorted(n for n, s in param_specs().items() if "pattern" in s["schema"])
#: a valid value for each string Param with a pattern (the default may be empty)
VALID = {"partition": "debug", "account": "proj42", "time_limit": "00:30:00"}
VALID["gpu_partition"] = "gpu"


def _param(name: str) -> Any:
    from airflow.sdk import Param

    spec = param_specs()[name]
    return Param(spec["default"], **spec["schema"])


# -- hole 6: trailing newlines --------------------------------------------------------


def test_every_param_pattern_is_covered() -> None:
    assert set(PATTERNED) == {
        "partition",
        "gpu_partition",
        "account",
        "time_limit",
        "experiment_name",
        "register_model_name",
    }


@pytest.mark.parametrize("name", PATTERNED)
def test_param_patterns_refuse_a_trailing_newline(name: str) -> None:
    good = VALID.get(name) or DEFAULTS[name]
    _param(name).resolve(good)  # the value itself is fine
    for bad in (f"{good}\n", f"{good}\r\n", f"\n{good}"):
        with pytest.raises(ParamValidationError):
            _param(name).resolve(bad)
        with pytest.raises(RunParamError, match=rf"^{name}: "):
            resolve_run({**DEFAULTS, name: bad})


@pytest.mark.parametrize("env_id", ["CartPole-v1\n", "ale_py:ALE/Breakout-v5\n", "Custom\n"])
def test_config_env_id_refuses_a_trailing_newline(env_id: str) -> None:
    with pytest.raises(ConfigError, match=r"^config\.env_id: "):
        validate_config({"env_id": env_id}, env_modules=("ale_py",))


def test_sanity_check_env_id_refuses_a_trailing_newline() -> None:
    from airflow.sdk.exceptions import AirflowException
    from slurm_ray.operators.remote_env import validate_env_id

    with pytest.raises(AirflowException, match=r"^env_id: "):
        validate_env_id("CartPole-v1\n")


# -- hole 6: wrong JSON types and values that int() would mangle ----------------------

WRONG_TYPES = [
    ("nodes", 2.9),
    ("nodes", "2; x"),
    ("nodes", True),
    ("nodes", [2]),
    ("cpus_per_node", 1.5),
    ("cpus_per_node", False),
    ("gpus_per_node", "1"),
    ("seed", 1.25),
    ("train_batch_size", None),
    ("stop_iterations", True),
    ("lr", "0.1"),
    ("deferrable", "yes"),
    ("partition", ["debug"]),
    ("account", {"a": 1}),
    ("time_limit", 30),
    ("experiment_name", ["x"]),
    ("env_id", ["CartPole-v1"]),
    ("profile", 1),
]


@pytest.mark.parametrize(("name", "value"), WRONG_TYPES)
def test_wrong_json_types_are_refused_naming_the_field(name: str, value: Any) -> None:
    with pytest.raises(RunParamError, match=rf"^{name}: "):
        resolve_run({**DEFAULTS, name: value})


def test_check_params_prefixes_the_field() -> None:
    with pytest.raises(RunParamError, match=r"^configs\[3\]\.nodes: "):
        check_params({"nodes": 2.9}, prefix="configs[3].")


# -- hole 6: sweep override values ----------------------------------------------------


@pytest.fixture(autouse=True)
def _tracking_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_RAY_MLFLOW_URI", "http://127.0.0.1:1")


def _plan(configs: list[Any]) -> list[dict[str, Any]]:
    from slurm_ray.pipeline import plan_sweep_runs

    return plan_sweep_runs({**DEFAULTS, "configs": configs})


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"nodes": 2.9}, "nodes"),
        ({"nodes": "2; x"}, "nodes"),
        ({"lr": "0.001"}, "lr"),
        ({"partition": "debug\n"}, "partition"),
        ({"env_id": "evil_module:Evil-v0"}, "env_id"),
        ({"env_id": "CartPole-v1\n"}, "env_id"),
        ({"seed": True}, "seed"),
        ({"profile": "local"}, "profile"),  # not overridable per configuration
        ({"nodes": 2, "bogus": 1}, "bogus"),
    ],
)
def test_sweep_override_values_pass_the_param_schema(override: dict[str, Any], field: str) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    with pytest.raises(AirflowFailException, match=rf"configs\[1\]\.{field}: "):
        _plan([{"lr": 0.001}, override])


def test_sweep_configs_must_be_objects() -> None:
    from airflow.sdk.exceptions import AirflowFailException

    with pytest.raises(AirflowFailException, match=r"configs\[0\]: "):
        _plan(["lr=0.1"])


def test_sweep_good_overrides_plan_one_run_each() -> None:
    runs = _plan([{"lr": 0.001}, {"nodes": 1, "seed": 7}])
    assert [r["config"]["lr"] for r in runs] == [0.001, DEFAULTS["lr"]]
    assert runs[1]["job_spec"]["nodes"] == 1 and runs[1]["config"]["seed"] == 7


# -- hole 6: `module:` env ids import code on the cluster ------------------------------


@pytest.mark.parametrize("env_id", ["os:Evil-v0", "my_pkg.envs:Grid-v0", "ale_py:ALE/Pong-v5"])
def test_module_env_ids_are_refused_unless_the_profile_allows_them(env_id: str) -> None:
    with pytest.raises(ConfigError, match=r"^config\.env_id: .*not allowed"):
        validate_config({"env_id": env_id})
    module = env_id.split(":", 1)[0]
    assert validate_config({"env_id": env_id}, env_modules=(module,)).env_id == env_id
    # a parent package allowed does not allow its children, nor the reverse
    with pytest.raises(ConfigError, match="not allowed"):
        validate_config({"env_id": env_id}, env_modules=(module + "x",))


def test_module_env_id_refused_by_the_operator_and_sanity_check() -> None:
    from airflow.sdk.exceptions import AirflowException
    from slurm_ray.operators.remote_env import validate_env_id
    from slurm_ray.operators.training import SlurmRayOperator
    from slurm_ray.operators.training_job import validate_job

    with pytest.raises(AirflowException, match=r"^env_id: .*not allowed"):
        validate_env_id("os:Evil-v0")
    assert validate_env_id("my_envs:Grid-v0", env_modules=("my_envs",)) == "my_envs:Grid-v0"
    op = SlurmRayOperator(
        task_id="t", ssh_conn_id="x", remote_base_dir="/r", config={"env_id": "os:Evil-v0"}
    )
    with pytest.raises(AirflowException, match=r"^config\.env_id: .*not allowed"):
        validate_job(op, "job", "slurm-%j.out")


def test_profiles_allow_no_env_module_by_default() -> None:
    from slurm_ray.profiles import get_profile, profile_names

    for name in profile_names():
        assert get_profile(name).env_modules == ()
    assert resolve_run(DEFAULTS)["env_modules"] == []


# -- hole 7: run directories that collide ---------------------------------------------


def test_sanitize_is_injective_on_lookalike_run_ids() -> None:
    from slurm_ray.operators.identity import run_identity, sanitize

    ids = ["a:b", "a+b", "a~b", "a_b", "a b", "a/b", "a__b", "a.b", "a-b", "_a_b_", "ab"]
    outs = [sanitize(i) for i in ids]
    assert len(set(outs)) == len(ids), dict(zip(ids, outs, strict=True))
    suffixes = {run_identity("dag", i, "train", -1, 1)[1] for i in ids}
    assert len(suffixes) == len(ids)
    # readable: the safe text is kept, a digest is appended only where needed
    assert sanitize("a_b") == "a_b" and sanitize("a:b").startswith("a_b-")


def test_sanitize_cannot_be_mimicked_by_a_safe_id() -> None:
    from slurm_ray.operators.identity import sanitize

    forged = sanitize("a:b")  # a safe-looking id equal to another id's directory
    assert sanitize(forged) != forged
    assert len({sanitize(x) for x in (forged, "a:b", "a+b")}) == 3


def test_sanitize_injective_on_many_variants() -> None:
    from slurm_ray.operators.identity import sanitize

    alphabet = ["a", "_", ":", "+", "~", " ", ".", "-", "é"]
    ids = ["".join(p) for n in (1, 2, 3) for p in itertools.product(alphabet, repeat=n)]
    assert len({sanitize(i) for i in ids}) == len(ids)
    long_ids = ["x" * 200 + c for c in alphabet]
    assert len({sanitize(i) for i in long_ids}) == len(long_ids)


# -- hole 5: connection extras that switch host key verification off ------------------

UNSAFE_EXTRAS = [
    ({"no_host_key_check": True}, "no_host_key_check"),
    ({"no_host_key_check": "true"}, "no_host_key_check"),
    ({"ignore_hostkey_verification": "True"}, "ignore_hostkey_verification"),
    ({"allow_host_key_change": True}, "allow_host_key_change"),
    ({"allow_host_key_change": "true", "host_key": "ssh-ed25519 AAAA"}, "allow_host_key_change"),
    ({"known_hosts": "none"}, "known_hosts"),
    ({"known_hosts": "None"}, "known_hosts"),
]


def _conn(monkeypatch: pytest.MonkeyPatch, conn_id: str, extra: dict[str, Any]) -> None:
    import json

    # Port 1 on loopback: nothing listens, so a hook that tried to connect
    # would fail with "connection refused", not with the refusal asserted here.
    conn = {"conn_type": "ssh", "host": "127.0.0.1", "port": 1, "login": "x", "extra": extra}
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(conn))


@pytest.mark.parametrize(("extra", "name"), UNSAFE_EXTRAS)
def test_host_key_disabling_extras_are_refused(
    monkeypatch: pytest.MonkeyPatch, extra: dict[str, Any], name: str
) -> None:
    from slurm_ray.hooks.slurm import HostKeyError, SlurmHook

    _conn(monkeypatch, "hk_unsafe", extra)
    hook = SlurmHook("hk_unsafe", conn_timeout=2)
    with pytest.raises(HostKeyError, match=rf"disable host key verification: {name}=.*host_key"):
        hook.run("true")
    hook.close()  # nothing to close, and no second error


@pytest.mark.parametrize(("extra", "name"), UNSAFE_EXTRAS)
def test_host_key_disabling_extras_are_refused_by_the_trigger_client(
    monkeypatch: pytest.MonkeyPatch, extra: dict[str, Any], name: str
) -> None:
    import asyncio

    from slurm_ray.hooks.slurm import AsyncSlurmClient, HostKeyError

    _conn(monkeypatch, "hk_unsafe_async", extra)
    client = AsyncSlurmClient("hk_unsafe_async")
    with pytest.raises(HostKeyError, match=rf"{name}="):
        asyncio.run(client.run("true"))


@pytest.mark.parametrize(
    "extra",
    [{"no_host_key_check": False}, {"allow_host_key_change": "false"}, {"known_hosts": "/x/kh"}],
)
def test_harmless_values_of_those_extras_pass_the_check(
    monkeypatch: pytest.MonkeyPatch, extra: dict[str, Any]
) -> None:
    from slurm_ray.hooks.slurm import HostKeyError, SlurmHook, SlurmSSHError

    _conn(monkeypatch, "hk_ok", extra)
    with pytest.raises(SlurmSSHError) as info:
        SlurmHook("hk_ok", conn_timeout=2).run("true")
    assert not isinstance(info.value, HostKeyError), info.value  # refused by the network


# -- hole 4: MLflow credentials and build variables stay out of what is stored ---------


def test_tracking_uri_credentials_never_stored(monkeypatch: pytest.MonkeyPatch) -> None:
    from slurm_ray.mlflow.hook import credentialed_uri, public_uri, scrub
    from slurm_ray.mlflow.relay import make_relay
    from slurm_ray.mlflow.settings import MlflowSettings

    secret_uri = "https://alice:S3cr%2Ft@mlflow.example.org:5000/"
    assert public_uri(secret_uri) == "https://mlflow.example.org:5000"
    assert public_uri("sqlite:///data/x@y/mlflow.db") == "sqlite:///data/x@y/mlflow.db"
    settings = MlflowSettings(secret_uri, "exp")
    stored = json.dumps([settings.to_dict(), make_relay(settings, run_id=None, tags={"a": "b"})])
    assert "S3cr" not in stored and "alice" not in stored
    assert credentialed_uri(settings.tracking_uri) == secret_uri.rstrip("/")
    # a process that only has the environment (the triggerer) finds them there
    monkeypatch.setenv("SLURM_RAY_MLFLOW_URI", "http://bob:pw2@10.0.0.9:5055")
    assert credentialed_uri("http://10.0.0.9:5055") == "http://bob:pw2@10.0.0.9:5055"
    assert credentialed_uri("http://10.0.0.8:5055") == "http://10.0.0.8:5055"
    assert "pw2" not in resolve_run(DEFAULTS)["mlflow"]["tracking_uri"]
    msg = scrub("API request to http://bob:pw2@10.0.0.9:5055/api/2.0 failed")
    assert "pw2" not in msg and "10.0.0.9:5055/api" in msg


def test_build_values_never_in_the_command_line() -> None:
    from slurm_ray.slurm.environment import render_build_command, render_build_stdin
    from slurm_ray.utils.environment import EnvironmentSpec

    env = EnvironmentSpec(kind="venv", prefix="/p/env", module_lines=("module load x",))
    cmd = render_build_command(env, stage_dir="/p/env.spec/.stage-1", spec_name="r.txt")
    stdin = render_build_stdin(env, {"PIP_INDEX_URL": "https://u:tok3n@idx/simple"})
    assert "tok3n" not in cmd and "module load" not in cmd
    assert stdin.split(b"\0")[-2] == b"PIP_INDEX_URL=https://u:tok3n@idx/simple"


def test_job_env_vars_are_not_in_the_batch_script() -> None:
    from slurm_ray.operators.training import SlurmRayOperator
    from slurm_ray.utils.batch import JobSpec
    from slurm_ray.utils.environment import EnvironmentSpec

    op = SlurmRayOperator(
        task_id="t",
        ssh_conn_id="x",
        remote_base_dir="/r",
        entrypoint="true",
        env_vars={"API_TOKEN": "tok-123-secret"},
    )
    script = op.render_script(
        JobSpec.from_dict({"job_name": "j"}), EnvironmentSpec(), "/r/run", None
    )
    assert "tok-123-secret" not in script and "job.env" in script


# -- hole 8: uploads only from inside the run directory, symlinks resolved -------------


def _outside_and_run(tmp_path: Path, links: bool = True) -> tuple[Path, Path]:
    outside = tmp_path / "outside"
    (outside / "ckpt").mkdir(parents=True)
    (outside / "ckpt" / "id_ed25519").write_text("OUTSIDE-SECRET-1")
    (outside / "secret.txt").write_text("OUTSIDE-SECRET-2")
    run_dir = tmp_path / "run"
    good = run_dir / "checkpoints" / "iter_000002"
    good.mkdir(parents=True)
    (good / "state.pkl").write_text("inside")
    (run_dir / "result.json").write_text("{}")
    (run_dir / "checkpoints" / "iter_000009").symlink_to(outside / "ckpt")
    if not links:
        return outside, run_dir
    (good / "leak").symlink_to(outside / "secret.txt")  # a link inside the checkpoint
    (good / "leakdir").symlink_to(outside / "ckpt")
    (run_dir / "config.json").symlink_to(outside / "secret.txt")
    (run_dir / "mlflow_model").symlink_to(outside / "ckpt")
    return outside, run_dir


@pytest.mark.parametrize(
    "checkpoint",
    [
        "{outside}/ckpt",  # named outright
        "{run}/../outside/ckpt",  # '..' out of the run dir
        "{run}/checkpoints/iter_000009",  # a symlink in the run dir pointing out
        "/",
    ],
)
@pytest.mark.parametrize("links", [False, True], ids=["plain", "symlinks"])
def test_bundle_never_takes_anything_from_outside_the_run(
    tmp_path: Path, checkpoint: str, links: bool
) -> None:
    from slurm_ray.mlflow.artifacts import MODEL_DIRNAME, RUN_DIR_ARTIFACTS, _fetch_bundle

    from tests.unit.test_mlflow_pure import LocalHook

    outside, run_dir = _outside_and_run(tmp_path, links)
    dest = tmp_path / "dest"
    dest.mkdir()
    names = [*RUN_DIR_ARTIFACTS, MODEL_DIRNAME]
    ckpt = checkpoint.format(outside=outside, run=run_dir)
    got_ckpt = _fetch_bundle(LocalHook(), str(run_dir), names, ckpt, dest)
    assert got_ckpt is None
    files = sorted(str(p.relative_to(dest)) for p in dest.rglob("*"))
    assert files == ["result.json"], files


def test_bundle_takes_the_checkpoint_inside_without_its_links(tmp_path: Path) -> None:
    from slurm_ray.mlflow.artifacts import _fetch_bundle

    from tests.unit.test_mlflow_pure import LocalHook

    _, run_dir = _outside_and_run(tmp_path)
    dest = tmp_path / "dest"
    dest.mkdir()
    ckpt = run_dir / "checkpoints" / "iter_000002"
    got = _fetch_bundle(LocalHook(), str(run_dir), ["result.json"], str(ckpt), dest)
    assert got == "checkpoints/iter_000002"
    files = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if not p.is_dir())
    assert files == ["checkpoints/iter_000002/state.pkl", "result.json"], files
    assert "OUTSIDE" not in "".join(p.read_text() for p in dest.rglob("*") if p.is_file())
