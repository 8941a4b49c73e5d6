"""A requeued job's log (Slurm truncates slurm-%j.out) is streamed again (issue 12 item 9)."""

from __future__ import annotations

import asyncio
import shlex
import time
from typing import Any

import pytest

from tests.conftest import DevCluster
from tests.faults.helpers import tap

pytestmark = pytest.mark.cluster

# First run: 300 long lines at once, then waits to be requeued. Second run
# (SLURM_RESTART_COUNT=1): a few short lines, then exits.
JOB = r"""#!/bin/bash
#SBATCH -N1 -n1 -c1 -t 5 --requeue
if [ "${SLURM_RESTART_COUNT:-0}" = 0 ]; then
  for i in $(seq 300); do printf 'first run line %03d %s\n' $i "$(printf '%080d' 0)"; done
  sleep 240
else
  for i in 1 2 3; do echo "second run line $i"; sleep 1; done
fi
"""


def test_requeue_restarts_the_log_stream(cluster: DevCluster) -> None:
    from slurm_ray.triggers.slurm_job import SlurmJobTrigger

    d = cluster.new_dir("requeue")
    proc = cluster.ssh(
        f"cd {shlex.quote(d)} && printf '%s' {shlex.quote(JOB)} > job.sh && "
        "sbatch --parsable -J sr-requeue-test job.sh"
    )
    job_id = proc.stdout.strip().split(";")[0]
    try:
        trig = SlurmJobTrigger(
            job_id=job_id,
            ssh_conn_id="slurm_dev",
            log_path=f"{d}/slurm-{job_id}.out",
            poll_interval=1.0,
        )
        logs = tap(trig)

        async def main() -> list[Any]:
            task = asyncio.ensure_future(_events(trig))
            deadline = time.monotonic() + 180
            while "first run line 300" not in logs.text and time.monotonic() < deadline:
                await asyncio.sleep(0.5)
            assert "first run line 300" in logs.text, logs.text[-2000:]
            cluster.ssh(f"scontrol requeue {job_id}")
            # Slurm holds a requeued job back ~2 min (BeginTime); 5 s is enough here
            # (at once, the new run sometimes failed while the old one was cleaned up).
            cluster.ssh(
                f"for i in $(seq 60); do squeue -h -j {job_id} -o %T | grep -q PENDING && "
                f"exec scontrol update JobId={job_id} StartTime=now+5; sleep 0.5; done; exit 1"
            )
            return await asyncio.wait_for(task, 240)

        events = asyncio.run(main())
    finally:
        cluster.ssh(f"scancel {job_id}; rm -rf {shlex.quote(d)}", check=False)
    assert events[-1]["state"] == "COMPLETED", events
    text = logs.text
    assert "log restarted" in text and "shrank from" in text, text[-3000:]
    for i in (1, 2, 3):
        assert f"[slurm {job_id}] second run line {i}" in text


async def _events(trig: Any) -> list[Any]:
    return [e.payload async for e in trig.run()]
