"""R12.3 (issue 12 item 3, issue 15 §3): a job that ended while nobody watched
and that the controller has purged (MinJobAge passed) is decided at the first
poll, not polled until the trigger's 12-h deadline. The dev cluster keeps
accounting (slurmdbd), as real sites do, so the end state comes from sacct:
COMPLETED for the job that succeeded, FAILED with its exit code for the other.
(A site without accounting: the run directory decides, tests/unit/test_purged_in_sacct.py
and the parsers' tests over real output.)

MinJobAge is lowered on the shared dev cluster for the shortest window that
works (after the jobs ended, until Slurm forgot them) and always restored; the
test runs alone (``exclusive``) because every job's record is purged meanwhile.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.cluster.test_operator import FakeTI, make_op
from tests.conftest import DevCluster
from tests.faults.conftest import trials

pytestmark = [pytest.mark.faults, pytest.mark.cluster, pytest.mark.exclusive]

WRITE_RESULT = (
    'printf \'%s\' \'{"status": "succeeded", "stop_reason": "iterations"}\' > result.json.tmp'
    " && mv result.json.tmp result.json"
)
SHORT_AGE = 5


def scontrol(cluster: DevCluster, *args: str) -> str:
    env = {**os.environ, "SLURM_CONF": cluster.env["SLURM_CONF"]}
    proc = subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=60, env=env)
    return proc.stdout + proc.stderr


class MinJobAge:
    """Lower MinJobAge in the running slurmctld; the original line comes back on exit.

    Other developers' `devcluster.sh up` rewrites slurm.conf and reconfigures
    at any time: :meth:`hold` puts the short value back when that happened.
    """

    def __init__(self, cluster: DevCluster, seconds: int) -> None:
        self.cluster, self.seconds = cluster, seconds
        self.conf = Path(cluster.env["SLURM_CONF"])
        found = re.search(r"^MinJobAge=.*$", self.conf.read_text(), re.M)
        assert found, f"no MinJobAge line in {self.conf}"
        self.original = found[0]

    def _set(self, line: str) -> None:
        text = self.conf.read_text()
        current = re.search(r"^MinJobAge=.*$", text, re.M)
        if current and current[0] != line:
            self.conf.write_text(text.replace(current[0], line))
        scontrol(self.cluster, "reconfigure")

    def applied(self) -> bool:
        # Slurm 22.05 applies MinJobAge on reconfigure; prove it rather than assume it.
        shown = scontrol(self.cluster, "show", "config")
        return bool(re.search(rf"^MinJobAge\s*=\s*{self.seconds} sec", shown, re.M))

    def hold(self) -> None:
        if not self.applied():
            self._set(f"MinJobAge={self.seconds}")
            assert self.applied(), "scontrol reconfigure did not apply MinJobAge"

    def __enter__(self) -> MinJobAge:
        self.hold()
        return self

    def __exit__(self, *exc: object) -> None:
        self._set(self.original)


def purged(cluster: DevCluster, job_id: str) -> bool:
    return "Invalid job id" in scontrol(cluster, "show", "job", job_id)


@pytest.mark.parametrize("trial", range(trials()))
def test_r12_3_purged_job_is_decided_at_the_first_poll(
    cluster: DevCluster, faults, trial: int
) -> None:
    if not os.access(cluster.env["SLURM_CONF"], os.W_OK):
        pytest.skip("lowering MinJobAge needs write access to the dev cluster's slurm.conf")
    from airflow.sdk.exceptions import AirflowException, TaskDeferred

    from tests.faults.helpers import first_event

    def body() -> float:
        spec = {"nodes": 1, "cpus_per_task": 1, "time": "5"}
        deferred: dict[str, TaskDeferred] = {}
        ops, tis = {}, {}
        for name, entrypoint in (("ok", WRITE_RESULT), ("bad", "exit 3")):
            task_id = f"r12_3_{name}_{trial}"
            ops[name] = make_op(cluster, task_id, entrypoint=entrypoint, job_spec=spec)
            tis[name] = FakeTI(task_id=task_id)
            with pytest.raises(TaskDeferred) as caught:
                ops[name].execute({"ti": tis[name]})
            deferred[name] = caught.value
        ids = {name: d.trigger.job_id for name, d in deferred.items()}
        try:
            # The triggerer is "down": nobody watches while the jobs end.
            deadline = time.monotonic() + 300
            while cluster.ssh(
                f"squeue -h -j {ids['ok']},{ids['bad']} -t PD,R,CG,CF -o %i", check=False
            ).stdout.strip():
                assert time.monotonic() < deadline, "the jobs did not end"
                time.sleep(1)
            with MinJobAge(cluster, SHORT_AGE) as age:
                deadline = time.monotonic() + 240  # slurmctld purges on its own schedule
                while not all(purged(cluster, i) for i in ids.values()):
                    assert time.monotonic() < deadline, "Slurm did not purge the jobs"
                    time.sleep(2)
                    age.hold()
            # The triggerer is back: the purged jobs are decided from sacct at once.
            started = time.monotonic()
            events = {
                name: asyncio.run(first_event(d.trigger, 120)) for name, d in deferred.items()
            }
            for name, state in (("ok", "COMPLETED"), ("bad", "FAILED")):
                payload = events[name].payload
                assert payload["status"] == "terminal", payload
                assert payload["state"] == state, payload
            assert events["bad"].payload["exit_code"] == "3:0", events["bad"].payload
            d = deferred["ok"]
            summary = getattr(ops["ok"], d.method_name)(
                {"ti": tis["ok"]}, events["ok"].payload, **(d.kwargs or {})
            )
            assert summary["state"] == "COMPLETED" and summary["job_id"] == ids["ok"], summary
            d = deferred["bad"]
            with pytest.raises(AirflowException, match=r"ended FAILED.*exit code 3:0"):
                getattr(ops["bad"], d.method_name)(
                    {"ti": tis["bad"]}, events["bad"].payload, **(d.kwargs or {})
                )
            return time.monotonic() - started
        finally:
            for job_id in ids.values():
                cluster.ssh(f"scancel {job_id}", check=False)

    faults.trial("R12.3")(body)
