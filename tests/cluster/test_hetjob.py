"""The seed's GPU job (issue 15 §1) through SlurmRayOperator on the dev cluster.

n1 has a count-only ``Gres=gpu:2`` in partition ``gpu``: a two-component
hetjob puts the Ray head and the learner on n1 (component 0) and the env
runners on n2 (component 1); Ray reports the two GPUs, torch has no CUDA, so
the learner runs on n1's CPUs and the log says so. A re-run of the try
adopts the running hetjob instead of submitting a second one.
"""

from __future__ import annotations

import re
import shlex

import pytest
from airflow.sdk.exceptions import TaskDeferred

from tests.cluster.test_operator import FakeTI, make_op, run_deferred
from tests.cluster.test_training import read_json
from tests.conftest import DevCluster

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def test_gpu_hetjob_places_learner_on_gpu_node_and_env_runners_on_cpu_node(
    cluster: DevCluster,
) -> None:
    config = {
        "algorithm": "PPO",
        "num_env_runners": 2,
        "num_envs_per_env_runner": 2,
        "train_batch_size": 400,
        "minibatch_size": 200,
        "num_epochs": 1,
        "hidden_sizes": [16],
        "stop": {"iterations": 2},
        "checkpoint_every": 2,
        "eval_episodes": 1,
    }
    # CPU component: 3 CPUs, more than the 4-core n1 keeps beside the GPU
    # component's 2, so Slurm must give it n2.
    spec = {"nodes": 1, "cpus_per_task": 3, "time": "10", "partition": "debug"}
    spec |= {"learner_gpus": 2, "gpu_partition": "gpu", "gpu_cpus": 2}
    op = make_op(cluster, "hetjob", config=config, job_spec=spec, poll_interval=2)
    ti = FakeTI(task_id="hetjob")
    with pytest.raises(TaskDeferred):
        op.execute({"ti": ti})
    job_id = ti.xcom["slurm_job_id"]
    try:
        # A re-run of the try adopts the hetjob (squeue lists it as ID+0 and ID+1).
        ti2 = FakeTI(task_id="hetjob", run_id=ti.run_id)
        op2 = make_op(cluster, "hetjob", config=config, job_spec=spec, poll_interval=2)
        run_deferred(op2, {"ti": ti2}, timeout=600)
        assert ti2.xcom["slurm_job_id"] == job_id
    finally:
        cluster.ssh(f"scancel {job_id}", check=False)
    run_dir = ti2.xcom["run_dir"]
    script = cluster.ssh(f"cat {shlex.quote(run_dir)}/job.sbatch").stdout
    assert script.count("#SBATCH hetjob") == 1 and "#SBATCH --gres=gpu:2" in script
    log = cluster.ssh(f"cat {shlex.quote(run_dir)}/slurm-*.out").stdout
    assert "ray_launch: hetjob: component 0 (GPU, no Ray CPUs) n1, component 1 (CPU) n2" in log
    assert re.search(r"cluster ready nodes=2 cpus=3 gpus=2 ", log), log[-3000:]
    said = [ln for ln in log.splitlines() if "has no CUDA" in ln]
    assert len(said) == 1 and "the learner runs on CPU on n1" in said[0], said

    result = read_json(cluster, f"{run_dir}/result.json")
    assert result["status"] == "succeeded", result.get("error")
    assert result["ray_gpus"] == 2
    assert result["learner_hostnames"] == ["n1"] and result["learner_devices"] == ["cpu"]
    assert result["env_runner_hostnames"] == ["n2"]
    assert result["ray_node_hostnames"] == ["n1", "n2"]
