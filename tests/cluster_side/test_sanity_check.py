"""include/sanity_check.py: gymnasium, legacy gym, and the failure contract."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from tests.cluster_side.conftest import INCLUDE, run_script


def summary_of(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("SANITY_SUMMARY ")]
    assert len(lines) == 1, proc.stdout[-2000:]
    return json.loads(lines[0].removeprefix("SANITY_SUMMARY "))


def error_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    return [ln for ln in proc.stderr.splitlines() if ln.startswith("SANITY_ERROR: ")]


def test_gymnasium_random_episode(cluster_python: Path) -> None:
    proc = run_script(cluster_python, "sanity_check.py", "--seed", "0", timeout=120)
    assert proc.returncode == 0, proc.stderr
    summary = summary_of(proc)
    assert summary["ok"] is True
    assert summary["api"] == "gymnasium"
    assert summary["env_id"] == "CartPole-v1"
    assert summary["episodes"] == 1
    assert summary["step_values"] == 5
    # The seed's "action obs reward done" lines, one per step, the last one done.
    step_lines = proc.stdout.splitlines()[:-1]
    assert len(step_lines) == summary["steps"] == int(summary["returns"][0])
    assert step_lines[0].split()[0] in ("0", "1")
    assert step_lines[-1].endswith("True")
    assert all(ln.endswith("False") for ln in step_lines[:-1])
    versions = summary["versions"]
    assert versions["gymnasium"] and versions["numpy"] and versions["python"]
    assert versions["ray"] == "2.60.0"
    assert versions["torch"].startswith("2.")


def test_quiet_several_episodes(cluster_python: Path) -> None:
    proc = run_script(
        cluster_python,
        "sanity_check.py",
        *("--episodes", "3", "--max-steps", "5", "--quiet"),
    )
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 1  # only the summary
    summary = summary_of(proc)
    assert summary["episodes"] == 3
    assert summary["steps"] <= 15
    assert len(summary["returns"]) == 3


@pytest.mark.parametrize(
    ("env_id", "fragment"),
    [
        ("NoSuchEnv-v0", "NoSuchEnv"),
        ("CartPole-v99", "v99"),
        ("no_such_module:Foo-v0", "no_such_module"),
    ],
)
def test_unknown_env_id_fails_with_one_error_line(
    cluster_python: Path, env_id: str, fragment: str
) -> None:
    proc = run_script(cluster_python, "sanity_check.py", "--env-id", env_id, "--quiet")
    assert proc.returncode == 4
    assert "SANITY_SUMMARY" not in proc.stdout
    errors = error_lines(proc)
    assert len(errors) == 1, proc.stderr
    assert fragment in errors[0]


def test_legacy_gym_fallback(legacy_gym_python: Path) -> None:
    """gym 0.26.2 on numpy 2: the env checker must be off for CartPole to run."""
    proc = run_script(legacy_gym_python, "sanity_check.py", "--seed", "1", timeout=120)
    assert proc.returncode == 0, proc.stderr
    summary = summary_of(proc)
    assert summary["api"] == "gym"
    assert summary["versions"]["gym"] == "0.26.2"
    assert "gymnasium" not in summary["versions"]
    assert summary["versions"]["ray"] is None and summary["versions"]["torch"] is None
    assert summary["steps"] >= 1
    # gym 0.26 already has the 5-value step API (terminated, truncated).
    assert summary["step_values"] == 5
    # gym's multi-line "unmaintained" notice is kept off stderr.
    assert proc.stderr.strip() == ""


def test_legacy_gym_unknown_env(legacy_gym_python: Path) -> None:
    proc = run_script(legacy_gym_python, "sanity_check.py", "--env-id", "Nope-v1")
    assert proc.returncode == 4
    assert error_lines(proc) == [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(error_lines(proc)) == 1


def test_no_gym_package_at_all() -> None:
    """The machine's bare python3 has neither gymnasium nor gym."""
    probe = subprocess.run(
        ["/usr/bin/python3", "-c", "import gymnasium"], capture_output=True, check=False
    )
    probe_gym = subprocess.run(["/usr/bin/python3", "-c", "import gym"], capture_output=True)
    if probe.returncode == 0 or probe_gym.returncode == 0:
        pytest.skip("/usr/bin/python3 has gymnasium or gym")
    proc = run_script(Path("/usr/bin/python3"), "sanity_check.py")
    assert proc.returncode == 3
    assert len(error_lines(proc)) == 1
    assert "neither gymnasium nor gym" in error_lines(proc)[0]


# --- the old 4-value gym API, with a fake gym module (no env needed) ------------


def _load_sanity_module() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("sanity_check", INCLUDE / "sanity_check.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _OldApiEnv:
    """gym < 0.26: reset() -> obs, step() -> (obs, reward, done, info)."""

    def __init__(self) -> None:
        self.t = 0
        self.action_space = types.SimpleNamespace(sample=lambda: 1, seed=lambda s: None)

    def reset(self, seed: int | None = None) -> list[float]:
        self.t = 0
        return [0.0]

    def step(self, action: int) -> tuple[list[float], float, bool, dict]:
        self.t += 1
        return [float(self.t)], 1.0, self.t >= 4, {}

    def close(self) -> None:
        pass


def test_old_four_value_api_with_fake_gym(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    made: dict[str, Any] = {}

    def make(env_id: str, **kwargs: Any) -> _OldApiEnv:
        made.update(env_id=env_id, **kwargs)
        return _OldApiEnv()

    monkeypatch.setitem(sys.modules, "gymnasium", None)  # import gymnasium -> ImportError
    monkeypatch.setitem(sys.modules, "gym", types.SimpleNamespace(make=make, __version__="0.21"))
    monkeypatch.setitem(sys.modules, "numpy", types.SimpleNamespace(__version__="2.1.0"))
    sanity = _load_sanity_module()
    assert sanity.main(["--episodes", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:4] == ["1 [1.0] 1.0 False", "1 [2.0] 1.0 False", "1 [3.0] 1.0 False",
                       "1 [4.0] 1.0 True"]  # fmt: skip
    summary = json.loads(out[-1].removeprefix("SANITY_SUMMARY "))
    assert summary["api"] == "gym"
    assert summary["step_values"] == 4
    assert summary["steps"] == 8
    assert summary["returns"] == [4.0, 4.0]
    assert made == {"env_id": "CartPole-v1", "disable_env_checker": True}  # numpy 2


def test_crash_while_stepping_is_one_error_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    class Broken(_OldApiEnv):
        def step(self, action: int) -> Any:
            raise RuntimeError("physics\nexploded")

    monkeypatch.setitem(sys.modules, "gymnasium", None)
    monkeypatch.setitem(sys.modules, "gym", types.SimpleNamespace(make=lambda i, **k: Broken()))
    monkeypatch.setitem(sys.modules, "numpy", types.SimpleNamespace(__version__="1.26.4"))
    sanity = _load_sanity_module()
    assert sanity.main(["--quiet"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == ["SANITY_ERROR: env 'CartPole-v1' crashed: RuntimeError: physics exploded"]


def test_no_package_with_fakes(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "gymnasium", None)
    monkeypatch.setitem(sys.modules, "gym", None)
    sanity = _load_sanity_module()
    assert sanity.main([]) == 3
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("SANITY_ERROR: neither gymnasium nor gym")
