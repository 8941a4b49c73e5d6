"""With SLURM_RAY_REQUIRE_CLUSTER set (`make test`), a skip in a real tier is a failure.

The real tiers are the tests marked ``cluster``, ``e2e`` or ``faults`` and every
test under ``tests/cluster``, ``tests/cluster_side``, ``tests/e2e`` and
``tests/faults``. A missing cluster, venv or privilege must fail the run loudly
instead of turning into a green run that tested nothing. tests/conftest.py
imports these hooks; a unit test loads this module alone with ``-p``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ENV = "SLURM_RAY_REQUIRE_CLUSTER"
TIER_DIRS = frozenset({"cluster", "cluster_side", "e2e", "faults"})
TIER_MARKERS = ("cluster", "e2e", "faults")


def required() -> bool:
    return os.environ.get(ENV, "") not in ("", "0")


def in_real_tier(path: Path, markers: set[str]) -> bool:
    """A test of a real tier: by marker, or by the folder under the last ``tests/``."""
    if markers & set(TIER_MARKERS):
        return True
    parts = path.parts
    if "tests" not in parts:
        return False
    below = parts[len(parts) - parts[::-1].index("tests") :]
    return len(below) > 1 and below[0] in TIER_DIRS


def _reason(longrepr: Any) -> str:
    # A skip's longrepr is (file, line, "Skipped: reason").
    return longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)


def _fail(report: pytest.TestReport | pytest.CollectReport) -> None:
    report.outcome = "failed"
    report.longrepr = (
        f"skipped in a real tier while {ENV} is set (a skip here hides an untested "
        f"feature): {_reason(report.longrepr)}"
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if not (report.skipped and required()) or hasattr(report, "wasxfail"):
        return
    markers = {m.name for m in item.iter_markers()}
    if in_real_tier(Path(str(item.path)), markers):
        _fail(report)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[None]:
    """A module-level skip (importorskip, allow_module_level) of a real-tier file."""
    outcome = yield
    report = outcome.get_result()
    if not (report.skipped and required()) or not isinstance(collector, pytest.Module):
        return
    markers = {m.name for m in collector.iter_markers()}
    if in_real_tier(Path(str(collector.path)), markers):
        _fail(report)
