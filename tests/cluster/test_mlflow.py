"""MLflow tracking against a real tracking server (and the real cluster for the model).

Needs the ``mlflow_server`` fixture (tests/mlflow_fixtures.py, imported by
tests/conftest.py). The model test trains a 2-iteration PPO on CartPole over
SSH in the cluster venv, exports it with include/export_model.py, logs and
registers it from the Airflow side (mlflow-skinny only), then loads
``models:/NAME/VERSION`` back on the cluster and plays an episode.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import posixpath
import shlex
import struct
import time
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH
from slurm_ray.mlflow.artifacts import finalize_run
from slurm_ray.mlflow.compare import PALETTE as _PALETTE
from slurm_ray.mlflow.compare import compare_runs
from slurm_ray.mlflow.errors import MlflowError, MlflowUnreachableError
from slurm_ray.mlflow.keys import task_identity_tags
from slurm_ray.mlflow.plot import RemotePlotter
from slurm_ray.mlflow.reachability import check_reachable
from slurm_ray.mlflow.registry import promote_if_better
from slurm_ray.mlflow.relay import (
    MetricsRelay,
    make_async_sink,
    make_relay,
    parse_metrics_jsonl,
    relay_rows,
)
from slurm_ray.mlflow.runs import end_run, ensure_run, record_job
from slurm_ray.mlflow.settings import MlflowSettings

from tests.conftest import ROOT, DevCluster
from tests.mlflow_fixtures import MlflowServer

pytestmark = pytest.mark.cluster
log = logging.getLogger("test_mlflow")


def settings_for(server: MlflowServer, **kw: Any) -> MlflowSettings:
    return MlflowSettings(
        tracking_uri=server.url,
        experiment_name=kw.pop("experiment", f"t-{uuid.uuid4().hex[:8]}"),
        **kw,
    )


def client(server: MlflowServer):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=server.url, registry_uri=server.url)


def rows(first: int, last: int) -> list[dict[str, Any]]:
    """metrics.jsonl-like rows for iterations first..last (inclusive)."""
    return [
        {
            "iteration": i,
            "env_steps": 1000 * i,
            "episode_return_mean": 10.0 + i,
            "episode_len_mean": None,  # None is skipped, never sent
            "policy_loss": 0.5 / i,
            "timestamp": 1_700_000_000 + i,
        }
        for i in range(first, last + 1)
    ]


def steps_of(server: MlflowServer, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client(server).get_metric_history(run_id, key))


def task_tags(**kw: Any) -> dict[str, str]:
    return task_identity_tags(
        kw.get("dag_id", "dag"),
        kw.get("run_id", f"manual__{uuid.uuid4().hex[:6]}"),
        "train",
        kw.get("map_index"),
    )


# -- reachability, runs, params -----------------------------------------------------


@contextlib.contextmanager
def hanging_up_server() -> Iterator[tuple[str, list[int]]]:
    """A loopback port that accepts each connection and closes it at once; counts them."""
    import socket
    import threading

    srv = socket.create_server(("127.0.0.1", 0))
    accepted: list[int] = []

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = srv.accept()
                accepted.append(1)
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.getsockname()[1]}", accepted
    finally:
        srv.close()


def test_check_reachable(mlflow_server: MlflowServer) -> None:
    check_reachable(settings_for(mlflow_server))
    with hanging_up_server() as (dead, accepted):
        with pytest.raises(MlflowUnreachableError) as err:
            check_reachable(MlflowSettings(dead, "x", request_timeout=2))
        assert dead in str(err.value) and "relay_later" in str(err.value)
        # no retry loop before failing: one connection, counted (not timed)
        assert len(accepted) == 1, accepted


def test_ensure_run_same_task_same_run_params_truncated(mlflow_server: MlflowServer) -> None:
    settings = settings_for(mlflow_server)
    tags = task_tags()
    config = {
        "env": "CartPole-v1",
        "algo": {"lr": 5e-5, "model": {"fcnet_hiddens": [64, 64]}},
        "huge": "x" * 20_000,  # over MLflow's 6000-character param limit
        "bad key/with::chars?": 1,
    }
    run_id = ensure_run(settings, tags=tags, params=config)
    c = client(mlflow_server)
    run = c.get_run(run_id)
    params = run.data.params
    assert params["algo.lr"] == "5e-05"
    assert params["algo.model.fcnet_hiddens"] == "[64, 64]"
    assert len(params["huge"]) == MAX_PARAM_VAL_LENGTH and params["huge"].endswith("[truncated]")
    assert run.data.tags["slurm_ray.params_truncated"] == "true"
    assert "huge" in run.data.tags["slurm_ray.params_truncated_keys"]
    assert run.data.tags["slurm_ray.task_id"] == "train"

    # A retry of the same task: the same run, back to RUNNING; a changed value
    # (params are immutable in MLflow) is recorded, not raised.
    end_run(settings, run_id, "FAILED")
    again = ensure_run(settings, tags=tags, params={**config, "env": "Acrobot-v1"})
    assert again == run_id
    run = c.get_run(run_id)
    assert run.info.status == "RUNNING"
    assert run.data.tags["slurm_ray.params_conflict"] == "env"

    other = ensure_run(settings, tags={**tags, "map_index": "3"}, params=config)
    assert other != run_id

    record_job(settings, run_id, job_id="101", try_number=1, nodelist="n[1-2]", num_nodes=2)
    record_job(settings, run_id, job_id="102", try_number=2, cluster="dev")
    tags_now = c.get_run(run_id).data.tags
    assert tags_now["slurm_ray.slurm_job_ids"] == "101,102"
    assert tags_now["slurm_ray.slurm_job_id"] == "102"
    assert tags_now["slurm_ray.nodelist"] == "n[1-2]" and tags_now["slurm_ray.try_number"] == "2"


# -- metrics relay --------------------------------------------------------------------


async def test_relay_logs_each_step_once(mlflow_server: MlflowServer) -> None:
    settings = settings_for(mlflow_server)
    run_id = ensure_run(settings, tags=task_tags())
    relay = make_relay(settings, run_id=run_id)
    json.dumps(relay)  # the trigger stores it

    sink = make_async_sink(relay, log)
    await sink(rows(1, 5))
    await sink(rows(3, 8))  # overlap: 3..5 again
    # "Triggerer restart": a new relay re-reads metrics.jsonl from offset 0.
    await make_async_sink(relay, log)(rows(1, 10))
    # The operator's catch-up at completion, and a retried task's catch-up.
    stats = relay_rows(relay, rows(1, 12))
    assert stats.sent == 2 and stats.skipped == 10
    assert relay_rows(relay, rows(1, 12)).sent == 0

    for key in ("episode_return_mean", "env_steps", "policy_loss", "iteration"):
        assert steps_of(mlflow_server, run_id, key) == list(range(1, 13)), key
    assert steps_of(mlflow_server, run_id, "episode_len_mean") == []
    hist = client(mlflow_server).get_metric_history(run_id, "env_steps")
    assert {m.step: m.timestamp for m in hist}[4] == (1_700_000_000 + 4) * 1000


async def test_relay_survives_server_outage(
    mlflow_server: MlflowServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.utils import rest_utils

    requests: list[int | None] = []
    real_request = rest_utils.http_request

    def counting_request(*args: Any, **kwargs: Any) -> Any:
        requests.append(kwargs.get("max_retries"))
        return real_request(*args, **kwargs)

    monkeypatch.setattr(rest_utils, "http_request", counting_request)
    settings = settings_for(mlflow_server)
    run_id = ensure_run(settings, tags=task_tags())
    relay = make_relay(settings, run_id=run_id)
    sink = make_async_sink(relay, log)
    assert isinstance(sink, MetricsRelay)
    await sink(rows(1, 3))

    mlflow_server.stop()
    try:
        requests.clear()
        await sink(rows(4, 6))  # no exception; rows wait in memory
        assert sink.pending == 3
        await sink(rows(7, 7))
        assert sink.pending == 4
        # one request per call and no retry loop in MLflow's client (counted, not timed)
        assert requests == [0, 0], requests
    finally:
        mlflow_server.start()

    await sink(rows(8, 9))
    assert sink.pending == 0
    assert steps_of(mlflow_server, run_id, "episode_return_mean") == list(range(1, 10))


async def test_relay_later_creates_the_run_when_the_server_is_back(
    mlflow_server: MlflowServer,
) -> None:
    settings = settings_for(mlflow_server, relay_later=True)
    tags = task_tags()
    relay = make_relay(settings, run_id=None, tags=tags)
    sink = make_async_sink(relay, log)
    await sink(rows(1, 4))
    assert sink.pending == 0 and sink.run_id
    # At completion the operator finds the same run and adds the params.
    assert ensure_run(settings, tags=tags, params={"lr": 0.1}) == sink.run_id
    assert steps_of(mlflow_server, sink.run_id, "env_steps") == [1, 2, 3, 4]


async def test_sink_does_not_block_the_event_loop(mlflow_server: MlflowServer) -> None:
    settings = settings_for(mlflow_server)
    run_id = ensure_run(settings, tags=task_tags())
    sink = make_async_sink(make_relay(settings, run_id=run_id), log)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.005)

    task = asyncio.create_task(ticker())
    await sink(rows(1, 200))
    task.cancel()
    assert ticks > 3, "the loop kept running while the batch was sent"
    assert steps_of(mlflow_server, run_id, "iteration") == list(range(1, 201))


# -- promotion ------------------------------------------------------------------------


def _version_with(server: MlflowServer, settings: MlflowSettings, name: str, value: float) -> str:
    from mlflow.entities import Metric

    c = client(server)
    run_id = ensure_run(settings, tags=task_tags())
    c.log_batch(run_id, metrics=[Metric("eval_return_mean", value, int(time.time() * 1000), 1)])
    with contextlib.suppress(Exception):  # exists after the first version
        c.create_registered_model(name)
    mv = c.create_model_version(
        name, source=f"{c.get_run(run_id).info.artifact_uri}/model", run_id=run_id
    )
    return str(mv.version)


def test_promotion_moves_alias_only_when_better_by_margin(mlflow_server: MlflowServer) -> None:
    settings = settings_for(mlflow_server, min_improvement=5.0)
    name = f"promo-{uuid.uuid4().hex[:6]}"
    c = client(mlflow_server)

    v1 = _version_with(mlflow_server, settings, name, 100.0)
    d1 = promote_if_better(settings, name, v1)
    assert d1["promoted"] and d1["champion"] is None and d1["new"] == 100.0

    v2 = _version_with(mlflow_server, settings, name, 103.0)  # better, but by < 5
    d2 = promote_if_better(settings, name, v2)
    assert not d2["promoted"] and (d2["new"], d2["champion"]) == (103.0, 100.0)
    assert c.get_model_version_by_alias(name, "champion").version == v1
    run2 = c.get_run(c.get_model_version(name, v2).run_id)
    assert run2.data.tags["slurm_ray.promotion.decision"] == "kept"
    assert run2.data.metrics["promotion.champion"] == 100.0
    assert run2.data.metrics["promotion.new"] == 103.0

    v3 = _version_with(mlflow_server, settings, name, 105.0)  # exactly the margin
    assert promote_if_better(settings, name, v3)["promoted"]
    assert c.get_model_version_by_alias(name, "champion").version == v3

    v4 = _version_with(mlflow_server, settings, name, 50.0)
    assert not promote_if_better(settings, name, v4)["promoted"]
    # An explicit margin overrides the settings'.
    assert promote_if_better(settings, name, v2, min_improvement=0)["promoted"] is False
    v5 = _version_with(mlflow_server, settings, name, 106.0)
    assert promote_if_better(settings, name, v5, min_improvement=0.5)["promoted"]
    assert c.get_model_version_by_alias(name, "champion").version == v5
    assert promote_if_better(settings, name, v5)["reason"].endswith("already is the champion")


def test_promotion_by_return_per_node_hour(mlflow_server: MlflowServer) -> None:
    """A cheaper run with a lower return wins by return per node-hour, not by return."""
    settings = settings_for(mlflow_server, min_improvement=0.0)
    name = f"promo-cost-{uuid.uuid4().hex[:6]}"
    c = client(mlflow_server)

    def version(ret: float, node_hours: float) -> str:
        v = _version_with(mlflow_server, settings, name, ret)
        c.log_metric(c.get_model_version(name, v).run_id, "slurm.node_hours", node_hours)
        return v

    big, cheap = version(400.0, 0.5), version(300.0, 0.1)
    assert promote_if_better(settings, name, big, metric="return_per_node_hour")["new"] == 800.0
    assert not promote_if_better(settings, name, cheap)["promoted"]  # 300 < 400
    d = promote_if_better(settings, name, cheap, metric="return_per_node_hour")
    assert d["promoted"] and (d["new"], d["champion"]) == (3000.0, 800.0)
    run = c.get_run(c.get_model_version(name, cheap).run_id)
    assert run.data.tags["slurm_ray.promotion.metric"] == "return_per_node_hour"
    assert run.data.metrics["promotion.new"] == 3000.0


# -- comparison -----------------------------------------------------------------------


def _unfilter(raw: bytes, width: int, height: int, bpp: int = 3) -> bytes:
    """The pixel bytes of a non-interlaced PNG: each row's filter (PNG spec 9.2) undone."""
    stride, out, prev = width * bpp, bytearray(), bytearray(width * bpp)
    for y in range(height):
        kind, row = (
            raw[y * (stride + 1)],
            bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)]),
        )
        for i in range(stride):
            a = row[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if kind == 1:
                row[i] = (row[i] + a) & 0xFF
            elif kind == 2:
                row[i] = (row[i] + b) & 0xFF
            elif kind == 3:
                row[i] = (row[i] + (a + b) // 2) & 0xFF
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                row[i] = (row[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        out += row
        prev = row
    return bytes(out)


def _png_info(data: bytes) -> tuple[int, int, set[bytes]]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    ihdr = data[16:29]
    assert zlib.crc32(b"IHDR" + ihdr) == struct.unpack(">I", data[29:33])[0]
    width, height, depth, color = struct.unpack(">IIBB", ihdr[:10])
    assert (depth, color) == (8, 2)
    pos, idat = 33, b""
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        if kind == b"IDAT":
            idat += data[pos + 8 : pos + 8 + length]
        pos += 12 + length
    raw = zlib.decompress(idat)
    assert len(raw) == height * (1 + width * 3)
    # matplotlib's PNG (Pillow) filters its rows; the old hand-written one did not
    pixels = _unfilter(raw, width, height)
    colors = {pixels[i : i + 3] for i in range(0, len(pixels) - 3, 3 * 7)}
    return width, height, colors


def test_compare_runs_plot_table_best(
    mlflow_server: MlflowServer, cluster: DevCluster, tmp_path: Path
) -> None:
    from mlflow.entities import Metric
    from slurm_ray.hooks.slurm import SlurmHook

    settings = settings_for(mlflow_server)
    c = client(mlflow_server)
    run_ids = []
    for k, final in enumerate((120.0, 310.0, 250.0)):
        run_id = ensure_run(settings, tags=task_tags(map_index=k), params={"lr": 10.0**-k})
        relay_rows(
            make_relay(settings, run_id=run_id),
            [
                {"iteration": i, "env_steps": 4000 * i, "episode_return_mean": final * i / 8}
                for i in range(1, 9)
            ],
        )
        c.log_batch(run_id, metrics=[Metric("eval_return_mean", final, 0, 8)])
        run_ids.append(run_id)

    hook = SlurmHook("slurm_dev")
    # the figure is drawn with matplotlib in the cluster venv, over SSH
    plotter = RemotePlotter(hook, {"kind": "venv", "prefix": str(cluster.venv)})
    try:
        out = compare_runs(
            settings,
            run_ids,
            parent_run_name="sweep",
            tags={"sweep": uuid.uuid4().hex},
            plotter=plotter,
        )
    finally:
        hook.close()
    assert out["best_run_id"] == run_ids[1] and out["best_value"] == 310.0
    parent = out["parent_run_id"]
    assert c.get_run(parent).data.tags["slurm_ray.best_run_id"] == run_ids[1]
    assert c.get_run(run_ids[0]).data.tags["mlflow.parentRunId"] == parent
    files = {a.path for a in c.list_artifacts(parent, "comparison")}
    assert files == {"comparison/learning_curves.png", "comparison/runs.csv", "comparison/runs.md"}

    png = Path(c.download_artifacts(parent, "comparison/learning_curves.png", str(tmp_path)))
    assert 10_000 < png.stat().st_size < 1_000_000, png.stat().st_size
    width, height, colors = _png_info(png.read_bytes())
    assert (width, height) == (960, 600)
    palette = {bytes(rgb) for rgb in _PALETTE[:3]}
    assert palette <= colors, "one coloured line per run"
    csv_text = Path(c.download_artifacts(parent, "comparison/runs.csv", str(tmp_path))).read_text()
    assert csv_text.count("\n") == 4 and "310.0" in csv_text
    header = csv_text.splitlines()[0].split(",")
    # both figures side by side: the return and the return per node-hour it cost
    assert {"eval_return_mean", "slurm.node_hours", "return_per_node_hour"} <= set(header)


# -- the model: export on the cluster, log + register from Airflow, load on the cluster ----

TINY_PPO = r"""
import json, os, shutil, sys, tempfile, time
from pathlib import Path
run_dir = Path(sys.argv[1])
import ray
from ray.rllib.algorithms.ppo import PPOConfig
# Not Ray's default /tmp/ray: world-writable, and it stays.
ray_tmp = tempfile.mkdtemp(prefix="rs-test-")
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=ray_tmp)
algo = (
    PPOConfig().environment("CartPole-v1")
    .env_runners(num_env_runners=0)
    .training(train_batch_size_per_learner=256, minibatch_size=64, num_epochs=1)
    .build_algo()
)
with open(run_dir / "metrics.jsonl", "w") as fh:
    for _ in range(2):
        r = algo.train()
        fh.write(json.dumps({
            "iteration": r["training_iteration"],
            "env_steps": r["num_env_steps_sampled_lifetime"],
            "episode_return_mean": r["env_runners"].get("episode_return_mean"),
            "timestamp": time.time(),
        }) + "\n")
ckpt = run_dir / "checkpoints" / "iter_000002"
algo.save_to_path(str(ckpt))
ret = r["env_runners"].get("episode_return_mean")
(run_dir / "result.json").write_text(json.dumps({
    "status": "succeeded", "stop_reason": "iterations", "iterations": 2,
    "env_steps": r["num_env_steps_sampled_lifetime"], "episode_return_mean": ret,
    "eval_return_mean": ret, "eval_episodes": 3, "wall_s": 12.5,
    "checkpoint": str(ckpt),
    "rl_module_checkpoint": str(ckpt / "learner_group/learner/rl_module/default_policy"),
    "config": {"env": "CartPole-v1"},
}))
algo.stop()
ray.shutdown()
shutil.rmtree(ray_tmp, ignore_errors=True)
"""

PLAY = r"""
import json, sys, tempfile
import gymnasium as gym, mlflow, mlflow.pyfunc, numpy as np
mlflow.set_tracking_uri(sys.argv[1])
# MLflow downloads a registry model to a temp dir it never removes.
dst = tempfile.TemporaryDirectory(prefix="rs-test-model-")
model = mlflow.pyfunc.load_model(sys.argv[2], dst_path=dst.name)
env = gym.make("CartPole-v1")
obs, _ = env.reset(seed=0)
total, done, actions = 0.0, False, set()
while not done:
    a = model.predict(np.asarray([obs], dtype=np.float32))
    actions.add(int(a[0]))
    obs, r, term, trunc, _ = env.step(int(a[0]))
    total += r
    done = term or trunc
batch = model.predict(np.zeros((5, 4), dtype=np.float32))
print(json.dumps({"return": total, "actions": sorted(actions), "batch": batch.tolist()}))
"""


@pytest.fixture(scope="module")
def trained_run(cluster: DevCluster) -> Iterator[tuple[str, Any]]:
    """A finished run directory on the cluster: tiny PPO + export_model.py, as slurmray."""
    from slurm_ray.hooks.slurm import SlurmHook

    hook = SlurmHook("slurm_dev")
    run_dir = cluster.new_dir("mlflow-run")
    hook.upload_bytes(TINY_PPO.encode(), posixpath.join(run_dir, "tiny_ppo.py"))
    hook.upload_bytes(
        (ROOT / "include" / "export_model.py").read_bytes(),
        posixpath.join(run_dir, "export_model.py"),
    )
    hook.upload_bytes(
        b"#!/bin/bash\n#SBATCH --nodes=1\necho hi\n", posixpath.join(run_dir, "job.sbatch")
    )
    hook.upload_bytes(b"training log line\n", posixpath.join(run_dir, "slurm-4242.out"))
    hook.upload_bytes(
        json.dumps({"env": "CartPole-v1"}).encode(), posixpath.join(run_dir, "config.json")
    )
    py = shlex.quote(str(cluster.venv / "bin" / "python"))
    env = "export RAY_USAGE_STATS_ENABLED=0 MLFLOW_DISABLE_TELEMETRY=true"
    rd = shlex.quote(run_dir)
    started = time.monotonic()
    cluster.ssh(f"{env}; cd {rd} && {py} tiny_ppo.py {rd}", timeout=300)
    trained = time.monotonic()
    proc = cluster.ssh(f"{env}; cd {rd} && {py} export_model.py --run-dir {rd}", timeout=300)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    log.info("tiny PPO %.1fs, export+verify %.1fs", trained - started, time.monotonic() - trained)
    assert summary["obs_shape"] == [4] and summary["verified_action"][0] in (0, 1)
    yield run_dir, hook
    hook.close()


@pytest.mark.slow
def test_export_finalize_register_load_and_play(
    mlflow_server: MlflowServer, cluster: DevCluster, trained_run: tuple[str, Any]
) -> None:
    run_dir, hook = trained_run
    name = f"cartpole-{uuid.uuid4().hex[:6]}"
    settings = settings_for(mlflow_server, registered_model_name=name)
    tags = task_tags()
    run_id = ensure_run(settings, tags=tags, params={"env": "CartPole-v1"})
    metrics = parse_metrics_jsonl(hook.read_file(posixpath.join(run_dir, "metrics.jsonl")) or b"")
    assert relay_rows(make_relay(settings, run_id=run_id), metrics).sent == 2

    started = time.monotonic()
    out = finalize_run(settings, run_id, hook=hook, run_dir=run_dir, job_id="4242", result=None)
    log.info("finalize_run %.1fs", time.monotonic() - started)
    assert out["mlflow_run_id"] == run_id and out["model_name"] == name
    assert out["model_uri"] == f"models:/{name}/{out['model_version']}"

    c = client(mlflow_server)
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["eval_episodes"] == 3.0 and "eval_return_mean" in run.data.metrics
    assert run.data.tags["slurm_ray.result.stop_reason"] == "iterations"
    top = {a.path for a in c.list_artifacts(run_id)}
    assert {"slurm", "result.json", "config.json", "metrics.jsonl", "checkpoint", "model"} <= top
    assert {a.path for a in c.list_artifacts(run_id, "slurm")} == {
        "slurm/job.sbatch",
        "slurm/slurm-4242.out",
    }
    assert "model/MLmodel" in {a.path for a in c.list_artifacts(run_id, "model")}
    assert "checkpoint/iter_000002/rllib_checkpoint.json" in {
        a.path for a in c.list_artifacts(run_id, "checkpoint/iter_000002")
    }
    mv = c.get_model_version(name, out["model_version"])
    assert mv.run_id == run_id and mv.status == "READY"

    # A retried finalize: same version, no second one.
    again = finalize_run(settings, run_id, hook=hook, run_dir=run_dir, job_id="4242", result=None)
    assert again["model_version"] == out["model_version"]
    assert len(c.search_model_versions(f"name = '{name}'")) == 1

    # Promotion of the first version: no champion yet.
    assert promote_if_better(settings, name, out["model_version"])["promoted"]

    # Load it back on the cluster side (ray + torch live only there) and play.
    hook.upload_bytes(PLAY.encode(), posixpath.join(run_dir, "play.py"))
    py = shlex.quote(str(cluster.venv / "bin" / "python"))
    for uri in (out["model_uri"], f"models:/{name}@champion"):
        proc = cluster.ssh(
            f"export RAY_USAGE_STATS_ENABLED=0 MLFLOW_DISABLE_TELEMETRY=true; "
            f"cd {shlex.quote(run_dir)} && "
            f"{py} play.py {shlex.quote(mlflow_server.url)} {shlex.quote(uri)}",
            timeout=300,
        )
        played = json.loads(proc.stdout.strip().splitlines()[-1])
        assert played["return"] >= 8  # CartPole ends after >= 8 steps for any policy
        assert set(played["actions"]) <= {0, 1} and len(played["batch"]) == 5


def test_finalize_without_model_fails_clearly_after_logging(
    mlflow_server: MlflowServer, cluster: DevCluster
) -> None:
    from slurm_ray.hooks.slurm import SlurmHook

    hook = SlurmHook("slurm_dev")
    run_dir = cluster.new_dir("mlflow-nomodel")
    hook.upload_bytes(
        b'{"status": "succeeded", "iterations": 3}', posixpath.join(run_dir, "result.json")
    )
    hook.upload_bytes(b"log\n", posixpath.join(run_dir, "slurm-7.out"))
    settings = settings_for(mlflow_server, registered_model_name=f"m-{uuid.uuid4().hex[:6]}")
    run_id = ensure_run(settings, tags=task_tags())
    with pytest.raises(MlflowError, match=r"export_model\.py"):
        finalize_run(settings, run_id, hook=hook, run_dir=run_dir, job_id="7", result=None)
    c = client(mlflow_server)
    assert {a.path for a in c.list_artifacts(run_id)} == {"result.json", "slurm"}
    assert c.get_run(run_id).info.status == "FAILED"

    # Without a model name the same run directory finalizes fine.
    plain = settings_for(mlflow_server)
    run2 = ensure_run(plain, tags=task_tags())
    out = finalize_run(plain, run2, hook=hook, run_dir=run_dir, job_id="7", result=None)
    assert out["model_version"] is None and out["model_uri"] is None
    hook.close()
