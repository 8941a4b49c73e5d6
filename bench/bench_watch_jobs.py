"""Watching 100 Slurm jobs at once: SSH connections and remote commands.

Submits N cheap jobs held in the queue (``sbatch --hold --wrap 'sleep 60'``,
1 node, 1 CPU: they stay PENDING and take nothing from other users of the
dev cluster), then watches all of them from one event loop, as a triggerer
does, in three scenarios:

  product     N SlurmJobTrigger instances started together, poll_interval P
  staggered   the same, but the triggers arrive in batches once a second
              over the first half of the window (tasks deferring at different
              moments; Airflow's triggerer creates new triggers once a second)
  naive       one SSHHookAsync.run_command("squeue -j ID") per job per
              interval (what a trigger that polls on its own does; a new SSH
              connection per command), over a shorter window; at most C
              handshakes at once so the login node stays usable for others

The counts come from sshd itself (LogLevel VERBOSE): "Connection from ... port
X" opens a connection, "Starting session: command for ... port X" is one exec.
Only lines whose client port belongs to a socket this process connected are
counted (other sessions share the sshd); all lines in the window are reported
too. Afterwards every job is scancel'ed.

    .venv/bin/python bench/bench_watch_jobs.py [--jobs 100] [--window 60]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import resource
import socket
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import _cluster as cl
from _report import fmt, machine, machine_line, quick, ratio, row, run_main, save, table

NAME = "watch_jobs"
SSHD_LOG = cl.STATE / "log" / "sshd.log"
SSHD_PORT = 22022
CONN_RE = re.compile(r"^Connection from \S+ port (\d+) on \S+ port (\d+)")
EXEC_RE = re.compile(r"^Starting session: command for \S+ from \S+ port (\d+)")
SFTP_RE = re.compile(r"^Starting session: subsystem 'sftp' for \S+ from \S+ port (\d+)")
#: sshd re-executing itself (another session's `devcluster.sh up` reloads it): the
#: connection drops and the poller must reconnect.
RESTART_RE = re.compile(r"^Server listening on ")

#: Local ports of every TCP connection this process opened to the sshd.
MY_PORTS: set[int] = set()


def _record_ports() -> None:
    """Wrap socket.connect so that each connection to sshd leaves its local port here."""
    orig = socket.socket.connect

    def connect(self: socket.socket, address: Any) -> None:
        try:
            orig(self, address)
        finally:
            try:
                if isinstance(address, tuple) and address[1] == SSHD_PORT:
                    MY_PORTS.add(self.getsockname()[1])
            except OSError:
                pass

    socket.socket.connect = connect  # type: ignore[method-assign]


class SshdWindow:
    """Lines sshd wrote between :meth:`start` and :meth:`stop` (by byte offset)."""

    def start(self) -> None:
        # only connections opened inside this window count (an earlier scenario's
        # cancelled handshakes may still be logged late)
        MY_PORTS.clear()
        self.offset = SSHD_LOG.stat().st_size
        self.t0 = time.monotonic()
        self.ru0 = resource.getrusage(resource.RUSAGE_SELF)

    def stop(self) -> dict[str, Any]:
        elapsed = time.monotonic() - self.t0
        ru = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (ru.ru_utime - self.ru0.ru_utime) + (ru.ru_stime - self.ru0.ru_stime)
        time.sleep(2.0)  # let sshd children flush their last lines
        ports = set(MY_PORTS)
        with SSHD_LOG.open("rb") as fh:
            size = SSHD_LOG.stat().st_size
            fh.seek(self.offset if size >= self.offset else 0)
            lines = fh.read().decode("utf-8", "replace").splitlines()
        counts = {"conn": 0, "exec": 0, "sftp": 0}
        mine = {"conn": 0, "exec": 0, "sftp": 0}
        restarts = sum(1 for line in lines if RESTART_RE.match(line))
        for line in lines:
            for key, rx in (("conn", CONN_RE), ("exec", EXEC_RE), ("sftp", SFTP_RE)):
                m = rx.match(line)
                if m:
                    counts[key] += 1
                    if int(m.group(1)) in ports:
                        mine[key] += 1
        per_min = 60.0 / elapsed
        return {
            "window_s": round(elapsed, 2),
            "connections": mine["conn"],
            "commands": mine["exec"],
            "sftp_sessions": mine["sftp"],
            "connections_per_min": round(mine["conn"] * per_min, 1),
            "commands_per_min": round(mine["exec"] * per_min, 1),
            "all_clients": counts,
            "sshd_restarts": restarts,
            "client_cpu_s": round(cpu, 2),
            "client_cpu_s_per_min": round(cpu * per_min, 2),
        }


def submit_held(n: int, tag: str, out_dir: str) -> list[str]:
    """N held 1-CPU jobs in one ssh call; returns their ids."""
    cmd = (
        f"mkdir -p {out_dir} && for i in $(seq {int(n)}); do "
        f"sbatch --parsable --hold -N1 -n1 -c1 -t 5 -J bench-watch-{tag} "
        f"-o {out_dir}/slurm-%j.out --wrap 'sleep 60' || exit 1; done"
    )
    ids = [line.split(";")[0] for line in cl.ssh(cmd, timeout=300).split()]
    if len(ids) != n or not all(i.isdigit() for i in ids):
        raise RuntimeError(f"submitted {len(ids)} of {n} jobs: {ids[:5]}...")
    return ids


async def _run_for(
    window: float, starters: list[Callable[[], Awaitable[Any]]], stagger: float
) -> tuple[float, list[asyncio.Task[Any]]]:
    """Start the coroutines, let them run ``window`` s.

    With ``stagger`` > 0 they start in batches once a second over ``stagger``
    seconds, as Airflow's triggerer creates newly deferred triggers (its main
    loop sleeps 1 s between rounds).
    """
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    tasks: list[asyncio.Task[Any]] = []
    rounds = max(1, int(stagger))
    per_round = -(-len(starters) // rounds)
    for i in range(0, len(starters), per_round):
        tasks += [asyncio.create_task(start()) for start in starters[i : i + per_round]]  # type: ignore[arg-type]
        if stagger and i + per_round < len(starters):
            await asyncio.sleep(1.0)
    t_all = loop.time() - t0
    await asyncio.sleep(max(0.0, window - t_all))
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return t_all, tasks


def product_window(
    job_ids: list[str], out_dir: str, window: float, interval: float, stagger: float
) -> dict[str, Any]:
    """N SlurmJobTriggers in one event loop for ``window`` seconds."""
    from slurm_ray.triggers.slurm_job import SlurmJobTrigger, _HostPoller

    events: list[dict[str, Any]] = []
    extra: dict[str, Any] = {}

    async def main() -> None:
        def starter(job_id: str) -> Callable[[], Awaitable[None]]:
            trig = SlurmJobTrigger(
                job_id=job_id,
                ssh_conn_id=cl.CONN_ID,
                log_path=f"{out_dir}/slurm-{job_id}.out",
                poll_interval=interval,
            )

            async def consume() -> None:
                async for ev in trig.run():
                    events.append(ev.payload)
                    return

            return consume

        loop = asyncio.get_running_loop()
        key = (id(loop), cl.CONN_ID)
        t_all, _ = await _run_for(window, [starter(j) for j in job_ids], stagger)
        poller = _HostPoller.registry.get(key)
        if poller is not None:
            extra["poller_commands"] = poller.commands_run
            if poller.task is not None:
                await asyncio.wait_for(asyncio.shield(poller.task), 30)
            _HostPoller.registry.pop(key, None)
        extra["all_started_after_s"] = round(t_all, 2)

    win = SshdWindow()
    win.start()
    asyncio.run(main())
    res = win.stop()
    res.update(extra)
    res["events"] = len(events)
    res["poll_intervals"] = round(res["window_s"] / interval, 2)
    res["commands_per_interval"] = round(res["commands"] / res["poll_intervals"], 2)
    return res


def naive_window(
    job_ids: list[str], window: float, interval: float, concurrency: int
) -> dict[str, Any]:
    """One SSHHookAsync.run_command per job per interval (a connection each)."""
    from airflow.providers.ssh.hooks.ssh import SSHHookAsync

    outcome = {"ok": 0, "failed": 0}

    async def main() -> None:
        sem = asyncio.Semaphore(concurrency)

        def starter(job_id: str) -> Callable[[], Awaitable[None]]:
            hook = SSHHookAsync(ssh_conn_id=cl.CONN_ID)

            async def poll() -> None:
                while True:
                    async with sem:
                        try:
                            await hook.run_command(f"squeue -h -j {job_id} -o %T", timeout=30)
                            outcome["ok"] += 1
                        except Exception:  # counted below
                            outcome["failed"] += 1
                    await asyncio.sleep(interval)

            return poll

        await _run_for(window, [starter(j) for j in job_ids], 0.0)

    win = SshdWindow()
    win.start()
    asyncio.run(main())
    res = win.stop()
    res.update(outcome)
    res["poll_intervals"] = round(res["window_s"] / interval, 2)
    res["commands_per_interval"] = round(res["commands"] / res["poll_intervals"], 2)
    res["concurrency_cap"] = concurrency
    return res


def body(start: dict[str, Any], a: argparse.Namespace) -> int:
    """Submit, watch three ways, cancel, report."""
    cl.setup_airflow_env()
    cl.ensure_cluster()
    if not SSHD_LOG.exists():
        raise RuntimeError(f"{SSHD_LOG} not found (the dev cluster's sshd log)")
    _record_ports()
    tag = uuid.uuid4().hex[:8]
    out_dir = f"{cl.SCRATCH}/watch-{tag}"
    scenarios: dict[str, dict[str, Any]] = {}
    try:
        t = time.monotonic()
        job_ids = submit_held(a.jobs, tag, out_dir)
        print(f"submitted {len(job_ids)} held jobs in {time.monotonic() - t:.1f}s", file=sys.stderr)
        scenarios["product"] = product_window(job_ids, out_dir, a.window, a.interval, 0.0)
        print(f"product: {scenarios['product']}", file=sys.stderr)
        scenarios["naive"] = naive_window(job_ids, a.naive_window, a.interval, a.concurrency)
        print(f"naive: {scenarios['naive']}", file=sys.stderr)
        scenarios["staggered"] = product_window(
            job_ids, out_dir, a.window, a.interval, a.window / 2
        )
        print(f"staggered: {scenarios['staggered']}", file=sys.stderr)
    finally:
        cl.ssh(f"scancel --name=bench-watch-{tag}; rm -rf {out_dir}", check=False)
    left = cl.ssh(f"squeue -h --name=bench-watch-{tag} -t PD,R,CG -o %i", check=False).split()

    p, n, s = scenarios["product"], scenarios["naive"], scenarios["staggered"]
    end = machine()
    # one connection per host; a restart of sshd in the window forces a reconnect
    one_conn = (
        p["connections"] <= 1 + p["sshd_restarts"] and s["connections"] <= 1 + s["sshd_restarts"]
    )
    # one command per interval, +1 for the first poll at the window's start
    per_interval_ok = p["commands"] <= p["poll_intervals"] + 1
    stagger_ok = s["commands"] <= s["poll_intervals"] + 1

    def scen_row(label: str, r: dict[str, Any]) -> list[str]:
        return [
            label,
            fmt(r["window_s"], ".0f"),
            str(r["connections"]),
            str(r["commands"]),
            str(r["sftp_sessions"]),
            fmt(r["commands_per_min"], ".1f"),
            fmt(r["connections_per_min"], ".1f"),
            fmt(r["commands_per_interval"], ".2f"),
            fmt(r["client_cpu_s_per_min"], ".2f"),
            f"{r['all_clients']['conn']}/{r['all_clients']['exec']}",
            str(r["sshd_restarts"]),
        ]

    lines = [
        machine_line(start, end),
        "",
        f"{a.jobs} jobs held in the queue (PENDING, `sbatch --hold`), poll interval "
        f"{a.interval:.0f} s; counted in sshd's own log (LogLevel VERBOSE: `Connection from ... "
        "port X`, `Starting session: command for ... port X`), only this process's client "
        "ports. The naive baseline opens one connection per command and ran at most "
        f"{a.concurrency} handshakes at once.",
        "",
        table(
            [
                "scenario",
                "window s",
                "SSH connections",
                "exec commands",
                "sftp sessions",
                "commands/min",
                "connections/min",
                "commands per poll interval",
                "client CPU s/min",
                "all sshd clients in window (conn/exec)",
                "sshd restarts in window",
            ],
            [
                scen_row(f"product: {a.jobs} SlurmJobTriggers, started together", p),
                scen_row(
                    f"product: {a.jobs} triggers arriving in batches, 1/s over "
                    f"{a.window / 2:.0f} s",
                    s,
                ),
                scen_row(f"naive: run_command per job per interval (cap {a.concurrency})", n),
            ],
        ),
        "",
        f"Product: {p['commands']} commands in {p['window_s']:.0f} s = "
        f"{p['commands_per_interval']:.2f} per {a.interval:.0f}-s interval for {a.jobs} jobs "
        f"(the poller's own counter: {p.get('poller_commands')}), over "
        f"{p['connections']} connection(s). Naive: {n['commands_per_min']:.0f} commands/min and "
        f"{n['connections_per_min']:.0f} connections/min "
        f"({n['ok']} ok, {n['failed']} failed), "
        f"{fmt(ratio(n['commands_per_min'], p['commands_per_min']), '.0f')}x the product's "
        "commands per minute.",
        "",
        f"Triggers arriving over time: {s['commands']} commands in {s['window_s']:.0f} s "
        f"({s['commands_per_interval']:.2f} per interval, poller's counter "
        f"{s.get('poller_commands')}): "
        + (
            "a new subscription waits for the next poll instead of forcing one."
            if stagger_ok
            else "each new subscription wakes the host poller for an immediate poll, so "
            "arrivals spread over time add polls beyond one per interval."
        ),
        "",
        f"Jobs still queued after scancel: {len(left)}.",
    ]
    summary = [
        row(
            f"watching {a.jobs} jobs: SSH connections (product / naive per min)",
            f"{p['connections']} for the whole window"
            + (f" ({p['sshd_restarts']} sshd restart(s))" if p["sshd_restarts"] else ""),
            f"{n['connections_per_min']:.0f}/min",
            "-",
            "1 per host",
            one_conn,
        ),
        row(
            f"watching {a.jobs} jobs: commands per minute (triggers started together)",
            f"{p['commands_per_min']:.1f}/min ({p['commands_per_interval']:.2f} per interval)",
            f"{n['commands_per_min']:.0f}/min",
            f"{fmt(ratio(n['commands_per_min'], p['commands_per_min']), '.0f')}x fewer",
            "<= 1 per poll interval",
            per_interval_ok,
        ),
        row(
            f"watching {a.jobs} jobs: commands per minute (triggers arriving over time)",
            f"{s['commands_per_min']:.1f}/min ({s['commands_per_interval']:.2f} per interval)",
            "-",
            "-",
            "<= 1 per poll interval",
            stagger_ok,
        ),
    ]
    result = {
        "machine": start,
        "machine_end": end,
        "jobs": a.jobs,
        "interval_s": a.interval,
        "scenarios": scenarios,
        "left_after_scancel": len(left),
        "my_ports": len(MY_PORTS),
    }
    out = save(NAME, result, "\n".join(lines), summary)
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=100)
    p.add_argument("--interval", type=float, default=5.0)
    p.add_argument("--window", type=float, default=30.0 if quick() else 60.0)
    p.add_argument("--naive-window", type=float, default=10.0 if quick() else 20.0)
    p.add_argument("--concurrency", type=int, default=20)
    a = p.parse_args(argv)
    return run_main(NAME, lambda start: body(start, a))


if __name__ == "__main__":
    sys.exit(main())
