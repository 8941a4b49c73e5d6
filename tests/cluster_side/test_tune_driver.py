"""include/tune_driver.py on a private local Ray: bad specs, interrupt and resume a sweep."""

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

BASE = {
    "num_env_runners": 0,
    "num_envs_per_env_runner": 2,
    "train_batch_size": 400,
    "minibatch_size": 100,
    "num_epochs": 1,
    "hidden_sizes": [16],
    "checkpoint_every": 1,
    "eval_episodes": 1,
}
SEARCH = {"search": {"lr": {"grid": [0.001, 0.003]}}, "num_samples": 1, "scheduler": "fifo"}


def stage(run_dir: Path) -> Path:
    """The files a job's run directory holds for a Tune sweep, nothing else importable."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in ("tune_driver.py", "train.py", "export_model.py"):
        shutil.copy(INCLUDE / name, run_dir / name)
    for name in ("training_config.py", "tune_space.py"):
        shutil.copy(ROOT / "plugins" / "slurm_ray" / name, run_dir / name)
    return run_dir / "tune_driver.py"


def command(python: Path, run_dir: Path, config: dict[str, Any]) -> list[str]:
    script = stage(run_dir)
    (run_dir / "config.json").write_text(json.dumps(config))
    config_path = str(run_dir / "config.json")
    return [str(python), "-u", str(script), "--config", config_path, "--run-dir", str(run_dir),
            "--local", "--num-cpus", "2"]  # fmt: skip


def trial_rows(run_dir: Path) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for path in sorted((run_dir / "trials").glob("*/metrics.jsonl")):
        rows = [json.loads(ln) for ln in path.read_text().splitlines()]
        out[path.parent.name] = [r["iteration"] for r in rows]
    return out


@pytest.mark.parametrize(
    ("tune", "field"),
    [
        ({"search": {"lr": {"grid": [3.0]}}}, "tune.search.lr.grid[0]"),
        ({"search": {"env_id": {"grid": ["x"]}}}, "tune.search.env_id"),
        ({"search": {"lr": {"grid": [0.1]}}, "scheduler": "asha"}, "tune.scheduler"),
    ],
)
def test_bad_spec_exits_2_naming_the_field(
    cluster_python: Path, tmp_path: Path, tune: dict[str, Any], field: str
) -> None:
    run_dir = tmp_path / "run"
    config = {"base": BASE | {"stop": {"minutes": 1}}, "tune": tune}
    proc = subprocess.run(
        command(cluster_python, run_dir, config),
        capture_output=True, text=True, timeout=120, env=subprocess_env(HOME=str(tmp_path)),
    )  # fmt: skip
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith(f"CONFIG_ERROR: {field}: "), proc.stderr
    assert json.loads((run_dir / "result.json").read_text())["status"] == "config_error"
    assert not (run_dir / "tune").exists()


@pytest.mark.slow
def test_sigusr1_saves_the_sweep_and_the_next_try_resumes_it(
    cluster_python: Path, tmp_path: Path
) -> None:
    """SIGUSR1 (Slurm's pre-timeout signal): exit 75 with Tune's state saved; the
    next try (its own run directory) restores the same trials and finishes them."""
    task = tmp_path / "task"
    first, second = task / "try_1", task / "try_2"
    # 12 iterations: under load one trial may run several iterations ahead of the
    # other before both have 2 (seen at 6: one trial had finished before the signal).
    config = {"base": BASE | {"stop": {"iterations": 12}}, "tune": SEARCH}
    env = subprocess_env(HOME=str(tmp_path))
    proc = subprocess.Popen(
        command(cluster_python, first, config),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            done = trial_rows(first) if (first / "trials").is_dir() else {}
            if len(done) == 2 and all(len(v) >= 2 for v in done.values()):
                break
            time.sleep(0.3)
        assert proc.poll() is None, "the sweep ended before the signal"
        os.kill(proc.pid, signal.SIGUSR1)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 75, out[-4000:]
    interrupted = json.loads((first / "result.json").read_text())
    assert interrupted["status"] == "interrupted"
    before = trial_rows(first)
    assert all(max(v) < 12 for v in before.values()), before
    first_stream = (first / "metrics.jsonl").read_text()

    proc2 = subprocess.run(
        command(cluster_python, second, config),
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert proc2.returncode == 0, (proc2.stdout + proc2.stderr)[-4000:]
    assert f"continuing the experiment of {first}" in proc2.stdout
    res = json.loads((second / "result.json").read_text())
    assert res["status"] == "succeeded"
    after = trial_rows(second)
    assert set(after) == set(before)  # the same trials, restored, not new ones
    for trial, steps in after.items():
        # Every iteration is there; those after the restored checkpoint may appear twice.
        assert sorted(set(steps)) == list(range(1, 13)), (trial, steps)
    assert {t["status"] for t in res["tune"]["trials"]} == {"TERMINATED"}
    # The restored sweep streams into this try's directory, not the earlier one's.
    assert (first / "metrics.jsonl").read_text() == first_stream
    streamed = [json.loads(ln) for ln in (second / "metrics.jsonl").read_text().splitlines()]
    assert {r["trial_id"] for r in streamed} == set(before)
    assert {r["iteration"] for r in streamed} >= {12}
    assert Path(res["rl_module_checkpoint"]).is_dir()
    assert str(second / "tune") in res["checkpoint"]
