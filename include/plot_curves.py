#!/usr/bin/env python3
"""Draw learning curves of several runs as a PNG (cluster side: needs matplotlib).

    python plot_curves.py SPEC.json OUT.png

SPEC (written by slurm_ray.mlflow.compare): ``title``, ``x_label``, ``y_label``,
``width``/``height`` (pixels), ``series`` (``label``, ``color`` "#rrggbb",
``points`` [[x, y], ...]) and ``thresholds`` (``axis`` "x" or "y", ``value``,
``label``): the stop criteria, drawn as dashed lines. The PNG is 8-bit RGB,
exactly ``width`` x ``height``. Prints ``PLOT_SUMMARY {json}`` last.
"""

from __future__ import annotations

import json
import sys
from typing import Any

DPI = 100


def build_figure(spec: dict[str, Any]) -> Any:
    """The matplotlib Figure for ``spec`` (Agg backend, no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter

    width, height = int(spec.get("width", 960)), int(spec.get("height", 600))
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)  # attaches itself: drawing needs no display
    ax = fig.add_subplot()
    series = spec.get("series") or []
    for s in series:
        xs = [p[0] for p in s["points"]]
        ys = [p[1] for p in s["points"]]
        marker = "o" if 0 < len(xs) <= 40 else None
        ax.plot(xs, ys, label=s["label"], color=s["color"], linewidth=2.5, marker=marker,
                markersize=4)  # fmt: skip
    for t in spec.get("thresholds") or []:
        draw_threshold(ax, t)
    ax.set_title(spec.get("title", ""), fontsize=13)
    ax.set_xlabel(spec.get("x_label", ""))
    ax.set_ylabel(spec.get("y_label", ""))
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    ax.grid(True, color="#dddddd", linewidth=0.8)
    if not any(s["points"] for s in series):
        ax.text(0.5, 0.5, "no data points", transform=ax.transAxes, ha="center", color="#888888")
    if ax.get_legend_handles_labels()[0]:
        outside = len(series) > 6
        ax.legend(
            loc="upper left" if outside else "best",
            bbox_to_anchor=(1.01, 1.0) if outside else None,
            fontsize=9,
            title="run (config)",
            title_fontsize=9,
            framealpha=0.9,
        )
    return fig


def draw_threshold(ax: Any, t: dict[str, Any]) -> None:
    """A stop criterion as a dashed line; far off the data it is named in the legend only
    (drawing it would squash every curve into a corner)."""
    style = {"color": "#555555", "linestyle": "--", "linewidth": 1.5}
    lo, hi = (ax.dataLim.y0, ax.dataLim.y1) if t["axis"] == "y" else (ax.dataLim.x0, ax.dataLim.x1)
    span = hi - lo if ax.has_data() and hi > lo else None
    if span is not None and not lo - span / 2 <= t["value"] <= hi + span / 2:
        ax.plot([], [], label=f"{t['label']} (off the chart)", **style)
        return
    draw = ax.axhline if t["axis"] == "y" else ax.axvline
    draw(t["value"], label=t["label"], **style)


def render_png(spec: dict[str, Any], out: str) -> dict[str, Any]:
    """Write ``spec``'s figure to ``out`` as an RGB PNG; returns its size and legend."""
    import numpy as np
    from PIL import Image

    fig = build_figure(spec)
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    Image.fromarray(rgba[..., :3].copy(), "RGB").save(out, format="PNG", optimize=True)
    legend = fig.axes[0].get_legend()
    return {
        "width": int(rgba.shape[1]),
        "height": int(rgba.shape[0]),
        "legend": [t.get_text() for t in legend.get_texts()] if legend else [],
    }


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[1]) as fh:
        spec = json.load(fh)
    print("PLOT_SUMMARY " + json.dumps(render_png(spec, argv[2])), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
