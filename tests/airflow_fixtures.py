"""A real Airflow (`airflow standalone` on PostgreSQL) for end-to-end and fault tests.

Started in its own temp home, port and private Postgres cluster by
scripts/airflow_local.sh, once per test session, and stopped (by process
group) at the end. The session fails at teardown if the API server answered
any request with a 5xx (its access log in standalone.log).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, DevCluster
from tests.mlflow_fixtures import MlflowServer, free_port

AIRFLOW_SCRIPT = ROOT / "scripts" / "airflow_local.sh"
# One line per answered request (Airflow's `http.access` logger, via standalone).
_ACCESS = re.compile(r"\[http\.access\].*\bstatus_code=(\d{3})\b")


class Airflow:
    """A running Airflow and a tiny REST client for it."""

    def __init__(self, home: Path, port: int, env: dict[str, str]) -> None:
        self.home = home
        self.port = port
        self.env = env
        self.base = f"http://127.0.0.1:{port}"
        self._token: str | None = None

    def script(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", str(AIRFLOW_SCRIPT), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env,
        )

    @property
    def token(self) -> str:
        if self._token is None:
            password = json.loads((self.home / "passwords.json").read_text())["admin"]
            body = json.dumps({"username": "admin", "password": password}).encode()
            req = urllib.request.Request(
                f"{self.base}/auth/token", data=body, headers={"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(req, timeout=30) as resp:
                self._token = json.load(resp)["access_token"]
        return self._token

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            f"{self.base}/api/v2{path}",
            data=data,
            method=method,
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, json.load(resp)
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def answered(self) -> list[tuple[int, str]]:
        """(status, access-log line) of every request the API server has answered so far."""
        log = self.home / "standalone.log"
        text = log.read_text(errors="replace") if log.exists() else ""
        return [
            (int(m.group(1)), line)
            for line in text.splitlines()
            if (m := _ACCESS.search(line)) is not None
        ]

    def wait_dag(self, dag_id: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.call("GET", f"/dags/{dag_id}")[0] == 200:
                return
            time.sleep(2)
        raise AssertionError(f"DAG {dag_id} never appeared")

    def ti(self, dag_id: str, run_id: str, task_id: str) -> dict[str, Any]:
        return self.call("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}")[1]

    def end_unfinished_runs(self, cluster: DevCluster) -> list[str]:
        """Fail every queued or running DAG run and cancel the Slurm jobs of its tasks.

        Jobs are found by their work dir, the run's directory (any try, any map index).
        """
        from urllib.parse import quote

        from slurm_ray.operators.identity import sanitize

        status, body = self.call("GET", "/dags/~/dagRuns?state=queued&state=running&limit=100")
        assert status == 200, body
        ended, dirs = [], []
        for run in body["dag_runs"]:
            dag_id, run_id = run["dag_id"], run["dag_run_id"]
            self.call(
                "PATCH", f"/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}", {"state": "failed"}
            )
            ended.append(f"{dag_id}/{run_id}")
            dirs.append(f"/runs/{sanitize(dag_id)}/{sanitize(run_id)}")
        if dirs:
            queue = cluster.ssh("squeue -h --me -o '%i|%Z'", check=False).stdout
            for line in queue.splitlines():
                job_id, _, workdir = line.partition("|")
                if any(d in workdir for d in dirs):
                    cluster.ssh(f"scancel {job_id}", check=False)
                    ended.append(f"job {job_id}")
        return ended

    #: Secrets the slurm_dev connection of this Airflow carries (see secret_connection).
    secrets: tuple[str, ...] = ()

    def leaked_secrets(self, dag_id: str, run_id: str) -> tuple[list[str], int, int]:
        """Where a secret shows in Airflow's own task-log files or the run's REST XCom.

        Returns (leaks, log files read, XCom entries read); the counts let a
        caller check that there was something to search.
        """
        leaks: list[str] = []
        files = [p for p in (self.home / "logs").rglob("*") if p.is_file()]
        for path in files:
            text = path.read_text(errors="replace")
            leaks += [f"{path}: {s[:8]}…" for s in self.secrets if s in text]
        entries = 0
        _, tis = self.call("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances")
        for ti in tis["task_instances"]:
            base = f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{ti['task_id']}"
            _, listing = self.call("GET", f"{base}/xcomEntries?map_index={ti['map_index']}")
            for entry in listing.get("xcom_entries", []):
                status, body = self.call(
                    "GET", f"{base}/xcomEntries/{entry['key']}?map_index={ti['map_index']}"
                )
                assert status == 200, body
                entries += 1
                text = json.dumps(body)
                leaks += [
                    f"xcom {ti['task_id']}/{entry['key']}: {s[:8]}…"
                    for s in self.secrets
                    if s in text
                ]
        return leaks, len(files), entries


def secret_connection(cluster: DevCluster) -> tuple[str, tuple[str, ...]]:
    """The dev cluster's connection with its secrets inline, as a real site would have it.

    The private key in the extras (not a key file), a password and token-like
    extras: every end-to-end run then shows whether any of them leaks.
    """
    key_text = (cluster.state / "ssh" / "id_ed25519").read_text()
    key_lines = [ln.strip() for ln in key_text.splitlines() if ln.strip() and "-----" not in ln]
    conn = json.loads(cluster.env["AIRFLOW_CONN_SLURM_DEV"])
    extra = dict(conn["extra"])
    extra.pop("key_file", None)
    extra.update(private_key=key_text, mlflow_token="s3cr3t-e2e-token")
    extra["api_password"] = "s3cr3t-e2e-api-password"
    conn.update(extra=extra, password="s3cr3t-e2e-passphrase")
    secrets = ("s3cr3t-e2e-token", "s3cr3t-e2e-api-password", "s3cr3t-e2e-passphrase", *key_lines)
    return json.dumps(conn), secrets


@pytest.fixture(scope="session")
def airflow(
    cluster: DevCluster, mlflow_server: MlflowServer, request: pytest.FixtureRequest
) -> Iterator[Airflow]:
    home = Path(tempfile.mkdtemp(prefix="slurm-ray-e2e-airflow-"))
    # Its own Postgres cluster (initdb'd there, owned by `postgres`, socket only).
    pg_dir = Path(tempfile.mkdtemp(prefix="slurm-ray-e2e-pg-"))
    port = free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("AIRFLOW__") and k not in ("AIRFLOW_HOME",)
    }
    env.update(
        SLURM_RAY_AIRFLOW_HOME=str(home),
        SLURM_RAY_AIRFLOW_PORT=str(port),
        SLURM_RAY_AIRFLOW_PG_DIR=str(pg_dir),
        SLURM_RAY_MLFLOW_URI=mlflow_server.url,
    )
    env["AIRFLOW_CONN_SLURM_DEV_OVERRIDE"], secrets = secret_connection(cluster)
    af = Airflow(home, port, env)
    af.secrets = secrets
    started = af.script("start")
    if started.returncode != 0:
        af.script("stop")
        shutil.rmtree(pg_dir, ignore_errors=True)
        pytest.fail(f"airflow did not start:\n{started.stderr[-3000:]}")
    # The secret search means something only if Airflow runs with that connection.
    pid = (home / "standalone.pid").read_text().strip()
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    conn_var = next(v for v in environ if v.startswith(b"AIRFLOW_CONN_SLURM_DEV="))
    assert b"private_key" in conn_var, "Airflow does not use the secret-laden connection"
    db_var = next(v for v in environ if v.startswith(b"AIRFLOW__DATABASE__SQL_ALCHEMY_CONN="))
    assert db_var.split(b"=", 1)[1].startswith(b"postgresql+psycopg2://"), db_var
    try:
        yield af
    finally:
        answered = af.answered()
        errors = [line for status, line in answered if status >= 500]
        af.script("stop")
        shutil.rmtree(pg_dir, ignore_errors=True)
        # Task logs are what one reads after a failure: keep them only then.
        if request.session.testsfailed == 0 and answered and not errors:
            shutil.rmtree(home, ignore_errors=True)
    # Session-wide: no request, from any test, was answered with a server error.
    assert answered, f"no access-log line in {home}/standalone.log: the 5xx check sees nothing"
    assert not errors, f"{len(errors)} 5xx answers from Airflow's API server:\n" + "\n".join(
        errors[:20]
    )


@pytest.fixture(autouse=True)
def _no_run_outlives_its_test(request: pytest.FixtureRequest) -> Iterator[None]:
    """End the runs (and their jobs) a test left unfinished, so the next test
    starts on an idle cluster: in a CI run, a sweep test that failed half-way
    kept retrying on the nodes and failed the next three tests with it."""
    yield
    if "airflow" not in request.fixturenames:
        return
    ended = request.getfixturevalue("airflow").end_unfinished_runs(
        request.getfixturevalue("cluster")
    )
    if ended:
        print(f"ended after {request.node.nodeid}: {', '.join(ended)}")


def trigger(af: Airflow, dag_id: str, conf: dict[str, Any]) -> tuple[int, Any]:
    return af.call("POST", f"/dags/{dag_id}/dagRuns", {"logical_date": None, "conf": conf})
