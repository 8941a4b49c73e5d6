"""The model registry: register a run's model, move the ``champion`` alias when better."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from slurm_ray.mlflow.accounting import NODE_HOURS
from slurm_ray.mlflow.keys import finite, tag_items
from slurm_ray.mlflow.runs import client_for

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from slurm_ray.mlflow.settings import MlflowSettings

_log = logging.getLogger(__name__)

#: Alias that marks the production model version.
CHAMPION_ALIAS = "champion"
#: The evaluation return a model is judged by.
EVAL_RETURN = "eval_return_mean"
#: The evaluation return per node-hour the job cost (``slurm.node_hours``).
RETURN_PER_NODE_HOUR = "return_per_node_hour"
#: What ``promotion_metric`` may name.
PROMOTION_METRICS = (EVAL_RETURN, RETURN_PER_NODE_HOUR)
#: The DAGs' ``promotion_metric`` Param: ``Param(EVAL_RETURN, **PROMOTION_PARAM)``.
PROMOTION_PARAM: dict[str, Any] = {
    "type": "string",
    "enum": list(PROMOTION_METRICS),
    "description": "What picks the best run and the champion: eval_return_mean, or "
    "return_per_node_hour (eval_return_mean / node-hours from Slurm accounting).",
}


def check_promotion_metric(value: Any) -> str:
    """``value`` if it is one of :data:`PROMOTION_METRICS`.

    :raises ValueError: naming the field ``promotion_metric`` and the valid values.
    """
    if value not in PROMOTION_METRICS:
        raise ValueError(
            f"promotion_metric: {value!r} is not one of {', '.join(PROMOTION_METRICS)}"
        )
    return str(value)


def metric_value(
    metrics: Mapping[str, Any], metric: str, *, return_metric: str = EVAL_RETURN
) -> float | None:
    """A run's ``metric``; :data:`RETURN_PER_NODE_HOUR` is derived from its metrics
    (``return_metric`` / ``slurm.node_hours``), None without either or at 0 node-hours."""
    if metric != RETURN_PER_NODE_HOUR:
        return finite(metrics.get(metric))
    value, hours = finite(metrics.get(return_metric)), finite(metrics.get(NODE_HOURS))
    return value / hours if value is not None and hours else None


def register_version(
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
    # What mlflow.register_model("runs:/<id>/model") does when the run has an
    # MLmodel file at that path: a version whose source is the artifact URI
    # (no LoggedModel entity needed).
    return client.create_model_version(
        name, source=source, run_id=run_id, tags=dict(tag_items(tags)), await_creation_for=60
    )


def _version_metric(client: MlflowClient, mv: Any, metric: str) -> float | None:
    if mv is None or not mv.run_id:
        return None
    return metric_value(client.get_run(mv.run_id).data.metrics, metric)


def _decide(
    version: str,
    new: float | None,
    champ_version: str | None,
    champ: float | None,
    metric: str,
    margin: float,
    alias: str,
) -> tuple[bool, str]:
    """Whether ``version`` takes the alias, and why (pure)."""
    if new is None:
        return False, f"version {version} has no {metric}"
    if champ_version is None:
        return True, f"no {alias} yet"
    if champ_version == version:
        return False, f"version {version} already is the {alias}"
    if champ is None:
        return True, f"the {alias} (version {champ_version}) has no {metric}"
    if new > champ and new - champ >= margin:
        return True, f"{new:g} beats {champ:g} by >= {margin:g}"
    return False, f"{new:g} does not beat {champ:g} by >= {margin:g}"


def _record_decision(client: MlflowClient, run_id: str, decision: Mapping[str, Any]) -> None:
    from mlflow.entities import Metric, RunTag

    now_ms = int(time.time() * 1000)
    new, champ = decision["new"], decision["champion"]
    metrics = [
        Metric(f"promotion.{k}", v, now_ms, 0)
        for k, v in (("new", new), ("champion", champ), ("margin", decision["min_improvement"]))
        if v is not None
    ]
    tags = {
        "slurm_ray.promotion.decision": "promoted" if decision["promoted"] else "kept",
        "slurm_ray.promotion.reason": decision["reason"],
        "slurm_ray.promotion.metric": decision["metric"],
        "slurm_ray.promotion.champion_version": decision["champion_version"] or "",
        "slurm_ray.promotion.champion_value": "" if champ is None else repr(champ),
        "slurm_ray.promotion.new_value": "" if new is None else repr(new),
    }
    client.log_batch(run_id, metrics=metrics, tags=[RunTag(k, v) for k, v in tag_items(tags)])


def promote_if_better(
    settings: MlflowSettings,
    model_name: str,
    version: str | int,
    *,
    metric: str = EVAL_RETURN,
    min_improvement: float | None = None,
    alias: str = CHAMPION_ALIAS,
    log: Any = None,
) -> dict[str, Any]:
    """
    Give ``version`` the ``champion`` alias if its run's ``metric`` beats the champion's.

    Promoted when there is no champion yet, or when ``new > champion`` and
    ``new - champion >= min_improvement`` (default: ``settings.min_improvement``,
    in the metric's unit). ``metric`` is one of :data:`PROMOTION_METRICS` or
    any metric of the runs; ``return_per_node_hour`` is computed from each
    run's ``eval_return_mean`` and ``slurm.node_hours``.
    A version without the metric is never promoted. The decision and both
    numbers are logged on the new version's run (tags ``slurm_ray.promotion.*``,
    metrics ``promotion.new`` / ``promotion.champion``) and on the model version.

    :returns: ``{"promoted", "new", "champion", "version", "champion_version",
        "metric", "min_improvement", "alias", "reason"}``.
    """
    from mlflow.exceptions import MlflowException

    margin = settings.min_improvement if min_improvement is None else float(min_improvement)
    client = client_for(settings)
    new_mv = client.get_model_version(model_name, str(version))
    try:
        champ_mv = client.get_model_version_by_alias(model_name, alias)
    except MlflowException:
        champ_mv = None
    new_value = _version_metric(client, new_mv, metric)
    champ_value = _version_metric(client, champ_mv, metric)
    champ_version = str(champ_mv.version) if champ_mv is not None else None
    promoted, reason = _decide(
        str(version), new_value, champ_version, champ_value, metric, margin, alias
    )
    if promoted:
        client.set_registered_model_alias(model_name, alias, str(version))
    decision = {
        "promoted": promoted,
        "new": new_value,
        "champion": champ_value,
        "version": str(version),
        "champion_version": champ_version,
        "metric": metric,
        "min_improvement": margin,
        "alias": alias,
        "reason": reason,
    }
    (log or _log).info("Promotion of %s v%s: %s (%s)", model_name, version, promoted, reason)
    if new_mv.run_id:
        _record_decision(client, new_mv.run_id, decision)
    client.set_model_version_tag(
        model_name, str(version), "slurm_ray.promotion", f"{promoted}: {reason}"[:5000]
    )
    return decision
