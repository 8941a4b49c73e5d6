"""The one MLflow run of a training task: find or create, record its jobs, end it."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from slurm_ray.mlflow.errors import MlflowError
from slurm_ray.mlflow.hook import client_for_uri
from slurm_ray.mlflow.keys import (
    TASK_KEY_TAG,
    flatten_params,
    limit_params,
    prefixed,
    tag_items,
    task_key,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from slurm_ray.mlflow.settings import MlflowSettings


def client_for(settings: MlflowSettings) -> MlflowClient:
    """An :class:`mlflow.MlflowClient` for ``settings`` (credentials from this process)."""
    return client_for_uri(settings.tracking_uri, settings.conn_id)


def set_tags(settings: MlflowSettings, run_id: str, tags: Mapping[str, Any]) -> None:
    """Set run tags (values stringified and cut to MLflow's limit; None → empty)."""
    from mlflow.entities import RunTag

    client_for(settings).log_batch(run_id, tags=[RunTag(k, v) for k, v in tag_items(tags)])


def experiment_id(client: MlflowClient, name: str) -> str:
    """The id of experiment ``name``: restored if deleted, created if missing."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return str(exp.experiment_id)
    try:
        return str(client.create_experiment(name))
    except MlflowException as exc:  # created concurrently by a sibling task
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise MlflowError(f"cannot create MLflow experiment {name!r}: {exc}") from exc
        return str(exp.experiment_id)


def _default_run_name(tags: Mapping[str, str]) -> str | None:
    if "task_id" not in tags:
        return None
    name = tags["task_id"]
    if tags.get("map_index") not in (None, "", "-1"):
        name += f"[{tags['map_index']}]"
    if tags.get("run_id"):
        name += f" {tags['run_id']}"
    return name[:250]


def _find_run(client: MlflowClient, exp_id: str, key: str) -> Any | None:
    runs = client.search_runs(
        [exp_id],
        filter_string=f"tags.`{TASK_KEY_TAG}` = '{key}'",
        max_results=1,
        order_by=["attributes.start_time ASC"],
    )
    return runs[0] if runs else None


def _find_or_create(
    client: MlflowClient, exp_id: str, tags: Mapping[str, str], run_name: str | None
) -> Any:
    key = task_key(tags)
    run = _find_run(client, exp_id, key)
    if run is None:
        run = client.create_run(
            exp_id,
            run_name=run_name or _default_run_name(tags),
            tags={TASK_KEY_TAG: key, **dict(tag_items({prefixed(k): v for k, v in tags.items()}))},
        )
        # Two workers racing on the same task (a rare scheduler double-start):
        # both then use the oldest run; the other one stays empty.
        oldest = _find_run(client, exp_id, key)
        if oldest is not None and oldest.info.run_id != run.info.run_id:
            client.delete_run(run.info.run_id)
            run = oldest
    elif run.info.status != "RUNNING":
        client.update_run(run.info.run_id, status="RUNNING")
    return run


def _log_params(client: MlflowClient, run: Any, params: Mapping[str, Any]) -> None:
    from mlflow.entities import Param, RunTag

    run_id = str(run.info.run_id)
    limited, changed = limit_params(flatten_params(params))
    existing = dict(run.data.params) if run.data.params else {}
    conflicts = sorted(k for k, v in limited.items() if k in existing and existing[k] != v)
    todo = [Param(k, v) for k, v in limited.items() if k not in existing]
    extra: dict[str, str] = {}
    if changed:
        extra["slurm_ray.params_truncated"] = "true"
        extra["slurm_ray.params_truncated_keys"] = ",".join(changed)
    if conflicts:
        # MLflow params are immutable; a retry with a changed config must not crash.
        extra["slurm_ray.params_conflict"] = ",".join(conflicts)
    if todo or extra:
        client.log_batch(run_id, params=todo, tags=[RunTag(k, v) for k, v in tag_items(extra)])


def ensure_run(
    settings: MlflowSettings,
    *,
    tags: Mapping[str, str],
    params: Mapping[str, Any] | None = None,
    run_name: str | None = None,
) -> str:
    """The one MLflow run of a training task: found by its identity tags, or created.

    Retries of a task pass the same ``tags`` (see :func:`task_identity_tags`;
    never the try number) and continue the same run, which is set back to
    RUNNING. Params (the training config, flattened) are logged once; a key
    already present with another value is left alone and listed in the tag
    ``slurm_ray.params_conflict``; anything cut to fit MLflow's limits is
    listed in ``slurm_ray.params_truncated_keys`` with ``slurm_ray.params_truncated=true``.

    :returns: the MLflow run id.
    """
    client = client_for(settings)
    run = _find_or_create(client, experiment_id(client, settings.experiment_name), tags, run_name)
    if params:
        _log_params(client, run, params)
    return str(run.info.run_id)


def record_job(
    settings: MlflowSettings,
    run_id: str,
    *,
    job_id: str,
    try_number: int | None = None,
    nodelist: str | None = None,
    num_nodes: int | None = None,
    cluster: str | None = None,
    run_dir: str | None = None,
    include_hash: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Tag the run with the Slurm job of the current try.

    ``slurm_ray.slurm_job_ids`` accumulates every job id the task used (retries,
    requeues); ``slurm_ray.slurm_job_id`` is the current one. None values are skipped.
    """
    current = client_for(settings).get_run(run_id).data.tags.get("slurm_ray.slurm_job_ids", "")
    ids = [i for i in current.split(",") if i]
    if job_id not in ids:
        ids.append(str(job_id))
    tags: dict[str, Any] = {
        "slurm_ray.slurm_job_id": job_id,
        "slurm_ray.slurm_job_ids": ",".join(ids),
        "slurm_ray.try_number": try_number,
        "slurm_ray.nodelist": nodelist,
        "slurm_ray.num_nodes": num_nodes,
        "slurm_ray.cluster": cluster,
        "slurm_ray.run_dir": run_dir,
        "slurm_ray.include_files_sha256": include_hash,
        **{prefixed(k): v for k, v in (extra or {}).items()},
    }
    set_tags(settings, run_id, {k: v for k, v in tags.items() if v is not None and v != ""})


def include_files_hash(files: Mapping[str, bytes]) -> str:
    """sha256 over the staged files (name and content, in name order): the code version."""
    digest = hashlib.sha256()
    for name in sorted(files):
        data = files[name]
        digest.update(f"{name}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


def end_run(settings: MlflowSettings, run_id: str, status: str = "FAILED") -> None:
    """Mark the run FINISHED / FAILED / KILLED (a retry sets it RUNNING again)."""
    client_for(settings).set_terminated(run_id, status=status)
