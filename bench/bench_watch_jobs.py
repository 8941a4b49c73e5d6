"""Watching N Slurm jobs at once: correctness, SSH connections, commands, login-node CPU.

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
too.

Correctness (issue 17): in the product scenario every trigger must log its
job's real state (PENDING, JobHeldUser) within two poll intervals of its
start; at the window's end every job is scancel'ed and every trigger must
send its final event (CANCELLED); end-to-event latency is measured from
scancel's return. The login-node CPU of one poll (user+sys of the poll
script and its children, bash ``times``) is measured separately for the
same jobs and tails.

    .venv/bin/python bench/bench_watch_jobs.py [--jobs 100,1000] [--window 60] [--no-naive]
        [--conns 4]

A fourth scenario spreads the smallest job count over ``--conns`` Airflow SSH
connection ids that all point at the same login node (goal: one connection
per connection id). The triggerer's resident memory is sampled every 0.5 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import shlex
import socket
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import _cluster as cl
from _report import OUT, machine, machine_line, quick, table

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
        f"mkdir -p {out_dir} && for i in $(seq {int(n)}); do for t in 1 2 3 4 5; do "
        f"sbatch --parsable --hold -N1 -n1 -c1 -t 5 -J bench-watch-{tag} "
        f"-o {out_dir}/slurm-%j.out --wrap 'sleep 60' && continue 2; sleep 2; done; "
        "exit 1; done"
    )
    ids = [line.split(";")[0] for line in cl.ssh(cmd, timeout=1800).split()]
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


def rss_mb() -> float:
    """This process's resident memory (the triggerer's, here), in MiB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def conn_ids(count: int) -> list[str]:
    """``count`` Airflow SSH connections to the same login node (copies of the dev one)."""
    ids = [cl.CONN_ID]
    for i in range(1, count):
        conn_id = f"{cl.CONN_ID}_copy{i}"
        os.environ[f"AIRFLOW_CONN_{conn_id.upper()}"] = os.environ["AIRFLOW_CONN_SLURM_DEV"]
        ids.append(conn_id)
    return ids


