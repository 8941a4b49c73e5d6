"""MLflow tracking for slurm_ray: one run per training task, live metrics, model registry.

Airflow side only: needs the MLflow *client* (``mlflow-skinny``), never ray,
torch, numpy or pandas. Compute nodes never talk to MLflow: the triggerer
relays ``metrics.jsonl`` rows, and at completion the worker downloads the run
directory's files over SSH and uploads them to the tracking server (which
proxies artifacts, ``mlflow server --serve-artifacts``).

What the operator calls when (see the report of issue 5):

* before submitting: :func:`check_reachable` (unless ``relay_later``), then
  :func:`ensure_run` and :func:`record_job`;
* while the job runs: the trigger's metrics sink, :func:`make_async_sink`
  (non-deferrable mode: :func:`relay_rows`);
* at completion: :func:`relay_rows` with every row of ``metrics.jsonl`` (the
  catch-up; steps already logged are skipped), then :func:`finalize_run`,
  then optionally :func:`promote_if_better`;
* a sweep's final task: :func:`compare_runs`.

Every function takes :class:`MlflowSettings` (or the relay dict) and builds its
own :class:`mlflow.MlflowClient`; nothing touches MLflow's global state
(``mlflow.set_tracking_uri``, the active run), so several tasks can share a
process.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import itertools
import json
import logging
import math
import os
import posixpath
import re
import struct
import tarfile
import tempfile
import time
import zlib
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from airflow.sdk.exceptions import AirflowException

from slurm_ray.utils.quoting import quote

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Metric

__all__ = [
    "CHAMPION_ALIAS",
    "SENTINEL_METRIC",
    "MetricsRelay",
    "MlflowError",
    "MlflowSettings",
    "MlflowUnreachableError",
    "check_reachable",
    "compare_runs",
    "end_run",
    "ensure_run",
    "finalize_run",
    "flatten_params",
    "include_files_hash",
    "limit_params",
    "make_async_sink",
    "make_relay",
    "metrics_from_row",
    "promote_if_better",
    "record_job",
    "relay_rows",
    "render_line_chart_png",
    "set_tags",
    "task_identity_tags",
]

_log = logging.getLogger(__name__)

# MLflow's client telemetry phones home from every process that imports it;
# Airflow workers and HPC-adjacent hosts often have no internet (each attempt
# then waits for a timeout). An explicit setting by the user wins.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

#: Alias that marks the production model version.
CHAMPION_ALIAS = "champion"
#: Metric logged last for every relayed row (value = step = iteration). Its
#: latest value in MLflow is the highest step fully logged: the relay's
#: watermark, which makes relaying idempotent across restarts and retries.
SENTINEL_METRIC = "iteration"
TAG_PREFIX = "slurm_ray."
TASK_KEY_TAG = "slurm_ray.task_key"

# MLflow's limits (mlflow.utils.validation, 3.17). Copied, not imported, so
# that importing this module stays cheap for the triggerer; a unit test
# checks them against the installed MLflow.
MAX_PARAM_VAL_LENGTH = 6000
MAX_TAG_VAL_LENGTH = 8000
MAX_ENTITY_KEY_LENGTH = 250
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000

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
#: In-memory cap of rows waiting for an unreachable server. Rows dropped past it
#: are not lost: the completion catch-up re-reads the whole metrics.jsonl.
MAX_PENDING_ROWS = 50_000


class MlflowError(AirflowException):
    """An MLflow step of slurm_ray failed; the message says which and why."""


class MlflowUnreachableError(MlflowError):
    """The tracking server did not answer."""


# -- settings -----------------------------------------------------------------------


@dataclass
class MlflowSettings:
    """
    Where and how a training task is tracked.

    :param tracking_uri: the tracking server, e.g. ``http://127.0.0.1:5055``.
    :param experiment_name: MLflow experiment (the DAG id unless a parameter says otherwise).
    :param registered_model_name: register the trained model under this name; None: don't.
    :param relay_later: if the server is unreachable when the task starts, warn and
        train anyway (metrics are relayed once it is back) instead of failing.
    :param min_improvement: how much a new version's metric must beat the champion's
        to take the ``champion`` alias.
    :param log_checkpoint: upload the final RLlib checkpoint as artifacts.
    :param request_timeout: seconds for the reachability probe.
    """

    tracking_uri: str
    experiment_name: str
    registered_model_name: str | None = None
    relay_later: bool = False
    min_improvement: float = 0.0
    log_checkpoint: bool = True
    request_timeout: float = 5.0

    def __post_init__(self) -> None:
        if not isinstance(self.tracking_uri, str) or not self.tracking_uri.strip():
            raise ValueError("mlflow.tracking_uri: must be a non-empty string")
        given = self.tracking_uri.strip().rstrip("/")
        # Settings travel (XCom, trigger kwargs, logs): they keep the URI without
        # its credentials; this process remembers them for its own clients.
        self.tracking_uri = public_uri(given)
        if given != self.tracking_uri:
            _CREDENTIALS[self.tracking_uri] = given
        if not isinstance(self.experiment_name, str) or not self.experiment_name.strip():
            raise ValueError("mlflow.experiment_name: must be a non-empty string")
        if len(self.experiment_name) > 500:
            raise ValueError("mlflow.experiment_name: longer than MLflow's 500 characters")
        if self.registered_model_name is not None and (
            not isinstance(self.registered_model_name, str)
            or not self.registered_model_name.strip()
        ):
            raise ValueError("mlflow.registered_model_name: must be a non-empty string or null")
        for name in ("relay_later", "log_checkpoint"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"mlflow.{name}: must be true or false")
        for name in ("min_improvement", "request_timeout"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
            ):
                raise ValueError(f"mlflow.{name}: must be a number, got {value!r}")
            setattr(self, name, float(value))
        if self.min_improvement < 0:
            raise ValueError("mlflow.min_improvement: must be >= 0")
        if self.request_timeout <= 0:
            raise ValueError("mlflow.request_timeout: must be > 0")

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], *, default_experiment: str | None = None
    ) -> MlflowSettings:
        """
        Build from a plain dict (operator argument, DAG params).

        :param default_experiment: used when ``experiment_name`` is missing (the DAG id).
        :raises ValueError: naming the offending key (unknown keys included).
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"mlflow: unknown setting(s) {unknown}; known: {sorted(known)}")
        values = dict(data)
        if not values.get("experiment_name"):
            if not default_experiment:
                raise ValueError("mlflow.experiment_name: required")
            values["experiment_name"] = default_experiment
        if "tracking_uri" not in values:
            raise ValueError("mlflow.tracking_uri: required")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict; ``from_dict(to_dict())`` round-trips."""
        return asdict(self)


_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/?#\s]*@")
_USERINFO_ANYWHERE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/?#\s@]*:[^/?#\s@]*@")
#: public URI -> the same URI with credentials, for settings built in this process.
_CREDENTIALS: dict[str, str] = {}
#: Where the Airflow processes (worker, triggerer) get a tracking URI with credentials.
URI_ENV_VARS = ("SLURM_RAY_MLFLOW_URI", "MLFLOW_TRACKING_URI")


def public_uri(uri: str) -> str:
    """``uri`` without ``user:password@``: the form that may be stored, logged or shown."""
    return _USERINFO.sub(r"\1", uri.strip()).rstrip("/")


def scrub(text: str) -> str:
    """``text`` with the password of any ``scheme://user:password@`` replaced by ``***``."""
    return _USERINFO_ANYWHERE.sub(lambda m: m.group(0).split(":")[0] + "://***@", text)


