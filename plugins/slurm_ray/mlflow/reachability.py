"""Is the tracking server answering? One cheap probe, and a patient wait built on it."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from slurm_ray.mlflow.errors import MlflowUnreachableError
from slurm_ray.mlflow.hook import credentialed_uri, scrub

if TYPE_CHECKING:
    from slurm_ray.mlflow.settings import MlflowSettings

_log = logging.getLogger(__name__)


def probe(tracking_uri: str, timeout: float, conn_id: str | None = None) -> str | None:
    """One request without MLflow's retry loop (which can take minutes); None if OK.

    The public ``MlflowClient`` has no per-call retry setting (only the
    process-wide ``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, which would also strip the
    retries of every artifact upload), so this one request goes through
    MLflow's ``http_request`` with ``max_retries=0``.
    """
    if not tracking_uri.startswith(("http://", "https://")):
        return None  # databricks, sqlite…: nothing cheap to probe, let the real call tell
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    try:
        resp = http_request(
            get_default_host_creds(credentialed_uri(tracking_uri, conn_id)),
            "/api/2.0/mlflow/experiments/search",
            "GET",
            params={"max_results": 1},
            max_retries=0,
            backoff_factor=0,
            timeout=timeout,
            raise_on_status=False,
        )
    except Exception as exc:  # connection refused, DNS, timeout: all "unreachable"
        return short_error(exc)
    if resp.status_code != 200:
        hint = ""
        if resp.status_code == 403 and "host" in resp.text.lower():
            hint = " (the server rejects this Host header: start it with --allowed-hosts)"
        return f"HTTP {resp.status_code}{hint}: {resp.text[:200]}"
    return None


def short_error(exc: BaseException) -> str:
    """The cause of a failed request, without the URL chain (and never its credentials)."""
    text = str(exc)
    for marker in ("Connection refused", "Name or service not known", "timed out"):
        if marker in text:
            return marker
    return f"{type(exc).__name__}: {scrub(text)[:300]}"


def check_reachable(settings: MlflowSettings) -> None:
    """Before anything is submitted: :class:`MlflowUnreachableError` unless the server answers."""
    problem = probe(settings.tracking_uri, settings.request_timeout, settings.conn_id)
    if problem is not None:
        raise MlflowUnreachableError(
            f"MLflow tracking server {settings.tracking_uri} is not reachable: {problem}. "
            "Start it (scripts/mlflow_server.sh start), fix mlflow.tracking_uri, or set "
            "mlflow.relay_later=true to train anyway and send the metrics when it is back."
        )


def patiently(wait_s: float, log: Any = None, *, what: str = "MLflow") -> Any:
    """A tenacity ``Retrying`` that retries :class:`MlflowUnreachableError` for ``wait_s``.

    Exponential backoff from 2 s to 30 s; the last error is re-raised.
    """
    import tenacity

    logger = log or _log

    def before_sleep(state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        logger.warning(
            "%s does not answer (%s): retrying in %.0fs (waited %.0fs of %.0fs)",
            what,
            exc,
            state.upcoming_sleep,
            state.seconds_since_start or 0.0,
            wait_s,
        )

    return tenacity.Retrying(
        retry=tenacity.retry_if_exception_type(MlflowUnreachableError),
        wait=tenacity.wait_exponential(multiplier=2, min=2, max=30),
        stop=tenacity.stop_after_delay(wait_s),
        before_sleep=before_sleep,
        reraise=True,
    )