def product_window(
    job_ids: list[str],
    out_dir: str,
    window: float,
    interval: float,
    stagger: float,
    finish: str | None = None,
    connections: list[str] | None = None,
) -> dict[str, Any]:
    """N SlurmJobTriggers in one event loop for ``window`` seconds.

    With ``connections``, job i is watched through connection id i mod len: the
    goal is one SSH connection per connection id, however many jobs each has.

    Each trigger's own log is tapped: the moment it first reports its job's
    real state is checked against its start. With ``finish`` (a job-name), the
    jobs are scancel'ed at the window's end and every trigger's final event is
    awaited (its latency measured from scancel's return).
    """
    from slurm_ray.triggers.slurm_job import SlurmJobTrigger, _HostPoller

    events: dict[str, tuple[float, dict[str, Any]]] = {}
    started: dict[str, float] = {}
    first_state: dict[str, tuple[float, str]] = {}
    extra: dict[str, Any] = {}

    class Tap:
        def __init__(self, job_id: str, inner: Any) -> None:
            self.job_id, self.inner = job_id, inner

        def info(self, msg: str, *args: Any, **kw: Any) -> Any:
            if self.job_id not in first_state and msg.startswith("Slurm job %s is "):
                first_state[self.job_id] = (time.monotonic(), f"{args[1]}{args[2]}")
            return self.inner.info(msg, *args, **kw)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

    conns = connections or [cl.CONN_ID]
    rss = {"before": rss_mb(), "peak": 0.0}

    async def sample_rss() -> None:
        while True:
            rss["peak"] = max(rss["peak"], rss_mb())
            await asyncio.sleep(0.5)

    async def main() -> None:
        sampler = asyncio.create_task(sample_rss())

        def starter(job_id: str, conn_id: str) -> Callable[[], Awaitable[None]]:
            trig = SlurmJobTrigger(
                job_id=job_id,
                ssh_conn_id=conn_id,
                log_path=f"{out_dir}/slurm-{job_id}.out",
                poll_interval=interval,
            )
            trig._log = Tap(job_id, trig.log)  # type: ignore[assignment]

            async def consume() -> None:
                started[job_id] = time.monotonic()
                async for ev in trig.run():
                    events[job_id] = (time.monotonic(), ev.payload)
                    return

            return consume

        loop = asyncio.get_running_loop()
        starters = [starter(j, conns[i % len(conns)]) for i, j in enumerate(job_ids)]
        if finish is None:
            t_all, _ = await _run_for(window, starters, stagger)
        else:
            t0 = loop.time()
            tasks = [asyncio.create_task(start()) for start in starters]  # type: ignore[arg-type]
            t_all = loop.time() - t0
            await asyncio.sleep(window)
            await asyncio.to_thread(cl.ssh, f"scancel --name={finish}")
            extra["scancel_done"] = time.monotonic()
            _, pending = await asyncio.wait(tasks, timeout=max(120.0, 10 * interval))
            extra["no_final_event"] = len(pending)
            for t in pending:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        sampler.cancel()
        extra["poller_commands"] = extra["max_command_bytes"] = extra["max_stdin_bytes"] = 0
        for conn_id in conns:
            key = (id(loop), conn_id)
            poller = _HostPoller.registry.get(key)
            if poller is None:
                continue
            extra["poller_commands"] += poller.commands_run
            extra["max_command_bytes"] = max(extra["max_command_bytes"], poller.max_command)
            extra["max_stdin_bytes"] = max(extra["max_stdin_bytes"], poller.max_stdin)
            if poller.task is not None:
                await asyncio.wait_for(asyncio.shield(poller.task), 30)
            _HostPoller.registry.pop(key, None)
        extra["all_started_after_s"] = round(t_all, 2)

    win = SshdWindow()
    win.start()
    asyncio.run(main())
    res = win.stop()
    res.update({k: v for k, v in extra.items() if k != "scancel_done"})
    res["events"] = len(events)
    res["connection_ids"] = len(conns)
    res["rss_mb_before"] = round(rss["before"], 1)
    res["rss_mb_peak"] = round(max(rss["peak"], rss["before"]), 1)
    res["poll_intervals"] = round(res["window_s"] / interval, 2)
    res["commands_per_interval"] = round(res["commands"] / res["poll_intervals"], 2)
    # correctness: the real state within two intervals of the trigger's start
    lags = [first_state[j][0] - started[j] for j in job_ids if j in first_state and j in started]
    res["saw_state"] = len(first_state)
    res["saw_pending_held"] = sum(
        1 for _, st in first_state.values() if st == "PENDING (JobHeldUser)"
    )
    res["state_within_two_intervals"] = sum(1 for lag in lags if lag <= 2 * interval)
    res["state_lag_max_s"] = round(max(lags), 2) if lags else None
    if finish is not None:
        t_c = extra["scancel_done"]
        lat = sorted(t - t_c for t, _ in events.values())
        res["final_events"] = len(events)
        res["final_states"] = sorted({p.get("state", "?") for _, p in events.values()})
        res["end_to_event_s"] = {
            "median": round(lat[len(lat) // 2], 2) if lat else None,
            "max": round(lat[-1], 2) if lat else None,
        }
    return res


def login_cpu_per_poll(job_ids: list[str], out_dir: str, repeat: int = 5) -> dict[str, float]:
    """user+sys CPU on the login node of one poll for these jobs and their log tails."""
    from slurm_ray.slurm.poll import TailRequest, build_poll

    poll = build_poll(job_ids, [TailRequest(f"{out_dir}/slurm-{j}.out", 0) for j in job_ids])
    script = (
        'f=$(mktemp) && cat > "$f" && t0=$(date +%s.%N) && '
        f'for i in $(seq {int(repeat)}); do sh -c "$POLL" < "$f" > /dev/null 2>&1; done; '
        't1=$(date +%s.%N); rm -f "$f"; times; echo WALL $t0 $t1'
    )
    out = cl.ssh(
        f"POLL={shlex.quote(poll.command)} bash -c {shlex.quote(script)}",
        stdin=poll.stdin.decode(),
        timeout=600,
    )
    lines = [ln for ln in out.splitlines() if ln.strip()]
    nums = []
    for ln in lines[:2]:
        for tok in ln.split():
            m = re.fullmatch(r"(\d+)m([\d.]+)s", tok)
            if m:
                nums.append(int(m.group(1)) * 60 + float(m.group(2)))
    wall = [float(x) for x in lines[-1].split()[1:3]]
    return {
        "cpu_s_per_poll": round(sum(nums) / repeat, 3),
        "wall_s_per_poll": round((wall[1] - wall[0]) / repeat, 3),
        "command_bytes": len(poll.command.encode()),
        "stdin_bytes": len(poll.stdin),
    }


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


def watch_size(n: int, a: argparse.Namespace, naive: bool) -> dict[str, Any]:
    """Submit ``n`` held jobs, watch them in every scenario, cancel them; the figures."""
    tag = uuid.uuid4().hex[:8]
    name = f"bench-watch-{tag}"
    out_dir = f"{cl.SCRATCH}/watch-{tag}"
    scenarios: dict[str, dict[str, Any]] = {}
    try:
        t = time.monotonic()
        job_ids = submit_held(n, tag, out_dir)
        print(f"submitted {len(job_ids)} held jobs in {time.monotonic() - t:.1f}s", file=sys.stderr)
        cpu = login_cpu_per_poll(job_ids, out_dir)
        print(f"login-node CPU per poll: {cpu}", file=sys.stderr)
        if naive:
            scenarios["naive"] = naive_window(job_ids, a.naive_window, a.interval, a.concurrency)
            print(f"naive: {scenarios['naive']}", file=sys.stderr)
        if a.conns > 1 and n <= a.conns_max_jobs:
            scenarios["conns"] = product_window(
                job_ids, out_dir, a.window, a.interval, 0.0, connections=conn_ids(a.conns)
            )
            print(f"{a.conns} connection ids: {scenarios['conns']}", file=sys.stderr)
        scenarios["staggered"] = product_window(
            job_ids, out_dir, a.window, a.interval, a.window / 2
        )
        print(f"staggered: {scenarios['staggered']}", file=sys.stderr)
        scenarios["product"] = product_window(
            job_ids, out_dir, a.window, a.interval, 0.0, finish=name
        )
        print(f"product: {scenarios['product']}", file=sys.stderr)
    finally:
        cl.ssh(f"scancel --name={name}; rm -rf {out_dir}", check=False)
    left = cl.ssh(f"squeue -h --name={name} -t PD,R,CG -o %i", check=False).split()
    p, s = scenarios["product"], scenarios["staggered"]
    checks = {
        "one connection": p["connections"] <= 1 + p["sshd_restarts"]
        and s["connections"] <= 1 + s["sshd_restarts"],
        # one command per interval, +1 for the first poll at the window's start
        "<= 1 command per interval": p["commands"] <= p["poll_intervals"] + 1
        and s["commands"] <= s["poll_intervals"] + 1,
        "every trigger saw PENDING within 2 intervals": p["state_within_two_intervals"] == n
        and p["saw_pending_held"] == n,
        "every trigger got its final event": p["final_events"] == n
        and p["final_states"] == ["CANCELLED"],
    }
    c = scenarios.get("conns")
    if c:
        checks[f"one connection per connection id ({a.conns})"] = (
            c["connections"] <= a.conns + c["sshd_restarts"]
        )
    return {
        "jobs": n,
        "scenarios": scenarios,
        "login_cpu_per_poll": cpu,
        "checks": checks,
        "left_after_scancel": len(left),
    }


def _size_row(r: dict[str, Any], interval: float) -> list[str]:
    p, s, cpu = r["scenarios"]["product"], r["scenarios"]["staggered"], r["login_cpu_per_poll"]
    lat = p["end_to_event_s"]
    return [
        f"{r['jobs']:,}",
        f"{p['connections']} / {s['connections']}",
        f"{p['commands_per_interval']:.2f} / {s['commands_per_interval']:.2f}",
        f"{p['state_within_two_intervals']:,} of {r['jobs']:,} ({p['state_lag_max_s']} s)",
        f"{p['final_events']:,} of {r['jobs']:,}, {', '.join(p['final_states'])}",
        f"{lat['median']} / {lat['max']}",
        f"{cpu['cpu_s_per_poll'] * 60 / interval:.2f}",
        f"{p['client_cpu_s_per_min']:.2f}",
        f"{p['rss_mb_before']:.0f} / {p['rss_mb_peak']:.0f}",
        str(r["left_after_scancel"]),
    ]


def body(start: dict[str, Any], a: argparse.Namespace) -> int:
    """Every job count in one run (side by side on the same machine state), then report."""
    cl.setup_airflow_env()
    cl.ensure_cluster()
    if not SSHD_LOG.exists():
        raise RuntimeError(f"{SSHD_LOG} not found (the dev cluster's sshd log)")
    _record_ports()
    sizes = sorted(int(x) for x in str(a.jobs).split(","))
    runs = [watch_size(n, a, naive=a.naive and n == sizes[0]) for n in sizes]
    end = machine()
    headers = [
        "jobs",
        "SSH connections (together / arriving)",
        "commands per interval (together / arriving)",
        "saw PENDING within 2 intervals (slowest)",
        "final events after scancel",
        "scancel -> event s (median / max)",
        "login-node CPU s per minute of polls",
        "triggerer CPU s/min",
        "triggerer RSS MiB (before / peak)",
        "jobs left",
    ]
    lines = [
        f"### Watching {', '.join(f'{n:,}' for n in sizes)} held jobs "
        f"({time.strftime('%Y-%m-%d')}, poll interval {a.interval:.0f} s, "
        f"window {a.window:.0f} s)",
        "",
        machine_line(start, end),
        "",
        table(headers, [_size_row(r, a.interval) for r in runs]),
        "",
    ]
    for r in runs:
        c = r["scenarios"].get("conns")
        if c:
            lines.append(
                f"{r['jobs']} jobs spread over {c['connection_ids']} Airflow SSH connection ids "
                f"to the same login node: {c['connections']} SSH connections, "
                f"{c['commands_per_interval']:.2f} commands per interval, triggerer RSS "
                f"{c['rss_mb_before']:.0f} / {c['rss_mb_peak']:.0f} MiB."
            )
        n = r["scenarios"].get("naive")
        if n:
            lines.append(
                f"Naive baseline at {r['jobs']} jobs (one `run_command` per job per interval, "
                f"at most {a.concurrency} handshakes at once): {n['connections']} connections "
                f"and {n['commands']} commands in {n['window_s']:.0f} s "
                f"({n['commands_per_interval']:.0f} per interval)."
            )
    checks = {f"{r['jobs']}: {k}": v for r in runs for k, v in r["checks"].items()}
    lines += [
        "",
        "Checks: " + ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in checks.items()) + ".",
    ]
    result = {
        "machine": start,
        "machine_end": end,
        "interval_s": a.interval,
        "runs": runs,
        "checks": checks,
        "section_md": "\n".join(lines),
    }
    # results.md is edited by hand (a dated section); the raw figures go here.
    OUT.mkdir(parents=True, exist_ok=True)
    out = OUT / f"{NAME}_{'_'.join(str(n) for n in sizes)}.json"
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(result["section_md"])
    print(f"wrote {out}")
    return 0 if all(checks.values()) else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", default="100", help="job counts, comma-separated: 100,1000")
    p.add_argument("--conns", type=int, default=4, help="connection ids for the spread scenario")
    p.add_argument("--conns-max-jobs", type=int, default=100, help="spread only up to this count")
    p.add_argument("--interval", type=float, default=5.0)
    p.add_argument("--window", type=float, default=30.0 if quick() else 60.0)
    p.add_argument("--naive-window", type=float, default=10.0 if quick() else 20.0)
    p.add_argument("--concurrency", type=int, default=20)
    p.add_argument("--no-naive", dest="naive", action="store_false")
    a = p.parse_args(argv)
    # not run_main: on failure it rebuilds results.md from bench/out/, whose other
    # benchmarks' files may be absent; this one's section is added by hand.
    return body(machine(), a)


if __name__ == "__main__":
    sys.exit(main())
