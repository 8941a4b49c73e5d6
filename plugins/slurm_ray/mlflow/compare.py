"""Compare a sweep's runs in a parent run: learning curves, a table, the best run."""

from __future__ import annotations

import csv
import io
import math
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slurm_ray.mlflow.accounting import NODE_HOURS
from slurm_ray.mlflow.keys import finite, safe_key, tag_items
from slurm_ray.mlflow.registry import EVAL_RETURN, RETURN_PER_NODE_HOUR, metric_value
from slurm_ray.mlflow.relay import SENTINEL_METRIC
from slurm_ray.mlflow.runs import client_for, ensure_run, experiment_id

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from slurm_ray.mlflow.settings import MlflowSettings

#: Line colours, one per run (Okabe-Ito, colour-blind friendly, then a few more).
PALETTE = (
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
#: Axis labels, with units, of the metrics a curve is usually drawn from.
AXIS_LABELS = {
    "env_steps": "Environment steps (count)",
    "iteration": "Training iteration (count)",
    "wall_s": "Wall-clock time (s)",
    "episode_return_mean": "Mean episode return (reward per episode)",
    "eval_return_mean": "Mean evaluation return (reward per episode)",
    "episode_len_mean": "Mean episode length (steps)",
}
#: Stop criteria (config params) drawn as thresholds: param -> (metric, axis label).
STOP_PARAMS = {"stop.return_mean": "episode_return_mean", "stop.env_steps": "env_steps"}
PLOT_ARTIFACT = "comparison/learning_curves.png"
#: Config keys that say nothing about how a run learns (legend labels skip them).
LABEL_SKIP = ("checkpoint_every", "eval_episodes", "stop.")


#: Turns a plot spec (see ``include/plot_curves.py``) into PNG bytes.
CurvePlotter = Callable[[Mapping[str, Any]], bytes]


def _curve(
    client: MlflowClient, run_id: str, y_metric: str, x_metric: str
) -> list[tuple[float, float]]:
    """(x, y) points of one run: y by step, x = the x metric at the same step (or the step)."""
    ys = {m.step: m.value for m in client.get_metric_history(run_id, y_metric)}
    xs = {m.step: m.value for m in client.get_metric_history(run_id, x_metric)} if x_metric else {}
    points = [(float(xs.get(step, step)), float(y)) for step, y in ys.items()]
    return sorted(p for p in points if math.isfinite(p[0]) and math.isfinite(p[1]))


def config_labels(names: Sequence[str], params: Sequence[Mapping[str, str]]) -> list[str]:
    """A legend label per run: the config values that differ between the runs.

    ``lr=0.001, seed=7`` (the most varied first, about 60 characters); bookkeeping keys (checkpointing, evaluation, the stop
    criteria, which the figure draws as thresholds) are left out; runs whose
    configs do not differ otherwise keep their run name.
    """
    keys = sorted({k for p in params for k in p if not k.startswith(LABEL_SKIP)})
    spread = {k: len({p.get(k) for p in params}) for k in keys}
    # what varies most first: a sweep's swept value leads the label
    differ = sorted((k for k in keys if spread[k] > 1), key=lambda k: (-spread[k], k))
    labels = []
    for name, p in zip(names, params, strict=True):
        text = ""
        for k in differ:
            part = f"{k}={p.get(k, '-')}"
            if len(text) + len(part) > 56:
                text += ", …" if text else part[:56] + "…"
                break
            text = f"{text}, {part}" if text else part
        labels.append(text or name[:60])
    # runs whose configs do not tell them apart: numbered in order
    for label in {lb for lb in labels if labels.count(lb) > 1}:
        for n, i in enumerate(i for i, lb in enumerate(labels) if lb == label):
            labels[i] = f"{label} (#{n + 1})"
    return labels


def plot_spec(
    title: str,
    x_metric: str,
    y_metric: str,
    series: Sequence[tuple[str, Sequence[tuple[float, float]]]],
    params: Sequence[Mapping[str, str]],
) -> dict[str, Any]:
    """What ``include/plot_curves.py`` draws: labelled axes, one coloured line per run,
    and each stop criterion of the runs (on a drawn axis) as a dashed line."""
    thresholds = []
    for param, metric in STOP_PARAMS.items():
        axis = "y" if metric == y_metric else "x" if metric == x_metric else None
        values = sorted({v for p in params if (v := finite(_number(p.get(param)))) is not None})
        for value in values if axis else []:
            name = param.removeprefix("stop.")
            thresholds.append({"axis": axis, "value": value, "label": f"stop: {name} ≥ {value:g}"})
    return {
        "title": title,
        "x_label": AXIS_LABELS.get(x_metric, x_metric),
        "y_label": AXIS_LABELS.get(y_metric, y_metric),
        "width": 960,
        "height": 600,
        "series": [
            {"label": label, "color": _hex(PALETTE[i % len(PALETTE)]), "points": pts}
            for i, (label, pts) in enumerate(series)
        ],
        "thresholds": thresholds,
    }


def _hex(rgb: tuple[int, int, int]) -> str:
    return "#" + "".join(f"{c:02x}" for c in rgb)


def _number(text: str | None) -> float | None:
    if text is None or text in ("", "None"):
        return None
    try:
        return float(text)
    except ValueError:
        return None


def _score(m: Mapping[str, Any], metric: str, fallback_metric: str) -> tuple[float | None, str]:
    """A run's ``metric``, else the same from ``fallback_metric`` (the training return)."""
    value = metric_value(m, metric)
    if value is not None:
        return value, metric
    if metric == RETURN_PER_NODE_HOUR:
        return metric_value(m, metric, return_metric=fallback_metric), f"{fallback_metric}/node-h"
    return finite(m.get(fallback_metric)), fallback_metric


def _row(
    run: Any, metric: str, fallback_metric: str, known: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """One table row: the return, what the job cost, and the score the best is picked by.

    ``known``: final values MLflow does not have yet (they win over the run's metrics).
    """
    m = {**run.data.metrics, **{k: v for k, v in (known or {}).items() if finite(v) is not None}}
    value, used = _score(m, metric, fallback_metric)
    return {
        "run_id": run.info.run_id,
        "run_name": run.info.run_name or run.info.run_id[:8],
        "status": run.info.status,
        EVAL_RETURN: finite(m.get(EVAL_RETURN)),
        fallback_metric: finite(m.get(fallback_metric)),
        NODE_HOURS: finite(m.get(NODE_HOURS)),
        RETURN_PER_NODE_HOUR: metric_value(m, RETURN_PER_NODE_HOUR),
        "env_steps": finite(m.get("env_steps")),
        "iterations": finite(m.get(SENTINEL_METRIC)),
        "wall_s": finite(m.get("wall_s")),
        "score": value,
        "score_metric": used,
    }


def _tables(rows: Sequence[Mapping[str, Any]], best: Mapping[str, Any] | None) -> dict[str, bytes]:
    """``runs.csv`` and ``runs.md``."""
    columns = list(rows[0])
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)

    def cell(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else "" if value is None else str(value)

    md = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    md += ["| " + " | ".join(cell(r[c]) for c in columns) + " |" for r in rows]
    if best is not None:
        md.append(
            f"\nbest: {best['run_name']} ({best['run_id']}), "
            f"{best['score_metric']} = {best['score']:.4g}"
        )
    return {"runs.csv": buf.getvalue().encode(), "runs.md": ("\n".join(md) + "\n").encode()}


def _log_summary(
    client: MlflowClient, parent_id: str, rows: Sequence[Mapping[str, Any]], best: Any, metric: str
) -> None:
    from mlflow.entities import Metric, RunTag

    now_ms = int(time.time() * 1000)
    metrics = [
        Metric(safe_key(f"{i + 1}_{r['run_name']}.{metric}"), r["score"], now_ms, 0)
        for i, r in enumerate(rows)
        if r["score"] is not None
    ]
    run_tags = {"slurm_ray.compared_runs": ",".join(r["run_id"] for r in rows)}
    if best is not None:
        metrics.append(Metric(safe_key(f"best.{metric}"), best["score"], now_ms, 0))
        run_tags["slurm_ray.best_run_id"] = best["run_id"]
        run_tags["slurm_ray.best_run_name"] = best["run_name"]
    client.log_batch(
        parent_id, metrics=metrics, tags=[RunTag(k, v) for k, v in tag_items(run_tags)]
    )


def _log_files(client: MlflowClient, run_id: str, files: Mapping[str, bytes]) -> None:
    """``{name: data}`` as the run's ``comparison/`` artifacts."""
    with tempfile.TemporaryDirectory(prefix="slurm-ray-compare-") as tmp_name:
        for name, data in files.items():
            (Path(tmp_name) / name).write_bytes(data)
        client.log_artifacts(run_id, tmp_name, "comparison")


def _parent_run(
    settings: MlflowSettings, client: MlflowClient, name: str, tags: Mapping[str, str] | None
) -> str:
    """The comparison's run: found again by ``tags`` (a retry reuses it), else a new one."""
    if tags:
        return ensure_run(settings, tags=tags, run_name=name)
    exp_id = experiment_id(client, settings.experiment_name)
    return str(client.create_run(exp_id, run_name=name).info.run_id)


def _series(
    client: MlflowClient,
    rows: Sequence[Mapping[str, Any]],
    params: Sequence[Mapping[str, str]],
    y_metric: str,
    x_metric: str,
) -> list[tuple[str, list[tuple[float, float]]]]:
    """One (legend label, points) per run."""
    labels = config_labels([r["run_name"] for r in rows], params)
    return [
        (lb, _curve(client, r["run_id"], y_metric, x_metric))
        for lb, r in zip(labels, rows, strict=True)
    ]


def compare_runs(
    settings: MlflowSettings,
    run_ids: Sequence[str],
    *,
    parent_run_name: str,
    plotter: CurvePlotter,
    metric: str = EVAL_RETURN,
    fallback_metric: str = "episode_return_mean",
    curve_metric: str = "episode_return_mean",
    x_metric: str = "env_steps",
    tags: Mapping[str, str] | None = None,
    nest: bool = True,
    known: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Log a comparison of several runs (a sweep) to a parent run and pick the best.

    The parent run (found again by ``tags`` if given, so a retry reuses it) gets
    ``comparison/learning_curves.png`` (``curve_metric`` against ``x_metric``,
    one line per run named by its config, stop thresholds dashed; drawn by
    ``plotter``, e.g. :class:`slurm_ray.mlflow.plot.RemotePlotter`),
    ``comparison/runs.csv`` and ``comparison/runs.md`` (final metrics: return,
    ``slurm.node_hours``, ``return_per_node_hour``), a metric
    ``<label>.<metric>`` per run and ``best.<metric>``; the child runs are
    nested under it. The best run has the highest ``metric``
    (:func:`~slurm_ray.mlflow.registry.metric_value`; from ``fallback_metric``
    for runs without an evaluation return).

    :param nest: show the compared runs under the parent in the MLflow UI
        (sets their ``mlflow.parentRunId``; a run has one parent).
    :param known: ``{run_id: {metric: value}}`` not in MLflow yet, such as the
        tasks' ``eval_return_mean`` (from result.json; logged at finalize).
    :returns: ``{"parent_run_id", "best_run_id", "best_value", "metric", "runs",
        "plot_artifact"}``.
    """
    if not run_ids:
        raise ValueError("compare_runs: no run ids")
    client = client_for(settings)
    parent_id = _parent_run(settings, client, parent_run_name, tags)
    runs = [client.get_run(run_id) for run_id in dict.fromkeys(run_ids)]  # ordered, no duplicates
    rows = [_row(run, metric, fallback_metric, (known or {}).get(run.info.run_id)) for run in runs]
    params = [dict(run.data.params) for run in runs]
    series = _series(client, rows, params, curve_metric, x_metric)
    for r in (r for r in rows if nest and r["run_id"] != parent_id):
        client.set_tag(r["run_id"], "mlflow.parentRunId", parent_id)
    scored = [r for r in rows if r["score"] is not None]
    best = max(scored, key=lambda r: r["score"]) if scored else None
    title = f"Learning curves: {curve_metric} vs {x_metric} ({settings.experiment_name})"
    png = plotter(plot_spec(title, x_metric, curve_metric, series, params))
    _log_files(client, parent_id, {"learning_curves.png": png, **_tables(rows, best)})
    _log_summary(client, parent_id, rows, best, metric)
    client.set_terminated(parent_id, status="FINISHED")
    return {
        "parent_run_id": parent_id,
        "best_run_id": best["run_id"] if best else None,
        "best_value": best["score"] if best else None,
        "metric": metric,
        "runs": rows,
        "plot_artifact": PLOT_ARTIFACT,
    }
