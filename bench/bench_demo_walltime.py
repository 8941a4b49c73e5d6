"""Demo wall time: trigger -> registered model, beside the driver run directly.

Alternates demo/direct/demo/direct...:

  demo    POST a run of the ``rllib_train`` DAG to the local Airflow (REST),
          wait for it; wall = trigger -> end of the ``register_model`` task
          (environment check, Gym sanity check, training job, model export
          and registration in MLflow)
  direct  the training that run does (the same resolved job spec and
          config), submitted by hand with sbatch (``ray_launch.sh python -u
          train.py``); wall = sbatch -> the job's last line

The difference is split per task from the task instances' own timestamps and
the Slurm log's birth (job start) and last write (job end). The conf keeps
the demo's model registry untouched (its own experiment and model name).

Needs Airflow and MLflow: started with scripts/airflow_local.sh and
scripts/mlflow_server.sh when they are not up, and stopped again afterwards
(only then).

    .venv/bin/python bench/bench_demo_walltime.py [--pairs 2]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
import urllib.parse
import uuid
from datetime import datetime
from types import ModuleType
from typing import Any

import _cluster as cl
from _report import (
    REPO,
    fmt,
    machine,
    machine_line,
    quick,
    ratio,
    row,
    run_main,
    save,
    stats,
    table,
)

NAME = "demo_walltime"
DAG_ID = "rllib_train"
CONF = {"experiment_name": "bench_demo", "register_model_name": "rllib-bench"}
#: --long LENGTH: the job trains for a fixed time instead of "to 450" (issue 16 §2:
#: the ratio is judged on jobs of realistic length), with its wall-time ratio target.
LENGTHS = {"90s": (1.5, 1.15), "10min": (10.0, 1.03)}
#: Without --long: the default "to 450" job (30-50 s here); no ratio target of its own.
SHORT_TARGET_RATIO = 1.15
TARGET_OVERHEAD_S = 8.0
TARGET_RATIO = SHORT_TARGET_RATIO


def long_conf(minutes: float) -> dict[str, Any]:
    """Conf of a job that trains ``minutes`` (no return, iteration or step stop)."""
    return {
        "stop_return_mean": None,
        "stop_iterations": None,
        "stop_env_steps": None,
        "stop_minutes": minutes,
    }


TASKS = ("resolve", "build_env", "sanity_check", "train", "register_model", "promote")


def _demo_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("slurm_ray_demo", REPO / "scripts" / "demo.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _service(script: str, action: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(REPO / "scripts" / script), action],
        capture_output=True,
        text=True,
        timeout=400,
        cwd=REPO,
        env=cl.ORIGINAL_ENV,
    )


def ensure_services() -> list[str]:
    """Start MLflow and Airflow if they are down; returns the scripts started here."""
    started = []
    for script in ("mlflow_server.sh", "airflow_local.sh"):
        if _service(script, "status").returncode != 0:
            print(f"[bench] starting {script}", file=sys.stderr)
            r = _service(script, "start")
            if r.returncode != 0:
                raise RuntimeError(f"{script} start failed: {r.stderr[-2000:]}")
            started.append(script)
    return started


def _ts(value: str | None) -> float | None:
    return datetime.fromisoformat(value).timestamp() if value else None


def connect(demo: ModuleType) -> Any:
    """A logged-in REST client once the DAG is there (Airflow may have been restarted)."""
    password = json.loads((demo.airflow_home() / "passwords.json").read_text())["admin"]
    api = demo.Api(demo.AIRFLOW, "admin", password)
    demo.wait_for_dag(api, DAG_ID)
    return api


def run_demo(api: Any, timeout: float = 1200) -> dict[str, Any]:
    """Trigger rllib_train over REST, wait, collect task and job timings."""
    t_trigger = time.time()
    run = api.call("POST", f"/dags/{DAG_ID}/dagRuns", {"logical_date": None, "conf": CONF})
    run_id = run["dag_run_id"]
    rid = urllib.parse.quote(run_id, safe="")
    state = run["state"]
    deadline = time.monotonic() + timeout
    while state not in ("success", "failed"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{DAG_ID} run {run_id} not done after {timeout:.0f}s")
        time.sleep(1.0)
        state = api.call("GET", f"/dags/{DAG_ID}/dagRuns/{rid}")["state"]
    tis = api.call("GET", f"/dags/{DAG_ID}/dagRuns/{rid}/taskInstances")["task_instances"]
    by_task = {t["task_id"]: t for t in tis}
    if state != "success":
        bad = {t["task_id"]: t["state"] for t in tis if t["state"] != "success"}
        raise RuntimeError(f"{DAG_ID} run {run_id} {state}: {bad}")

    def xcom(task: str) -> Any:
        value = api.call(
            "GET", f"/dags/{DAG_ID}/dagRuns/{rid}/taskInstances/{task}/xcomEntries/return_value"
        )["value"]
        return json.loads(value) if isinstance(value, str) and value[:1] in "{[" else value

    summary = xcom("train")
    registered = xcom("register_model")
    data = cl.collect_run(summary["run_dir"], str(summary["job_id"]))
    data.pop("log_tail", None)
    tasks = {
        name: {
            "start": _ts(by_task[name].get("start_date")),
            "end": _ts(by_task[name].get("end_date")),
            "duration_s": by_task[name].get("duration"),
            "try_number": by_task[name].get("try_number"),
        }
        for name in TASKS
        if name in by_task
    }
    reg_end = tasks["register_model"]["end"]
    train = tasks["train"]
    start, end = data["t_job_start"], data["t_job_end"]
    data.update(
        {
            "path": "demo",
            "run_id": run_id,
            "t_submit": t_trigger,
            "tasks": tasks,
            "model": {k: registered.get(k) for k in ("model_name", "model_version")},
            "wall_s": round(reg_end - t_trigger, 3),
            "dag_run_s": round((tasks["promote"]["end"] or reg_end) - t_trigger, 3),
            "trigger_to_train_start_s": round(train["start"] - t_trigger, 3),
            "train_start_to_job_start_s": round(start - train["start"], 3),
            "job_end_to_train_end_s": round(train["end"] - end, 3),
            "train_end_to_registered_s": round(reg_end - train["end"], 3),
            "register_model_s": tasks["register_model"]["duration_s"],
            "outside_job_s": round(reg_end - t_trigger - data["job_s"], 3),
        }
    )
    return data


def body(start: dict[str, Any], pairs: int, name: str = NAME) -> int:
    """Run the interleaved pairs and write the results section."""
    cl.setup_airflow_env()
    cl.ensure_cluster()
    started = ensure_services()
    demo = _demo_module()
    runs: list[dict[str, Any]] = []
    tag = uuid.uuid4().hex[:8]
    base = f"{cl.SCRATCH}/demo-{tag}"
    try:
        run_cfg = cl.default_run(**CONF)
        for i in range(pairs):
            for path in ("demo", "direct"):
                idle_wait = cl.wait_idle()
                load = machine()["loadavg"]
                if path == "demo":
                    # other sessions start and stop the shared Airflow/MLflow too
                    def one_demo() -> dict[str, Any]:
                        started.extend(ensure_services())
                        return run_demo(connect(demo))

                    r = cl.retry_once(f"demo-{i + 1}", one_demo)
                else:
                    r = cl.retry_once(
                        f"direct-{i + 1}",
                        lambda n=i + 1: cl.run_direct(
                            run_cfg, base, f"direct-{n}-{uuid.uuid4().hex[:4]}"
                        ),
                    )
                    r["outside_job_s"] = round(r["wall_s"] - r["job_s"], 3)
                r.pop("log_tail", None)
                r["pair"] = i + 1
                r["loadavg_before"] = load
                r["idle_wait_s"] = idle_wait
                # waiting in the queue for nodes busy with other users' jobs is not overhead
                queued = cl.queue_excess(r)
                r["wall_raw_s"] = r["wall_s"]
                r["wall_s"] = round(r["wall_s"] - queued, 3)
                r["outside_job_s"] = round(r["outside_job_s"] - queued, 3)
                if "train_start_to_job_start_s" in r:
                    r["train_start_to_job_start_s"] = round(
                        r["train_start_to_job_start_s"] - queued, 3
                    )
                runs.append(r)
                print(
                    f"[{path}-{i + 1}] job {r['job_id']}: wall {r['wall_s']}s, job {r['job_s']}s, "
                    f"outside the job {r['outside_job_s']}s, queued {queued}s (load {load[0]})",
                    file=sys.stderr,
                )
    finally:
        cl.ssh(f"rm -rf {base}", check=False)
        for script in reversed(list(dict.fromkeys(started))):
            print(f"[bench] stopping {script} (it was down before)", file=sys.stderr)
            _service(script, "stop")

    dm = [r for r in runs if r["path"] == "demo"]
    di = [r for r in runs if r["path"] == "direct"]
    w_dm, w_di = stats(r["wall_s"] for r in dm), stats(r["wall_s"] for r in di)
    o_dm, o_di = stats(r["outside_job_s"] for r in dm), stats(r["outside_job_s"] for r in di)
    j_dm, j_di = stats(r["job_s"] for r in dm), stats(r["job_s"] for r in di)
    wall_ratio = ratio(w_dm["median"], w_di["median"])
    # Both paths run the identical training job; its length swings with the other
    # tenants' load (see steady steps/s). At equal job length (the median of all
    # jobs) the ratio depends only on what each path adds around the job.
    j_all = stats(r["job_s"] for r in runs)["median"]
    eq_ratio = (
        ratio(o_dm["median"] + j_all, o_di["median"] + j_all)
        if None not in (o_dm["median"], o_di["median"], j_all)
        else None
    )
    fixed = (
        round(o_dm["median"] - o_di["median"], 2)
        if o_dm["median"] is not None and o_di["median"] is not None
        else None
    )
    wall_diff = (
        round(w_dm["median"] - w_di["median"], 2)
        if w_dm["median"] is not None and w_di["median"] is not None
        else None
    )

    def med(key: str) -> float | None:
        return stats(r.get(key) for r in dm)["median"]

    def task_med(name: str) -> float | None:
        return stats(r["tasks"].get(name, {}).get("duration_s") for r in dm)["median"]

    def gap_med(a: str, b: str) -> float | None:
        return stats(
            (r["tasks"][b]["start"] - r["tasks"][a]["end"])
            if r["tasks"].get(a, {}).get("end") and r["tasks"].get(b, {}).get("start")
            else None
            for r in dm
        )["median"]

    trig_to_first = stats(
        (r["tasks"]["resolve"]["start"] - r["t_submit"]) if r["tasks"].get("resolve") else None
        for r in dm
    )["median"]
    end = machine()
    breakdown = [
        ["trigger (POST) -> `resolve` starts", fmt(trig_to_first)],
        ["`resolve` task", fmt(task_med("resolve"))],
        ["gap -> `build_env`", fmt(gap_med("resolve", "build_env"))],
        ["`build_env` task (spec unchanged: no-op)", fmt(task_med("build_env"))],
        ["gap -> `sanity_check`", fmt(gap_med("build_env", "sanity_check"))],
        ["`sanity_check` task (srun on a compute node)", fmt(task_med("sanity_check"))],
        ["gap -> `train`", fmt(gap_med("sanity_check", "train"))],
        [
            "`train` start -> Slurm job start (MLflow run, staging, sbatch)",
            fmt(med("train_start_to_job_start_s")),
        ],
        ["Slurm job (Ray up, training, eval, Ray down)", fmt(med("job_s"), ".1f")],
        [
            "job end -> `train` done (trigger poll, requeue, execute_complete)",
            fmt(med("job_end_to_train_end_s")),
        ],
        ["`train` done -> `register_model` done", fmt(med("train_end_to_registered_s"))],
        ["  of which the `register_model` task", fmt(task_med("register_model"))],
    ]
    lines = [
        machine_line(start, end),
        "",
        f"{pairs} pairs run demo/direct/demo/direct...; the DAG's default "
        "Params (PPO CartPole-v1, 2 nodes x 4 CPUs, stop at return >= 450) with conf "
        f"`{json.dumps(CONF)}` (the conf wins). Direct: the same resolved job spec and "
        "config, sbatch by hand.",
        "",
        table(
            [
                "run",
                "job",
                "load1 before",
                "wall s",
                "Slurm queue wait s",
                "Slurm job s",
                "outside the job s",
                "train s to 450",
                "steady steps/s",
            ],
            [
                [
                    f"{r['pair']} {r['path']}",
                    r["job_id"],
                    fmt(r["loadavg_before"][0]),
                    fmt(r["wall_s"], ".1f"),
                    fmt(r["queue_wait_s"], ".0f"),
                    fmt(r["job_s"], ".1f"),
                    fmt(r["outside_job_s"], ".1f"),
                    fmt(r["metrics"]["time_to_target_s"], ".1f"),
                    fmt(r["metrics"]["env_steps_per_s_excl_first"]["median"], ".0f"),
                ]
                for r in runs
            ],
        ),
        "",
        table(
            ["figure (medians)", "demo", "direct", "demo/direct or difference"],
            [
                [
                    "wall s (demo: trigger -> registered model; direct: sbatch -> job end)",
                    fmt(w_dm["median"], ".1f"),
                    fmt(w_di["median"], ".1f"),
                    f"{fmt(wall_ratio, '.3f')}x, {fmt(wall_diff, '+.1f')} s",
                ],
                [
                    f"wall s at equal Slurm job time ({fmt(j_all, '.1f')} s, median of all jobs)",
                    fmt(None if j_all is None else o_dm["median"] + j_all, ".1f"),
                    fmt(None if j_all is None else o_di["median"] + j_all, ".1f"),
                    f"{fmt(eq_ratio, '.3f')}x",
                ],
                [
                    "Slurm job s",
                    fmt(j_dm["median"], ".1f"),
                    fmt(j_di["median"], ".1f"),
                    fmt(ratio(j_dm["median"], j_di["median"]), ".3f") + "x",
                ],
                [
                    "outside the Slurm job s (fixed overhead)",
                    fmt(o_dm["median"], ".1f"),
                    fmt(o_di["median"], ".1f"),
                    f"{fmt(fixed, '+.1f')} s",
                ],
            ],
        ),
        "",
        "Where the demo's time outside the job goes (medians over the demo runs, seconds):",
        "",
        table(["step", "s"], breakdown),
        "",
        "Wall, outside-the-job and `train` start -> job start figures leave out the time the job waited in Slurm's "
        "queue for nodes held by other users of the shared dev cluster (Slurm's SubmitTime "
        "-> StartTime less 1 s, as both are whole seconds; each run also first waits until "
        "no job runs). "
        "Train s to 450 and steady steps/s show how much the shared cores slowed each "
        "run's training.",
    ]
    summary = [
        row(
            "demo wall time, trigger -> registered model vs the driver directly, "
            "at equal Slurm job time",
            f"{fmt(None if j_all is None else o_dm['median'] + j_all, '.1f')} s",
            f"{fmt(None if j_all is None else o_di['median'] + j_all, '.1f')} s",
            f"{fmt(eq_ratio, '.3f')}x",
            f"<= {TARGET_RATIO}x",
            None if eq_ratio is None else eq_ratio <= TARGET_RATIO,
        ),
        row(
            "demo wall time as measured (medians; training length varies with the load)",
            f"{fmt(w_dm['median'], '.1f')} s",
            f"{fmt(w_di['median'], '.1f')} s",
            f"{fmt(wall_ratio, '.3f')}x",
            f"<= {TARGET_RATIO}x",
            None if wall_ratio is None else wall_ratio <= TARGET_RATIO,
        ),
        row(
            "demo fixed overhead (time outside the Slurm job, demo - direct)",
            f"{fmt(o_dm['median'], '.1f')} s",
            f"{fmt(o_di['median'], '.1f')} s",
            f"{fmt(fixed, '+.1f')} s",
            f"<= {TARGET_OVERHEAD_S:.0f} s",
            None if fixed is None else fixed <= TARGET_OVERHEAD_S,
        ),
    ]
    result = {
        "machine": start,
        "machine_end": end,
        "pairs": pairs,
        "conf": CONF,
        "runs": runs,
        "wall_s": {"demo": w_dm, "direct": w_di, "ratio": wall_ratio, "difference": wall_diff},
        "equal_job_s": j_all,
        "ratio_at_equal_job": eq_ratio,
        "outside_job_s": {"demo": o_dm, "direct": o_di, "fixed_overhead": fixed},
        "job_s": {"demo": j_dm, "direct": j_di},
        "breakdown_s": {k: v for k, v in breakdown},
        "services_started_here": started,
    }
    out = save(name, result, "\n".join(lines), summary)
    print(f"wrote {out}")
    print(f"demo/direct wall {wall_ratio}x ({eq_ratio}x at equal job time); overhead {fixed}s")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=1 if quick() else 3)
    p.add_argument(
        "--long",
        nargs="?",
        const="90s",
        choices=sorted(LENGTHS),
        help="a job that trains this long (default 90s) instead of to return 450",
    )
    a = p.parse_args(argv)
    name = NAME
    if a.long:
        global TARGET_RATIO
        minutes, TARGET_RATIO = LENGTHS[a.long]
        CONF.update(long_conf(minutes))
        name = f"{NAME}_long" if a.long == "90s" else f"{NAME}_{a.long}"
    return run_main(name, lambda start: body(start, a.pairs, name))


if __name__ == "__main__":
    sys.exit(main())
