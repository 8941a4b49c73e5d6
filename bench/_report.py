"""Shared reporting for the benchmarks: machine facts, JSON in bench/out/, bench/results.md.

Every benchmark calls :func:`save` with its raw result, a Markdown section and
a few summary rows (figure, baseline from the same run, ratio, target).
:func:`assemble` rebuilds ``bench/results.md`` in a fixed order: the benchmark
just run from its ``bench/out`` JSON, every other section as results.md records
it, so one benchmark can be re-run alone without losing the others' sections.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
OUT = BENCH / "out"
RESULTS = BENCH / "results.md"

#: Section order in results.md (benchmark name -> title); the number of a section
#: is its place here. Sections 6-8 were recorded by hand (see each section).
ORDER: dict[str, str] = {
    "ray_formation": "Ray cluster formation inside the allocation",
    "watch_jobs": "Watching 100 Slurm jobs: SSH connections and commands",
    "train_throughput": "Training throughput: operator path vs the driver run directly",
    "demo_walltime": "Demo wall time: trigger to registered model vs the driver run directly",
    "demo_walltime_long": "Demo wall time for a 90-s training job",
    "watch_jobs_stdin": "Watching 100, 1,000 and 5,000 held jobs: one poll on stdin",
    "watch_jobs_100_1000": "Watching 100 and 1,000 held jobs side by side",
    "tune_vs_jobs": "Ray Tune in one allocation vs one Slurm job per configuration",
    "demo_walltime_10min": "Demo wall time for a 10-minute training job",
}


def quick() -> bool:
    """``BENCH_QUICK=1``: fewer repetitions and shorter windows."""
    return os.environ.get("BENCH_QUICK", "").strip() not in ("", "0", "false", "no")


def loadavg() -> list[float]:
    """The 1/5/15-minute load averages, rounded."""
    return [round(x, 2) for x in os.getloadavg()]


def machine() -> dict[str, Any]:
    """Where and when a measurement ran (``uname -n``, ``nproc``, load average)."""
    return {
        "host": os.uname().nodename,
        "nproc": len(os.sched_getaffinity(0)),
        "loadavg": loadavg(),
        "when": datetime.now().astimezone().isoformat(timespec="seconds"),
        "quick": quick(),
    }


def machine_line(start: dict[str, Any], end: dict[str, Any] | None = None) -> str:
    """One Markdown line naming the machine and the load around a measurement."""
    end = end or machine()
    la = "/".join(f"{x:.2f}" for x in start["loadavg"])
    lb = "/".join(f"{x:.2f}" for x in end["loadavg"])
    return (
        f"Machine `{start['host']}`, nproc {start['nproc']}, load average (1/5/15 min) "
        f"{la} at start, {lb} at end; {start['when']}"
        + (" (BENCH_QUICK=1)" if start.get("quick") else "")
        + "."
    )


def stats(values: Iterable[float | None]) -> dict[str, float | int | None]:
    """min / median / mean / max / n of the non-None values."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {"n": 0, "min": None, "median": None, "mean": None, "max": None}
    return {
        "n": len(vals),
        "min": round(min(vals), 3),
        "median": round(statistics.median(vals), 3),
        "mean": round(statistics.fmean(vals), 3),
        "max": round(max(vals), 3),
    }


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b`` rounded, or None."""
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 3)


def fmt(value: Any, spec: str = ".2f", unit: str = "") -> str:
    """Format a number for a table; ``-`` for None."""
    if value is None:
        return "-"
    if isinstance(value, (int, float)):
        return f"{value:{spec}}{unit}"
    return f"{value}{unit}"


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def row(
    figure: str,
    value: str,
    baseline: str,
    ratio_text: str,
    target: str,
    met: bool | None,
) -> dict[str, Any]:
    """One line of the summary table at the top of results.md."""
    return {
        "figure": figure,
        "value": value,
        "baseline": baseline,
        "ratio": ratio_text,
        "target": target,
        "met": met,
    }


def save(
    name: str,
    result: dict[str, Any],
    section: str,
    summary: list[dict[str, Any]],
) -> Path:
    """Write ``bench/out/NAME.json`` (raw data + section + summary) and rebuild results.md."""
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.json"
    data = {"benchmark": name, **result, "section_md": section, "summary_rows": summary}
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    assemble(name)
    return path


def save_failure(name: str, start: dict[str, Any], exc: BaseException) -> Path:
    """Record a benchmark that could not finish (its section says why)."""
    tb = "".join(traceback.format_exception(exc))[-3000:]
    section = (
        f"{machine_line(start)}\n\n**The benchmark failed**: `{type(exc).__name__}: {exc}`\n\n"
        f"```\n{tb}\n```"
    )
    summary = [row(ORDER.get(name, name), "failed", "-", "-", "-", False)]
    return save(name, {"machine": start, "error": f"{type(exc).__name__}: {exc}"}, section, summary)


def run_main(name: str, body: Callable[[dict[str, Any]], int]) -> int:
    """Run a benchmark body; on an exception record the failure in results.md and exit 1."""
    start = machine()
    t0 = time.monotonic()
    try:
        rc = body(start)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:
        save_failure(name, start, exc)
        traceback.print_exc()
        return 1
    print(f"[bench] {name}: done in {time.monotonic() - t0:.0f}s", file=sys.stderr)
    return rc


def _load(name: str) -> dict[str, Any] | None:
    path = OUT / f"{name}.json"
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return data if "section_md" in data else None


def _recorded() -> tuple[dict[int, str], dict[int, list[str]]]:
    """The sections (by number) and summary rows of the results.md on disk."""
    sections: dict[int, str] = {}
    rows: dict[int, list[str]] = {}
    if not RESULTS.exists():
        return sections, rows
    text = RESULTS.read_text()
    for m in re.finditer(r"^## (\d+)\. .*?(?=^## \d+\. |\Z)", text, re.S | re.M):
        sections[int(m.group(1))] = m.group(0).strip()
    for line in text.splitlines():
        if m := re.match(r"\| (\d+)\. ", line):
            rows.setdefault(int(m.group(1)), []).append(line)
    return sections, rows


def assemble(fresh: str | None = None) -> Path:
    """Rebuild ``bench/results.md``: benchmark ``fresh`` (the one just saved) from its
    ``bench/out`` JSON, every other section as results.md already records it (the
    JSON of an earlier run on this machine is not what was committed), else from
    its JSON, else "not run"."""
    m = machine()
    parts = [
        "# slurm_ray benchmarks",
        "",
        "Written by `make bench` (`bench/*.py`; raw data in `bench/out/*.json`, not committed). "
        "Every figure stands beside its baseline measured in the same run, interleaved where "
        "timing matters. The dev cluster's two Slurm nodes (4 CPUs each) share the host's "
        "cores with everything else on it, including other jobs and sessions, so absolute "
        "numbers move with the load average noted in each section; the ratios are the figures "
        "to compare.",
        "",
        f"Assembled {m['when']} on `{m['host']}` (nproc {m['nproc']}, load average "
        f"{'/'.join(f'{x:.2f}' for x in m['loadavg'])}).",
        "",
        "## Summary",
        "",
    ]
    kept_sections, kept_rows = _recorded()
    header = ["figure", "measured", "baseline (same run)", "ratio", "target", "met"]
    lines = table(header, []).splitlines()
    sections: list[str] = []
    for i, (name, title) in enumerate(ORDER.items(), 1):
        data = _load(name)
        if (name != fresh and i in kept_sections) or data is None:
            if i in kept_sections:
                lines += kept_rows.get(i, [])
                sections.append(kept_sections[i] + "\n")
            else:
                lines += table(
                    header, [[f"{i}. {title}", "not run", "-", "-", "-", "-"]]
                ).splitlines()[2:]
            continue
        for r in data.get("summary_rows", []):
            met = {True: "yes", False: "**no**", None: "-"}[r.get("met")]
            cells = [f"{i}. {r['figure']}", r["value"], r["baseline"], r["ratio"], r["target"], met]
            lines += table(header, [cells]).splitlines()[2:]
        sections.append(f"## {i}. {title}\n\n{data['section_md'].strip()}\n")
    parts.append("\n".join(lines))
    parts.append("")
    parts.extend(sections)
    RESULTS.write_text("\n".join(parts).rstrip() + "\n")
    return RESULTS


if __name__ == "__main__":
    print(assemble())
