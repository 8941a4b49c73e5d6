"""Compatibility shim: the MLflow layer now lives in :mod:`slurm_ray.mlflow`.

Re-exports the names other modules and tests import from here; to be removed
once they import from the package.
"""

from __future__ import annotations

from typing import Any

from slurm_ray.mlflow.accounting import _elapsed_seconds, slurm_efficiency
from slurm_ray.mlflow.artifacts import (
    FINAL_METRIC_KEYS,
    FINAL_TAG_KEYS,
    MODEL_ARTIFACT_PATH,
    MODEL_DIRNAME,
    RUN_DIR_ARTIFACTS,
    RemoteFiles,
    _bundle_command,
    _fetch_bundle,
    finalize_run,
)
from slurm_ray.mlflow.compare import PALETTE as _PALETTE
from slurm_ray.mlflow.compare import compare_runs
from slurm_ray.mlflow.errors import MlflowError, MlflowUnreachableError
from slurm_ray.mlflow.hook import (
    _CREDENTIALS,
    URI_ENV_VARS,
    MlflowHook,
    credentialed_uri,
    public_uri,
    scrub,
)
from slurm_ray.mlflow.keys import (
    TAG_PREFIX,
    TASK_KEY_TAG,
    flatten_params,
    limit_params,
    task_identity_tags,
)
from slurm_ray.mlflow.keys import task_key as _task_key
from slurm_ray.mlflow.plot import RemotePlotter
from slurm_ray.mlflow.reachability import check_reachable
from slurm_ray.mlflow.registry import CHAMPION_ALIAS, promote_if_better
from slurm_ray.mlflow.relay import (
    MAX_PENDING_ROWS,
    SENTINEL_METRIC,
    MetricsRelay,
    RelayStats,
    deliver_rows,
    make_async_sink,
    make_relay,
    metrics_from_row,
    parse_metrics_jsonl,
    relay_rows,
)
from slurm_ray.mlflow.runs import (
    client_for,
    end_run,
    ensure_run,
    include_files_hash,
    record_job,
    set_tags,
)
from slurm_ray.mlflow.settings import MlflowSettings

__all__ = [
    "CHAMPION_ALIAS",
    "FINAL_METRIC_KEYS",
    "FINAL_TAG_KEYS",
    "MAX_PENDING_ROWS",
    "MODEL_ARTIFACT_PATH",
    "MODEL_DIRNAME",
    "RUN_DIR_ARTIFACTS",
    "SENTINEL_METRIC",
    "TAG_PREFIX",
    "TASK_KEY_TAG",
    "URI_ENV_VARS",
    "_CREDENTIALS",
    "_PALETTE",
    "MetricsRelay",
    "MlflowError",
    "MlflowHook",
    "MlflowSettings",
    "MlflowUnreachableError",
    "RelayStats",
    "RemoteFiles",
    "RemotePlotter",
    "_bundle_command",
    "_elapsed_seconds",
    "_fetch_bundle",
    "_task_key",
    "check_reachable",
    "client_for",
    "compare_runs",
    "credentialed_uri",
    "deliver_rows",
    "end_run",
    "ensure_run",
    "finalize_run",
    "flatten_params",
    "include_files_hash",
    "limit_params",
    "make_async_sink",
    "make_relay",
    "metrics_from_row",
    "parse_metrics_jsonl",
    "promote_if_better",
    "public_uri",
    "record_job",
    "relay_rows",
    "scrub",
    "set_tags",
    "slurm_efficiency",
    "task_identity_tags",
]


def __getattr__(name: str) -> Any:
    # MLflow's own limits (no copies): MAX_PARAM_VAL_LENGTH, MAX_METRICS_PER_BATCH, ...
    if name.startswith("MAX_"):
        from slurm_ray.mlflow.keys import limits

        return getattr(limits(), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
