"""bench/reliability.md from recorded fault trials (pure)."""

from __future__ import annotations

import json
from pathlib import Path

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
        "R10",
    ]
    assert "| 2 | 2 | 5.0 s / 6.0 s |" in table[0]
    assert table[0].split("|")[2].strip().startswith("task marked failed / cleared")
    assert table[1].endswith("| 1 | 0 | - |")


def test_report_keeps_the_shared_site_section(tmp_path: Path) -> None:
    src = tmp_path / "results-1.jsonl"
    src.write_text(json.dumps({"fault": "R2", "passed": True, "recover_s": 3.0}) + "\n")
    target = tmp_path / "reliability.md"
    target.write_text("# old table\n\n## Shared site: a neighbour attacks\n\n- attack 1\n")
    write_report([src], target)
    text = target.read_text()
    assert "# old table" not in text and "| R2 |" in text
    assert text.endswith("## Shared site: a neighbour attacks\n\n- attack 1\n")
