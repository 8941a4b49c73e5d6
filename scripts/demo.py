"""`make demo`: trigger rllib_train on the local stack and report the result.

The Makefile has already built the environments and started the dev
cluster, MLflow and Airflow. This script triggers the `rllib_train` DAG over
Airflow's REST API, follows it (task states, live return from MLflow), and
prints a summary. It leaves everything running; `make down` stops it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

STATE = Path(os.environ.get("SLURM_RAY_DEV_STATE", "/var/lib/slurm-ray-dev"))
AIRFLOW = f"http://127.0.0.1:{os.environ.get('SLURM_RAY_AIRFLOW_PORT', '8080')}"
MLFLOW = os.environ.get("SLURM_RAY_MLFLOW_URI", "http://127.0.0.1:5055")
TERMINAL = {"success", "failed"}


def airflow_home() -> Path:
    return Path(os.environ.get("SLURM_RAY_AIRFLOW_HOME", STATE / "airflow"))


class Api:
    """The smallest Airflow REST client: a token and JSON requests."""

    def __init__(self, base: str, user: str, password: str) -> None:
        self.base = base
        body = json.dumps({"username": user, "password": password}).encode()
        req = urllib.request.Request(
            f"{base}/auth/token", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            self.token = json.load(resp)["access_token"]

    def call(self, method: str, path: str, body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            f"{self.base}/api/v2{path}",
            data=data,
            method=method,
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.load(resp)


def mlflow_latest(run_id: str) -> dict[str, float]:
    """Latest metrics of an MLflow run (REST; no client library needed here)."""
    try:
        with urllib.request.urlopen(
            f"{MLFLOW}/api/2.0/mlflow/runs/get?run_id={run_id}", timeout=10
        ) as r:
            run = json.load(r)["run"]
    except (urllib.error.URLError, KeyError, ValueError):
        return {}
    return {m["key"]: m["value"] for m in run.get("data", {}).get("metrics", [])}


def wait_for_dag(api: Api, dag_id: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            api.call("GET", f"/dags/{dag_id}")
            return
        except urllib.error.HTTPError as exc:
            if exc.code != 404 or time.monotonic() > deadline:
                raise
        time.sleep(2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--conf", default="{}", help="JSON conf for the DAG run (overrides Params)")
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args()
    conf = json.loads(args.conf)

    password = json.loads((airflow_home() / "passwords.json").read_text())["admin"]
    api = Api(AIRFLOW, "admin", password)
    wait_for_dag(api, "rllib_train")
    started = time.monotonic()
    run = api.call("POST", "/dags/rllib_train/dagRuns", {"logical_date": None, "conf": conf})
    run_id = run["dag_run_id"]
    print(f"[demo] triggered rllib_train run {run_id}", flush=True)

    seen: dict[str, str] = {}
    mlflow_run = None
    last_progress = 0.0
    state = run["state"]
    while state not in TERMINAL:
        if time.monotonic() - started > args.timeout:
            print(
                f"[demo] gave up after {args.timeout:.0f}s; the run goes on in Airflow",
                file=sys.stderr,
            )
            return 1
        time.sleep(3)
        state = api.call("GET", f"/dags/rllib_train/dagRuns/{run_id}")["state"]
        tis = api.call("GET", f"/dags/rllib_train/dagRuns/{run_id}/taskInstances")["task_instances"]
        for ti in tis:
            if seen.get(ti["task_id"]) != ti["state"]:
                seen[ti["task_id"]] = ti["state"]
                print(
                    f"[demo] {time.monotonic() - started:6.1f}s  {ti['task_id']:<14} {ti['state']}",
                    flush=True,
                )
        if mlflow_run is None and seen.get("train") in ("deferred", "running", "success"):
            try:
                mlflow_run = api.call(
                    "GET",
                    f"/dags/rllib_train/dagRuns/{run_id}/taskInstances/train/xcomEntries/mlflow_run_id",
                )["value"]
            except urllib.error.HTTPError:
                mlflow_run = None
        if mlflow_run and time.monotonic() - last_progress > 10:
            last_progress = time.monotonic()
            m = mlflow_latest(str(mlflow_run).strip('"'))
            if "iteration" in m:
                print(
                    f"[demo]         iteration {m['iteration']:.0f}  return {m.get('episode_return_mean', float('nan')):.1f}"
                    f"  steps {m.get('env_steps', 0):.0f}  ({m.get('env_steps_per_s', 0):.0f} steps/s)",
                    flush=True,
                )

    wall = time.monotonic() - started
    if state != "success":
        failed = [t for t, s in seen.items() if s in ("failed", "upstream_failed")]
        print(
            f"[demo] rllib_train run {run_id} FAILED at {failed}; see the task logs in the UI",
            file=sys.stderr,
        )
        return 1

    def xcom(task: str, key: str = "return_value") -> Any:
        value = api.call(
            "GET", f"/dags/rllib_train/dagRuns/{run_id}/taskInstances/{task}/xcomEntries/{key}"
        )["value"]
        return json.loads(value) if isinstance(value, str) and value[:1] in "{[" else value

    summary = xcom("train")
    registered = xcom("register_model")
    promoted = xcom("promote")
    print("\n=== slurm_ray demo: done ===")
    print(f"Airflow UI   {AIRFLOW}  (login admin / {password}; DAG rllib_train, run {run_id})")
    print(f"MLflow UI    {MLFLOW}  (experiment rllib_train, run {summary.get('mlflow_run_id')})")
    print(
        f"Slurm job    {summary.get('job_id')} on {summary.get('nodelist')}  ({summary.get('run_dir')})"
    )
    print(
        f"Training     {summary.get('iterations')} iterations, {summary.get('env_steps')} env steps, "
        f"mean return {summary.get('episode_return_mean')}, greedy eval {summary.get('eval_return_mean')}"
    )
    print(
        f"Model        {registered.get('model_name')} version {registered.get('model_version')}"
        f"  (champion: {'yes' if promoted.get('promoted') else 'no'}; {promoted.get('reason', '')})"
    )
    print(f"Wall time    {wall:.0f}s from trigger to registered model")
    print("Stop everything with: make down")
    return 0


if __name__ == "__main__":
    sys.exit(main())