def credentialed_uri(uri: str) -> str:
    """The URI to connect with: credentials from this process, never from stored state.

    A URI with credentials in :data:`URI_ENV_VARS` (set for the workers and the
    triggerer alike) or given to :class:`MlflowSettings` in this process.
    """
    if uri in _CREDENTIALS:
        return _CREDENTIALS[uri]
    for name in URI_ENV_VARS:
        value = os.environ.get(name, "").strip().rstrip("/")
        if value and value != uri and public_uri(value) == uri:
            return value
    return uri


def _client(tracking_uri: str) -> MlflowClient:
    from mlflow import MlflowClient

    uri = credentialed_uri(tracking_uri)
    if uri != tracking_uri:
        # MLflow prints "View run ... at: <the URI>" to stdout (the task log).
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def client_for(settings: MlflowSettings) -> MlflowClient:
    """An :class:`mlflow.MlflowClient` for ``settings`` (credentials from this process)."""
    return _client(settings.tracking_uri)


def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def _probe(tracking_uri: str, timeout: float) -> str | None:
    """One cheap request without MLflow's retry loop (which can take minutes); None if OK."""
    if not _is_http(tracking_uri):
        return None  # databricks, sqlite…: nothing cheap to probe, let the real call tell
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    try:
        resp = http_request(
            get_default_host_creds(credentialed_uri(tracking_uri)),
            "/api/2.0/mlflow/experiments/search",
            "GET",
            params={"max_results": 1},
            max_retries=0,
            backoff_factor=0,
            timeout=timeout,
            raise_on_status=False,
        )
    except Exception as exc:  # connection refused, DNS, timeout: all "unreachable"
        return _short_error(exc)
    if resp.status_code != 200:
        hint = ""
        if resp.status_code == 403 and "host" in resp.text.lower():
            hint = " (the server rejects this Host header: start it with --allowed-hosts)"
        return f"HTTP {resp.status_code}{hint}: {resp.text[:200]}"
    return None


def _short_error(exc: BaseException) -> str:
    text = str(exc)
    # requests' messages repeat the URL and the whole urllib3 chain; keep the cause.
    for marker in (
        "Connection refused",
        "Name or service not known",
        "timed out",
        "Read timed out",
    ):
        if marker in text:
            return marker
    # MLflow's errors quote the request URL, credentials included.
    return f"{type(exc).__name__}: {scrub(text)[:300]}"


def check_reachable(settings: MlflowSettings) -> None:
    """
    Fail fast, before anything is submitted, if the tracking server does not answer.

    :raises MlflowUnreachableError: naming the URI, the cause and the way out.
    """
    problem = _probe(settings.tracking_uri, settings.request_timeout)
    if problem is not None:
        raise MlflowUnreachableError(
            f"MLflow tracking server {settings.tracking_uri} is not reachable: {problem}. "
            "Start it (scripts/mlflow_server.sh start), fix mlflow.tracking_uri, or set "
            "mlflow.relay_later=true to train anyway and send the metrics when it is back."
        )


# -- params and tags ----------------------------------------------------------------

_BAD_KEY_CHARS = re.compile(r"[^\w.\- :]")


def _safe_key(key: str) -> str:
    """A key MLflow accepts (its name rules: ``[/\\w.\\- :]``, no path tricks, ≤ 250)."""
    # Slashes are replaced too: "a//b" or "a/../b" would be rejected as paths.
    out = _BAD_KEY_CHARS.sub("_", str(key)) or "_"
    if out in {".", ".."} or out.startswith(".."):
        out = "_" + out
    if len(out) > MAX_ENTITY_KEY_LENGTH:
        digest = hashlib.sha256(out.encode()).hexdigest()[:10]
        out = f"{out[: MAX_ENTITY_KEY_LENGTH - 11]}-{digest}"
    return out


def _param_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None or isinstance(value, bool | int | float):
        return str(value)
    return json.dumps(value, sort_keys=True, default=str)


def flatten_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """
    Flatten a nested config into MLflow params: ``{"a": {"b": 1}}`` → ``{"a.b": "1"}``.

    Lists and other non-dict values become one param (JSON text); empty dicts too.
    """
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, prefix=f"{name}."))
        else:
            flat[name] = _param_value(value if not isinstance(value, Mapping) else {})
    return flat


def _truncate(text: str, limit: int) -> str:
    marker = "...[truncated]"
    return text if len(text) <= limit else text[: limit - len(marker)] + marker


