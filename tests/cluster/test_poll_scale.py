"""The shared poller at scale, against the real dev cluster (issue 17).

1,000 held jobs, each with a log file that already has a line in it, watched by
1,000 SlurmJobTriggers in one event loop (as in one triggerer): every trigger
streams its line and sees PENDING; after ``scancel`` every trigger gets its
CANCELLED event; all of it over one SSH connection. The old poll pasted every
id and tail into one ``bash -c`` argument, which Linux refuses above 128 KiB
(from ~790 jobs): every job stayed UNKNOWN.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import time
import uuid
from typing import Any

import pytest

from tests.conftest import DevCluster
from tests.faults.helpers import tap

pytestmark = pytest.mark.cluster

N_JOBS = int(os.environ.get("SR_POLL_SCALE_JOBS", "1000"))


def _submit_held(cluster: DevCluster, n: int, name: str, out_dir: str) -> list[str]:
    d = shlex.quote(out_dir)
    script = (
        f"mkdir -p {d} && for i in $(seq {n}); do for try in 1 2 3 4 5; do "
        f"sbatch --parsable --hold -N1 -n1 -c1 -t 5 -J {shlex.quote(name)} "
        f"-o {d}/slurm-%j.out --wrap 'sleep 30' && continue 2; sleep 2; done; exit 1; done"
    )
    ids = [x.split(";")[0] for x in cluster.ssh(script, timeout=600).stdout.split()]
    assert len(ids) == n and all(i.isdigit() for i in ids), ids[:5]
    # a line in each job's log (the jobs are held: Slurm has not created them)
    cluster.ssh(
        f"cd {d} && for i in {' '.join(ids)}; do printf 'hello from %s\\n' $i > slurm-$i.out; done",
        timeout=300,
    )
    return ids


def test_thousand_held_jobs_one_connection(cluster: DevCluster) -> None:
    from slurm_ray.hooks import slurm as hooks
    from slurm_ray.triggers.slurm_job import SlurmJobTrigger, _HostPoller

    name = f"sr-pollscale-{uuid.uuid4().hex[:8]}"
    out_dir = cluster.new_dir("pollscale")
    connects = 0
    real_connect = hooks.AsyncSlurmClient.connect

    async def counting_connect(self: Any) -> None:
        nonlocal connects
        if self._conn is None or self._conn.is_closed():
            connects += 1
        await real_connect(self)

    mp = pytest.MonkeyPatch()
    mp.setattr(hooks.AsyncSlurmClient, "connect", counting_connect)
    try:
        ids = _submit_held(cluster, N_JOBS, name, out_dir)
        events: dict[str, dict[str, Any]] = {}
        taps = []

        async def watch(job_id: str) -> None:
            trig = SlurmJobTrigger(
                job_id=job_id,
                ssh_conn_id="slurm_dev",
                log_path=f"{out_dir}/slurm-{job_id}.out",
                poll_interval=2.0,
            )
            taps.append(tap(trig))
            async for ev in trig.run():
                events[job_id] = ev.payload
                return

        def seen(needle: str) -> set[str]:
            out = set()
            for t in taps:
                out.update(msg for _, _, msg in t.records if needle in msg)
            return out

        async def main() -> None:
            tasks = [asyncio.ensure_future(watch(j)) for j in ids]
            try:
                want_lines = {f"[slurm {j}] hello from {j}" for j in ids}
                want_pending = {f"Slurm job {j} is PENDING (JobHeldUser)" for j in ids}
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline:
                    lines, pending = seen("hello from"), seen("is PENDING")
                    if want_lines <= lines and want_pending <= pending:
                        break
                    await asyncio.sleep(1)
                lines, pending = seen("hello from"), seen("is PENDING")
                assert want_lines <= lines, f"{len(want_lines - lines)} jobs' log lines missing"
                assert want_pending <= pending, (
                    f"{len(want_pending - pending)} jobs never seen PENDING; e.g. "
                    f"{sorted(seen('is UNKNOWN'))[:2]}"
                )
                cluster.ssh(f"scancel --name={shlex.quote(name)}")
                done, _ = await asyncio.wait(tasks, timeout=120)
                assert len(done) == N_JOBS, f"{N_JOBS - len(done)} triggers got no event"
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                for poller in list(_HostPoller.registry.values()):
                    if poller.task is not None:
                        await asyncio.wait_for(asyncio.gather(poller.task), 30)

        asyncio.run(main())
        assert {e["state"] for e in events.values()} == {"CANCELLED"}, events
        assert {e["status"] for e in events.values()} == {"terminal"}
        # one connection per host (a second one only if sshd restarted meanwhile)
        assert connects <= 2, f"{connects} SSH connections for {N_JOBS} triggers"
    finally:
        mp.undo()
        cluster.ssh(f"scancel --name={shlex.quote(name)}; rm -rf {shlex.quote(out_dir)}")
