"""The GPU learner's hetjob (issue 15 §1), pure: rendering, quoting, validation, Params."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from slurm_ray.params import RunParamError, param_specs, resolve_run
from slurm_ray.training_config import ConfigError, learners_for_gpus, validate_config
from slurm_ray.utils.batch import JobSpec, JobSpecError, render_batch_script

from tests.unit.test_batch import HOSTILE_TEMPLATES, _sbatch_line_args
from tests.unit.test_claim import make_op as claim_op
from tests.unit.test_claim import run_dir as claim_run_dir
from tests.unit.test_claim import shell  # noqa: F401  (fixture)
from tests.unit.test_remote import squeue_line

HET = {"learner_gpus": 2, "gpu_partition": "gpu", "gpu_cpus": 2, "partition": "debug"}


def components(script: str) -> list[dict[str, str | None]]:
    """What sbatch reads, per hetjob component (split at ``#SBATCH hetjob``)."""
    out: list[dict[str, str | None]] = [{}]
    for line in script.split("\n"):
        if not line.startswith("#SBATCH"):
            if line.strip() and not line.lstrip().startswith("#"):
                break
            continue
        for arg in _sbatch_line_args(line[len("#SBATCH") :]):
            if arg == "hetjob":
                out.append({})
                continue
            key, eq, value = arg[2:].partition("=")
            assert arg.startswith("--") and key not in out[-1], arg
            out[-1][key] = value if eq else None
    return out


def test_learner_gpus_renders_a_gpu_component_then_the_cpu_nodes() -> None:
    spec = JobSpec(
        job_name="t", nodes=2, cpus_per_task=4, mem="4G", account="proj", time="10",
        signal="B:USR1@60", exclusive=True, extra={"exclude": "n9"}, **HET,
    )  # fmt: skip
    gpu, cpu = components(render_batch_script(spec, command="true"))
    assert gpu == {
        "job-name": "t", "partition": "gpu", "nodes": "1", "ntasks-per-node": "1",
        "cpus-per-task": "2", "mem": "4G", "gres": "gpu:2", "exclusive": None, "account": "proj",
        "time": "10", "signal": "B:USR1@60", "output": "slurm-%j.out", "exclude": "n9",
    }  # fmt: skip
    assert cpu == {
        "partition": "debug", "nodes": "2", "ntasks-per-node": "1", "cpus-per-task": "4",
        "mem": "4G", "exclusive": None,
    }  # fmt: skip


def test_learner_gpus_split_over_gpu_nodes_and_default_partition() -> None:
    spec = JobSpec(job_name="t", learner_gpus=4, gpu_nodes=2)
    gpu, cpu = components(render_batch_script(spec, command="true"))
    assert (gpu["nodes"], gpu["gres"], "partition" in gpu, "cpus-per-task" in gpu) == (
        "2", "gpu:2", False, False,
    )  # fmt: skip
    assert cpu == {"nodes": "1", "ntasks-per-node": "1"}
    # Slurm gives a component without --partition the default one, not component 0's.
    gpu, cpu = components(
        render_batch_script(
            JobSpec(job_name="t", learner_gpus=1, gpu_partition="gpu"), command="true"
        )
    )
    assert (gpu["partition"], "partition" in cpu) == ("gpu", False)


def test_zero_learner_gpus_is_todays_one_component_script() -> None:
    plain = JobSpec(job_name="t", nodes=2, partition="debug")
    zero = JobSpec(job_name="t", nodes=2, partition="debug", learner_gpus=0)
    assert render_batch_script(zero, command="x") == render_batch_script(plain, command="x")
    assert "hetjob" not in render_batch_script(zero, command="x")
    assert JobSpec.from_dict(JobSpec(job_name="t", **HET).to_dict()) == JobSpec(job_name="t", **HET)


@pytest.mark.parametrize("template", HOSTILE_TEMPLATES)
def test_hostile_values_in_both_components_are_inert_and_exact(
    tmp_path: Path, template: str
) -> None:
    marker = tmp_path / "PWNED"
    value = template.format(m=marker)
    spec = JobSpec(
        job_name=value, partition=value, gpu_partition=value, account=value,
        constraint=value, learner_gpus=1, extra={"comment": value},
    )  # fmt: skip
    script = render_batch_script(spec, command="true", header_comment=value)
    gpu, cpu = components(script)
    for key in ("job-name", "partition", "account", "comment"):
        assert gpu[key] == value, key
    assert cpu["partition"] == value and cpu["constraint"] == value
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    proc = subprocess.run(["bash", str(path)], capture_output=True, cwd=tmp_path, timeout=30)
    assert (proc.returncode, proc.stdout) == (0, b""), proc.stderr
    assert not marker.exists()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"gpu_partition": "gpu"}, "gpu_partition"),
        ({"gpu_nodes": 1}, "gpu_nodes"),
        ({"gpu_cpus": 2}, "gpu_cpus"),
        ({"learner_gpus": -1}, "learner_gpus"),
        ({"learner_gpus": True}, "learner_gpus"),
        ({"learner_gpus": "2"}, "learner_gpus"),
        ({"learner_gpus": 3, "gpu_nodes": 2}, "learner_gpus"),
        ({"learner_gpus": 1, "gpu_nodes": 0}, "gpu_nodes"),
        ({"learner_gpus": 1, "gpu_cpus": 0}, "gpu_cpus"),
        ({"learner_gpus": 1, "gpus_per_node": 1}, "gpus_per_node"),
        ({"learner_gpus": 1, "gres": "gpu:1"}, "gres"),
        ({"learner_gpus": 1, "gpu_partition": "a\nb", "partition": "x"}, "gpu_partition"),
        ({"learner_gpus": 1, "extra": {"nodelist": "n1"}}, "extra['nodelist']"),
        ({"learner_gpus": 1, "extra": {"gpus": "2"}}, "extra['gpus']"),
    ],
)
def test_bad_gpu_component_names_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(JobSpecError, match=rf"^JobSpec\.{re.escape(field)}: "):
        JobSpec(job_name="t", **kwargs)


