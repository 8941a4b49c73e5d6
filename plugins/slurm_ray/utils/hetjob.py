"""The GPU learner's hetjob: a :class:`~slurm_ray.utils.batch.JobSpec` split in two.

With ``learner_gpus > 0`` the job is a Slurm heterogeneous job (``#SBATCH
hetjob`` between the components), as in the seed tutorial's GPU script:

- component 0, the GPU node(s): ``gpu_partition`` (else ``partition``),
  ``gpu_nodes`` (default 1), ``gpu_cpus``, ``--gres=gpu:N`` with ``learner_gpus``
  split evenly over them, and every job-level option (name, account, QOS, time,
  signal, log files, extra directives). The batch script runs there, so the Ray
  head and the driver do too;
- component 1, the CPU nodes: the spec's own resources (partition, nodes, CPUs,
  memory, constraint, exclusive).

Slurm propagates job-level options (account, time, ...) to later components
and resets the resources, so component 1 repeats every resource it needs
(measured on 22.05: a component 1 without ``--partition`` gets the default
partition, not component 0's).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from slurm_ray.validation import FieldError

if TYPE_CHECKING:
    from slurm_ray.utils.batch import JobSpec

__all__ = ["check_gpu_component", "het_components"]

Pairs = list[tuple[str, str | None]]

#: Directives that describe one component's nodes; everything else is job-level.
_RESOURCES = frozenset(
    {"partition", "nodes", "ntasks-per-node", "cpus-per-task", "mem", "constraint", "exclusive"}
)
#: Per-node extras that describe the CPU nodes too (Slurm resets them per component).
_BOTH = frozenset({"mem-per-cpu", "tmp"})
#: Extras that cannot apply to both components as one value.
_REFUSED = {
    "gpus": "learner_gpus sets the GPUs of a hetjob",
    "nodelist": "a node list cannot span hetjob components; use exclude",
}
_GPU_FIELDS = ("gpu_partition", "gpu_nodes", "gpu_cpus")


def check_gpu_component(spec: JobSpec) -> None:
    """Raise :class:`FieldError` naming the field for a GPU component Slurm would misread."""
    if not spec.learner_gpus:
        for name in _GPU_FIELDS:
            if getattr(spec, name) is not None:
                raise FieldError(name, "only used with learner_gpus > 0 (a GPU hetjob)")
        return
    for name in ("gpus_per_node", "gres"):
        if getattr(spec, name) is not None:
            raise FieldError(
                name, "not with learner_gpus: the GPUs go to the hetjob's GPU component"
            )
    for key, why in _REFUSED.items():
        if key in spec.extra:
            raise FieldError(f"extra[{key!r}]", f"not with learner_gpus: {why}")
    nodes = spec.gpu_nodes or 1
    if spec.learner_gpus % nodes:
        raise FieldError(
            "learner_gpus", f"{spec.learner_gpus} GPUs do not split evenly over gpu_nodes={nodes}"
        )


def het_components(spec: JobSpec, pairs: Pairs) -> list[Pairs]:
    """``[GPU component, CPU component]`` from the one-component ``pairs`` of ``spec``."""
    cpu = [(o, v) for o, v in pairs if o in _RESOURCES or o in _BOTH]
    gpu: Pairs = []
    for option, value in pairs:
        if option not in _RESOURCES:
            gpu.append((option, value))
        if option == "job-name":
            # Component 0's resources right after the name, in the usual order.
            partition = spec.gpu_partition or spec.partition
            if partition is not None:
                gpu.append(("partition", partition))
            gpu.append(("nodes", str(spec.gpu_nodes or 1)))
            gpu.append(("ntasks-per-node", "1"))
            if spec.gpu_cpus is not None:
                gpu.append(("cpus-per-task", str(spec.gpu_cpus)))
            if spec.mem is not None:
                gpu.append(("mem", spec.mem))
            gpu.append(("gres", f"gpu:{spec.learner_gpus // (spec.gpu_nodes or 1)}"))
            if spec.exclusive:
                gpu.append(("exclusive", None))
    return [gpu, cpu]
