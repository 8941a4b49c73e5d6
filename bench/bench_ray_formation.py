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
TARGET_S = 8.0


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


def batch_script(nodes: int, cpus: int) -> str:
    ep = "import time; print('BENCH_T_EP %.6f' % time.time(), flush=True)"
    return (
        "#!/bin/bash\n"
        f"#SBATCH --nodes={nodes} --cpus-per-task={cpus} --time=10\n"
        "#SBATCH --output=slurm-%j.out --job-name=bench-ray-formation\n"
        'echo "BENCH_T_BATCH $(date +%s.%N)"\n'
        f"source {VENV}/bin/activate\n"
        f'bash ./ray_launch.sh python -c "{ep}"\n'
        "rc=$?\n"
        'echo "BENCH_T_END $(date +%s.%N)"\n'
        "exit $rc\n"
    )


def run_one(run_dir: Path, nodes: int) -> dict:
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
        "slurm_start_time": info["StartTime"],
        # The dev nodes share this machine's cores with everything else on it:
        # formation is CPU-bound (~4-5 CPU-seconds of Ray startup for 2 nodes).
        "loadavg_1min_before": round(load_before, 2),
        "loadavg_1min_after": round(os.getloadavg()[0], 2),
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
    p.add_argument("--jobs", type=int, default=3 if quick() else 5)
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--cpus-per-task", type=int, default=1)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "ray_formation.json")
    a = p.parse_args(argv)
    return run_main("ray_formation", lambda start: body(start, a))


def body(start_machine: dict, a: argparse.Namespace) -> int:
    """Run the jobs, print the table, write the JSON and the results section."""
    run_dir = SCRATCH / f"formation-{uuid.uuid4().hex[:10]}"
    ssh(f"mkdir -p {shlex.quote(str(run_dir))}")

    def put(name: str, text: str) -> None:
        ssh(f"cat > {shlex.quote(str(run_dir / name))}", stdin=text)

    for name in ("ray_launch.sh", "ray_wait.py"):
        put(name, (REPO / "include" / name).read_text())
    put("job.sbatch", batch_script(a.nodes, a.cpus_per_task))

    rows = []
    for i in range(a.jobs):
        row = run_one(run_dir, a.nodes)
        rows.append(row)
        ready = row["launcher_ready_s"]
        print(f"job {i + 1}/{a.jobs}: {row['jobid']} ready in {ready:.2f}s", file=sys.stderr)

    keys = [
        "submit_to_start_s",
        "launcher_ready_s",
        "start_to_ready_s",
        "slurm_start_to_ready_s",
        "teardown_s",
    ]
    result = {
        "benchmark": "ray_formation",
        "what": "Slurm job start -> all Ray nodes joined, include/ray_launch.sh",
        "when": datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu_count_host": os.cpu_count(),
        "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
        "nodes": a.nodes,
        "cpus_per_task": a.cpus_per_task,
        "jobs": rows,
        "summary": {k: summary(rows, k) for k in keys},
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
        f"{'job':>6} {'submit>start':>12} {'launcher':>9} {'start>ready':>11} "
        f"{'slurm>ready':>11} {'teardown':>9} {'load1':>6}"
    )
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(
            f"{r['jobid']:>6} {r['submit_to_start_s']:>12.2f} {r['launcher_ready_s']:>9.2f} "
            f"{r['start_to_ready_s']:>11.2f} {r['slurm_start_to_ready_s']:>11.2f} "
            f"{(r['teardown_s'] or 0):>9.2f} {r['loadavg_1min_before']:>6.2f}"
        )
    s = result["summary"]
    print("-" * len(hdr))
    md = {k: v["median"] for k, v in s.items()}
    print(
        f"{'median':>6} {md['submit_to_start_s']:>12.2f} {md['launcher_ready_s']:>9.2f} "
        f"{md['start_to_ready_s']:>11.2f} {md['slurm_start_to_ready_s']:>11.2f} "
        f"{md['teardown_s']:>9.2f}"
    )
    med, worst, seed = md["start_to_ready_s"], s["start_to_ready_s"]["max"], seed_sleep_s(a.nodes)
    print(
        f"\nstart->all {a.nodes} nodes joined: median {med:.2f}s, max {worst:.2f}s "
        f"(target <= {TARGET_S:.0f}s); seed's fixed sleeps: {seed}s for {a.nodes} nodes "
        f"(25s in its GPU example), {seed / med:.1f}x slower, and unchecked"
    )
    print(f"wrote {a.out}")
    ssh(f"rm -rf {shlex.quote(str(run_dir))}", check=False)
    save_section(result, start_machine)
    return 0


def save_section(result: dict, start_machine: dict) -> None:
    """The ray_formation section of bench/results.md."""
    s, rows, nodes = result["summary"], result["jobs"], result["nodes"]
    med = s["start_to_ready_s"]["median"]
    worst = s["start_to_ready_s"]["max"]
    seed = result["seed_fixed_sleeps_s"]
    lines = [
        machine_line(start_machine),
        "",
        f"{len(rows)} jobs one after another, {nodes} nodes x {result['cpus_per_task']} CPU, "
        "each running `include/ray_launch.sh` with a one-line entrypoint. *start->ready*: "
        "the batch script's first line (before the venv is activated) -> the entrypoint's "
        "first line, i.e. every node joined (the launcher checks, no fixed sleeps).",
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
