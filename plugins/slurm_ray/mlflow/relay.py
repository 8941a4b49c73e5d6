"""Relay metrics.jsonl rows to a run, each step exactly once: :class:`MetricsRelay`."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from slurm_ray.mlflow.errors import MlflowError, MlflowUnreachableError
from slurm_ray.mlflow.hook import (
    _CREDENTIALS,
    aremember_connection,
    client_for_uri,
    uri_from_connection,
)
from slurm_ray.mlflow.keys import finite, limits, safe_key
from slurm_ray.mlflow.reachability import patiently, short_error
from slurm_ray.mlflow.reachability import probe as _probe
from slurm_ray.mlflow.runs import ensure_run
from slurm_ray.mlflow.settings import MlflowSettings

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Metric

_log = logging.getLogger(__name__)

#: Metric logged last for every relayed row (value = step = iteration). Its
#: latest value in MLflow is the highest step fully logged: the relay's
#: watermark, which makes relaying idempotent across restarts and retries.
SENTINEL_METRIC = "iteration"
#: In-memory cap of rows waiting for an unreachable server. Rows dropped past it
#: are not lost: the completion catch-up re-reads the whole metrics.jsonl.
MAX_PENDING_ROWS = 50_000


def _client(tracking_uri: str) -> MlflowClient:
    return client_for_uri(tracking_uri)


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
    ts = finite(row.get("timestamp"))
    metrics = {
        safe_key(k): v
        for k, v in ((k, finite(v)) for k, v in row.items() if k != "timestamp")
        if v is not None
    }
    metrics[SENTINEL_METRIC] = float(int(step))
    return int(step), (int(ts * 1000) if ts is not None else None), metrics


def make_relay(
    settings: MlflowSettings, *, run_id: str | None, tags: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """
    The serialisable relay description a trigger stores (no credentials).

    ``run_id`` None (``relay_later`` while the server was down at submit time):
    the relay finds or creates the run from ``tags`` once the server answers.
    """
    # Experiment and tags always: trial rows (Ray Tune) make nested runs from them.
    relay: dict[str, Any] = {
        "tracking_uri": settings.tracking_uri,
        "run_id": run_id,
        "experiment_name": settings.experiment_name,
        "tags": dict(tags or {}),
    }
    relay["timeout"] = settings.request_timeout
    if settings.conn_id:
        relay["conn_id"] = settings.conn_id
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
    #: the run the rows go to (found or created by now for a relay_later relay)
    run_id: str | None = None
    #: nested runs of Ray Tune trials: trial id -> MLflow run id (None: not created yet)
    trial_runs: dict[str, str | None] = field(default_factory=dict)


class MetricsRelay:
    """
    Log metrics.jsonl rows to one MLflow run, each step exactly once.

    Idempotence rests on MLflow itself, not on local state: on the first send
    (and after any failure) the relay reads the watermark, the latest value of
    :data:`SENTINEL_METRIC`, and skips rows at or below it. Rows are sent in
    order, whole (one row never spans two requests), with the sentinel last,
    so the watermark only covers fully logged steps. A new relay object
    (triggerer restart), the operator's final catch-up and a task retry
    therefore never log a step twice.

    If the server is unreachable, rows stay in memory and go out with the next
    call. A retried task that restarts training without resuming from a
    checkpoint repeats iteration numbers; those rows are skipped until it
    passes the previous watermark (the driver resumes, so this is rare).

    :param relay: ``{"tracking_uri", "run_id", ...}`` (see :func:`make_relay`).
    :param log: logger for warnings (the trigger's ``self.log``).
    """

    def __init__(
        self, relay: Mapping[str, Any], log: Any = None, *, parent: MetricsRelay | None = None
    ) -> None:
        self.parent = parent
        self._children: dict[str, MetricsRelay] = {}
        self.params: Mapping[str, Any] | None = None  # a trial's config, logged at creation
        self.tracking_uri = str(relay["tracking_uri"]).rstrip("/")
        self.run_id: str | None = relay.get("run_id") or None
        self.experiment_name: str | None = relay.get("experiment_name")
        self.tags: dict[str, str] = dict(relay.get("tags") or {})
        self.timeout = float(relay.get("timeout") or 5.0)
        self.conn_id: str | None = relay.get("conn_id") or None
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

    def _resolve_run(self) -> str:
        if self.run_id is None:
            if not self.experiment_name or not self.tags:
                raise MlflowError("relay has neither run_id nor experiment_name + tags")
            settings = MlflowSettings(self.tracking_uri, self.experiment_name, conn_id=self.conn_id)
            if self.parent is None:
                self.run_id = ensure_run(settings, tags=self.tags)
                self.log.info("MLflow relay: run %s found/created for the task", self.run_id)
            else:
                parent_id = self.parent._resolve_run()
                name = f"trial {self.tags['trial_id']}"
                run_id = ensure_run(settings, tags=self.tags, params=self.params, run_name=name)
                _client(self.tracking_uri).set_tag(run_id, "mlflow.parentRunId", parent_id)
                self.run_id = run_id
        return self.run_id

    def _route(self, rows: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
        """This run's rows; trial rows are queued in their trial's relay."""
        own: list[Mapping[str, Any]] = []
        for row in rows:
            trial = row.get("trial_id") if self.parent is None else None
            if not isinstance(trial, str) or not trial:
                own.append(row)
                continue
            child = self._children.get(trial)
            if child is None:
                relay = {
                    "tracking_uri": self.tracking_uri,
                    "run_id": None,
                    "experiment_name": self.experiment_name,
                    "tags": {**self.tags, "trial_id": trial},
                    "timeout": self.timeout,
                    "conn_id": self.conn_id,
                }
                child = self._children[trial] = MetricsRelay(relay, self.log, parent=self)
            if child.params is None and isinstance(row.get("trial_config"), Mapping):
                child.params = row["trial_config"]
            child._add([row])
        return own

    def send(self, rows: Iterable[Mapping[str, Any]] = ()) -> RelayStats:
        """Queue ``rows`` and send everything pending (blocking; never raises)."""
        stats = self._send_own(self._route(rows))
        for trial, child in self._children.items():
            got = child.send()
            stats.trial_runs[trial] = got.run_id
            stats.sent, stats.skipped = stats.sent + got.sent, stats.skipped + got.skipped
            stats.pending += got.pending
            if got.error and not stats.error:
                stats.error, stats.unreachable = f"trial {trial}: {got.error}", got.unreachable
        return stats

    def _send_own(self, rows: Iterable[Mapping[str, Any]]) -> RelayStats:
        stats = RelayStats()
        bad = self._add(rows)
        if bad:
            self.log.warning("MLflow relay: skipped %d row(s) without a numeric 'iteration'", bad)
        if not self._pending and self.run_id is not None:
            stats.watermark, stats.run_id = self._watermark, self.run_id
            return stats
        try:
            self._flush(stats)
        except Exception as exc:  # any failure: keep the rows, re-read the watermark next time
            self._watermark = None
            stats.error = short_error(exc)
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
        stats.run_id = self.run_id
        return stats

    def _flush(self, stats: RelayStats) -> None:
        from mlflow.entities import Metric

        if self.conn_id and self.tracking_uri not in _CREDENTIALS:
            uri_from_connection(self.conn_id)  # credentials into this process
        problem = _probe(self.tracking_uri, self.timeout)
        if problem is not None:
            raise MlflowUnreachableError(problem)
        client = _client(self.tracking_uri)
        run_id = self._resolve_run()
        if self._watermark is None:
            value = client.get_run(run_id).data.metrics.get(SENTINEL_METRIC)
            self._watermark = int(value) if value is not None else -(2**62)
        for step in [s for s in self._pending if s <= self._watermark]:
            del self._pending[step]
            stats.skipped += 1
        now_ms = int(time.time() * 1000)
        most = limits().MAX_METRICS_PER_BATCH
        batch: list[Metric] = []
        steps: list[int] = []
        for step in sorted(self._pending):
            ts, metrics = self._pending[step]
            row = [
                Metric(k, v, ts or now_ms, step) for k, v in metrics.items() if k != SENTINEL_METRIC
            ]
            # The sentinel goes last: it may only claim a step once the rest is in.
            row = [*row[: most - 1], Metric(SENTINEL_METRIC, float(step), ts or now_ms, step)]
            if batch and len(batch) + len(row) > most:
                self._send_batch(client, run_id, batch, steps, stats)
                batch, steps = [], []
            batch.extend(row)
            steps.append(step)
        if batch:
            self._send_batch(client, run_id, batch, steps, stats)

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
            if self.conn_id and self.tracking_uri not in _CREDENTIALS:
                try:  # the triggerer reads connections asynchronously
                    await aremember_connection(self.conn_id)
                except Exception as exc:
                    self.log.warning("MLflow connection %s: %s", self.conn_id, short_error(exc))
            stats = await asyncio.to_thread(self.send, rows)
        if stats.sent:
            where = f"{len(stats.trial_runs)} trial runs" if stats.trial_runs else "the run"
            where += "" if stats.trial_runs else f", up to step {stats.watermark}"
            self.log.info("MLflow: logged %d step(s) to %s", stats.sent, where)


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


def deliver_rows(
    relay: Mapping[str, Any],
    rows: Iterable[Mapping[str, Any]],
    *,
    wait_s: float,
    log: Any = None,
    where: str = "metrics.jsonl",
) -> RelayStats:
    """
    The catch-up at completion: every row must arrive.

    While the server does not answer, wait with exponential backoff (tenacity)
    up to ``wait_s``: the job is done and its rows are safe in ``where``.

    :raises MlflowError: the server refused the rows, or stayed away for ``wait_s``.
    """
    sender = MetricsRelay(relay, log)
    rows = list(rows)
    started = time.monotonic()

    def attempt() -> RelayStats:
        stats = sender.send(rows)
        if stats.error is None:
            return stats
        error = MlflowUnreachableError if stats.unreachable else MlflowError
        raise error(stats.error)

    try:
        return patiently(wait_s, sender.log, what=f"MLflow at {sender.tracking_uri}")(attempt)
    except MlflowError as exc:
        raise MlflowError(
            f"could not log the job's metrics rows to {sender.tracking_uri} "
            f"(waited {time.monotonic() - started:.0f}s): {exc}; they are in {where}"
        ) from exc


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
