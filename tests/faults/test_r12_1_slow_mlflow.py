"""R12.1 (issue 12 item 1): a slow MLflow server loses no metric row.

A real training job on both nodes; its live relay talks to MLflow through a
loopback proxy that holds every request 3 s. Relaying one batch then takes
several poll intervals, so polls queue up behind it, each built from an offset
that the one before moves on. Every ``metrics.jsonl`` row must still reach
MLflow exactly once, in order, and through the live relay itself (the proxy
sees each step once, ascending), not only through the completion catch-up.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import math
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import pytest
from airflow.sdk.exceptions import TaskDeferred

from tests.cluster.test_operator import FakeTI, make_op
from tests.conftest import DevCluster
from tests.faults.conftest import trials
from tests.mlflow_fixtures import MlflowServer

pytestmark = [pytest.mark.faults, pytest.mark.cluster, pytest.mark.slow]

DELAY_S = 3.0
CONFIG = {
    "num_env_runners": 1,
    "num_envs_per_env_runner": 4,
    "train_batch_size": 1000,
    "minibatch_size": 250,
    "num_epochs": 2,
    # Stopped by time: rows keep coming (about one a second) for many relay
    # calls; each call waits 6-9 s, so several polls queue behind it.
    "stop": {"minutes": 1.0},
    "checkpoint_every": 20,
    "eval_episodes": 1,
}
KEYS = ("episode_return_mean", "env_steps", "episode_len_mean")


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


class SlowProxy:
    """HTTP proxy on loopback: every request waits ``delay`` s, then goes upstream.

    It records the ``iteration`` steps of each ``log-batch`` it forwards, in
    the order they went out: what the live relay delivered.
    """

    def __init__(self, upstream: str, delay: float) -> None:
        self.upstream = urlsplit(upstream)
        self.delay = delay
        self.requests = 0
        self.sent_steps: list[int] = []
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                time.sleep(proxy.delay)
                conn = http.client.HTTPConnection(
                    proxy.upstream.hostname, proxy.upstream.port, timeout=60
                )
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                if self.path.endswith("/runs/log-batch") and resp.status == 200:
                    proxy._note_batch(body)
                with proxy.lock:
                    proxy.requests += 1
                self.send_response(resp.status)
                for key, value in resp.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()

            do_GET = do_POST = do_PATCH = do_DELETE = _forward

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _note_batch(self, body: bytes) -> None:
        metrics = json.loads(body or b"{}").get("metrics") or []
        steps = [int(m["step"]) for m in metrics if m.get("key") == "iteration"]
        with self.lock:
            self.sent_steps.extend(steps)

    def __enter__(self) -> SlowProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def slow_mlflow(mlflow_server: MlflowServer) -> Iterator[SlowProxy]:
    with SlowProxy(mlflow_server.url, DELAY_S) as proxy:
        yield proxy


@pytest.mark.parametrize("trial", range(trials()))
def test_r12_1_slow_mlflow_loses_no_row(
    cluster: DevCluster, mlflow_server: MlflowServer, slow_mlflow: SlowProxy, faults, trial: int
) -> None:
    from mlflow.tracking import MlflowClient
    from slurm_ray.triggers.slurm_job import SlurmJobTrigger

    def body() -> float:
        ti = FakeTI(task_id="slowmlflow")
        op = make_op(
            cluster,
            "slowmlflow",
            config=CONFIG,
            job_spec={"nodes": 2, "cpus_per_task": 1, "time": "15"},
            mlflow={"tracking_uri": mlflow_server.url, "experiment_name": "faults_r12_1"},
        )
        with pytest.raises(TaskDeferred) as deferred:
            op.execute({"ti": ti})
        job_id = ti.xcom["slurm_job_id"]
        try:
            # The live relay (the triggerer's) goes through the slow proxy; the
            # operator's own calls stay direct so that only the relay is slow.
            _, kwargs = deferred.value.trigger.serialize()
            assert kwargs["poll_interval"] * 2 < DELAY_S, "the relay must lag the polls"
            kwargs["relay"] = {**kwargs["relay"], "tracking_uri": slow_mlflow.url}
            trigger = SlurmJobTrigger(**kwargs)

            async def first_event() -> Any:
                async for event in trigger.run():
                    return event
                raise AssertionError("trigger ended without an event")

            started = time.monotonic()
            event = asyncio.run(asyncio.wait_for(first_event(), 900))
            relayed_s = time.monotonic() - started
            assert event.payload["status"] == "terminal", event.payload
            live = list(slow_mlflow.sent_steps)
            op.execute_complete({"ti": ti}, event.payload, **(deferred.value.kwargs or {}))
        finally:
            cluster.ssh(f"scancel {job_id}", check=False)

        run_dir = ti.xcom["run_dir"]
        rows = [
            json.loads(line)
            for line in cluster.ssh(f"cat {run_dir}/metrics.jsonl").stdout.splitlines()
            if line.strip()
        ]
        expected = [int(r["iteration"]) for r in rows]
        assert expected == list(range(1, len(rows) + 1)), expected
        assert len(rows) >= 15, f"too short a job to queue polls behind the relay: {expected}"
        # Through the slow relay itself: each step once, ascending, none missing.
        assert live == expected, f"live relay sent {live}, metrics.jsonl has {expected}"
        client = MlflowClient(mlflow_server.url)
        run_id = ti.xcom["mlflow_run_id"]
        for key in KEYS:
            history = client.get_metric_history(run_id, key)
            # An iteration that ended no episode has no return: no row for that key.
            having = {int(r["iteration"]): r[key] for r in rows if _finite(r.get(key))}
            assert sorted(m.step for m in history) == sorted(having), key
            for m in history:
                assert m.value == pytest.approx(having[m.step]), (key, m.step)
        assert slow_mlflow.requests >= 3, slow_mlflow.requests
        return relayed_s

    faults.trial("R12.1")(body)