def test_learners_follow_learner_gpus() -> None:
    cfg = validate_config({"stop": {"iterations": 1}}).to_dict()
    assert learners_for_gpus(cfg, 0) == cfg
    two = learners_for_gpus(cfg, 2)
    assert (two["num_learners"], two["num_gpus_per_learner"]) == (2, 1)
    own = cfg | {"num_learners": 1, "num_gpus_per_learner": 0.5}
    assert learners_for_gpus(own, 1) == own
    with pytest.raises(ConfigError, match=r"^config\.num_gpus_per_learner: 3 learner"):
        learners_for_gpus(cfg | {"num_learners": 3, "num_gpus_per_learner": 1}, 2)
    with pytest.raises(ConfigError, match=r"^config\.num_gpus_per_learner: 0 leaves"):
        learners_for_gpus(cfg | {"num_learners": 2}, 2)


def _defaults(**over: Any) -> dict[str, Any]:
    return {name: spec["default"] for name, spec in param_specs().items()} | over


def test_params_render_the_hetjob() -> None:
    # the local profile: 4-core nodes, n1 with gpu:2
    assert "learner_gpus" not in resolve_run(_defaults())["job_spec"]  # 0: today's CPU path
    run = resolve_run(_defaults(learner_gpus=2, gpu_partition="gpu", nodes=1, cpus_per_node=3))
    assert {k: run["job_spec"][k] for k in ("learner_gpus", "gpu_partition", "gpu_nodes")} == {
        "learner_gpus": 2, "gpu_partition": "gpu", "gpu_nodes": 1,
    }  # fmt: skip
    assert run["job_spec"]["gpu_cpus"] == 3  # empty gpu_cpus: cpus_per_node
    assert (run["config"]["num_learners"], run["config"]["num_gpus_per_learner"]) == (2, 1)
    with pytest.raises(RunParamError, match=r"^gpus_per_node: set learner_gpus or"):
        resolve_run(_defaults(learner_gpus=2, gpus_per_node=1))
    with pytest.raises(RunParamError, match=r"^learner_gpus: 3 exceeds the 2 GPUs"):
        resolve_run(_defaults(learner_gpus=3))
    with pytest.raises(RunParamError, match=r"^gpu_cpus: 5 exceeds the 4 cores"):
        resolve_run(_defaults(learner_gpus=2, gpu_cpus=5))
    with pytest.raises(RunParamError, match=r"^gpu_partition: "):
        resolve_run(_defaults(learner_gpus=1, gpu_partition="a b"))
    with pytest.raises(RunParamError, match=r"^learner_gpus: "):
        resolve_run(_defaults(learner_gpus=-1))


def test_rllib_train_offers_the_gpu_params() -> None:
    specs = param_specs()
    for name in ("learner_gpus", "gpu_partition", "gpu_nodes", "gpu_cpus"):
        assert specs[name]["description"] and specs[name]["schema"], name
    assert specs["learner_gpus"]["default"] == 0  # today's CPU path unless asked for


# -- the submit path's claim sees a hetjob (squeue lists it as ID+0, ID+1) ------------


def test_claim_adopts_a_hetjob_of_the_try_instead_of_submitting_again(
    tmp_path: Path,
    shell: Any,  # noqa: F811 (the fixture imported above)
) -> None:
    for offset in ("0", "1"):
        shell.fake.add(
            "squeue", f"61+{offset}", squeue_line(f"61+{offset}", "RUNNING", "sr-abc-train-t1")
        )
    op = claim_op(tmp_path, shell)
    assert op.manager.submit_once(claim_run_dir(tmp_path), "sr-abc-train-t1") == ("61", True)
    assert shell.fake.calls("sbatch") == []


def test_claim_sees_a_later_tries_hetjob(tmp_path: Path, shell: Any) -> None:  # noqa: F811
    from airflow.sdk.exceptions import AirflowException

    for offset in ("0", "1"):
        shell.fake.add(
            "squeue", f"80+{offset}", squeue_line(f"80+{offset}", "PENDING", "sr-abc-train-t3")
        )
    op = claim_op(tmp_path, shell)
    with pytest.raises(AirflowException, match=r"later try .* Slurm job 80\b"):
        op.manager.submit_once(claim_run_dir(tmp_path, 2), "sr-abc-train-t2")
    assert shell.fake.calls("sbatch") == []
