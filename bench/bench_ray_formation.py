"""How fast does include/ray_launch.sh form a multi-node Ray cluster?

Submits K jobs one after another to the dev cluster (sbatch over ssh), each
running the launcher with a trivial entrypoint, and reports per job:

  submit->start   local time of `sbatch` to the first line of the batch script
  launcher        the launcher's own "cluster ready ... in X.XXs" figure
                  (launcher start -> every node ALIVE in the GCS)
  start->ready    first line of the batch script (before the venv is
                  activated) -> the entrypoint's first line
  slurm->ready    Slurm's StartTime (1 s resolution) -> the entrypoint's first line
  teardown        entrypoint's first line -> launcher exited (Ray stopped,
                  temp dirs removed)

The dev cluster's nodes run on this machine, so one clock serves all
timestamps. The seed tutorial's script waits with fixed sleeps instead:
`sleep 10` after the head plus `sleep 5` per worker node (15 s for 2 nodes,
25 s for its 4-node GPU example), and does not check that nodes joined.

    .venv/bin/python bench/bench_ray_formation.py [--jobs 5] [--nodes 2]

Side by side (the shared machine's load moves absolute figures; compare
variants run interleaved in one go, A B C / C B A / ...):

    bench_ray_formation.py --variants [--jobs 4]       # the standard set below
    bench_ray_formation.py --variant old=025ffb8 --variant new=worktree \
        --variant new+autoscaler=worktree,SLURM_RAY_AUTOSCALER=1 [--breakdown]

A variant is NAME=REF[,VAR=VALUE...]: the launcher scripts of git revision
REF (``worktree``: the files as they are) with VAR=VALUE exported in the
batch script. ``--breakdown`` keeps Ray's temp dirs (SLURM_RAY_KEEP_TMP=1)
and reports when each Ray process wrote its first log line, relative to the
batch script's first line, per node: what costs what on the head.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from _report import fmt, machine, machine_line, quick, row, run_main, save, table

REPO = Path(__file__).resolve().parents[1]
SSH_CONFIG = REPO / ".dev" / "ssh_config"
STATE = Path("/var/lib/slurm-ray-dev")
VENV = STATE / "venv"
SCRATCH = STATE / "scratch" / "bench"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}
READY_RE = re.compile(
    r"ray_launch: cluster ready nodes=(\d+) cpus=(\S+) gpus=(\S+) in ([\d.]+)s "
    r"\(address=([\d.]+):(\d+)\)"
)
TARGET_S = 4.0
#: The launcher before issue 16 section 3 (worker waited for the head node
#: ALIVE; autoscaler monitor started): the baseline of ``--variants``.
BASELINE_REF = "025ffb8"
#: ``--variants``: old vs new, and new with each component it leaves out put back.
STANDARD_VARIANTS = (
    f"old={BASELINE_REF}",
    "new=worktree",
    "new+autoscaler=worktree,SLURM_RAY_AUTOSCALER=1",
    "new-logmonitor=worktree,SLURM_RAY_LOG_MONITOR=0",
)
#: Ray's per-process logs whose first line dates a process's start (after its
#: imports, for the Python ones).
PROCESS_LOGS = (
    "gcs_server.out",
    "monitor.log",
    "dashboard.log",
    "log_monitor.log",
    "raylet.out",
    "runtime_env_agent.log",
    "dashboard_agent.log",
)
LOG_TS_RE = re.compile(r"^\[?(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})")


@dataclass
class Variant:
    name: str
    ref: str
    env: dict[str, str]

    @classmethod
    def parse(cls, spec: str) -> Variant:
        name, sep, rest = spec.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z0-9_.+-]+", name):
            raise SystemExit(f"--variant {spec!r}: expected NAME=REF[,VAR=VALUE...]")
        ref, *pairs = rest.split(",")
        env = {}
        for pair in pairs:
            k, sep, v = pair.partition("=")
            if not sep or not re.fullmatch(r"[A-Z_][A-Z0-9_]*", k):
                raise SystemExit(f"--variant {spec!r}: {pair!r} is not VAR=VALUE")
            env[k] = v
        return cls(name, ref or "worktree", env)

    def script(self, name: str) -> str:
        if self.ref == "worktree":
            return (REPO / "include" / name).read_text()
        return subprocess.run(
            ["git", "-C", str(REPO), "show", f"{self.ref}:include/{name}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout


def seed_sleep_s(nodes: int) -> int:
    return 10 + 5 * (nodes - 1)


def ssh(cmd: str, stdin: str | None = None, check: bool = True) -> str:
    r = subprocess.run(
        ["ssh", "-F", str(SSH_CONFIG), "dev-cluster", cmd],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if check and r.returncode != 0:
        raise RuntimeError(f"ssh {cmd!r}: {r.stderr.strip()}")
    return r.stdout


def job_info(jobid: str) -> dict[str, str]:
    info: dict[str, str] = {}
    for tok in ssh(f"scontrol show job -o {jobid}", check=False).split():
        k, sep, v = tok.partition("=")
        if sep and k not in info:
            info[k] = v
    return info


#: The entrypoint: its start time, then the CPU seconds the job's live processes
#: (Ray's daemons, `ray start`, prestarted idle Ray workers) have used so far.
ENTRYPOINT = """\
import os, time
print("BENCH_T_EP %.6f" % time.time(), flush=True)
tag, total = ("SLURM_JOB_ID=" + os.environ["SLURM_JOB_ID"]).encode(), 0
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            if tag not in f.read().split(b"\\0") or int(pid) == os.getpid():
                continue
        with open(f"/proc/{pid}/stat") as f:
            total += sum(int(x) for x in f.read().rsplit(")", 1)[1].split()[11:15])
    except OSError:
        pass
