"""The readers-writer lock of the parallel test lanes (tests/lanes.py)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import lanes


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("SLURM_RAY_DEV_STATE", str(tmp_path))
    yield tmp_path


def _hold(exclusive: bool, entered: threading.Event, release: threading.Event) -> None:
    with lanes.cluster_lock(exclusive=exclusive):
        entered.set()
        release.wait(10)


def _start(exclusive: bool) -> tuple[threading.Thread, threading.Event, threading.Event]:
    entered, release = threading.Event(), threading.Event()
    t = threading.Thread(target=_hold, args=(exclusive, entered, release), daemon=True)
    t.start()
    return t, entered, release


def test_shared_holders_run_together_and_exclusive_waits_for_them(state: Path) -> None:
    _, a_in, a_out = _start(exclusive=False)
    _, b_in, b_out = _start(exclusive=False)
    assert a_in.wait(5) and b_in.wait(5)  # two lanes at once
    _, x_in, x_out = _start(exclusive=True)
    assert not x_in.wait(0.5)
    a_out.set()
    assert not x_in.wait(0.5)  # one shared holder is still in
    # a test that starts now queues behind the waiting exclusive one (no starvation)
    _, c_in, c_out = _start(exclusive=False)
    assert not c_in.wait(0.5)
    b_out.set()
    assert x_in.wait(5)
    assert not c_in.wait(0.5)  # nothing runs beside an exclusive test
    x_out.set()
    assert c_in.wait(5)
    c_out.set()
    assert (state / "run" / "test-locks" / "cluster.lock").exists()


def test_lanes_split_faults_from_the_other_real_tiers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_LANES", "2")
    assert lanes.lane_of("faults") == "real_a"
    assert {lanes.lane_of(t) for t in ("cluster", "e2e", "unit")} == {"real_b"}
    monkeypatch.setenv("TEST_LANES", "1")
    assert {lanes.lane_of(t) for t in ("faults", "cluster", "e2e")} == {"real"}
