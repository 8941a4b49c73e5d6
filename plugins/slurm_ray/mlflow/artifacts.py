"""A finished run's evidence into MLflow: run-dir files, checkpoint, model, final metrics."""

from __future__ import annotations

import json
import logging
import posixpath
import re
import tarfile
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from slurm_ray.mlflow.accounting import record_job_cost
from slurm_ray.mlflow.errors import MlflowError
from slurm_ray.mlflow.keys import finite, safe_key, tag_items
from slurm_ray.mlflow.registry import register_version
from slurm_ray.mlflow.runs import client_for, set_tags
from slurm_ray.utils.quoting import quote

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from slurm_ray.mlflow.settings import MlflowSettings

_log = logging.getLogger(__name__)

#: Result fields logged as final metrics (``episode_return_mean``, ``env_steps``…
#: are already per-iteration metrics; logging them again would duplicate a step).
FINAL_METRIC_KEYS = ("eval_return_mean", "eval_episodes", "wall_s", "ray_nodes", "num_env_runners")
#: Result fields recorded as run tags at completion.
FINAL_TAG_KEYS = ("status", "stop_reason", "checkpoint", "rl_module_checkpoint", "resumed_from")
#: Files of the run directory logged as artifacts (name -> artifact folder).
RUN_DIR_ARTIFACTS = {
    "job.sbatch": "slurm",
    "result.json": "",
    "config.json": "",
    "metrics.jsonl": "",
}
MODEL_DIRNAME = "mlflow_model"
MODEL_ARTIFACT_PATH = "model"

_EXPORT_DIR_RE = re.compile(r"\.slurm-ray-export\.[A-Za-z0-9]+")


class RemoteFiles(Protocol):
    """What :func:`finalize_run` needs from :class:`slurm_ray.hooks.slurm.SlurmHook`."""

    def run(self, command: str, *, timeout: float | None = None, check: bool = False) -> Any:
        """Run a shell command on the login node (result has exit_code, stdout)."""

    def read_file(self, remote_path: str) -> bytes | None:
        """Whole remote file, or None."""

    def download(self, remote_path: str, local_path: str) -> None:
        """Copy a remote file to a local path."""


def _bundle_command(run_dir: str, names: Sequence[str], checkpoint: str | None) -> str:
    """
    Shell: tar the existing ``names`` of ``run_dir`` and the checkpoint directory.

    Only what lies inside the run directory is taken: the checkpoint path (from
    ``result.json``, written by the job) is resolved with its symlinks and
    refused unless it is inside; symlinks are never archived or followed.
    The tarball goes into a fresh hidden directory inside the run directory
    (scratch has room for a big checkpoint, a login node's /tmp may not).
    Prints that directory's name, then ``checkpoint REL`` (or
    ``checkpoint-outside``), then ``bundle`` if there was anything to tar.
    """
    lines = [
        "set -e",
        f"cd -- {quote(run_dir)}",
        "rd=$(pwd -P)",
        "tmp=$(mktemp -d .slurm-ray-export.XXXXXX)",
        'echo "$tmp"',
        ': > "$tmp/list"',
        f"for f in {' '.join(quote(n) for n in names)}; do "
        'if [ -e "$f" ] && [ ! -L "$f" ]; then find "$f" ! -type l -print0 >> "$tmp/list"; fi; done',
    ]
    if checkpoint:
        lines += [
            f"ck=$(realpath -e -- {quote(checkpoint)} 2>/dev/null) || ck=",
            'case "$ck" in'
            ' "$rd"/?*) rel=${ck#"$rd"/}; echo "checkpoint $rel";'
            ' find "$rel" ! -type l -print0 >> "$tmp/list" ;;'
            " *) echo checkpoint-outside ;;"
            " esac",
        ]
    lines.append(
        'if [ -s "$tmp/list" ]; then '
        'tar --null --no-recursion -T "$tmp/list" -czf "$tmp/bundle.tgz"; echo bundle; fi'
    )
    return "\n".join(lines)


def _fetch_bundle(
    hook: RemoteFiles, run_dir: str, names: Sequence[str], checkpoint: str | None, dest: Path
) -> str | None:
    """Download the run-dir files and the checkpoint in one tarball (one SFTP transfer).

    :returns: the checkpoint's path relative to the run directory (and to
        ``dest``), or None when there is none inside the run directory.
    """
    # Generous timeout: compressing a large checkpoint takes a while.
    res = hook.run(_bundle_command(run_dir, names, checkpoint), timeout=3600, check=True)
    out = (res.stdout or "").splitlines()
    if not out or not _EXPORT_DIR_RE.fullmatch(out[0]):
        raise MlflowError(f"unexpected output from the remote bundling step: {res.stdout!r}")
    tmp = posixpath.join(run_dir, out[0])
    rel: str | None = None
    try:
        for line in out[1:]:
            if line.startswith("checkpoint "):
                rel = line.removeprefix("checkpoint ")
            elif line == "checkpoint-outside":
                _log.warning(
                    "checkpoint %r is not inside the run directory %s (symlinks resolved); "
                    "not uploaded",
                    checkpoint,
                    run_dir,
                )
        if "bundle" in out[1:]:
            local = dest / "bundle.tgz"
            hook.download(f"{tmp}/bundle.tgz", str(local))
            with tarfile.open(local) as tar:
                tar.extractall(dest, filter="data")  # refuses absolute paths, .., devices
            local.unlink()
    finally:
        hook.run(f"rm -rf -- {quote(tmp)}")
    if rel is not None and (rel.startswith("/") or ".." in rel.split("/")):
        rel = None  # cannot come from the case above; never trust it blindly
    return rel