print("BENCH_CPU_S %.2f" % (total / os.sysconf("SC_CLK_TCK")), flush=True)
"""


def batch_script(nodes: int, cpus: int, env: dict[str, str] | None = None) -> str:
    exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in (env or {}).items())
    return (
        "#!/bin/bash\n"
        f"#SBATCH --nodes={nodes} --cpus-per-task={cpus} --time=10\n"
        "#SBATCH --output=slurm-%j.out --job-name=bench-ray-formation\n"
        'echo "BENCH_T_BATCH $(date +%s.%N)"\n'
        f"source {VENV}/bin/activate\n"
        f"{exports}"
        "bash ./ray_launch.sh python ep.py\n"
        "rc=$?\n"
        'echo "BENCH_T_END $(date +%s.%N)"\n'
        "exit $rc\n"
    )


def process_starts(run_dir: Path, jobid: str, t_batch: float) -> dict[str, float]:
    """First log line of each Ray process, s after the batch script's first line
    ("head raylet.out", "worker dashboard_agent.log", ...); removes the kept temp dirs."""
    logs = " ".join(PROCESS_LOGS)
    out = ssh(
        f"cd {shlex.quote(str(run_dir / 'ray-logs'))} && for f in {jobid}.*.log; do "
        f'n=${{f#{jobid}.}}; n=${{n%.log}}; t=$(sed -n "s/^temp dir //p" "$f" | head -n 1); '
        '[ -n "$t" ] || continue; '
        f'for p in {logs}; do for l in "$t"/session_2*/logs/$p; do '
        '[ -f "$l" ] && printf "%s %s %s\\n" "$n" "$p" "$(grep -m1 -oE '
        '\'^\\[?[0-9]{4}-[0-9-]+ [0-9:,]+\' "$l")"; done; done; '
        'rm -rf "${t%/ray}"; done',
        check=False,
    )
    seen: dict[str, dict[str, float]] = {}
    for line in out.splitlines():
        node, proc, stamp = [*line.split(" ", 2), "", ""][:3]
        m = LOG_TS_RE.match(stamp)
        if m:
            ts = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            seen.setdefault(node, {})[proc] = round(ts - t_batch, 3)
    starts = {}
    for procs in seen.values():
        role = "head" if "gcs_server.out" in procs else "worker"
        starts.update({f"{role} {p}": t for p, t in procs.items()})
    return starts


def run_one(run_dir: Path, nodes: int, breakdown: bool = False) -> dict:
    load_before = os.getloadavg()[0]
    t_submit = time.time()
    jobid = ssh(f"cd {shlex.quote(str(run_dir))} && sbatch --parsable job.sbatch").strip()
    jobid = jobid.split(";")[0]
    try:
        deadline = time.monotonic() + 300
        while True:
            info = job_info(jobid)
            if info.get("JobState") in TERMINAL:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"job {jobid} did not finish: {info}")
            time.sleep(0.5)
    finally:
        ssh(f"scancel {jobid}", check=False)
    out = ssh(f"cat {shlex.quote(str(run_dir / f'slurm-{jobid}.out'))}", check=False)
    m = READY_RE.search(out)
    marks = {k: float(v) for k, v in re.findall(r"BENCH_T_(\w+) ([\d.]+)", out)}
    if info.get("JobState") != "COMPLETED" or not m or "EP" not in marks:
        raise RuntimeError(f"job {jobid} {info.get('JobState')}:\n{out}")
    start = datetime.strptime(info["StartTime"], "%Y-%m-%dT%H:%M:%S").timestamp()
    return {
        "jobid": int(jobid),
        "nodes": int(m.group(1)),
        "cpus": float(m.group(2)),
        "submit_to_start_s": round(marks["BATCH"] - t_submit, 3),
        "launcher_ready_s": float(m.group(4)),
        "start_to_ready_s": round(marks["EP"] - marks["BATCH"], 3),
        "slurm_start_to_ready_s": round(marks["EP"] - start, 3),
        "teardown_s": round(marks["END"] - marks["EP"], 3) if "END" in marks else None,
        "cpu_s": float(c.group(1)) if (c := re.search(r"BENCH_CPU_S ([\d.]+)", out)) else None,
        "slurm_start_time": info["StartTime"],
        # The dev nodes share this machine's cores with everything else on it:
        # formation is CPU-bound (~4-5 CPU-seconds of Ray startup for 2 nodes).
        "loadavg_1min_before": round(load_before, 2),
        "loadavg_1min_after": round(os.getloadavg()[0], 2),
        "process_starts_s": process_starts(run_dir, jobid, marks["BATCH"]) if breakdown else {},
    }


def summary(rows: list[dict], key: str) -> dict:
    vals = [r[key] for r in rows if r[key] is not None]
    return {
        "min": min(vals),
        "median": round(statistics.median(vals), 3),
        "mean": round(statistics.fmean(vals), 3),
        "max": max(vals),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=None, help="jobs per variant (default 5, 3 quick)")
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--cpus-per-task", type=int, default=1)
    p.add_argument("--variant", action="append", default=[], metavar="NAME=REF[,VAR=VALUE...]")
    p.add_argument(
        "--variants", action="store_true", help="the standard set: " + " ".join(STANDARD_VARIANTS)
    )
    p.add_argument("--breakdown", action="store_true", help="date each Ray process's start")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "ray_formation.json")
    a = p.parse_args(argv)
    specs = list(a.variant) + (list(STANDARD_VARIANTS) if a.variants else [])
    a.variants = [Variant.parse(v) for v in specs] or [Variant("new", "worktree", {})]
    if len({v.name for v in a.variants}) != len(a.variants):
        p.error("variant names must differ")
    if a.jobs is None:
        a.jobs = (3 if quick() else 5) if len(a.variants) == 1 else (2 if quick() else 4)
    return run_main("ray_formation", lambda start: body(start, a))


def primary(variants: list[Variant]) -> Variant:
    """The variant the target applies to: the worktree's launcher as it stands."""
    return next((v for v in variants if v.ref == "worktree" and not v.env), variants[0])