def limit_params(params: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    """
    Make params fit MLflow's limits instead of failing mid-run.

    :returns: the params (keys sanitised, values cut to ``MAX_PARAM_VAL_LENGTH``)
        and the original keys that were changed.
    """
    out: dict[str, str] = {}
    changed: list[str] = []
    for key, value in params.items():
        safe_key = _safe_key(key)
        safe_value = _truncate(str(value), MAX_PARAM_VAL_LENGTH)
        if safe_key != key or safe_value != value or safe_key in out:
            changed.append(key)
        while safe_key in out:  # two keys that sanitise alike: keep both
            safe_key = _safe_key(safe_key + "_")
        out[safe_key] = safe_value
    return out, changed


def _tag_items(tags: Mapping[str, Any]) -> list[tuple[str, str]]:
    return [
        (_safe_key(k), _truncate("" if v is None else str(v), MAX_TAG_VAL_LENGTH))
        for k, v in tags.items()
    ]


def _chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def set_tags(settings: MlflowSettings, run_id: str, tags: Mapping[str, Any]) -> None:
    """Set run tags (values stringified and cut to MLflow's limit; None → empty)."""
    from mlflow.entities import RunTag

    client = _client(settings.tracking_uri)
    items = [RunTag(k, v) for k, v in _tag_items(tags)]
    for chunk in _chunks(items, MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, tags=list(chunk))


def task_identity_tags(
    dag_id: str, run_id: str, task_id: str, map_index: int | str | None = None
) -> dict[str, str]:
    """The tags that identify one training task across its retries (no try number)."""
    return {
        "dag_id": str(dag_id),
        "run_id": str(run_id),
        "task_id": str(task_id),
        "map_index": "-1" if map_index is None else str(map_index),
    }


def _task_key(tags: Mapping[str, str]) -> str:
    # A hex digest is safe inside a search filter whatever the run id contains.
    text = json.dumps({str(k): str(v) for k, v in tags.items()}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _prefixed(key: str) -> str:
    return key if key.startswith(TAG_PREFIX) else TAG_PREFIX + key


def _experiment_id(client: MlflowClient, name: str) -> str:
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


def _find_run(client: MlflowClient, experiment_id: str, key: str) -> Any | None:
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{TASK_KEY_TAG}` = '{key}'",
        max_results=1,
        order_by=["attributes.start_time ASC"],
    )
    return runs[0] if runs else None


def ensure_run(
    settings: MlflowSettings,
    *,
    tags: Mapping[str, str],
    params: Mapping[str, Any] | None = None,
    run_name: str | None = None,
) -> str:
    """
    The one MLflow run of a training task: found by its identity tags, or created.

    Retries of a task pass the same ``tags`` (see :func:`task_identity_tags`;
    never the try number) and continue the same run, which is set back to
    RUNNING. Params (the training config, flattened) are logged once; a key
    already present with another value is left alone and listed in the tag
    ``slurm_ray.params_conflict``; anything cut to fit MLflow's limits is
    listed in ``slurm_ray.params_truncated_keys`` with ``slurm_ray.params_truncated=true``.

    :returns: the MLflow run id.
    """
    from mlflow.entities import Param, RunTag

    client = _client(settings.tracking_uri)
    exp_id = _experiment_id(client, settings.experiment_name)
    key = _task_key(tags)
    run = _find_run(client, exp_id, key)
    if run is None:
        run = client.create_run(
            exp_id,
            run_name=run_name or _default_run_name(tags),
            tags={
                TASK_KEY_TAG: key,
                **{k: v for k, v in _tag_items({_prefixed(k): v for k, v in tags.items()})},
            },
        )
        # Two workers racing on the same task (a rare scheduler double-start):
        # both then use the oldest run; the other one stays empty.
        oldest = _find_run(client, exp_id, key)
        if oldest is not None and oldest.info.run_id != run.info.run_id:
            client.delete_run(run.info.run_id)
            run = oldest
    elif run.info.status != "RUNNING":
        client.update_run(run.info.run_id, status="RUNNING")
    run_id = str(run.info.run_id)

    if params:
        limited, changed = limit_params(flatten_params(params))
        existing = dict(run.data.params) if run.data.params else {}
        conflicts = sorted(k for k, v in limited.items() if k in existing and existing[k] != v)
        todo = [Param(k, v) for k, v in limited.items() if k not in existing]
        for chunk in _chunks(todo, MAX_PARAMS_TAGS_PER_BATCH):
            client.log_batch(run_id, params=list(chunk))
        extra: dict[str, str] = {}
        if changed:
            extra["slurm_ray.params_truncated"] = "true"
            extra["slurm_ray.params_truncated_keys"] = ",".join(changed)
        if conflicts:
            # MLflow params are immutable; a retry with a changed config must not crash.
            extra["slurm_ray.params_conflict"] = ",".join(conflicts)
        if extra:
            client.log_batch(run_id, tags=[RunTag(k, v) for k, v in _tag_items(extra)])
    return run_id


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
    """
    Tag the run with the Slurm job of the current try.

    ``slurm_ray.slurm_job_ids`` accumulates every job id the task used (retries,
    requeues); ``slurm_ray.slurm_job_id`` is the current one. None values are skipped.
    """
    client = _client(settings.tracking_uri)
    current = client.get_run(run_id).data.tags.get("slurm_ray.slurm_job_ids", "")
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
        **{_prefixed(k): v for k, v in (extra or {}).items()},
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
    _client(settings.tracking_uri).set_terminated(run_id, status=status)


# -- metrics relay ------------------------------------------------------------------


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def metrics_from_row(row: Mapping[str, Any]) -> tuple[int, int | None, dict[str, float]] | None:
    """
    ``(step, timestamp_ms, metrics)`` of one metrics.jsonl row, or None without an iteration.

    Every finite number except ``timestamp`` becomes a metric (None, strings,
    booleans, NaN and infinities are skipped); ``timestamp`` (seconds) becomes
    the metrics' time, so MLflow's time axis shows when the cluster measured it.
    """
    step = row.get("iteration")
    if isinstance(step, bool) or not isinstance(step, int | float) or not math.isfinite(step):
        return None
    ts = _finite(row.get("timestamp"))
    metrics = {
        _safe_key(k): v
        for k, v in ((k, _finite(v)) for k, v in row.items() if k != "timestamp")
        if v is not None
    }
    metrics[SENTINEL_METRIC] = float(int(step))
    return int(step), (int(ts * 1000) if ts is not None else None), metrics


def make_relay(
    settings: MlflowSettings, *, run_id: str | None, tags: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """
    The serialisable relay description a trigger stores.

    ``run_id`` None (``relay_later`` while the server was down at submit time):
    the relay finds or creates the run from ``tags`` once the server answers.
    """
    relay: dict[str, Any] = {"tracking_uri": settings.tracking_uri, "run_id": run_id}
    if run_id is None:
        relay["experiment_name"] = settings.experiment_name
        relay["tags"] = dict(tags or {})
    relay["timeout"] = settings.request_timeout
    return relay


@dataclass
class RelayStats:
    """What one relay call did."""

    sent: int = 0
    skipped: int = 0
    pending: int = 0
    error: str | None = None
    watermark: int | None = None
    #: the error was the server not answering (worth waiting for), not a refusal
    unreachable: bool = False


class MetricsRelay:
    """
    Log metrics.jsonl rows to one MLflow run, each step exactly once.

    Idempotence rests on MLflow itself, not on local state: on the first send
    (and after any failure) the relay reads the watermark, the latest value of
    :data:`SENTINEL_METRIC`, and skips rows at or below it. Rows are sent in
    order, whole, with the sentinel last, so the watermark only covers fully
    logged steps. A new relay object (triggerer restart), the operator's final
    catch-up and a task retry therefore never log a step twice.

    If the server is unreachable, rows stay in memory and go out with the next
    call. A retried task that restarts training without resuming from a
    checkpoint repeats iteration numbers; those rows are skipped until it
    passes the previous watermark (the driver resumes, so this is rare).

    :param relay: ``{"tracking_uri", "run_id"}`` (see :func:`make_relay`).
    :param log: logger for warnings (the trigger's ``self.log``).
    """

    def __init__(self, relay: Mapping[str, Any], log: Any = None) -> None:
        self.tracking_uri = str(relay["tracking_uri"]).rstrip("/")
        self.run_id: str | None = relay.get("run_id") or None
        self.experiment_name: str | None = relay.get("experiment_name")
        self.tags: dict[str, str] = dict(relay.get("tags") or {})
        self.timeout = float(relay.get("timeout") or 5.0)
        self.log = log or _log
        self._pending: dict[int, tuple[int | None, dict[str, float]]] = {}
        self._watermark: int | None = None
        self._failing_since: float | None = None
        self._lock = asyncio.Lock()

    @property
    def pending(self) -> int:
        """Rows waiting to be sent."""
        return len(self._pending)

    def _add(self, rows: Iterable[Mapping[str, Any]]) -> int:
        bad = 0
        for row in rows:
            parsed = metrics_from_row(row)
            if parsed is None:
                bad += 1
                continue
            step, ts, metrics = parsed
            # The first copy of a step wins: re-reads of the same file repeat rows.
            self._pending.setdefault(step, (ts, metrics))
        if len(self._pending) > MAX_PENDING_ROWS:
            for step in sorted(self._pending)[: len(self._pending) - MAX_PENDING_ROWS]:
                del self._pending[step]
            self.log.warning(
                "MLflow relay: more than %d rows waiting; dropped the oldest from memory "
                "(the completion catch-up re-reads metrics.jsonl)",
                MAX_PENDING_ROWS,
            )
        return bad

    def _resolve_run(self, client: MlflowClient) -> str:
        if self.run_id is None:
            if not self.experiment_name or not self.tags:
                raise MlflowError("relay has neither run_id nor experiment_name + tags")
            settings = MlflowSettings(self.tracking_uri, self.experiment_name)
            self.run_id = ensure_run(settings, tags=self.tags)
            self.log.info("MLflow relay: run %s found/created for the task", self.run_id)
        return self.run_id

    def _read_watermark(self, client: MlflowClient, run_id: str) -> int:
        value = client.get_run(run_id).data.metrics.get(SENTINEL_METRIC)
        return int(value) if value is not None else -(2**62)

    def send(self, rows: Iterable[Mapping[str, Any]] = ()) -> RelayStats:
        """Queue ``rows`` and send everything pending (blocking; never raises)."""
        stats = RelayStats()
        bad = self._add(rows)
        if bad:
            self.log.warning("MLflow relay: skipped %d row(s) without a numeric 'iteration'", bad)
        if not self._pending:
            stats.watermark = self._watermark
            return stats
        try:
            self._flush(stats)
        except Exception as exc:  # any failure: keep the rows, re-read the watermark next time
            self._watermark = None
            stats.error = _short_error(exc)
            stats.unreachable = isinstance(exc, MlflowUnreachableError)
            if self._failing_since is None:
                self._failing_since = time.monotonic()
                self.log.warning(
                    "MLflow relay to %s failed (%s); %d row(s) wait for the next call",
                    self.tracking_uri,
                    stats.error,
                    len(self._pending),
                )
        else:
            if self._failing_since is not None:
                self.log.info(
                    "MLflow relay to %s recovered after %.0fs",
                    self.tracking_uri,
                    time.monotonic() - self._failing_since,
                )
                self._failing_since = None
        stats.pending = len(self._pending)
        stats.watermark = self._watermark
        return stats

    def _flush(self, stats: RelayStats) -> None:
        from mlflow.entities import Metric

        problem = _probe(self.tracking_uri, self.timeout)
        if problem is not None:
            raise MlflowUnreachableError(problem)
        client = _client(self.tracking_uri)
        run_id = self._resolve_run(client)
        if self._watermark is None:
            self._watermark = self._read_watermark(client, run_id)
        for step in [s for s in self._pending if s <= self._watermark]:
            del self._pending[step]
            stats.skipped += 1
        now_ms = int(time.time() * 1000)
        batch: list[Metric] = []
        batch_steps: list[int] = []
        for step in sorted(self._pending):
            ts, metrics = self._pending[step]
            row_metrics = [
                Metric(key, value, ts or now_ms, step)
                for key, value in metrics.items()
                if key != SENTINEL_METRIC
            ][: MAX_METRICS_PER_BATCH - 1]
            # The sentinel goes last: it may only claim a step once the rest is in.
            row_metrics.append(Metric(SENTINEL_METRIC, float(step), ts or now_ms, step))
            if batch and len(batch) + len(row_metrics) > MAX_METRICS_PER_BATCH:
                self._send_batch(client, run_id, batch, batch_steps, stats)
                batch, batch_steps = [], []
            batch.extend(row_metrics)
            batch_steps.append(step)
        if batch:
            self._send_batch(client, run_id, batch, batch_steps, stats)

    def _send_batch(
        self,
        client: MlflowClient,
        run_id: str,
        batch: list[Metric],
        steps: list[int],
        stats: RelayStats,
    ) -> None:
        client.log_batch(run_id, metrics=batch, synchronous=True)
        for step in steps:
            del self._pending[step]
        self._watermark = max(steps)
        stats.sent += len(steps)

    async def __call__(self, rows: list[dict[str, Any]]) -> None:
        """Async sink for the trigger: the blocking HTTP work runs in a thread."""
        async with self._lock:
            stats = await asyncio.to_thread(self.send, rows)
        if stats.sent:
            self.log.info("MLflow: logged %d step(s), up to step %s", stats.sent, stats.watermark)


def make_async_sink(
    relay: Mapping[str, Any], log: Any = None
) -> Callable[[list[dict[str, Any]]], Awaitable[None]]:
    """The trigger's metrics sink: never raises, never blocks the event loop."""
    return MetricsRelay(relay, log)


def relay_rows(
    relay: Mapping[str, Any],
    rows: Iterable[Mapping[str, Any]],
    *,
    log: Any = None,
    strict: bool = True,
) -> RelayStats:
    """
    Send ``rows`` now (non-deferrable mode, and the catch-up at completion).

    Steps already in MLflow are skipped, so passing the whole metrics.jsonl is right.

    :param strict: raise :class:`MlflowError` if rows could not be sent.
    """
    stats = MetricsRelay(relay, log).send(rows)
    if strict and stats.error:
        raise MlflowError(
            f"could not log {stats.pending} metrics row(s) to "
            f"{relay['tracking_uri']}: {stats.error}"
        )
    return stats


def parse_metrics_jsonl(data: bytes, log: Any = None) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl file (a torn last line or a bad line is skipped with a warning)."""
    rows: list[dict[str, Any]] = []
    for line in data.splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            (log or _log).warning("skipping malformed metrics line: %r", line[:200])
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


# -- completion: artifacts, model, registry -----------------------------------------


class RemoteFiles(Protocol):
    """What :func:`finalize_run` needs from :class:`slurm_ray.hooks.slurm.SlurmHook`."""

    def run(self, command: str, *, timeout: float | None = None, check: bool = False) -> Any:
        """Run a shell command on the login node (result has exit_code, stdout)."""

    def read_file(self, remote_path: str) -> bytes | None:
        """Whole remote file, or None."""

    def download(self, remote_path: str, local_path: str) -> None:
        """Copy a remote file to a local path."""


_EXPORT_DIR_RE = re.compile(r"\.slurm-ray-export\.[A-Za-z0-9]+")


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


def _elapsed_seconds(text: str | None) -> float | None:
    """Slurm durations: ``MM:SS(.mmm)``, ``HH:MM:SS``, ``D-HH:MM:SS``."""
    if not text:
        return None
    days = 0
    if "-" in text:
        day_text, text = text.split("-", 1)
        if not day_text.isdigit():
            return None
        days = int(day_text)
    try:
        parts = [float(p) for p in text.split(":")]
    except ValueError:
        return None
    seconds = 0.0
    for part in parts:
        seconds = seconds * 60 + part
    return days * 86400 + seconds


def slurm_efficiency(hook: RemoteFiles, job_id: str) -> dict[str, float]:
    """
    Elapsed time, node-hours and CPU efficiency of a finished job.

    From ``sacct`` where the site has accounting; otherwise elapsed time and
    node-hours from ``scontrol`` (via the hook's ``states``) while Slurm still
    remembers the job; otherwise nothing.
    """
    cmd = (
        f"sacct -j {quote(job_id)} -n -P -o JobID,ElapsedRaw,NNodes,AllocCPUS,TotalCPU 2>/dev/null"
    )
    res = hook.run(cmd)
    for line in (res.stdout or "").splitlines() if res.exit_code == 0 else []:
        parts = line.split("|")
        if len(parts) >= 5 and parts[0] == str(job_id):
            try:
                elapsed, nodes, cpus = float(parts[1]), int(parts[2]), int(parts[3])
            except ValueError:
                break
            out = {"slurm.elapsed_s": elapsed, "slurm.node_hours": elapsed * nodes / 3600}
            total_cpu = _elapsed_seconds(parts[4])
            if total_cpu is not None and elapsed > 0 and cpus > 0:
                out["slurm.cpu_efficiency"] = total_cpu / (elapsed * cpus)
            return out
    states = getattr(hook, "states", None)
    if states is None:
        return {}
    try:
        info = states([job_id]).get(job_id)
    except Exception:  # best effort: accounting is a nice-to-have
        return {}
    elapsed_s = _elapsed_seconds(getattr(info, "elapsed", None)) if info else None
    if elapsed_s is None:
        return {}
    out = {"slurm.elapsed_s": elapsed_s}
    if info is not None and info.num_nodes:
        out["slurm.node_hours"] = elapsed_s * info.num_nodes / 3600
    return out


def _register(
    client: MlflowClient, name: str, run_id: str, source: str, tags: Mapping[str, Any]
) -> Any:
    """Register ``source`` (a run's model folder) as a version of ``name``; idempotent per run."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    # A retried finalize must not add a second version for the same run.
    for mv in client.search_model_versions(f"run_id = '{run_id}'"):
        if mv.name == name and mv.source == source:
            return mv
    # What mlflow.register_model("runs:/<id>/model") does in 3.17 when the run
    # has an MLmodel file at that path: a version whose source is the artifact
    # URI (no LoggedModel entity needed).
    return client.create_model_version(
        name,
        source=source,
        run_id=run_id,
        tags={k: v for k, v in _tag_items(tags)},
        await_creation_for=60,
    )


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
    from mlflow.entities import Metric, RunTag

    logger = log or _log
    client = _client(settings.tracking_uri)
    if result is None:
        raw = hook.read_file(posixpath.join(run_dir, "result.json"))
        result = json.loads(raw) if raw else {}
    checkpoint = result.get("checkpoint") if settings.log_checkpoint else None
    slurm_log = f"slurm-{job_id}.out"
    names = [*RUN_DIR_ARTIFACTS, slurm_log, MODEL_DIRNAME]

    with tempfile.TemporaryDirectory(prefix="slurm-ray-mlflow-") as tmp_name:
        tmp = Path(tmp_name)
        started = time.monotonic()
        ckpt_rel = _fetch_bundle(hook, run_dir, names, checkpoint, tmp)
        for name, folder in {**RUN_DIR_ARTIFACTS, slurm_log: "slurm"}.items():
            if (tmp / name).is_file():
                client.log_artifact(run_id, str(tmp / name), folder or None)
        if checkpoint:
            ckpt_local = tmp / ckpt_rel if ckpt_rel else tmp / ".no-checkpoint"
            if ckpt_local.is_dir():
                client.log_artifacts(run_id, str(ckpt_local), f"checkpoint/{ckpt_local.name}")
            else:
                logger.warning("checkpoint %s not found on the cluster; not logged", checkpoint)
        model_local = tmp / MODEL_DIRNAME
        has_model = (model_local / "MLmodel").is_file()
        if has_model:
            client.log_artifacts(run_id, str(model_local), MODEL_ARTIFACT_PATH)
        logger.info(
            "MLflow artifacts of run %s logged in %.1fs", run_id, time.monotonic() - started
        )

    step = int(result.get("iterations") or 0)
    now_ms = int(time.time() * 1000)
    metrics = {k: v for k in FINAL_METRIC_KEYS if (v := _finite(result.get(k))) is not None}
    metrics.update(slurm_efficiency(hook, job_id))
    tags = {
        f"slurm_ray.result.{k}": result.get(k) for k in FINAL_TAG_KEYS if result.get(k) is not None
    }
    tags["slurm_ray.slurm_job_id"] = job_id
    client.log_batch(
        run_id,
        metrics=[Metric(_safe_key(k), v, now_ms, step) for k, v in metrics.items()],
        tags=[RunTag(k, v) for k, v in _tag_items(tags)],
    )

    out: dict[str, Any] = {
        "mlflow_run_id": run_id,
        "model_name": None,
        "model_version": None,
        "model_uri": f"runs:/{run_id}/{MODEL_ARTIFACT_PATH}" if has_model else None,
        "artifact_uri": client.get_run(run_id).info.artifact_uri,
        "metrics": metrics,
    }
    if settings.registered_model_name:
        if not has_model:
            client.set_terminated(run_id, status="FAILED")
            raise MlflowError(
                f"no MLflow model in {run_dir}/{MODEL_DIRNAME}: run include/export_model.py "
                "after training (the artifacts and metrics were logged; nothing was registered)"
            )
        source = f"{out['artifact_uri']}/{MODEL_ARTIFACT_PATH}"
        mv = _register(
            client,
            settings.registered_model_name,
            run_id,
            source,
            {
                "slurm_ray.slurm_job_id": job_id,
                "eval_return_mean": metrics.get("eval_return_mean"),
            },
        )
        out.update(
            model_name=settings.registered_model_name,
            model_version=str(mv.version),
            model_uri=f"models:/{settings.registered_model_name}/{mv.version}",
        )
        set_tags(settings, run_id, {"slurm_ray.model_version": mv.version})
    client.set_terminated(run_id, status="FINISHED")
    return out


# -- promotion ----------------------------------------------------------------------


def _version_metric(client: MlflowClient, mv: Any, metric: str) -> float | None:
    if not mv.run_id:
        return None
    value = client.get_run(mv.run_id).data.metrics.get(metric)
    return _finite(value)


def promote_if_better(
    settings: MlflowSettings,
    model_name: str,
    version: str | int,
    *,
    metric: str = "eval_return_mean",
    min_improvement: float | None = None,
    alias: str = CHAMPION_ALIAS,
    log: Any = None,
) -> dict[str, Any]:
    """
    Give ``version`` the ``champion`` alias if its run's ``metric`` beats the champion's.

    Promoted when there is no champion yet, or when ``new > champion`` and
    ``new - champion >= min_improvement`` (default: ``settings.min_improvement``).
    A version without the metric is never promoted. The decision and both
    numbers are logged on the new version's run (tags ``slurm_ray.promotion.*``,
    metrics ``promotion.new`` / ``promotion.champion``) and on the model version.

    :returns: ``{"promoted", "new", "champion", "version", "champion_version",
        "metric", "min_improvement", "alias", "reason"}``.
    """
    from mlflow.exceptions import MlflowException

    logger = log or _log
    margin = settings.min_improvement if min_improvement is None else float(min_improvement)
    client = _client(settings.tracking_uri)
    new_mv = client.get_model_version(model_name, str(version))
    new_value = _version_metric(client, new_mv, metric)
    try:
        champ_mv = client.get_model_version_by_alias(model_name, alias)
    except MlflowException:
        champ_mv = None
    champ_value = _version_metric(client, champ_mv, metric) if champ_mv is not None else None

    if new_value is None:
        promoted, reason = False, f"version {version} has no {metric}"
    elif champ_mv is None:
        promoted, reason = True, f"no {alias} yet"
    elif str(champ_mv.version) == str(version):
        promoted, reason = False, f"version {version} already is the {alias}"
    elif champ_value is None:
        promoted, reason = True, f"the {alias} (version {champ_mv.version}) has no {metric}"
    elif new_value > champ_value and new_value - champ_value >= margin:
        promoted, reason = True, f"{new_value:g} beats {champ_value:g} by >= {margin:g}"
    else:
        promoted, reason = False, f"{new_value:g} does not beat {champ_value:g} by >= {margin:g}"

    if promoted:
        client.set_registered_model_alias(model_name, alias, str(version))
    decision = {
        "promoted": promoted,
        "new": new_value,
        "champion": champ_value,
        "version": str(version),
        "champion_version": str(champ_mv.version) if champ_mv is not None else None,
        "metric": metric,
        "min_improvement": margin,
        "alias": alias,
        "reason": reason,
    }
    logger.info("Promotion of %s v%s: %s (%s)", model_name, version, promoted, reason)
    if new_mv.run_id:
        from mlflow.entities import Metric, RunTag

        now_ms = int(time.time() * 1000)
        metrics = [
            Metric(f"promotion.{k}", v, now_ms, 0)
            for k, v in (("new", new_value), ("champion", champ_value), ("margin", margin))
            if v is not None
        ]
        tags = {
            "slurm_ray.promotion.decision": "promoted" if promoted else "kept",
            "slurm_ray.promotion.reason": reason,
            "slurm_ray.promotion.champion_version": decision["champion_version"] or "",
            "slurm_ray.promotion.champion_value": "" if champ_value is None else repr(champ_value),
            "slurm_ray.promotion.new_value": "" if new_value is None else repr(new_value),
        }
        client.log_batch(
            new_mv.run_id, metrics=metrics, tags=[RunTag(k, v) for k, v in _tag_items(tags)]
        )
    client.set_model_version_tag(
        model_name, str(version), "slurm_ray.promotion", f"{promoted}: {reason}"[:5000]
    )
    return decision


# -- comparison ---------------------------------------------------------------------


def _curve(
    client: MlflowClient, run_id: str, y_metric: str, x_metric: str
) -> list[tuple[float, float]]:
    """(x, y) points of one run: y by step, x = the x metric at the same step (or the step)."""
    ys = {m.step: m.value for m in client.get_metric_history(run_id, y_metric)}
    xs = {m.step: m.value for m in client.get_metric_history(run_id, x_metric)} if x_metric else {}
    points = [(float(xs.get(step, step)), float(y)) for step, y in ys.items()]
    return sorted(p for p in points if math.isfinite(p[0]) and math.isfinite(p[1]))


def compare_runs(
    settings: MlflowSettings,
    run_ids: Sequence[str],
    *,
    parent_run_name: str,
    metric: str = "eval_return_mean",
    fallback_metric: str = "episode_return_mean",
    curve_metric: str = "episode_return_mean",
    x_metric: str = "env_steps",
    tags: Mapping[str, str] | None = None,
    nest: bool = True,
) -> dict[str, Any]:
    """
    Log a comparison of several runs (a sweep) to a parent run and pick the best.

    The parent run (found again by ``tags`` if given, so a retry reuses it) gets
    ``comparison/learning_curves.png`` (``curve_metric`` against ``x_metric``,
    one line per run), ``comparison/runs.csv`` and ``comparison/runs.md`` (final
    metrics), a metric ``<label>.<metric>`` per run and ``best.<metric>``; the
    child runs are nested under it (``mlflow.parentRunId``). The best run has the
    highest ``metric`` (``fallback_metric`` for runs without it).

    :param nest: show the compared runs under the parent in the MLflow UI
        (sets their ``mlflow.parentRunId``; a run has one parent).

    :returns: ``{"parent_run_id", "best_run_id", "best_value", "metric", "runs",
        "plot_artifact"}``.
    """
    from mlflow.entities import Metric, RunTag

    if not run_ids:
        raise ValueError("compare_runs: no run ids")
    client = _client(settings.tracking_uri)
    if tags:
        parent_id = ensure_run(settings, tags=tags, run_name=parent_run_name)
    else:
        exp_id = _experiment_id(client, settings.experiment_name)
        parent_id = client.create_run(exp_id, run_name=parent_run_name).info.run_id

    rows: list[dict[str, Any]] = []
    series: list[tuple[str, list[tuple[float, float]]]] = []
    for index, run_id in enumerate(dict.fromkeys(run_ids)):  # keep order, drop duplicates
        run = client.get_run(run_id)
        m = run.data.metrics
        label = run.info.run_name or run_id[:8]
        value = _finite(m.get(metric))
        used = metric
        if value is None:
            value, used = _finite(m.get(fallback_metric)), fallback_metric
        rows.append(
            {
                "run_id": run_id,
                "run_name": label,
                "status": run.info.status,
                metric: _finite(m.get(metric)),
                fallback_metric: _finite(m.get(fallback_metric)),
                "env_steps": _finite(m.get("env_steps")),
                "iterations": _finite(m.get(SENTINEL_METRIC)),
                "wall_s": _finite(m.get("wall_s")),
                "score": value,
                "score_metric": used,
            }
        )
        series.append((f"{index + 1} {label}", _curve(client, run_id, curve_metric, x_metric)))
        if nest and run_id != parent_id:
            client.set_tag(run_id, "mlflow.parentRunId", parent_id)

    scored = [r for r in rows if r["score"] is not None]
    best = max(scored, key=lambda r: r["score"]) if scored else None

    png = render_line_chart_png(
        series,
        title=f"{curve_metric} vs {x_metric}",
        x_label=x_metric,
        y_label=curve_metric,
    )
    columns = list(rows[0])
    csv_buf = io.StringIO()
    writer = csv.DictWriter(csv_buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return "" if value is None else str(value)

    md = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    md += ["| " + " | ".join(cell(r[c]) for c in columns) + " |" for r in rows]
    if best is not None:
        md.append(
            f"\nbest: {best['run_name']} ({best['run_id']}), "
            f"{best['score_metric']} = {best['score']:.4g}"
        )

    with tempfile.TemporaryDirectory(prefix="slurm-ray-compare-") as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "learning_curves.png").write_bytes(png)
        (tmp / "runs.csv").write_text(csv_buf.getvalue())
        (tmp / "runs.md").write_text("\n".join(md) + "\n")
        client.log_artifacts(parent_id, str(tmp), "comparison")

    now_ms = int(time.time() * 1000)
    metrics = [
        Metric(_safe_key(f"{i + 1}_{r['run_name']}.{metric}"), r["score"], now_ms, 0)
        for i, r in enumerate(rows)
        if r["score"] is not None
    ]
    run_tags = {"slurm_ray.compared_runs": ",".join(r["run_id"] for r in rows)}
    if best is not None:
        metrics.append(Metric(_safe_key(f"best.{metric}"), best["score"], now_ms, 0))
        run_tags["slurm_ray.best_run_id"] = best["run_id"]
        run_tags["slurm_ray.best_run_name"] = best["run_name"]
    for chunk in _chunks(metrics, MAX_METRICS_PER_BATCH):
        client.log_batch(parent_id, metrics=list(chunk))
    client.log_batch(parent_id, tags=[RunTag(k, v) for k, v in _tag_items(run_tags)])
    client.set_terminated(parent_id, status="FINISHED")
    return {
        "parent_run_id": parent_id,
        "best_run_id": best["run_id"] if best else None,
        "best_value": best["score"] if best else None,
        "metric": metric,
        "runs": rows,
        "plot_artifact": "comparison/learning_curves.png",
    }


# -- a tiny PNG line chart (no matplotlib/numpy on the Airflow side) ----------------

# 5x7 bitmap glyphs; lower case is drawn as upper case.
_FONT_ROWS = {
    "0": (" ### ", "#   #", "#  ##", "# # #", "##  #", "#   #", " ### "),
    "1": ("  #  ", " ##  ", "  #  ", "  #  ", "  #  ", "  #  ", " ### "),
    "2": (" ### ", "#   #", "    #", "   # ", "  #  ", " #   ", "#####"),
    "3": ("#####", "   # ", "  #  ", "   # ", "    #", "#   #", " ### "),
    "4": ("   # ", "  ## ", " # # ", "#  # ", "#####", "   # ", "   # "),
    "5": ("#####", "#    ", "#### ", "    #", "    #", "#   #", " ### "),
    "6": ("  ## ", " #   ", "#    ", "#### ", "#   #", "#   #", " ### "),
    "7": ("#####", "    #", "   # ", "  #  ", " #   ", " #   ", " #   "),
    "8": (" ### ", "#   #", "#   #", " ### ", "#   #", "#   #", " ### "),
    "9": (" ### ", "#   #", "#   #", " ####", "    #", "   # ", " ##  "),
    "A": (" ### ", "#   #", "#   #", "#####", "#   #", "#   #", "#   #"),
    "B": ("#### ", "#   #", "#   #", "#### ", "#   #", "#   #", "#### "),
    "C": (" ### ", "#   #", "#    ", "#    ", "#    ", "#   #", " ### "),
    "D": ("###  ", "#  # ", "#   #", "#   #", "#   #", "#  # ", "###  "),
    "E": ("#####", "#    ", "#    ", "#### ", "#    ", "#    ", "#####"),
    "F": ("#####", "#    ", "#    ", "#### ", "#    ", "#    ", "#    "),
    "G": (" ### ", "#   #", "#    ", "# ###", "#   #", "#   #", " ####"),
    "H": ("#   #", "#   #", "#   #", "#####", "#   #", "#   #", "#   #"),
    "I": (" ### ", "  #  ", "  #  ", "  #  ", "  #  ", "  #  ", " ### "),
    "J": ("  ###", "   # ", "   # ", "   # ", "   # ", "#  # ", " ##  "),
    "K": ("#   #", "#  # ", "# #  ", "##   ", "# #  ", "#  # ", "#   #"),
    "L": ("#    ", "#    ", "#    ", "#    ", "#    ", "#    ", "#####"),
    "M": ("#   #", "## ##", "# # #", "# # #", "#   #", "#   #", "#   #"),
    "N": ("#   #", "#   #", "##  #", "# # #", "#  ##", "#   #", "#   #"),
    "O": (" ### ", "#   #", "#   #", "#   #", "#   #", "#   #", " ### "),
    "P": ("#### ", "#   #", "#   #", "#### ", "#    ", "#    ", "#    "),
    "Q": (" ### ", "#   #", "#   #", "#   #", "# # #", "#  # ", " ## #"),
    "R": ("#### ", "#   #", "#   #", "#### ", "# #  ", "#  # ", "#   #"),
    "S": (" ####", "#    ", "#    ", " ### ", "    #", "    #", "#### "),
    "T": ("#####", "  #  ", "  #  ", "  #  ", "  #  ", "  #  ", "  #  "),
    "U": ("#   #", "#   #", "#   #", "#   #", "#   #", "#   #", " ### "),
    "V": ("#   #", "#   #", "#   #", "#   #", "#   #", " # # ", "  #  "),
    "W": ("#   #", "#   #", "#   #", "# # #", "# # #", "# # #", " # # "),
    "X": ("#   #", "#   #", " # # ", "  #  ", " # # ", "#   #", "#   #"),
    "Y": ("#   #", "#   #", " # # ", "  #  ", "  #  ", "  #  ", "  #  "),
    "Z": ("#####", "    #", "   # ", "  #  ", " #   ", "#    ", "#####"),
    " ": ("     ",) * 7,
    ".": ("     ", "     ", "     ", "     ", "     ", " ##  ", " ##  "),
    ",": ("     ", "     ", "     ", "     ", " ##  ", "  #  ", " #   "),
    "-": ("     ", "     ", "     ", "#####", "     ", "     ", "     "),
    "_": ("     ", "     ", "     ", "     ", "     ", "     ", "#####"),
    ":": ("     ", " ##  ", " ##  ", "     ", " ##  ", " ##  ", "     "),
    "/": ("     ", "    #", "   # ", "  #  ", " #   ", "#    ", "     "),
    "(": ("   # ", "  #  ", " #   ", " #   ", " #   ", "  #  ", "   # "),
    ")": (" #   ", "  #  ", "   # ", "   # ", "   # ", "  #  ", " #   "),
    "[": (" ### ", " #   ", " #   ", " #   ", " #   ", " #   ", " ### "),
    "]": (" ### ", "   # ", "   # ", "   # ", "   # ", "   # ", " ### "),
    "=": ("     ", "     ", "#####", "     ", "#####", "     ", "     "),
    "+": ("     ", "  #  ", "  #  ", "#####", "  #  ", "  #  ", "     "),
    "%": ("##   ", "##  #", "   # ", "  #  ", " #   ", "#  ##", "   ##"),
    "?": (" ### ", "#   #", "    #", "   # ", "  #  ", "     ", "  #  "),
}
_FONT = {
    ch: tuple((x, y) for y, row in enumerate(rows) for x, c in enumerate(row) if c == "#")
    for ch, rows in _FONT_ROWS.items()
}
# Colour-blind-friendly palette (Okabe-Ito), then a few more.
_PALETTE = (
    (0, 114, 178),
    (230, 159, 0),
    (0, 158, 115),
    (204, 121, 167),
    (86, 180, 233),
    (213, 94, 0),
    (0, 0, 0),
    (240, 228, 66),
    (128, 0, 128),
    (128, 128, 128),
)


class _Canvas:
    """An RGB raster with just enough drawing for a line chart."""

    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        self.pixels = bytearray(b"\xff" * (width * height * 3))

    def dot(self, x: int, y: int, color: tuple[int, int, int], size: int = 1) -> None:
        for dy in range(size):
            for dx in range(size):
                px, py = x + dx, y + dy
                if 0 <= px < self.width and 0 <= py < self.height:
                    i = (py * self.width + px) * 3
                    self.pixels[i : i + 3] = bytes(color)

    def line(
        self, x0: int, y0: int, x1: int, y1: int, color: tuple[int, int, int], size: int = 1
    ) -> None:
        # Bresenham; `size` draws a square brush for thick lines.
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err = dx + dy
        while True:
            self.dot(x0, y0, color, size)
            if x0 == x1 and y0 == y1:
                return
            e2 = 2 * err
            if e2 >= dy:
                err += dy
                x0 += sx
            if e2 <= dx:
                err += dx
                y0 += sy

    def text(
        self, x: int, y: int, text: str, color: tuple[int, int, int] = (0, 0, 0), scale: int = 2
    ) -> int:
        """Draw ``text`` with its top-left at (x, y); returns the width drawn."""
        for i, ch in enumerate(text):
            glyph = _FONT.get(ch.upper(), _FONT["?"])
            for gx, gy in glyph:
                self.dot(x + (i * 6 + gx) * scale, y + gy * scale, color, scale)
        return len(text) * 6 * scale

    def png(self) -> bytes:
        def chunk(kind: bytes, data: bytes) -> bytes:
            return (
                struct.pack(">I", len(data))
                + kind
                + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
            )

        stride = self.width * 3
        raw = b"".join(
            b"\x00" + bytes(self.pixels[y * stride : (y + 1) * stride]) for y in range(self.height)
        )
        ihdr = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)  # 8-bit RGB
        return (
            b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(raw, 9))
            + chunk(b"IEND", b"")
        )


def _nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step) * step
    ticks = []
    value = start
    while value <= hi + step * 1e-9:
        ticks.append(round(value, 10))
        value += step
    return ticks


def _fmt(value: float) -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= div:
            return f"{value / div:.3g}{suffix}"
    return f"{value:.3g}"


def render_line_chart_png(
    series: Sequence[tuple[str, Sequence[tuple[float, float]]]],
    *,
    title: str = "",
    x_label: str = "",
    y_label: str = "",
    width: int = 960,
    height: int = 600,
) -> bytes:
    """
    A line chart as PNG bytes, in pure Python (zlib + struct).

    One line per ``(label, [(x, y), ...])`` in a distinct colour, with axes,
    tick labels, a grid and a legend. Series without points are listed in the
    legend only. Good enough for a learning-curve artifact; no dependencies.
    """
    canvas = _Canvas(width, height)
    legend_w = 300
    left, right, top, bottom = 90, width - legend_w, 64, height - 60
    points = [p for _, pts in series for p in pts]
    if points:
        x_lo, x_hi = min(p[0] for p in points), max(p[0] for p in points)
        y_lo, y_hi = min(p[1] for p in points), max(p[1] for p in points)
    else:
        x_lo, x_hi, y_lo, y_hi = 0.0, 1.0, 0.0, 1.0
    x_ticks, y_ticks = _nice_ticks(x_lo, x_hi), _nice_ticks(y_lo, y_hi)
    x_lo, x_hi = min(x_lo, x_ticks[0]), max(x_hi, x_ticks[-1])
    y_lo, y_hi = min(y_lo, y_ticks[0]), max(y_hi, y_ticks[-1])
    x_span, y_span = (x_hi - x_lo) or 1.0, (y_hi - y_lo) or 1.0

    def px(x: float) -> int:
        return round(left + (x - x_lo) / x_span * (right - left))

    def py(y: float) -> int:
        return round(bottom - (y - y_lo) / y_span * (bottom - top))

    grid, axis = (225, 225, 225), (60, 60, 60)
    for t in x_ticks:
        canvas.line(px(t), top, px(t), bottom, grid)
        label = _fmt(t)
        canvas.text(px(t) - len(label) * 6, bottom + 8, label, axis)
    for t in y_ticks:
        canvas.line(left, py(t), right, py(t), grid)
        label = _fmt(t)
        canvas.text(left - 8 - len(label) * 12, py(t) - 7, label, axis)
    canvas.line(left, bottom, right, bottom, axis, 2)
    canvas.line(left, top, left, bottom, axis, 2)
    canvas.text(left, 8, title[:60], (0, 0, 0))
    canvas.text(8, top - 26, y_label[:40], axis)
    canvas.text((left + right) // 2 - len(x_label) * 6, height - 24, x_label[:50], axis)

    for index, (label, pts) in enumerate(series):
        color = _PALETTE[index % len(_PALETTE)]
        coords = [(px(x), py(y)) for x, y in pts]
        for (x0, y0), (x1, y1) in itertools.pairwise(coords):
            canvas.line(x0, y0, x1, y1, color, 3)
        if len(coords) <= 60:  # markers while they do not clutter
            for x, y in coords:
                canvas.dot(x - 3, y - 3, color, 7)
        ly = top + 10 + index * 24
        if ly < bottom:
            canvas.dot(right + 20, ly, color, 14)
            canvas.text(right + 42, ly, label[:20], (0, 0, 0))
    return canvas.png()
