"""Fault suite: each fault is caused for real; outcomes are recorded for bench/reliability.md.

`make test` runs each fault once; `make test-faults` repeats them
(`SLURM_RAY_FAULT_TRIALS`, default 5 there) and writes the report.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "bench" / "out" / "reliability"


def trials(limit: int | None = None) -> int:
    """How many times each repeated fault runs (1 in `make test`), at most ``limit``."""
    n = max(1, int(os.environ.get("SLURM_RAY_FAULT_TRIALS", "1")))
    return min(n, limit) if limit else n


class FaultRecorder:
    """Collects (fault id, passed, seconds to recover) and writes them as JSON lines."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def record(
        self,
        fault: str,
        *,
        passed: bool,
        recover_s: float | None,
        note: str = "",
        skipped: bool = False,
    ) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        row = {
            "fault": fault,
            "passed": passed,
            "recover_s": recover_s,
            "note": note,
            "t": time.time(),
        }
        if skipped:
            row["skipped"] = True
        with self.path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")

    def require_root(self, fault: str) -> None:
        """Skip a fault that needs root, but keep it in the report as skipped (not absent)."""
        if os.geteuid() != 0:
            reason = "reading the node namespaces' processes needs root"
            self.record(fault, passed=False, recover_s=None, note=reason, skipped=True)
            pytest.skip(reason)

    def trial(self, fault: str) -> Callable[[Callable[[], float | None]], None]:
        """Run `body` (returns seconds to recover); record pass/fail; re-raise failures."""

        def run(body: Callable[[], float | None]) -> None:
            try:
                recover = body()
            except BaseException as exc:
                self.record(
                    fault, passed=False, recover_s=None, note=f"{type(exc).__name__}: {exc}"[:300]
                )
                raise
            self.record(fault, passed=True, recover_s=recover)

        return run


@pytest.fixture(scope="session")
def faults() -> Iterator[FaultRecorder]:
    path = OUT / f"results-{os.getpid()}.jsonl"
    recorder = FaultRecorder(path)
    yield recorder
    if path.exists():
        from tests.faults.report import write_report

        # The committed report comes from `make test-faults` (repetitions);
        # a single-trial `make test` writes its own copy under bench/out/.
        repeated = "SLURM_RAY_FAULT_TRIALS" in os.environ
        target = ROOT / "bench" / "reliability.md" if repeated else OUT / "reliability.md"
        write_report(sorted(OUT.glob("results-*.jsonl")), target)
