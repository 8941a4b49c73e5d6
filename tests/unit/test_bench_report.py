"""bench/_report.py: re-running one benchmark keeps every other section of results.md."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import ROOT


@pytest.fixture
def report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "bench" / "_report.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "OUT", tmp_path / "out")
    monkeypatch.setattr(mod, "RESULTS", tmp_path / "results.md")
    (tmp_path / "out").mkdir()
    return mod


def _json(mod: ModuleType, name: str, text: str, figure: str) -> None:
    row = mod.row(figure, "1 s", "2 s", "0.5", "-", True)
    data = {"benchmark": name, "section_md": text, "summary_rows": [row]}
    (mod.OUT / f"{name}.json").write_text(json.dumps(data))


def test_a_rerun_replaces_its_own_section_and_keeps_the_others(report: ModuleType) -> None:
    names = list(report.ORDER)
    report.RESULTS.write_text(
        "# old\n\n## Summary\n\n| figure | measured | baseline (same run) | ratio | target | met |\n"
        "|---|---|---|---|---|---|\n"
        "| 3. by hand | 9 s | - | - | - | - |\n| 1. old formation | 5 s | - | - | - | - |\n\n"
        "## 1. Formation\n\nold formation text\n\n## 3. Throughput\n\nrecorded by hand\n"
    )
    # An earlier local run's JSON of section 3 is not what results.md records.
    _json(report, names[2], "stale local run", "stale")
    _json(report, names[0], "new formation text", "new formation")
    report.save(
        names[0],
        {},
        "new formation text",
        [report.row("new formation", "3 s", "-", "-", "-", True)],
    )
    text = report.RESULTS.read_text()
    assert "new formation text" in text and "old formation text" not in text
    assert "| 1. new formation | 3 s |" in text and "old formation" not in text
    assert "recorded by hand" in text and "| 3. by hand | 9 s |" in text
    assert "stale" not in text
    assert f"| 2. {report.ORDER[names[1]]} | not run |" in text
    # Sections in the order of ORDER, each once.
    assert text.index("## 1. ") < text.index("## 3. ") and text.count("## 3. ") == 1
    # Assembling again without a fresh run changes nothing but the timestamp.
    before = [ln for ln in text.splitlines() if not ln.startswith("Assembled")]
    report.assemble()
    after = [ln for ln in report.RESULTS.read_text().splitlines() if not ln.startswith("Assembled")]
    assert after == before
