"""operators/deferral.py: the decision before deferring (pure logic; the real
race is tests/faults/test_r1_mark_failed.py)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
from airflow.sdk.exceptions import AirflowException
from slurm_ray.operators import deferral

TI = SimpleNamespace(dag_id="d", task_id="train", run_id="r1", map_index=-1)
LOG = logging.getLogger("t")


@pytest.mark.parametrize(
    ("state", "cancels"),
    [
        ("running", False),
        (None, False),  # unknown: defer, as without the check
        ("failed", True),
        ("success", True),
        ("skipped", True),
        ("up_for_retry", True),
        ("restarting", True),
    ],
)
def test_defers_only_while_the_task_runs(
    monkeypatch: pytest.MonkeyPatch, state: str | None, cancels: bool
) -> None:
    monkeypatch.setattr(deferral, "task_state", lambda ti: state)
    got: list[str] = []
    if cancels:
        with pytest.raises(AirflowException, match=f"task is {state} now.*job 42 was cancelled"):
            deferral.ensure_still_running(TI, "42", got.append, LOG, killed=False)
        assert got == ["42"]
    else:
        deferral.ensure_still_running(TI, "42", got.append, LOG, killed=False)
        assert got == []


def test_a_sigterm_during_submission_cancels_without_asking(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def unasked(ti: object) -> str:
        raise AssertionError("the state was read")

    monkeypatch.setattr(deferral, "task_state", unasked)
    got: list[str] = []
    with pytest.raises(AirflowException, match=r"stopped \(SIGTERM\)"):
        deferral.ensure_still_running(TI, "42", got.append, LOG, killed=True)
    assert got == ["42"]


def test_an_unreadable_state_defers(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    def gone(ti: object) -> str:
        raise BrokenPipeError("supervisor gone")

    monkeypatch.setattr(deferral, "task_state", gone)
    got: list[str] = []
    with caplog.at_level(logging.WARNING):
        deferral.ensure_still_running(TI, "42", got.append, LOG, killed=False)
    assert got == []
    assert "supervisor gone" in caplog.text
