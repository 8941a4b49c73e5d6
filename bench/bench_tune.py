"""Ray Tune in one allocation vs one Slurm job per configuration: 8 configs, same work.

The same 8 PPO configurations on CartPole-v1 (lr x hidden_sizes grid, 1 CPU
each: no env runners, the trial's process samples and learns), the same stop
(``--iterations``), both written by hand into ``sbatch`` scripts (no Airflow,
so the figures are Slurm + Ray + the drivers):

  tune  ONE job on 2 nodes x 4 CPUs: ``ray_launch.sh python -u tune_driver.py``,
        8 trials concurrently (FIFO: every trial runs to the end, as the jobs do);
  jobs  8 jobs of 1 node x 1 CPU submitted at once (Slurm packs them onto the
        same 8 CPUs): ``ray_launch.sh python -u train.py`` each.

Reported side by side: wall time (first submit to last job end, from Slurm's
accounting), node-seconds and CPU-seconds allocated (sacct ElapsedRaw x
NNodes / AllocCPUS summed over jobs), best final return (the best config's
``episode_return_mean``; no greedy evaluation on either side). The paths run one after
the other (``--order`` picks which first), each on an idle cluster.

    .venv/bin/python bench/bench_tune.py [--iterations 10] [--order tune,jobs]
"""

from __future__ import annotations

import argparse
import itertools
import json
import shlex
import sys
import time
import uuid
from typing import Any

import _cluster as cl
from _report import OUT, REPO, fmt, machine, machine_line, ratio, table

NAME = "tune_vs_jobs"
LRS = (1e-4, 3e-4, 1e-3, 3e-3)
HIDDEN = ([32], [64, 64])
BASE: dict[str, Any] = {
    "num_env_runners": 0,
    "num_envs_per_env_runner": 4,
    "train_batch_size": 1000,
    "minibatch_size": 250,
    "num_epochs": 4,
    "checkpoint_every": 5,
    "eval_episodes": 0,  # the jobs would evaluate 8 times, Tune once: not compared
    "seed": 7,
}
FILES = {
    **cl.DIRECT_FILES,
    "tune_driver.py": REPO / "include" / "tune_driver.py",
    "tune_space.py": REPO / "plugins" / "slurm_ray" / "tune_space.py",
    "export_model.py": REPO / "include" / "export_model.py",
}


def configs() -> list[dict[str, Any]]:
    return [{"lr": lr, "hidden_sizes": h} for lr, h in itertools.product(LRS, HIDDEN)]


def script(run_dir: str, name: str, nodes: int, cpus: int, command: str) -> str:
    venv = cl.VENV
    return "\n".join(
        [
            "#!/bin/bash",
            f"#SBATCH --job-name={name}",
            f"#SBATCH --nodes={nodes}",
            "#SBATCH --ntasks-per-node=1",
            f"#SBATCH --cpus-per-task={cpus}",
            "#SBATCH --time=30",
            "#SBATCH --output=slurm-%j.out",
            f"cd {shlex.quote(run_dir)}",
            f"source {shlex.quote(str(venv))}/bin/activate",
            "export RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1 SLURM_RAY_JOIN_TIMEOUT=300",
            f"export SLURM_RAY_RUN_DIR={shlex.quote(run_dir)}",
            f"exec bash ray_launch.sh {command}",
            "",
        ]
    )


def stage(run_dir: str, config: dict[str, Any], sbatch: str) -> None:
    payload = {name: path.read_text() for name, path in FILES.items()}
    payload["config.json"] = json.dumps(config, indent=2, sort_keys=True)
    payload["job.sbatch"] = sbatch
    unpack = f"mkdir -p {shlex.quote(run_dir)} && cd {shlex.quote(run_dir)} && python3 -c " + (
        shlex.quote(
            "import json,sys\nfor k,v in json.load(sys.stdin).items(): open(k,'w').write(v)"
        )
    )
    cl.ssh(unpack, stdin=json.dumps(payload))


def sacct(job_ids: list[str]) -> list[dict[str, str]]:
    fields = "JobID,State,Start,End,ElapsedRaw,NNodes,AllocCPUS"
    out = ""
    for _ in range(30):  # slurmdbd records the end a moment after squeue drops the job
        out = cl.ssh(f"sacct -n -X -P -j {','.join(job_ids)} -o {fields}", check=False)
        rows = [
            dict(zip(fields.split(","), ln.split("|"), strict=False)) for ln in out.splitlines()
        ]
        if len(rows) == len(job_ids) and all(r["End"] not in ("", "Unknown") for r in rows):
            return rows
        time.sleep(2)
    raise RuntimeError(f"sacct did not report every job as ended:\n{out}")


def costs(job_ids: list[str]) -> dict[str, Any]:
    rows = sacct(job_ids)
    start = min(cl._slurm_ts(r["Start"]) or 0.0 for r in rows)
    end = max(cl._slurm_ts(r["End"]) or 0.0 for r in rows)
    return {
        "jobs": rows,
        "states": sorted({r["State"] for r in rows}),
        "span_s": end - start,
        "node_s": sum(int(r["ElapsedRaw"]) * int(r["NNodes"]) for r in rows),
        "cpu_s": sum(int(r["ElapsedRaw"]) * int(r["AllocCPUS"]) for r in rows),
    }


