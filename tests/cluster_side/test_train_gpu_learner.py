"""include/train.py's learner placement when Ray offers GPUs that torch cannot use.

A count-only GRES (the dev cluster's ``gpu:2`` on n1) gives Ray GPU resources
but torch no CUDA device; ``--num-gpus`` on a ``--local`` Ray does the same
here. RLlib would move the learner to ``cuda:0`` (or set up NCCL) and fail;
the driver runs one learner on CPU instead and says so in one line.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cluster_side.conftest import INCLUDE
from tests.cluster_side.test_train_driver import TINY_PPO, result, run_driver

pytestmark = pytest.mark.slow


def test_gpu_learners_without_cuda_run_on_cpu_and_say_so(
    cluster_python: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = TINY_PPO | {"num_learners": 2, "num_gpus_per_learner": 1, "stop": {"iterations": 1}}
    proc = run_driver(
        cluster_python, INCLUDE / "train.py", config, run_dir, tmp_path,
        "--local", "--num-cpus", "2", "--num-gpus", "2",
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    said = [ln for ln in out.splitlines() if "has no CUDA" in ln]
    assert len(said) == 1 and "the learner runs on CPU" in said[0], said
    res = result(run_dir)
    assert res["status"] == "succeeded" and res["ray_gpus"] == 2
    assert res["learner_devices"] == ["cpu"] and len(res["learner_hostnames"]) == 1
    eff = res["effective_config"]
    assert (eff["num_learners"], eff["num_gpus_per_learner"]) == (1, 0)