def body(start_machine: dict, a: argparse.Namespace) -> int:
    """Run the jobs (variants interleaved), print the tables, write the JSON and results."""
    run_dir = SCRATCH / f"formation-{uuid.uuid4().hex[:10]}"
    variants: list[Variant] = a.variants
    for v in variants:
        vdir = run_dir / v.name
        ssh(f"mkdir -p {shlex.quote(str(vdir))}")
        env = {**v.env, **({"SLURM_RAY_KEEP_TMP": "1"} if a.breakdown else {})}
        files = {n: v.script(n) for n in ("ray_launch.sh", "ray_wait.py")}
        files["job.sbatch"] = batch_script(a.nodes, a.cpus_per_task, env)
        files["ep.py"] = ENTRYPOINT
        for name, text in files.items():
            ssh(f"cat > {shlex.quote(str(vdir / name))}", stdin=text)

    rows = []
    for i in range(a.jobs):
        # A B C, C B A, ...: no variant always runs right after the same one.
        for v in variants if i % 2 == 0 else variants[::-1]:
            r = {
                "variant": v.name,
                "round": i + 1,
                **run_one(run_dir / v.name, a.nodes, a.breakdown),
            }
            rows.append(r)
            print(
                f"round {i + 1}/{a.jobs} {v.name}: job {r['jobid']} start->ready "
                f"{r['start_to_ready_s']:.2f}s (load1 {r['loadavg_1min_before']:.2f})",
                file=sys.stderr,
            )

    keys = [
        "submit_to_start_s",
        "launcher_ready_s",
        "start_to_ready_s",
        "slurm_start_to_ready_s",
        "teardown_s",
    ]
    main_v = primary(variants)
    by_v = {v.name: [r for r in rows if r["variant"] == v.name] for v in variants}
    result = {
        "benchmark": "ray_formation",
        "what": "Slurm job start -> all Ray nodes joined, include/ray_launch.sh",
        "when": datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu_count_host": os.cpu_count(),
        "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
        "nodes": a.nodes,
        "cpus_per_task": a.cpus_per_task,
        "variants": [{"name": v.name, "ref": v.ref, "env": v.env} for v in variants],
        "primary_variant": main_v.name,
        "jobs": rows,
        "summary": {k: summary(by_v[main_v.name], k) for k in keys},
        "variant_summary": variant_summary(variants, by_v, a.jobs),
        "target_s": TARGET_S,
        "seed_fixed_sleeps_s": seed_sleep_s(a.nodes),
        "seed_fixed_sleeps_note": (
            "seed script: sleep 10 after the head + sleep 5 per worker; "
            "15 s for 2 nodes, 20 s for its 3-node CPU example, 25 s for its GPU "
            "example (head + 3 rollout nodes), with no check that nodes joined"
        ),
        "reference_seed_s": 25,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")

    hdr = (
        f"{'variant':>16} {'job':>6} {'submit>start':>12} {'launcher':>9} {'start>ready':>11} "
        f"{'slurm>ready':>11} {'teardown':>9} {'load1':>6} {'CPU s':>6}"
    )
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(
            f"{r['variant']:>16} {r['jobid']:>6} {r['submit_to_start_s']:>12.2f} "
            f"{r['launcher_ready_s']:>9.2f} {r['start_to_ready_s']:>11.2f} "
            f"{r['slurm_start_to_ready_s']:>11.2f} {(r['teardown_s'] or 0):>9.2f} "
            f"{r['loadavg_1min_before']:>6.2f} {fmt(r['cpu_s']):>6}"
        )
    if len(variants) > 1:
        print()
        print(variants_text(result))
    if a.breakdown:
        print()
        print(breakdown_text(variants, by_v))
    s = result["summary"]
    med, worst, seed = (
        s["start_to_ready_s"]["median"],
        s["start_to_ready_s"]["max"],
        seed_sleep_s(a.nodes),
    )
    ok = med <= TARGET_S
    print(
        f"\n{main_v.name}: start->all {a.nodes} nodes joined: median {med:.2f}s, max {worst:.2f}s, "
        f"target <= {TARGET_S:.0f}s: {'MET' if ok else 'NOT MET'} "
        f"(load average {'/'.join(f'{x:.2f}' for x in os.getloadavg())}); seed's fixed sleeps: "
        f"{seed}s for {a.nodes} nodes, {seed / med:.1f}x slower, and unchecked"
    )
    print(f"wrote {a.out}")
    ssh(f"rm -rf {shlex.quote(str(run_dir))}", check=False)
    save_section(result, start_machine, a.breakdown and breakdown_text(variants, by_v))
    return 0


def variant_summary(variants: list[Variant], by_v: dict[str, list[dict]], rounds: int) -> dict:
    """Per variant: median start->ready, its ratio to the first variant's, and the
    per-round ratios (each round runs every variant once, back to back)."""
    base = variants[0].name
    med0 = statistics.median(r["start_to_ready_s"] for r in by_v[base])
    out = {}
    for v in variants:
        vals = [r["start_to_ready_s"] for r in by_v[v.name]]
        med = statistics.median(vals)
        pairs = [
            round(x["start_to_ready_s"] / y["start_to_ready_s"], 3)
            for x, y in zip(by_v[v.name], by_v[base], strict=True)
        ]
        out[v.name] = {
            "median_s": round(med, 3),
            "min_s": min(vals),
            "max_s": max(vals),
            "ratio_to_first": round(med / med0, 3),
            "saved_vs_first_s": round(med0 - med, 3),
            "per_round_ratio": pairs,
            "median_per_round_ratio": round(statistics.median(pairs), 3),
            "median_cpu_s": stat_or_none([r.get("cpu_s") for r in by_v[v.name]]),
            "load1": [r["loadavg_1min_before"] for r in by_v[v.name]],
        }
    return out


def stat_or_none(vals: list[float | None]) -> float | None:
    got = [v for v in vals if v is not None]
    return round(statistics.median(got), 2) if got else None


def variants_text(result: dict) -> str:
    vs = result["variant_summary"]
    first = result["variants"][0]["name"]
    lines = [
        f"{'variant':>16} {'median s':>9} {'min':>6} {'max':>6} {'vs ' + first:>10} "
        f"{'saved s':>8} {'CPU s':>6} {'per-round ratios':>24}"
    ]
    for v in result["variants"]:
        x = vs[v["name"]]
        lines.append(
            f"{v['name']:>16} {x['median_s']:>9.2f} {x['min_s']:>6.2f} {x['max_s']:>6.2f} "
            f"{x['ratio_to_first']:>10.3f} {x['saved_vs_first_s']:>8.2f} "
            f"{fmt(x['median_cpu_s']):>6} {', '.join(f'{p:.2f}' for p in x['per_round_ratio']):>24}"
        )
    return "\n".join(lines)


def breakdown_text(variants: list[Variant], by_v: dict[str, list[dict]]) -> str:
    """Median first-log-line time of each Ray process, s after the batch script started."""
    procs = sorted(
        {p for rs in by_v.values() for r in rs for p in r["process_starts_s"]},
        key=lambda p: statistics.median(
            r["process_starts_s"][p]
            for rs in by_v.values()
            for r in rs
            if p in r["process_starts_s"]
        ),
    )
    lines = [
        f"{'process (first log line, s after batch start)':<40}"
        + "".join(f"{v.name:>16}" for v in variants)
    ]
    for p in procs:
        cells = []
        for v in variants:
            vals = [r["process_starts_s"][p] for r in by_v[v.name] if p in r["process_starts_s"]]
            cells.append(f"{statistics.median(vals):>16.2f}" if vals else f"{'-':>16}")
        lines.append(f"{p:<40}" + "".join(cells))
    ready = [
        f"{statistics.median(r['start_to_ready_s'] for r in by_v[v.name]):>16.2f}" for v in variants
    ]
    lines.append(f"{'all nodes joined (entrypoint starts)':<40}" + "".join(ready))
    return "\n".join(lines)


def save_section(result: dict, start_machine: dict, breakdown: str | bool = False) -> None:
    """The ray_formation section of bench/results.md."""
    s, nodes = result["summary"], result["nodes"]
    rows = [r for r in result["jobs"] if r["variant"] == result["primary_variant"]]
    med = s["start_to_ready_s"]["median"]
    worst = s["start_to_ready_s"]["max"]
    seed = result["seed_fixed_sleeps_s"]
    lines = [
        machine_line(start_machine),
        "",
        f"{len(rows)} jobs"
        + (" per variant" if len(result["variants"]) > 1 else "")
        + f" one after another, {nodes} nodes x {result['cpus_per_task']} CPU, "
        "each running `include/ray_launch.sh` with a one-line entrypoint. *start->ready*: "
        "the batch script's first line (before the venv is activated) -> the entrypoint's "
        "first line, i.e. every node joined (the launcher checks, no fixed sleeps). "
        "*job CPU s at ready*: user+system CPU seconds of the job's live processes when "
        "the entrypoint starts (Ray's daemons, `ray start`, and the idle Ray workers the raylets "
        "have prestarted by then, whose number varies: +-1 s between runs).",
        "",
        table(
            [
                "job",
                "submit->start s",
                "launcher s",
                "start->ready s",
                "Slurm StartTime->ready s",
                "teardown s",
                "load1 before",
                "job CPU s at ready",
            ],
            [
                [
                    r["jobid"],
                    fmt(r["submit_to_start_s"]),
                    fmt(r["launcher_ready_s"]),
                    fmt(r["start_to_ready_s"]),
                    fmt(r["slurm_start_to_ready_s"]),
                    fmt(r["teardown_s"]),
                    fmt(r["loadavg_1min_before"]),
                    fmt(r.get("cpu_s")),
                ]
                for r in rows
            ],
        ),
        "",
        f"Median start->ready {med:.2f} s, worst {worst:.2f} s (target <= {TARGET_S:.0f} s). "
        f"The seed tutorial's script sleeps {seed} s for {nodes} nodes (10 s + 5 s per "
        "worker) and 25 s in its GPU example, without checking that nodes joined: "
        f"{seed / med:.1f}x / {25 / med:.1f}x the measured median.",
    ]
    if len(result["variants"]) > 1:
        vs = result["variant_summary"]
        first = result["variants"][0]["name"]
        lines += [
            "",
            f"Variants, interleaved ({len(rows)} rounds, order reversed every other round); "
            f"ratios to `{first}`:",
            "",
            table(
                [
                    "variant",
                    "launcher",
                    "env",
                    "median s",
                    "min-max s",
                    f"ratio to {first}",
                    "saved s",
                    "job CPU s at ready (median)",
                    "per-round ratios",
                    "load1 before",
                ],
                [
                    [
                        v["name"],
                        f"`{v['ref']}`",
                        " ".join(f"`{k}={x}`" for k, x in v["env"].items()) or "-",
                        fmt(vs[v["name"]]["median_s"]),
                        f"{vs[v['name']]['min_s']:.2f}-{vs[v['name']]['max_s']:.2f}",
                        fmt(vs[v["name"]]["ratio_to_first"], ".3f"),
                        fmt(vs[v["name"]]["saved_vs_first_s"]),
                        fmt(vs[v["name"]]["median_cpu_s"]),
                        ", ".join(f"{p:.2f}" for p in vs[v["name"]]["per_round_ratio"]),
                        ", ".join(f"{x:.1f}" for x in vs[v["name"]]["load1"]),
                    ]
                    for v in result["variants"]
                ],
            ),
        ]
    lines += [
        "",
        "What the launcher leaves out (Ray 2.60): the dashboard (`--include-dashboard=false`), "
        "usage stats (`--disable-usage-stats`, `RAY_USAGE_STATS_ENABLED=0`), the autoscaler "
        "monitor (`--no-monitor`; `SLURM_RAY_AUTOSCALER=1` puts it back); a worker imports "
        "Ray while the head starts and runs `ray start` in-process the moment the head's "
        "raylet is in the GCS node table (polled every 50 ms): a worker that asks earlier "
        "falls into Ray's own 2-s retry sleep (`get_all_node_info_until_retrieved`), which "
        "made formation bimodal (about 3.8 or 5.8 s). Log monitors stay (they carry Ray workers' output to the "
        "entrypoint's; `SLURM_RAY_LOG_MONITOR=0` drops them). Not removable through `ray start` "
        "or environment variables: the head's API-server process (`dashboard.py`, started even "
        "without the dashboard; `ray start` waits until it registers) and each raylet's "
        "dashboard agent and runtime-env agent (the raylet starts them itself).",
    ]
    if breakdown:
        lines += [
            "",
            "When each Ray process wrote its first log line (median s after the "
            "batch script's first line; the Python ones after their imports):",
            "",
            "```",
            str(breakdown),
            "```",
        ]
    summary = [
        row(
            "Ray cluster formation, job start -> all nodes joined (median / worst)",
            f"{med:.2f} s / {worst:.2f} s",
            f"{seed} s fixed sleeps ({nodes} nodes); 25 s (seed GPU example)",
            f"{med / 25:.2f} of 25 s",
            f"<= {TARGET_S:.0f} s",
            med <= TARGET_S,
        )
    ]
    data = {**result, "machine": start_machine, "machine_end": machine()}
    save("ray_formation", data, "\n".join(lines), summary)


if __name__ == "__main__":
    sys.exit(main())
