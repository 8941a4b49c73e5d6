"""include/train.py with a private local Ray (--local): the driver's contract.

Training runs are kept tiny (1 env runner, 500-step batches) for 2 shared
cores; each one is ~15-25 s, most of it Ray start-up.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.cluster_side.conftest import INCLUDE, subprocess_env
from tests.conftest import ROOT

# Small enough to be quick, big enough that PPO finishes episodes every iteration.
TINY_PPO: dict[str, Any] = {
    "algorithm": "PPO",
    "num_env_runners": 1,
    "num_envs_per_env_runner": 4,
    "train_batch_size": 500,
    "minibatch_size": 250,
    "num_epochs": 2,
    "hidden_sizes": [32, 32],
    "seed": 1,
    "checkpoint_every": 2,
    "keep_checkpoints": 2,
    "eval_episodes": 2,
}


def stage(run_dir: Path) -> Path:
    """Lay out the driver as a job's run directory holds it: train.py beside
    training_config.py, nothing else of the project importable."""
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(INCLUDE / "train.py", run_dir / "train.py")
    shutil.copy(ROOT / "plugins" / "slurm_ray" / "training_config.py", run_dir)
    return run_dir / "train.py"


def driver_cmd(python: Path, script: Path, config: dict[str, Any], run_dir: Path) -> list[str]:
    cfg_path = run_dir / "config.json"
    cfg_path.write_text(json.dumps(config))
    return [str(python), "-u", str(script), "--config", str(cfg_path), "--run-dir", str(run_dir)]


def driver_env(home: Path) -> dict[str, str]:
    # A throwaway HOME proves the driver writes neither ~/ray_results nor ~/.ray.
    return subprocess_env(HOME=str(home))


def run_driver(
    python: Path, script: Path, config: dict[str, Any], run_dir: Path, home: Path, *extra: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*driver_cmd(python, script, config, run_dir), *extra],
        capture_output=True,
        text=True,
        timeout=240,
        env=driver_env(home),
    )


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def result(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "result.json").read_text())


def checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def assert_clean_home(home: Path) -> None:
    assert not (home / "ray_results").exists()
    assert not (home / ".ray").exists()


# --- bad config: exit 2 before Ray does anything -----------------------------------


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"algorithm": "A3C"}, "algorithm"),
        ({"lr": -1}, "lr"),
        ({"num_envs_per_env_runner": 0}, "num_envs_per_env_runner"),
        ({"stop": {"iterations": -3}}, "stop.iterations"),
        ({"env_id": "NoSuchEnv-v0"}, "env_id"),
        ({"env_id": "CartPole-v42"}, "env_id"),
        ({"env_id": "no_such_module:Foo-v0"}, "env_id"),
        ({"epochs": 3}, "epochs"),
    ],
)
def test_bad_config_exits_2_naming_the_field(
    cluster_python: Path, tmp_path: Path, config: dict[str, Any], field: str
) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    started = time.monotonic()
    # Run from the repository: training_config comes from ../plugins/slurm_ray.
    proc = run_driver(cluster_python, INCLUDE / "train.py", config, run_dir, tmp_path, "--local")
    elapsed = time.monotonic() - started
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"CONFIG_ERROR: config.{field}: ")
    assert "Started a local Ray" not in proc.stdout + proc.stderr
    assert elapsed < 30  # no Ray start-up (a few seconds) happened
    assert result(run_dir)["status"] == "config_error"
    assert not (run_dir / "metrics.jsonl").exists()


def test_missing_ray_address_is_a_usage_error(cluster_python: Path, tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    proc = run_driver(cluster_python, INCLUDE / "train.py", {}, tmp_path / "run", tmp_path)
    assert proc.returncode == 2
    assert "RAY_ADDRESS" in proc.stderr


# --- training -------------------------------------------------------------------------


@pytest.mark.slow
def test_ppo_run_then_resume_continues_counters(cluster_python: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    script = stage(run_dir)

    first = run_driver(
        cluster_python, script, TINY_PPO | {"stop": {"iterations": 3}}, run_dir, tmp_path, "--local"
    )
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    rows = metrics(run_dir)
    assert [r["iteration"] for r in rows] == [1, 2, 3]
    steps = [r["env_steps"] for r in rows]
    assert steps == sorted(steps) and steps[0] >= 500
    for row in rows:
        assert {
            "iteration", "env_steps", "episode_return_mean", "episode_return_min",
            "episode_return_max", "episode_len_mean", "env_steps_per_s", "time_this_iter_s",
            "time_total_s", "timestamp", "policy_loss", "vf_loss", "total_loss", "entropy",
        } <= set(row)  # fmt: skip
        assert row["env_steps_per_s"] > 0
    res = result(run_dir)
    assert res["status"] == "succeeded" and res["exit_code"] == 0
    assert res["stop_reason"] == "iterations"
    assert res["iterations"] == 3 and res["env_steps"] == steps[-1]
    assert res["checkpoint"] == str(run_dir / "checkpoints" / "iter_000003")
    assert Path(res["rl_module_checkpoint"]).is_dir()
    assert res["rl_module_checkpoint"].endswith("learner_group/learner/rl_module/default_policy")
    assert res["eval_episodes"] == 2 and res["eval_return_mean"] > 0
    assert res["ray_nodes"] == 1 and len(res["env_runner_node_ips"]) == 1
    assert res["config"]["stop"]["iterations"] == 3
    assert res["resumed_from"] is None
    assert checkpoints(run_dir) == ["iter_000002", "iter_000003"]  # every 2 + final
    assert "iter     3 |" in first.stdout and "steps/s" in first.stdout and "eta" in first.stdout

    # The second run also exports the MLflow model in-process, as the DAGs ask.
    shutil.copy(INCLUDE / "export_model.py", run_dir / "export_model.py")
    second = run_driver(
        cluster_python,
        script,
        TINY_PPO | {"stop": {"iterations": 5}},
        run_dir,
        tmp_path,
        "--local",
        "--export-model",
    )
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    rows = metrics(run_dir)
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[3]["env_steps"] > rows[2]["env_steps"]  # counters go on, not back to zero
    assert rows[3]["time_total_s"] > rows[2]["time_total_s"]
    res = result(run_dir)
    assert res["resumed_from"] == str(run_dir / "checkpoints" / "iter_000003")
    assert res["iterations"] == 5 and res["env_steps"] == rows[-1]["env_steps"]
    assert (run_dir / "result.previous.json").is_file()
    assert checkpoints(run_dir) == ["iter_000004", "iter_000005"]  # keep_checkpoints=2
    export = res["model_export"]
    assert export["model_dir"] == str(run_dir / "mlflow_model")
    assert export["rl_module_checkpoint"] == res["rl_module_checkpoint"]
    assert export["verified_action"] in ([0], [1]) and export["export_s"] > 0
    assert (run_dir / "mlflow_model" / "MLmodel").is_file()
    assert not (run_dir / "mlflow_model" / "__pycache__").exists()
    assert "model exported to" in second.stdout
    assert_clean_home(tmp_path)


@pytest.mark.slow
def test_resume_skips_an_incomplete_checkpoint(cluster_python: Path, tmp_path: Path) -> None:
    """A killed save leaves a temp dir (or an empty final name): never restored."""
    run_dir = tmp_path / "run"
    script = stage(run_dir)
    first = run_driver(
        cluster_python,
        script,
        TINY_PPO | {"stop": {"iterations": 2}, "eval_episodes": 0},
        run_dir,
        tmp_path,
        "--local",
    )
    assert first.returncode == 0, first.stderr[-3000:]
    (run_dir / "checkpoints" / ".tmp-iter_000007-123").mkdir()
    (run_dir / "checkpoints" / "iter_000009").mkdir()  # no rllib_checkpoint.json
    second = run_driver(
        cluster_python,
        script,
        TINY_PPO | {"stop": {"iterations": 3}, "eval_episodes": 0},
        run_dir,
        tmp_path,
        "--local",
    )
    assert second.returncode == 0, second.stderr[-3000:]
    assert result(run_dir)["resumed_from"] == str(run_dir / "checkpoints" / "iter_000002")
    assert [r["iteration"] for r in metrics(run_dir)] == [1, 2, 3]
    assert not (run_dir / "checkpoints" / ".tmp-iter_000007-123").exists()
    assert result(run_dir)["eval_return_mean"] is None


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=["SIGUSR1", "SIGTERM"])
def test_signal_checkpoints_and_exits_75(
    cluster_python: Path, tmp_path: Path, sig: signal.Signals
) -> None:
    run_dir = tmp_path / "run"
    script = stage(run_dir)
    config = TINY_PPO | {"stop": {"iterations": 10_000}, "checkpoint_every": 1000}
    proc = subprocess.Popen(
        [*driver_cmd(cluster_python, script, config, run_dir), "--local"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=driver_env(tmp_path),
    )
    try:
        deadline = time.monotonic() + 150
        metrics_file = run_dir / "metrics.jsonl"
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics_file.exists() and len(metrics_file.read_text().splitlines()) >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "driver exited before the signal"
        os.kill(proc.pid, sig)
        out, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 75, out[-3000:]
    rows = metrics(run_dir)
    last = rows[-1]["iteration"]
    assert [r["iteration"] for r in rows] == list(range(1, last + 1))
    res = result(run_dir)
    assert res["status"] == "interrupted"
    assert res["stop_reason"] == f"signal:{sig.name}"
    assert res["exit_code"] == 75
    assert res["iterations"] == last
    # The checkpoint is the last finished iteration, though none was due (every 1000).
    assert res["checkpoint"] == str(run_dir / "checkpoints" / f"iter_{last:06d}")
    assert checkpoints(run_dir) == [f"iter_{last:06d}"]
    assert f"got {sig.name}" in out


@pytest.mark.slow
def test_dqn_two_iterations(cluster_python: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    script = stage(run_dir)
    config = {
        "algorithm": "dqn",
        "num_env_runners": 1,
        "num_envs_per_env_runner": 8,  # 8 env steps per DQN update: ~3x faster than 1
        "hidden_sizes": [32],
        "stop": {"iterations": 2},
        "eval_episodes": 2,
    }
    # export_model.py is not staged: the export fails, the run still succeeds.
    proc = run_driver(
        cluster_python, script, config, run_dir, tmp_path, "--local", "--export-model"
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "export_model" in result(run_dir)["model_export_error"]
    assert not (run_dir / "mlflow_model").exists()
    rows = metrics(run_dir)
    assert [r["iteration"] for r in rows] == [1, 2]
    assert rows[-1]["env_steps"] >= 2000  # DQN samples >= 1000 steps per iteration
    assert "qf_loss" in rows[-1]
    res = result(run_dir)
    assert res["status"] == "succeeded"
    assert res["config"]["algorithm"] == "DQN"
    assert res["effective_config"]["train_batch_size"] == 32
    assert res["eval_return_mean"] is not None  # greedy via the module's "actions"
    assert Path(res["rl_module_checkpoint"]).is_dir()


CRASH_ENV = '''
import gymnasium as gym


class CrashEnv(gym.Env):
    """CartPole-shaped env that breaks after a few hundred steps."""

    observation_space = gym.spaces.Box(-1.0, 1.0, (4,))
    action_space = gym.spaces.Discrete(2)

    def __init__(self, **kwargs):
        self.steps = 0

    def reset(self, *, seed=None, options=None):
        return self.observation_space.sample(), {}

    def step(self, action):
        self.steps += 1
        if self.steps > 300:
            raise RuntimeError("simulator diverged")
        return self.observation_space.sample(), 1.0, self.steps % 20 == 0, False, {}


gym.register("CrashEnv-v0", entry_point=CrashEnv)
'''


@pytest.mark.slow
def test_training_error_exits_1_with_failed_result(cluster_python: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    script = stage(run_dir)
    (tmp_path / "crashenv.py").write_text(CRASH_ENV)
    config = TINY_PPO | {
        "env_id": "crashenv:CrashEnv-v0",  # imported by the driver's env-id check
        "num_env_runners": 0,  # sample in the driver: the error reaches train()
        "num_envs_per_env_runner": 1,
        "train_batch_size": 200,
        "minibatch_size": 100,
        "stop": {"iterations": 50},
    }
    proc = subprocess.run(
        [*driver_cmd(cluster_python, script, config, run_dir), "--local"],
        capture_output=True,
        text=True,
        timeout=240,
        env=subprocess_env(
            HOME=str(tmp_path), PYTHONPATH=str(tmp_path), SLURM_RAY_ENV_MODULES="crashenv"
        ),
    )
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = result(run_dir)
    assert res["status"] == "failed" and res["stop_reason"] == "error"
    assert res["exit_code"] == 1
    assert "simulator diverged" in res["error"]
    assert res["iterations"] == 1  # the first iteration (200 steps) completed
    assert [r["iteration"] for r in metrics(run_dir)] == [1]
