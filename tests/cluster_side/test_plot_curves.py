"""include/plot_curves.py: the comparison figure, drawn with matplotlib (Agg) in the cluster venv."""

from __future__ import annotations

import json
import struct
import subprocess
import zlib
from pathlib import Path
from typing import Any

from tests.cluster_side.conftest import INCLUDE, run_script, subprocess_env

SPEC: dict[str, Any] = {
    "title": "Learning curves: episode_return_mean vs env_steps (rllib_sweep)",
    "x_label": "Environment steps (count)",
    "y_label": "Mean episode return (reward per episode)",
    "width": 960,
    "height": 600,
    "series": [
        {"label": "lr=0.0003", "color": "#0072b2", "points": [[4000, 15], [8000, 30], [12000, 60]]},
        {"label": "lr=0.001", "color": "#e69f00", "points": [[4000, 20], [8000, 55], [12000, 150]]},
        {"label": "lr=0.01", "color": "#009e73", "points": []},
    ],
    "thresholds": [
        {"axis": "y", "value": 100.0, "label": "stop: return_mean ≥ 100"},
        {"axis": "x", "value": 10000.0, "label": "stop: env_steps ≥ 10000"},
    ],
}

#: Builds the figure in the cluster venv and reports what a reader would see.
INSPECT = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import matplotlib
from plot_curves import build_figure
spec = json.load(open(sys.argv[2]))
fig = build_figure(spec)
ax = fig.axes[0]
fig.canvas.draw()
print(json.dumps({
    "backend": type(fig.canvas).__name__,
    "title": ax.get_title(),
    "xlabel": ax.get_xlabel(),
    "ylabel": ax.get_ylabel(),
    "legend": [t.get_text() for t in ax.get_legend().get_texts()],
    "legend_title": ax.get_legend().get_title().get_text(),
    "lines": [[l.get_label(), matplotlib.colors.to_hex(l.get_color()), l.get_linestyle(),
               [list(map(float, l.get_xdata())), list(map(float, l.get_ydata()))]]
              for l in ax.get_lines()],
    "size": [fig.get_figwidth() * fig.dpi, fig.get_figheight() * fig.dpi],
    "ylim": list(map(float, ax.get_ylim())),
}))
"""


def png_header(data: bytes) -> tuple[int, int, int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    assert zlib.crc32(b"IHDR" + data[16:29]) == struct.unpack(">I", data[29:33])[0]
    width, height, depth, color = struct.unpack(">IIBB", data[16:26])
    return width, height, depth, color


def inspect(python: Path, tmp_path: Path, spec: dict[str, Any]) -> dict[str, Any]:
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    proc = subprocess.run(
        [str(python), "-c", INSPECT, str(INCLUDE), str(path)],
        capture_output=True, text=True, timeout=120, env=subprocess_env(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_figure_labels_legend_and_thresholds(cluster_python: Path, tmp_path: Path) -> None:
    got = inspect(cluster_python, tmp_path, SPEC)
    assert got["backend"] == "FigureCanvasAgg"
    assert got["title"] == SPEC["title"]
    assert got["xlabel"] == "Environment steps (count)"
    assert got["ylabel"] == "Mean episode return (reward per episode)"
    # one legend entry per run, named by its config, then each stop threshold
    assert got["legend"] == [
        "lr=0.0003",
        "lr=0.001",
        "lr=0.01",
        "stop: return_mean ≥ 100",
        "stop: env_steps ≥ 10000",
    ]
    assert got["legend_title"] == "run (config)"
    lines = {label: (color, style, data) for label, color, style, data in got["lines"]}
    assert lines["lr=0.001"][0] == "#e69f00" and lines["lr=0.001"][2][1] == [20.0, 55.0, 150.0]
    assert lines["stop: return_mean ≥ 100"][1] == "--"
    assert lines["stop: return_mean ≥ 100"][2][1] == [100.0, 100.0]  # horizontal at 100
    assert lines["stop: env_steps ≥ 10000"][2][0] == [10000.0, 10000.0]  # vertical
    assert got["size"] == [960.0, 600.0]


def test_a_threshold_far_off_the_data_is_named_not_drawn(
    cluster_python: Path, tmp_path: Path
) -> None:
    """A goal of 450 over curves near 30 would squash them into a flat line at the bottom."""
    spec = {
        **SPEC,
        "thresholds": [{"axis": "y", "value": 5000.0, "label": "stop: return_mean ≥ 5000"}],
    }
    got = inspect(cluster_python, tmp_path, spec)
    assert got["legend"][-1] == "stop: return_mean ≥ 5000 (off the chart)"
    assert got["ylim"][1] < 1000, got["ylim"]


def test_script_writes_an_rgb_png(cluster_python: Path, tmp_path: Path) -> None:
    spec, out = tmp_path / "spec.json", tmp_path / "curves.png"
    spec.write_text(json.dumps(SPEC))
    proc = run_script(cluster_python, "plot_curves.py", str(spec), str(out), timeout=120)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1].removeprefix("PLOT_SUMMARY "))
    assert (summary["width"], summary["height"]) == (960, 600)
    assert summary["legend"][:3] == ["lr=0.0003", "lr=0.001", "lr=0.01"]
    data = out.read_bytes()
    assert png_header(data) == (960, 600, 8, 2)  # 8-bit RGB
    assert 10_000 < len(data) < 1_000_000, len(data)


def test_script_usage_error(cluster_python: Path) -> None:
    proc = run_script(cluster_python, "plot_curves.py", timeout=60)
    assert proc.returncode == 2 and "SPEC.json OUT.png" in proc.stderr
