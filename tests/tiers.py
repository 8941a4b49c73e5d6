"""Hooks: the real tiers in xdist groups (lanes), and a time-per-tier summary at the end.

`make test` runs pytest with ``-n 3 --dist loadgroup``: every test that uses
the Slurm cluster, MLflow or Airflow (the real tiers, see
tests/require_cluster.py) carries the group of its lane (tests/lanes.py): with
``TEST_LANES=2`` the fault suite runs on one worker and the cluster and
end-to-end tiers on another, each with its own Airflow and MLflow, sharing the
cluster under a readers-writer lock (``exclusive`` tests run alone); with
``TEST_LANES=1`` all real tests run in order on one worker. The cluster-side
tier (include/ scripts on a local Ray, no Slurm, no server) is the group
``local_ray`` and the pure tier is ungrouped: both run beside the lanes.
Without ``-n`` the group markers do nothing.

The summary gives, per tier (the folder under tests/), the tests run, how many
failed, the seconds spent in them (setup + call + teardown) and the wall-clock
span from the tier's first test start to its last test end; every test's
time goes to .dev/test-durations.tsv. tests/conftest.py imports these hooks.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.lanes import EXCLUSIVE, cluster_lock, lane_of
from tests.require_cluster import in_real_tier

LOCAL_RAY_GROUP = "local_ray"


@dataclass
class _Tier:
    tests: set[str] = field(default_factory=set)
    failed: set[str] = field(default_factory=set)
    seconds: float = 0.0
    start: float = float("inf")
    stop: float = 0.0


_TIERS: dict[str, _Tier] = {}
_TESTS: dict[str, list[float]] = {}  # nodeid -> [seconds, first start, failed]
_SESSION_START = time.time()
# Every test's time, for whoever plans where the test run's minutes go.
DURATIONS = Path(__file__).resolve().parents[1] / ".dev" / "test-durations.tsv"


def tier_of(nodeid: str) -> str:
    """``tests/<tier>/...`` -> tier; a test file directly under tests/ is ``tests``."""
    parts = nodeid.split("::", 1)[0].split("@", 1)[0].split("/")
    return parts[1] if len(parts) > 2 and parts[0] == "tests" else parts[0]


# tryfirst: xdist's own hook turns the marker into the nodeid's group suffix.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        path = Path(str(item.path))
        if "cluster_side" in path.parts:
            item.add_marker(pytest.mark.xdist_group(LOCAL_RAY_GROUP))
        elif in_real_tier(path, {m.name for m in item.iter_markers()}):
            item.add_marker(pytest.mark.xdist_group(lane_of(tier_of(item.nodeid))))


@pytest.fixture(autouse=True)
def _share_the_cluster(request: pytest.FixtureRequest) -> Iterator[None]:
    """A real test holds the dev cluster shared, an ``exclusive`` one alone (tests/lanes.py)."""
    markers = {m.name for m in request.node.iter_markers()}
    if not in_real_tier(Path(str(request.node.path)), markers):
        yield
        return
    with cluster_lock(exclusive=EXCLUSIVE in markers):
        yield


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    tier = _TIERS.setdefault(tier_of(report.nodeid), _Tier())
    tier.tests.add(report.nodeid)
    if report.failed:
        tier.failed.add(report.nodeid)
    tier.seconds += report.duration
    row = _TESTS.setdefault(report.nodeid, [0.0, report.start or 0.0, 0.0])
    row[0] += report.duration
    row[2] = max(row[2], float(report.failed))
    if report.start:
        tier.start = min(tier.start, report.start)
        tier.stop = max(tier.stop, report.stop)


def _mmss(seconds: float) -> str:
    return f"{int(seconds) // 60}:{int(seconds) % 60:02d}"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _TIERS or hasattr(terminalreporter.config, "workerinput"):
        return  # nothing ran, or an xdist worker (the controller prints)
    tr = terminalreporter
    tr.section("time per tier")
    tr.write_line(f"{'tier':<14}{'tests':>7}{'failed':>8}{'in tests':>11}{'wall span':>11}")
    for name, t in sorted(_TIERS.items(), key=lambda kv: kv[1].start):
        span = _mmss(t.stop - t.start) if t.stop else "-"
        tr.write_line(
            f"{name:<14}{len(t.tests):>7}{len(t.failed):>8}{_mmss(t.seconds):>11}{span:>11}"
        )
    tr.write_line(f"session wall: {_mmss(time.time() - _SESSION_START)} (pytest only)")
    DURATIONS.parent.mkdir(exist_ok=True)
    with DURATIONS.open("w") as fh:
        fh.write("seconds\tstart\tfailed\ttier\ttest\n")
        for nodeid, (secs, start, failed) in sorted(_TESTS.items(), key=lambda kv: -kv[1][0]):
            fh.write(f"{secs:.2f}\t{start:.1f}\t{int(failed)}\t{tier_of(nodeid)}\t{nodeid}\n")
    tr.write_line(f"every test's time: {DURATIONS}")