def _log_files(
    client: MlflowClient,
    run_id: str,
    hook: RemoteFiles,
    run_dir: str,
    job_id: str,
    checkpoint: str | None,
    log: Any,
) -> bool:
    """Upload the run directory's evidence; returns whether it held an MLflow model."""
    slurm_log = f"slurm-{job_id}.out"
    with tempfile.TemporaryDirectory(prefix="slurm-ray-mlflow-") as tmp_name:
        tmp = Path(tmp_name)
        started = time.monotonic()
        ckpt_rel = _fetch_bundle(
            hook, run_dir, [*RUN_DIR_ARTIFACTS, slurm_log, MODEL_DIRNAME], checkpoint, tmp
        )
        for name, folder in {**RUN_DIR_ARTIFACTS, slurm_log: "slurm"}.items():
            if (tmp / name).is_file():
                client.log_artifact(run_id, str(tmp / name), folder or None)
        if checkpoint:
            ckpt_local = tmp / ckpt_rel if ckpt_rel else tmp / ".no-checkpoint"
            if ckpt_local.is_dir():
                client.log_artifacts(run_id, str(ckpt_local), f"checkpoint/{ckpt_local.name}")
            else:
                log.warning("checkpoint %s not found on the cluster; not logged", checkpoint)
        has_model = (tmp / MODEL_DIRNAME / "MLmodel").is_file()
        if has_model:
            client.log_artifacts(run_id, str(tmp / MODEL_DIRNAME), MODEL_ARTIFACT_PATH)
        log.info("MLflow artifacts of run %s logged in %.1fs", run_id, time.monotonic() - started)
    return has_model


def _log_final(
    client: MlflowClient, run_id: str, hook: RemoteFiles, job_id: str, result: Mapping[str, Any]
) -> dict[str, float]:
    """Final metrics (result fields), result tags and the job's cost; returns the metrics.

    The cost is logged once per job: the operator usually did at completion.
    """
    from mlflow.entities import Metric, RunTag

    step = int(result.get("iterations") or 0)
    now_ms = int(time.time() * 1000)
    metrics = {k: v for k in FINAL_METRIC_KEYS if (v := finite(result.get(k))) is not None}
    tags = {
        f"slurm_ray.result.{k}": result.get(k) for k in FINAL_TAG_KEYS if result.get(k) is not None
    }
    tags["slurm_ray.slurm_job_id"] = job_id
    client.log_batch(
        run_id,
        metrics=[Metric(safe_key(k), v, now_ms, step) for k, v in metrics.items()],
        tags=[RunTag(k, v) for k, v in tag_items(tags)],
    )
    return {**metrics, **record_job_cost(client, run_id, hook, job_id, wait_s=5.0)}


def finalize_run(
    settings: MlflowSettings,
    run_id: str,
    *,
    hook: RemoteFiles,
    run_dir: str,
    job_id: str,
    result: Mapping[str, Any] | None,
    log: Any = None,
) -> dict[str, Any]:
    """
    Log a finished run's evidence and model, register a version, end the run.

    Artifacts: ``slurm/job.sbatch``, ``slurm/slurm-<job>.out``, ``result.json``,
    ``config.json``, ``metrics.jsonl``, ``checkpoint/<name>/`` (the final RLlib
    checkpoint) and ``model/`` (``<run_dir>/mlflow_model``, built on the cluster
    by ``include/export_model.py``). Final metrics: ``eval_return_mean`` & co.
    and Slurm efficiency where available. Safe to call again (task retry):
    artifacts are overwritten and an existing version for this run is reused.

    :raises MlflowError: a model name is configured but the run has no model.
    :returns: ``{"mlflow_run_id", "model_name", "model_version", "model_uri",
        "artifact_uri", "metrics"}``.
    """
    client = client_for(settings)
    if result is None:
        raw = hook.read_file(posixpath.join(run_dir, "result.json"))
        result = json.loads(raw) if raw else {}
    checkpoint = result.get("checkpoint") if settings.log_checkpoint else None
    has_model = _log_files(client, run_id, hook, run_dir, job_id, checkpoint, log or _log)
    metrics = _log_final(client, run_id, hook, job_id, result)
    out: dict[str, Any] = {
        "mlflow_run_id": run_id,
        "model_name": None,
        "model_version": None,
        "model_uri": f"runs:/{run_id}/{MODEL_ARTIFACT_PATH}" if has_model else None,
        "artifact_uri": client.get_run(run_id).info.artifact_uri,
        "metrics": metrics,
    }
    name = settings.registered_model_name
    if name:
        if not has_model:
            client.set_terminated(run_id, status="FAILED")
            raise MlflowError(
                f"no MLflow model in {run_dir}/{MODEL_DIRNAME}: run include/export_model.py "
                "after training (the artifacts and metrics were logged; nothing was registered)"
            )
        source = f"{out['artifact_uri']}/{MODEL_ARTIFACT_PATH}"
        tags = {
            "slurm_ray.slurm_job_id": job_id,
            "eval_return_mean": metrics.get("eval_return_mean"),
        }
        mv = register_version(client, name, run_id, source, tags)
        out.update(
            model_name=name, model_version=str(mv.version), model_uri=f"models:/{name}/{mv.version}"
        )
        set_tags(settings, run_id, {"slurm_ray.model_version": mv.version})
    client.set_terminated(run_id, status="FINISHED")
    return out
