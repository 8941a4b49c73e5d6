"""Cluster profiles: everything site-specific, in one place.

A profile names the SSH connection of the login node, where run directories
go, the site's module lines, how the Python environment is activated, and
default Slurm placement.  DAG code only ever says ``profile="kestrel"``.

Add a site: :func:`register_profile` from a DAG-folder module, or set the
``SLURM_RAY_PROFILES`` environment variable to a JSON file path whose content
is ``{"name": {...ClusterProfile fields...}}``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar

from pydantic import Field, StrictInt, StrictStr

from slurm_ray.utils.environment import EnvironmentSpec
from slurm_ray.validation import MODULE_PATTERN, Spec


class ProfileError(ValueError):
    """Unknown profile or bad profile definition."""


class ClusterProfile(Spec):
    """
    One HPC site.

    :param name: profile id used in Params (``local``, ``eagle``, ``kestrel``).
    :param ssh_conn_id: Airflow SSH connection of the login node.
    :param login_host: documentation only: the host the connection points at.
    :param remote_base_dir: root of run directories; ``{user}`` is the remote user.
    :param cores_per_node: CPUs of one compute node.
    :param gpus_per_node: GPUs of one GPU node (0 if none).
    :param partition: default partition (None: the site default).
    :param account: default account; ``None`` where the site needs none.
    :param environment: how jobs activate the Python environment.
    :param job_url_template: link to a job page (Open OnDemand etc.); ``{job_id}``,
        ``{cluster}`` are filled in. Empty: the link shows the id and cluster only.
    :param env_modules: modules a ``module:Name`` env id may make gymnasium import
        on the cluster (none by default: an env id must not run arbitrary code).
    """

    spec_error: ClassVar[type[ValueError]] = ProfileError

    name: StrictStr
    ssh_conn_id: StrictStr
    login_host: StrictStr = ""
    remote_base_dir: StrictStr = "/scratch/{user}/slurm_ray"
    cores_per_node: Annotated[StrictInt, Field(ge=1)] = 1
    gpus_per_node: Annotated[StrictInt, Field(ge=0)] = 0
    partition: StrictStr | None = None
    account: StrictStr | None = None
    qos: StrictStr | None = None
    environment: EnvironmentSpec = Field(default_factory=EnvironmentSpec)
    job_url_template: StrictStr = ""
    env_stage_dir: StrictStr | None = None
    env_build_vars: Mapping[StrictStr, StrictStr] = Field(default_factory=dict)
    description: StrictStr = ""
    env_modules: tuple[Annotated[StrictStr, Field(pattern=MODULE_PATTERN)], ...] = ()

    @classmethod
    def _label(cls, data: Mapping[str, Any]) -> str:
        return f"profile {data.get('name')!r}: "

    @classmethod
    def from_dict(cls, name: str, data: Mapping[str, Any]) -> ClusterProfile:
        """A profile from JSON (``environment`` may be a plain mapping)."""
        return cls(**{**data, "name": name})


_LOCAL_STATE = os.environ.get("SLURM_RAY_DEV_STATE", "/var/lib/slurm-ray-dev")

_BUILTIN: dict[str, ClusterProfile] = {
    "local": ClusterProfile(
        name="local",
        ssh_conn_id="slurm_dev",
        login_host="127.0.0.1:22022",
        remote_base_dir=f"{_LOCAL_STATE}/scratch/runs",
        cores_per_node=4,
        gpus_per_node=2,  # n1's count-only gpu:2 (partition gpu): learner_gpus hetjobs
        partition="debug",
        environment=EnvironmentSpec(
            kind="venv",
            prefix=f"{_LOCAL_STATE}/venv",
            spec_file="requirements-cluster.txt",
            python="/usr/bin/python3",
        ),
        # The venv itself belongs to root (make cluster-up builds it); the job
        # user stages the spec here to confirm it is up to date.
        env_stage_dir=f"{_LOCAL_STATE}/scratch/env-spec",
        description="The local dev cluster of scripts/devcluster.sh (two nodes n1, n2).",
    ),
    # NREL Eagle (retired; kept because the tutorial this project grew from ran there).
    "eagle": ClusterProfile(
        name="eagle",
        ssh_conn_id="slurm_eagle",
        login_host="el1.hpc.nrel.gov",
        remote_base_dir="/scratch/{user}/slurm_ray",
        cores_per_node=36,
        gpus_per_node=2,
        partition="short",
        account="CHANGE_ME",
        environment=EnvironmentSpec(
            kind="conda",
            prefix="/scratch/{user}/conda-envs/slurm-ray",
            spec_file="environment.yml",
            module_lines=("module purge", "module load conda"),
            conda_setup='eval "$(conda shell.bash hook)"',
            unset_ld_preload=True,
        ),
        description="NREL Eagle: 36 cores per node; LD_PRELOAD broke Ray's Redis there.",
    ),
    "kestrel": ClusterProfile(
        name="kestrel",
        ssh_conn_id="slurm_kestrel",
        login_host="kestrel.hpc.nrel.gov",
        remote_base_dir="/scratch/{user}/slurm_ray",
        cores_per_node=104,
        gpus_per_node=4,
        partition="short",
        account="CHANGE_ME",
        environment=EnvironmentSpec(
            kind="conda",
            prefix="/scratch/{user}/conda-envs/slurm-ray",
            spec_file="environment.yml",
            module_lines=("module purge", "module load anaconda3"),
            conda_setup='eval "$(conda shell.bash hook)"',
        ),
        description="NREL Kestrel: 104 cores per node.",
    ),
}

_REGISTERED: dict[str, ClusterProfile] = {}


def register_profile(profile: ClusterProfile) -> None:
    """Add or replace a profile at import time (e.g. from a DAG-folder module)."""
    _REGISTERED[profile.name] = profile


def _from_env_file() -> dict[str, ClusterProfile]:
    path = os.environ.get("SLURM_RAY_PROFILES")
    if not path:
        return {}
    with open(path) as fh:
        raw = json.load(fh)
    if not isinstance(raw, dict):
        raise ProfileError(f"{path}: expected a JSON object of profiles")
    return {name: ClusterProfile.from_dict(name, spec) for name, spec in raw.items()}


def all_profiles() -> dict[str, ClusterProfile]:
    """Built-in, file-defined and registered profiles (later ones win)."""
    return {**_BUILTIN, **_from_env_file(), **_REGISTERED}


def profile_names() -> list[str]:
    return sorted(all_profiles())


def get_profile(name: str, **overrides: Any) -> ClusterProfile:
    """The profile ``name``; ``overrides`` replace fields. Unknown names list the valid ones."""
    profiles = all_profiles()
    if name not in profiles:
        raise ProfileError(
            f"profile: unknown cluster profile {name!r}; valid profiles are: {', '.join(sorted(profiles))}"
        )
    profile = profiles[name]
    return ClusterProfile(**{**dict(profile), **overrides}) if overrides else profile


#: Where run directories go when neither the operator nor a profile names one:
#: the remote user's home, resolved on the cluster at run time.
DEFAULT_REMOTE_BASE_DIR = "{home}/slurm_ray/runs"

#: Plain operator keyword -> JobSpec field (the common placement values).
PLACEMENT_KWARGS = {
    "nodes": "nodes",
    "cpus_per_node": "cpus_per_task",
    "time_limit": "time",
    "partition": "partition",
    "account": "account",
}


def operator_defaults(profile: str | None) -> dict[str, Any]:
    """
    What an operator's ``profile=`` supplies: connection, base dir, environment, placement.

    Empty for ``None``. An unknown name raises :class:`ProfileError` naming ``profile``
    (at DAG parse time, so the DAG shows an import error instead of a failed run).
    """
    if not profile:
        return {}
    p = get_profile(profile)
    placement = {"partition": p.partition, "account": p.account, "qos": p.qos}
    return {
        "name": p.name,
        "ssh_conn_id": p.ssh_conn_id,
        "remote_base_dir": p.remote_base_dir,
        "environment": p.environment.to_dict(),
        "placement": {k: v for k, v in placement.items() if v is not None},
        "job_url_template": p.job_url_template,
        "env_stage_dir": p.env_stage_dir,
        "env_build_vars": dict(p.env_build_vars),
        "env_modules": tuple(p.env_modules),
    }


def merge_placement(
    profile_placement: Mapping[str, Any],
    job_spec: Mapping[str, Any],
    plain: Mapping[str, Any],
    *,
    profile: str = "",
) -> dict[str, Any]:
    """
    The job spec: the profile's placement, then ``job_spec``, then the plain keywords.

    ``plain`` uses the operator's keyword names (:data:`PLACEMENT_KWARGS`); a value
    given both as a keyword and in ``job_spec`` must agree. A profile's ``CHANGE_ME``
    account must be replaced.
    """
    spec = {**profile_placement, **job_spec}
    for kwarg, value in plain.items():
        if value is None:
            continue
        key = PLACEMENT_KWARGS[kwarg]
        if job_spec.get(key) is not None and job_spec[key] != value:
            raise ProfileError(
                f"{kwarg}: given as {kwarg}={value!r} and as job_spec[{key!r}]={job_spec[key]!r}; "
                "give it once"
            )
        spec[key] = value
    if spec.get("account") == "CHANGE_ME":
        raise ProfileError(
            f"account: the {profile or 'cluster'} profile needs your Slurm account (account=...)"
        )
    return spec
