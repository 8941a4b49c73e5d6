"""Shared cluster plumbing for the benchmarks: ssh, Airflow env, runs of the driver.

Two ways to run the same training on the dev cluster, measured the same way:

- :func:`run_direct`: the driver in a hand-written ``sbatch`` script (the
  launcher + ``python -u train.py``), no Airflow at all: the baseline.
- :func:`run_operator`: ``SlurmRayOperator`` driven as Airflow drives a
  deferrable task (execute -> TaskDeferred -> trigger.run() -> execute_complete).

Both read the run's ``metrics.jsonl`` / ``result.json`` and the Slurm log's
birth time (job start; the log is created by slurmstepd before the batch
script runs) and modification time (the launcher's last line, i.e. job end).
The dev cluster runs on this machine, so one clock serves all timestamps.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import os
import re
import resource
import shlex
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from _report import REPO, stats

STATE = Path(os.environ.get("SLURM_RAY_DEV_STATE", "/var/lib/slurm-ray-dev"))
SSH_CONFIG = STATE / "ssh_config"
VENV = STATE / "venv"
SCRATCH = STATE / "scratch" / "bench"
CONN_ID = "slurm_dev"
TARGET_RETURN = 450.0
#: Files the hand-written job needs next to it (the operator stages the same ones).
DIRECT_FILES = {
    "ray_launch.sh": REPO / "include" / "ray_launch.sh",
    "ray_wait.py": REPO / "include" / "ray_wait.py",
    "train.py": REPO / "include" / "train.py",
    "training_config.py": REPO / "plugins" / "slurm_ray" / "training_config.py",
}


def ssh(command: str, stdin: str | None = None, check: bool = True, timeout: float = 120) -> str:
    """Run ``command`` on the login node as the job user (through the real sshd).

    Other sessions restart the dev cluster's daemons now and then (``devcluster.sh
    up`` is idempotent but reloads sshd): ssh's own failure (exit 255) is retried.
    """
    give_up = time.monotonic() + 90
    attempt = 0
    while True:
        r = subprocess.run(
            ["ssh", "-F", str(SSH_CONFIG), "dev-cluster", command],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if r.returncode != 255 or time.monotonic() > give_up:
            break
        attempt += 1
        time.sleep(min(10.0, 1.0 * attempt))
    if check and r.returncode != 0:
        raise RuntimeError(f"ssh {command[:200]!r} failed ({r.returncode}): {r.stderr.strip()}")
    return r.stdout


def load_cluster_env() -> dict[str, str]:
    """``cluster.env`` (``export K='V'`` lines) as a dict."""
    env: dict[str, str] = {}
    for line in (STATE / "cluster.env").read_text().splitlines():
        if line.startswith("export "):
            key, _, value = line[len("export ") :].partition("=")
            env[key] = shlex.split(value)[0] if value else ""
    return env


#: The environment before :func:`setup_airflow_env`, for starting the real services
#: (a leaked AIRFLOW_HOME or unit-test mode would break the local Airflow).
ORIGINAL_ENV: dict[str, str] = dict(os.environ)


def setup_airflow_env() -> None:
    """Make the provider importable outside Airflow: a throwaway AIRFLOW_HOME, the conn."""
    home = tempfile.mkdtemp(prefix="slurm-ray-bench-airflow-")
    atexit.register(shutil.rmtree, home, True)
    os.environ["AIRFLOW_HOME"] = home
    os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
    os.environ["AIRFLOW__CORE__UNIT_TEST_MODE"] = "True"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    env = load_cluster_env()
    for key in ("SLURM_CONF", "AIRFLOW_CONN_SLURM_DEV"):
        os.environ[key] = env[key]
    # asyncssh/paramiko log every channel at INFO; the trigger relays every job
    # log line. Keep the benchmark's own output readable (after Airflow has
    # configured logging, which would reset the levels).
    import airflow.sdk  # noqa: F401

    for name in ("asyncssh", "paramiko", "slurm_ray", "airflow.task"):
        logging.getLogger(name).setLevel(logging.WARNING)


def ensure_cluster(wait: float = 180) -> None:
    """Wait (up to ``wait`` s) until the dev cluster answers; a clear error otherwise."""
    deadline = time.monotonic() + wait
    while True:
        try:
            ssh("sinfo -h -o %T", timeout=30)
            return
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"dev cluster not reachable ({exc}); run `make cluster-up`"
                ) from exc
            time.sleep(5)


def retry_once(label: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one measured run; after a failure (another session restarting the shared
    dev cluster, say) wait for the cluster and run it once more, noting why."""
    try:
        return fn()
    except Exception as exc:
        print(f"[bench] {label} failed ({type(exc).__name__}: {exc}); retrying once", flush=True)
        ensure_cluster()
        wait_idle()
        result = fn()
        result["retried_after"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        return result


def default_run(**overrides: Any) -> dict[str, Any]:
    """What the ``rllib_train`` DAG resolves for its default Params (+ overrides)."""
    from slurm_ray.params import param_specs, resolve_run

    params = {k: v["default"] for k, v in param_specs().items()}
    params.update(overrides)
    return resolve_run(params)


def wait_idle(timeout: float = 300) -> float:
    """Wait until no job runs on the dev cluster (other sessions share it); returns s waited.

    A job of another user of the cluster would hold our whole-cluster job in
    the queue and take CPU from it. After ``timeout`` the run goes ahead anyway
    (its queue wait is measured and reported separately).
    """
    t0 = time.monotonic()
    cmd = (
        f"end=$((SECONDS+{int(timeout)})); "
        'while [ -n "$(squeue -h -t R,CG,CF -o %i 2>/dev/null)" ]; do '
        "[ $SECONDS -lt $end ] || exit 0; sleep 2; done"
    )
    ssh(cmd, timeout=timeout + 60, check=False)
    return round(time.monotonic() - t0, 1)


def _slurm_ts(value: str | None) -> float | None:
    if not value or value in ("Unknown", "None"):
        return None
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%S").timestamp()


def job_info(job_id: str, attempts: int = 5) -> dict[str, str]:
    """``scontrol show job -o`` as a dict (first occurrence of each key).

    Retried while it has no JobState: munged/slurmctld restarted by another
    session answer nothing for a moment.
    """
    info: dict[str, str] = {}
    for attempt in range(attempts):
        info = {}
        for tok in ssh(f"scontrol show job -o {int(job_id)}", check=False).split():
            k, sep, v = tok.partition("=")
            if sep and k not in info:
                info[k] = v
        if "JobState" in info:
            break
        time.sleep(1.0 + attempt)
    return info


def file_times(path: str) -> tuple[float | None, float | None]:
    """(birth, mtime) of a remote file in epoch seconds with ns resolution."""
    out = ssh(f"stat -c '%.9W %.9Y' -- {shlex.quote(path)}", check=False).split()
    if len(out) != 2:
        return None, None
    birth, mtime = (float(x) for x in out)
    return (birth if birth > 0 else None), mtime


def read_remote(path: str) -> str:
    """A remote file's text ('' if missing)."""
    return ssh(f"cat -- {shlex.quote(path)} 2>/dev/null || true", check=False)


def metrics_summary(rows: list[dict[str, Any]], target: float = TARGET_RETURN) -> dict[str, Any]:
    """Throughput and time-to-target from ``metrics.jsonl`` rows."""
    if not rows:
        return {"iterations": 0}
    last = rows[-1]
    train_s = float(last.get("time_total_s") or 0.0)
    steps = int(last.get("env_steps") or 0)
    per_iter = [r.get("env_steps_per_s") for r in rows]
    hit = next((r for r in rows if (r.get("episode_return_mean") or float("-inf")) >= target), None)
    first_start = float(rows[0]["timestamp"]) - float(rows[0].get("time_this_iter_s") or 0)
    return {
        "iterations": len(rows),
        "first_iter_s": rows[0].get("time_this_iter_s"),
        "env_steps": steps,
        "train_time_s": round(train_s, 3),
        # lifetime steps over summed iteration time: what decides time-to-target
        "env_steps_per_s": round(steps / train_s, 1) if train_s > 0 else None,
        "env_steps_per_s_iter": stats(per_iter),
        "env_steps_per_s_excl_first": stats(per_iter[1:]),
        "time_to_target_s": round(float(hit["time_total_s"]), 3) if hit else None,
        "steps_to_target": int(hit["env_steps"]) if hit else None,
        "iters_to_target": int(hit["iteration"]) if hit else None,
        "t_first_iter_start": round(first_start, 3),
        "t_target": float(hit["timestamp"]) if hit else None,
        "t_last_iter": float(last["timestamp"]),
        "final_return": last.get("episode_return_mean"),
    }


def parse_jsonl(text: str) -> list[dict[str, Any]]:
    """Rows of a JSONL text; the later row wins for a repeated iteration."""
    by_iter: dict[int, dict[str, Any]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        by_iter[int(row.get("iteration", len(by_iter) + 1))] = row
    return [by_iter[k] for k in sorted(by_iter)]


def _queue_wait(info: dict[str, str]) -> float | None:
    sub, start = _slurm_ts(info.get("SubmitTime")), _slurm_ts(info.get("StartTime"))
    return None if sub is None or start is None else max(0.0, start - sub)


def queue_excess(run: dict[str, Any]) -> float:
    """Seconds a job surely waited for nodes beyond normal scheduling.

    Slurm's Submit/StartTime are truncated to whole seconds, so the true wait
    lies within 1 s of their difference: subtracting ``difference - 1`` never
    removes time that was not queueing.
    """
    return max(0.0, float(run.get("queue_wait_s") or 0.0) - 1.0)


def collect_run(run_dir: str, job_id: str) -> dict[str, Any]:
    """Metrics, result and Slurm timestamps of a finished run directory."""
    log_path = f"{run_dir}/slurm-{job_id}.out"
    birth, mtime = file_times(log_path)
    info = job_info(job_id)
    result_text = read_remote(f"{run_dir}/result.json")
    result = json.loads(result_text) if result_text.strip() else {}
    rows = parse_jsonl(read_remote(f"{run_dir}/metrics.jsonl"))
    log = read_remote(log_path)
    ready = re.search(r"cluster ready nodes=(\d+) cpus=(\S+) gpus=\S+ in ([\d.]+)s", log)
    return {
        "job_id": job_id,
        "run_dir": run_dir,
        "state": info.get("JobState"),
        "slurm_submit": info.get("SubmitTime"),
        "slurm_start": info.get("StartTime"),
        "slurm_end": info.get("EndTime"),
        # time in the queue waiting for nodes (Slurm's 1-s timestamps)
        "queue_wait_s": _queue_wait(info),
        "t_job_start": birth,  # the Slurm log's birth time (slurmstepd creates it)
        "t_job_end": mtime,  # the log's last write (the launcher's exit)
        "job_s": round(mtime - birth, 3) if birth and mtime else None,
        "ray_ready_s": float(ready.group(3)) if ready else None,
        "ray_nodes": int(ready.group(1)) if ready else None,
        "ray_cpus": ready.group(2) if ready else None,
        "result": {
            k: result.get(k)
            for k in (
                "status",
                "stop_reason",
                "iterations",
                "env_steps",
                "episode_return_mean",
                "eval_return_mean",
                "env_steps_per_s",
                "wall_s",
                "num_env_runners",
                "env_runner_hostnames",
            )
        },
        "metrics": metrics_summary(rows),
        "log_tail": "\n".join(log.splitlines()[-15:]),
    }


# -- the baseline: the driver in a hand-written batch script ---------------------


def direct_script(run: dict[str, Any], run_dir: str, job_name: str) -> str:
    """The job spec of ``run`` written by hand: launcher + driver, nothing else."""
    spec = run["job_spec"]
    venv = run["environment"]["prefix"]
    directives = [
        f"--job-name={job_name}",
        f"--nodes={spec['nodes']}",
        f"--ntasks-per-node={spec.get('ntasks_per_node', 1)}",
        f"--cpus-per-task={spec['cpus_per_task']}",
        f"--time={spec['time']}",
        "--output=slurm-%j.out",
    ]
    if spec.get("partition"):
        directives.append(f"--partition={spec['partition']}")
    lines = ["#!/bin/bash", *(f"#SBATCH {d}" for d in directives)]
    lines += [
        'echo "BENCH_T_BATCH $(date +%s.%N)"',
        f"cd {shlex.quote(run_dir)}",
        f"source {shlex.quote(venv)}/bin/activate",
        "export RAY_USAGE_STATS_ENABLED=0 MLFLOW_DISABLE_TELEMETRY=true PYTHONUNBUFFERED=1",
        f"export SLURM_RAY_RUN_DIR={shlex.quote(run_dir)} SLURM_RAY_JOIN_TIMEOUT=180",
        "bash ray_launch.sh python -u train.py --config config.json "
        f"--run-dir {shlex.quote(run_dir)}",
        "rc=$?",
        'echo "BENCH_T_END $(date +%s.%N)"',
        "exit $rc",
        "",
    ]
    return "\n".join(lines)


def wait_gone(job_id: str, timeout: float = 1800, every: float = 2.0) -> None:
    """Block until squeue no longer lists the job (one ssh session, light polling)."""
    cmd = (
        f"end=$((SECONDS+{int(timeout)})); "
        f'while [ -n "$(squeue -h -j {int(job_id)} -o %T 2>/dev/null)" ]; do '
        f"[ $SECONDS -lt $end ] || exit 9; sleep {every}; done"
    )
    ssh(cmd, timeout=timeout + 60)


def run_direct(run: dict[str, Any], base: str, label: str) -> dict[str, Any]:
    """Stage the files, ``sbatch`` the hand-written script, wait, collect."""
    run_dir = f"{base}/{label}"
    ssh(f"mkdir -p {shlex.quote(run_dir)}")
    payload = {name: path.read_text() for name, path in DIRECT_FILES.items()}
    payload["config.json"] = json.dumps(run["config"], indent=2, sort_keys=True)
    payload["job.sbatch"] = direct_script(run, run_dir, f"bench-direct-{label}")
    # one ssh call for all files: a python one-liner unpacks a JSON bundle
    unpack = f"cd {shlex.quote(run_dir)} && python3 -c " + shlex.quote(
        "import json,sys\nfor k,v in json.load(sys.stdin).items(): open(k,'w').write(v)"
    )
    ssh(unpack, stdin=json.dumps(payload))
    t_submit = time.time()
    out = ssh(f"cd {shlex.quote(run_dir)} && sbatch --parsable job.sbatch")
    t_sbatch = time.time()
    job_id = out.strip().split(";")[0]
    try:
        wait_gone(job_id)
    finally:
        ssh(f"scancel {int(job_id)}", check=False)
    t_seen_done = time.time()
    data = collect_run(run_dir, job_id)
    log = read_remote(f"{run_dir}/slurm-{job_id}.out")
    marks = {k: float(v) for k, v in re.findall(r"BENCH_T_(\w+) ([\d.]+)", log)}
    if data["state"] != "COMPLETED" or "END" not in marks:
        raise RuntimeError(f"direct job {job_id} ended {data['state']}:\n{data['log_tail']}")
    end = marks["END"]
    data.update(
        {
            "path": "direct",
            "t_submit": t_submit,
            "sbatch_s": round(t_sbatch - t_submit, 3),
            "submit_to_start_s": round(data["t_job_start"] - t_submit, 3),
            "job_end_to_done_s": 0.0,  # the result is on disk when the job ends
            "wall_s": round(end - t_submit, 3),
            "poll_detect_s": round(t_seen_done - end, 3),
        }
    )
    return data


# -- the product path: SlurmRayOperator, deferrable -------------------------------


@dataclass
class FakeTI:
    """The part of a TaskInstance the operator uses (identity + xcom_push)."""

    task_id: str
    dag_id: str
    run_id: str = field(default_factory=lambda: f"manual__{uuid.uuid4().hex[:8]}")
    map_index: int = -1
    try_number: int = 1
    xcom: dict[str, Any] = field(default_factory=dict)

    def xcom_push(self, key: str, value: Any) -> None:
        self.xcom[key] = value


def run_operator(
    run: dict[str, Any], base: str, label: str, *, poll_interval: float = 5.0
) -> dict[str, Any]:
    """``SlurmRayOperator`` as a deferrable task: execute, trigger, execute_complete."""
    from airflow.sdk.exceptions import TaskDeferred
    from slurm_ray import SlurmRayOperator

    op = SlurmRayOperator(
        task_id="train",
        ssh_conn_id=CONN_ID,
        remote_base_dir=base,
        job_spec=run["job_spec"],
        environment=run["environment"],
        config=run["config"],
        poll_interval=poll_interval,
        deferrable=True,
    )
    ti = FakeTI(task_id="train", dag_id="bench_operator", run_id=f"bench__{label}")
    context: dict[str, Any] = {"ti": ti}
    marks: dict[str, float] = {}
    hook = op.hook
    orig_run = hook.run

    def timed_run(command: str, **kwargs: Any) -> Any:
        res = orig_run(command, **kwargs)
        if "sbatch --parsable" in command:
            marks["sbatch_returned"] = time.time()
        return res

    hook.run = timed_run  # type: ignore[method-assign]
    t_exec = time.time()
    try:
        op.execute(context)
        raise RuntimeError("SlurmRayOperator did not defer")
    except TaskDeferred as deferred:
        t_deferred = time.time()
        trigger = deferred.trigger

        async def first_event() -> Any:
            async for event in trigger.run():
                return event
            raise RuntimeError("trigger ended without an event")

        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        try:
            event = asyncio.run(asyncio.wait_for(first_event(), 1800))
        except BaseException:
            job = ti.xcom.get("slurm_job_id")
            if job:
                ssh(f"scancel {int(job)}", check=False)
            raise
        t_event = time.time()
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        trigger_cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
        summary = getattr(op, deferred.method_name)(
            context, event.payload, **(deferred.kwargs or {})
        )
        t_done = time.time()
    hook.close()
    job_id = str(ti.xcom["slurm_job_id"])
    data = collect_run(ti.xcom["run_dir"], job_id)
    if summary.get("state") != "COMPLETED":
        raise RuntimeError(f"operator run ended {summary}")
    start, end = data["t_job_start"], data["t_job_end"]
    data.update(
        {
            "path": "operator",
            "t_submit": t_exec,
            "execute_s": round(t_deferred - t_exec, 3),
            "stage_and_submit_s": round(marks.get("sbatch_returned", t_deferred) - t_exec, 3),
            "submit_to_start_s": round(start - t_exec, 3),
            "job_end_to_event_s": round(t_event - end, 3),
            "execute_complete_s": round(t_done - t_event, 3),
            "job_end_to_done_s": round(t_done - end, 3),
            "wall_s": round(t_done - t_exec, 3),
            "poll_interval_s": poll_interval,
            # CPU the trigger (this process: asyncssh, parsing, log relay) used while waiting
            "trigger_cpu_s": round(trigger_cpu, 3),
            "trigger_wait_s": round(t_event - t_deferred, 3),
        }
    )
    return data


def poll_command_cpu(job_id: str, run_dir: str, repeat: int = 20) -> dict[str, float]:
    """CPU (user+sys, s) the trigger's per-interval poll command costs on the login node.

    The command is the one the trigger sends (states + new bytes of the log and
    metrics), with offsets at the files' ends as in the steady state; measured
    with bash's ``times`` over ``repeat`` runs (sshd's own session cost is not
    included).
    """
    from slurm_ray.slurm.poll import TailRequest, build_poll

    log, metrics = f"{run_dir}/slurm-{job_id}.out", f"{run_dir}/metrics.jsonl"
    sizes = ssh(f"stat -c %s -- {shlex.quote(log)} {shlex.quote(metrics)}").split()
    poll = build_poll(
        [job_id], [TailRequest(log, int(sizes[0])), TailRequest(metrics, int(sizes[1]))]
    )
    data = shlex.quote(poll.stdin.decode())
    script = (
        f"t0=$(date +%s.%N); for i in $(seq {int(repeat)}); do "
        f"printf '%s' {data} | sh -c {shlex.quote(poll.command)} >/dev/null 2>&1; done; "
        "t1=$(date +%s.%N); times; echo WALL $t0 $t1"
    )
    out = ssh(f"bash -c {shlex.quote(script)}")
    # `times`: shell user/sys, then children user/sys ("0m0.012s 0m0.004s")
    lines = [ln for ln in out.splitlines() if ln.strip()]
    nums = []
    for ln in lines[:2]:
        for tok in ln.split():
            m = re.fullmatch(r"(\d+)m([\d.]+)s", tok)
            if m:
                nums.append(int(m.group(1)) * 60 + float(m.group(2)))
    wall = [float(x) for x in lines[-1].split()[1:3]]
    return {
        "cpu_s_per_poll": round(sum(nums) / repeat, 4),
        "wall_s_per_poll": round((wall[1] - wall[0]) / repeat, 4),
    }
