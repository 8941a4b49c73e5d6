"""Issue 12 item 7: a job that prints 200 MB without a newline.

Two real jobs watched by two triggers in this process, the way one triggerer
watches them (one shared poller for the host): job A writes 200 MB of one
"line" to its Slurm log and fails; job B prints a tick a second. The process's
resident memory stays under a stated bound the whole time (triggers, then the
operator collecting A's failure), B's ticks keep streaming while A floods, and
A's failure message carries a bounded tail that says what was cut.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk.exceptions import AirflowException, TaskDeferred

from tests.cluster.test_operator import FakeTI, make_op
from tests.conftest import DevCluster
from tests.faults.helpers import tap

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

FLOOD_MB = 200
#: What the watching process may grow by while 200 MB go through the log.
RSS_BOUND_MB = 96
# 1 MB every 50 ms: the flood lasts ~10-20 s, longer than several polls.
FLOOD = (
    f"for i in $(seq {FLOOD_MB}); do head -c 1000000 /dev/zero | tr '\\0' x; sleep 0.05; done; "
    "echo; echo flood-marker-end; exit 3"
)
TICKS = "for i in $(seq 40); do echo tick-$i; sleep 0.5; done"


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


class RssPeak:
    """Samples this process's RSS every 0.1 s in a thread; remembers the peak."""

    def __init__(self) -> None:
        self.base = _rss_mb()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, _rss_mb())

    def __enter__(self) -> RssPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())

    @property
    def growth(self) -> float:
        return self.peak - self.base


def test_a_200mb_line_keeps_memory_bounded_and_others_streaming(cluster: DevCluster) -> None:
    spec = {"nodes": 1, "cpus_per_task": 1, "time": "10"}
    flood_ti, tick_ti = FakeTI(task_id="flood"), FakeTI(task_id="ticks")
    flood_op = make_op(cluster, "flood", entrypoint=FLOOD, job_spec=spec)
    tick_op = make_op(cluster, "ticks", entrypoint=TICKS, job_spec=spec)
    deferred: dict[str, Any] = {}
    for name, op, ti in (("flood", flood_op, flood_ti), ("ticks", tick_op, tick_ti)):
        with pytest.raises(TaskDeferred) as err:
            op.execute({"ti": ti})
        deferred[name] = err.value
    flood_id, tick_id = flood_ti.xcom["slurm_job_id"], tick_ti.xcom["slurm_job_id"]

    taps = {name: tap(d.trigger) for name, d in deferred.items()}
    ended: dict[str, float] = {}

    async def watch(name: str) -> Any:
        async for event in deferred[name].trigger.run():
            ended[name] = time.monotonic()
            return event
        raise AssertionError(f"{name}: trigger ended without an event")

    async def both() -> list[Any]:
        return list(await asyncio.gather(watch("flood"), watch("ticks")))

    try:
        with RssPeak() as watching:
            flood_event, tick_event = asyncio.run(asyncio.wait_for(both(), 900))
        with RssPeak() as collecting:
            with pytest.raises(AirflowException) as failure:
                flood_op.execute_complete(
                    {"ti": flood_ti}, flood_event.payload, **(deferred["flood"].kwargs or {})
                )
            tick_op.execute_complete(
                {"ti": tick_ti}, tick_event.payload, **(deferred["ticks"].kwargs or {})
            )
    finally:
        cluster.ssh(f"scancel {flood_id} {tick_id}", check=False)

    # The flood really happened: the whole 200 MB are in the job's log.
    log = f"{flood_ti.xcom['run_dir']}/slurm-{flood_id}.out"
    size = int(cluster.ssh(f"stat -c %s {log}").stdout)
    assert size > FLOOD_MB * 1_000_000, size
    assert flood_event.payload["state"] == "FAILED", flood_event.payload

    assert watching.growth < RSS_BOUND_MB, f"the triggers grew by {watching.growth:.0f} MB"
    assert collecting.growth < RSS_BOUND_MB, (
        f"collecting the failure grew by {collecting.growth:.0f} MB"
    )

    # B streamed while A was still being read: ticks logged before A's event.
    # (LogTap stamps records with time.time(); the events with monotonic time)
    flood_end = time.time() - (time.monotonic() - ended["flood"])
    ticks_seen = [t for t, _, msg in taps["ticks"].records if f"[slurm {tick_id}] tick-" in msg]
    assert len(ticks_seen) == 40, len(ticks_seen)
    assert sum(1 for t in ticks_seen if t < flood_end) >= 5, "B stalled behind A's flood"
    # The task log says what was cut instead of carrying 200 MB.
    flood_lines = [msg for _, _, msg in taps["flood"].records if f"job {flood_id}" in msg]
    assert any("cut" in m or "skipping" in m for m in flood_lines), flood_lines[-5:]

    # A's failure names the job's end and carries a bounded tail of its log.
    message = str(failure.value)
    assert "FAILED" in message and "flood-marker-end" in message, message[-500:]
    assert len(message) < 64 * 1024, f"failure message of {len(message)} characters"
