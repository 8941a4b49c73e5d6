"""bench/reliability.md from recorded fault trials (pure)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.faults.report import write_report


def test_report_rows_variants_and_failures(tmp_path: Path) -> None:
    src = tmp_path / "results-1.jsonl"
    rows = [
        {"fault": "R1 deferred clear", "passed": True, "recover_s": 4.0},
        {"fault": "R1 deferred clear", "passed": True, "recover_s": 6.0},
        {"fault": "R1 worker failed", "passed": False, "recover_s": None},
        {"fault": "R10", "passed": True, "recover_s": 0.5},
        {"fault": "R2", "passed": True, "recover_s": 30.0},
    ]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    target = tmp_path / "reliability.md"
    write_report([src], target)
    table = [ln for ln in target.read_text().splitlines() if ln.startswith("| R")]
    assert [ln.split("|")[1].strip() for ln in table] == [
        "R1 deferred clear",
        "R1 worker failed",
        "R2",
        *[f"R{n}" for n in range(3, 11)],
        "R12.1",
        "R12.2",
        "R12.3",
    ]
    assert "| 2 | 2 | 0 | 5.0 s / 6.0 s |" in table[0]
    assert table[0].split("|")[2].strip().startswith("task marked failed / cleared")
    assert table[1].endswith("| 1 | 0 | 0 | - |")
    # faults with no row at all are listed as not run, never left out
    assert table[3].startswith("| R3 |") and table[3].endswith("| 0 | 0 | 0 | not run |")
    assert table[-4].startswith("| R10 |") and "| 1 | 1 | 0 | 0.5 s / 0.5 s |" in table[-4]


def test_a_skipped_fault_stays_in_the_report(tmp_path: Path, monkeypatch) -> None:
    """R1/R2/R8 skip without root: the skip is recorded and shown, not dropped."""
    from tests.faults import conftest as faults_conftest

    recorder = faults_conftest.FaultRecorder(tmp_path / "results-2.jsonl")
    monkeypatch.setattr(faults_conftest.os, "geteuid", lambda: 1000)
    with pytest.raises(pytest.skip.Exception, match="needs root"):
        recorder.require_root("R8")
    recorder.record("R2", passed=True, recover_s=3.0)
    target = tmp_path / "reliability.md"
    write_report([recorder.path], target)
    text = target.read_text()
    row = next(ln for ln in text.splitlines() if ln.startswith("| R8 |"))
    assert row.endswith(
        "| 0 | 0 | 1 | skipped: reading the node namespaces' processes needs root |"
    )
    assert "| R2 |" in text and "| 1 | 1 | 0 | 3.0 s / 3.0 s |" in text
    monkeypatch.setattr(faults_conftest.os, "geteuid", lambda: 0)
    recorder.require_root("R1")  # as root: no skip, nothing recorded
    assert "R1" not in recorder.path.read_text()


def test_report_keeps_the_shared_site_section(tmp_path: Path) -> None:
    src = tmp_path / "results-1.jsonl"
    src.write_text(json.dumps({"fault": "R2", "passed": True, "recover_s": 3.0}) + "\n")
    target = tmp_path / "reliability.md"
    target.write_text("# old table\n\n## Shared site: a neighbour attacks\n\n- attack 1\n")
    write_report([src], target)
    text = target.read_text()
    assert "# old table" not in text and "| R2 |" in text
    assert text.endswith("## Shared site: a neighbour attacks\n\n- attack 1\n")