def run_tune(base: str, iterations: int) -> dict[str, Any]:
    run_dir = f"{base}/tune"
    config = {
        "base": BASE | {"stop": {"iterations": iterations}},
        "tune": {
            "search": {"lr": {"grid": list(LRS)}, "hidden_sizes": {"grid": list(HIDDEN)}},
            "num_samples": 1,
            "scheduler": "fifo",
        },
    }
    command = f"python -u tune_driver.py --config config.json --run-dir {shlex.quote(run_dir)}"
    stage(run_dir, config, script(run_dir, "bench-tune", 2, 4, command))
    t0 = time.time()
    job = cl.ssh(f"cd {shlex.quote(run_dir)} && sbatch --parsable job.sbatch").strip()
    cl.wait_gone(job)
    out = {"t_submit": t0, "job_ids": [job], **costs([job])}
    result = json.loads(cl.read_remote(f"{run_dir}/result.json") or "{}")
    trials = result.get("tune", {}).get("trials", [])
    out["wall_s"] = (cl._slurm_ts(out["jobs"][0]["End"]) or t0) - t0
    out["returns"] = {
        json.dumps(t["config"], sort_keys=True): t["episode_return_mean"] for t in trials
    }
    out["best_config"] = result.get("tune", {}).get("best_config")
    out["best_return"] = result.get("episode_return_mean")
    out["best_eval"] = result.get("eval_return_mean")
    out["status"] = result.get("status")
    return out


def run_jobs(base: str, iterations: int) -> dict[str, Any]:
    jobs: list[tuple[str, str, dict[str, Any]]] = []
    for i, override in enumerate(configs()):
        run_dir = f"{base}/job{i}"
        config = BASE | override | {"stop": {"iterations": iterations}}
        command = f"python -u train.py --config config.json --run-dir {shlex.quote(run_dir)}"
        stage(run_dir, config, script(run_dir, f"bench-job{i}", 1, 1, command))
        jobs.append((run_dir, "", override))
    t0 = time.time()
    ids = []
    for run_dir, _, _ in jobs:
        ids.append(cl.ssh(f"cd {shlex.quote(run_dir)} && sbatch --parsable job.sbatch").strip())
    for job in ids:
        cl.wait_gone(job)
    out = {"t_submit": t0, "job_ids": ids, **costs(ids)}
    out["wall_s"] = max(cl._slurm_ts(r["End"]) or t0 for r in out["jobs"]) - t0
    results = [json.loads(cl.read_remote(f"{d}/result.json") or "{}") for d, _, _ in jobs]
    out["returns"] = {
        json.dumps(o, sort_keys=True): r.get("episode_return_mean")
        for (_, _, o), r in zip(jobs, results, strict=True)
    }
    best = max(results, key=lambda r: r.get("episode_return_mean") or float("-inf"))
    out["best_config"] = {k: best.get("config", {}).get(k) for k in ("lr", "hidden_sizes")}
    out["best_return"] = best.get("episode_return_mean")
    out["best_eval"] = best.get("eval_return_mean")
    out["status"] = sorted({str(r.get("status")) for r in results})
    return out


def body(iterations: int, order: list[str]) -> dict[str, Any]:
    cl.ensure_cluster()
    base = f"{cl.SCRATCH}/tune-{uuid.uuid4().hex[:8]}"
    runs: dict[str, Any] = {}
    for path in order:
        runs[path] = {"idle_wait_s": cl.wait_idle(timeout=180)}
        runs[path].update((run_tune if path == "tune" else run_jobs)(base, iterations))
        print(
            f"[bench] {path}: {json.dumps({k: runs[path][k] for k in ('wall_s', 'node_s', 'cpu_s', 'best_return')})}",
            file=sys.stderr,
        )
    return {"base_dir": base, "iterations": iterations, "configs": configs(), "runs": runs}


def section(data: dict[str, Any]) -> str:
    t, j = data["runs"]["tune"], data["runs"]["jobs"]
    rows = [
        ["wall time (first submit to last job end)", fmt(t["wall_s"], ".0f", " s"), fmt(j["wall_s"], ".0f", " s"), fmt(ratio(t["wall_s"], j["wall_s"]), ".2f", "x")],
        ["span (first job start to last job end)", fmt(t["span_s"], ".0f", " s"), fmt(j["span_s"], ".0f", " s"), fmt(ratio(t["span_s"], j["span_s"]), ".2f", "x")],
        ["node-seconds allocated", fmt(t["node_s"], ".0f"), fmt(j["node_s"], ".0f"), fmt(ratio(t["node_s"], j["node_s"]), ".2f", "x")],
        ["CPU-seconds allocated", fmt(t["cpu_s"], ".0f"), fmt(j["cpu_s"], ".0f"), fmt(ratio(t["cpu_s"], j["cpu_s"]), ".2f", "x")],
        ["best final return (mean)", fmt(t["best_return"], ".1f"), fmt(j["best_return"], ".1f"), "-"],
        ["best config", f"`{json.dumps(t['best_config'])}`", f"`{json.dumps(j['best_config'])}`", "-"],
    ]  # fmt: skip
    head = [
        "8 configs, " + f"{data['iterations']} iterations each",
        "Tune, 1 job (2x4 CPUs)",
        "8 jobs (1 CPU each)",
        "tune/jobs",
    ]
    return f"{machine_line(data['machine'], data.get('machine_end'))}\n\n{table(head, rows)}\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--order", default="tune,jobs")
    args = ap.parse_args()
    start = machine()
    data = body(args.iterations, args.order.split(","))
    data.update(machine=start, machine_end=machine())
    text = section(data)
    OUT.mkdir(parents=True, exist_ok=True)
    # Our own files: bench/results.md is assembled by the lead.
    (OUT / f"{NAME}.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    (OUT / f"{NAME}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
