"""Pure parts of slurm_ray.mlflow_tracking: no server, no cluster.

The real-server behaviour (runs, relay idempotence, outages, registry,
promotion, comparison) is covered in tests/cluster/test_mlflow.py.
"""

from __future__ import annotations

import asyncio
import json
import math
import posixpath
import shutil
import socket
import struct
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path
from typing import Any

import pytest
from slurm_ray import mlflow_tracking as mt


def closed_port_uri() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# -- limits and names -----------------------------------------------------------------


def test_limits_match_installed_mlflow() -> None:
    from mlflow.utils import validation as v

    assert mt.MAX_PARAM_VAL_LENGTH == v.MAX_PARAM_VAL_LENGTH
    assert mt.MAX_TAG_VAL_LENGTH == v.MAX_TAG_VAL_LENGTH
    assert mt.MAX_ENTITY_KEY_LENGTH == v.MAX_ENTITY_KEY_LENGTH
    assert mt.MAX_PARAMS_TAGS_PER_BATCH == v.MAX_PARAMS_TAGS_PER_BATCH
    assert mt.MAX_METRICS_PER_BATCH == v.MAX_METRICS_PER_BATCH


def test_flatten_params() -> None:
    flat = mt.flatten_params(
        {
            "env": "CartPole-v1",
            "algo": {"lr": 5e-5, "model": {"hidden": [64, 64], "act": None}},
            "stop": {},
            "flag": True,
            "n": 3,
        }
    )
    assert flat == {
        "env": "CartPole-v1",
        "algo.lr": "5e-05",
        "algo.model.hidden": "[64, 64]",
        "algo.model.act": "None",
        "stop": "{}",
        "flag": "True",
        "n": "3",
    }


def test_limit_params_truncates_and_sanitises_without_raising() -> None:
    from mlflow.utils.validation import path_not_unique, validate_param_and_metric_name

    params = {
        "ok": "1",
        "huge": "y" * 50_000,
        "k" * 400: "long key",
        "a/../b": "path trick",
        "bad?key": "1",
        "bad!key": "2",  # sanitises to the same key as the one above: both kept
        "..": "dots",
    }
    out, changed = mt.limit_params(params)
    assert out["ok"] == "1"
    assert len(out["huge"]) == mt.MAX_PARAM_VAL_LENGTH and out["huge"].endswith("[truncated]")
    assert set(changed) == set(params) - {"ok"}
    assert len(out) == len(params)
    for key in out:
        assert len(key) <= mt.MAX_ENTITY_KEY_LENGTH
        assert validate_param_and_metric_name(key) and not path_not_unique(key), key


def test_task_key_ignores_order_and_identity_tags_have_no_try() -> None:
    a = mt.task_identity_tags("d", "manual__2024-01-01T00:00:00+00:00", "t", 2)
    assert "try_number" not in a and a["map_index"] == "2"
    assert mt.task_identity_tags("d", "r", "t")["map_index"] == "-1"
    assert mt._task_key(a) == mt._task_key(dict(reversed(list(a.items()))))
    assert mt._task_key(a) != mt._task_key({**a, "map_index": "3"})
    assert all(c in "0123456789abcdef" for c in mt._task_key(a))  # safe inside a filter string


def test_include_files_hash() -> None:
    files = {"train.py": b"print(1)", "launch.sh": b"#!/bin/bash"}
    assert mt.include_files_hash(files) == mt.include_files_hash(dict(reversed(files.items())))
    assert mt.include_files_hash(files) != mt.include_files_hash({**files, "train.py": b"print(2)"})
    # name/content boundaries are part of the hash
    assert mt.include_files_hash({"ab": b"c"}) != mt.include_files_hash({"a": b"bc"})


# -- settings ------------------------------------------------------------------------


def test_settings_round_trip_and_defaults() -> None:
    s = mt.MlflowSettings.from_dict(
        {"tracking_uri": "http://127.0.0.1:5055/", "min_improvement": 5}, default_experiment="dag"
    )
    assert s.tracking_uri == "http://127.0.0.1:5055" and s.experiment_name == "dag"
    assert s.min_improvement == 5.0 and s.relay_later is False
    assert mt.MlflowSettings.from_dict(json.loads(json.dumps(s.to_dict()))) == s


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"tracking_uri": "http://x", "experiment_name": "e", "relay_latr": True}, "relay_latr"),
        ({"experiment_name": "e"}, "tracking_uri"),
        ({"tracking_uri": "", "experiment_name": "e"}, "tracking_uri"),
        ({"tracking_uri": "http://x"}, "experiment_name"),
        (
            {"tracking_uri": "http://x", "experiment_name": "e", "min_improvement": -1},
            "min_improvement",
        ),
        (
            {"tracking_uri": "http://x", "experiment_name": "e", "min_improvement": "5"},
            "min_improvement",
        ),
        ({"tracking_uri": "http://x", "experiment_name": "e", "relay_later": "yes"}, "relay_later"),
        (
            {"tracking_uri": "http://x", "experiment_name": "e", "registered_model_name": ""},
            "registered",
        ),
    ],
)
def test_settings_bad_input_names_the_field(data: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        mt.MlflowSettings.from_dict(data)


# -- relay ----------------------------------------------------------------------------


def test_metrics_from_row() -> None:
    step, ts, metrics = mt.metrics_from_row(
        {
            "iteration": 7,
            "timestamp": 1_700_000_000.25,
            "episode_return_mean": 21.5,
            "env_steps": 4000,
            "missing": None,
            "nan": math.nan,
            "inf": math.inf,
            "flag": True,
            "text": "x",
            "bad key?": 1.0,
        }
    ) or (0, 0, {})
    assert step == 7 and ts == 1_700_000_000_250
    assert metrics == {
        "iteration": 7.0,
        "episode_return_mean": 21.5,
        "env_steps": 4000.0,
        "bad key_": 1.0,
    }
    assert mt.metrics_from_row({"env_steps": 1}) is None
    assert mt.metrics_from_row({"iteration": "3"}) is None
    assert mt.metrics_from_row({"iteration": 2})[1] is None  # type: ignore[index]


def test_parse_metrics_jsonl_skips_torn_lines() -> None:
    data = b'{"iteration": 1}\n\nnot json\n{"iteration": 2}\n[1]\n{"iteration": 3'
    assert [r["iteration"] for r in mt.parse_metrics_jsonl(data)] == [1, 2]


def test_relay_unreachable_keeps_rows_and_never_raises() -> None:
    relay = mt.make_relay(
        mt.MlflowSettings(closed_port_uri(), "e", request_timeout=2), run_id="abc"
    )
    json.dumps(relay)
    r = mt.MetricsRelay(relay)
    started = time.monotonic()
    stats = r.send([{"iteration": i, "x": i} for i in range(1, 4)])
    assert time.monotonic() - started < 5, "no MLflow retry loop on a dead server"
    assert stats.error and stats.pending == 3 and stats.sent == 0
    stats = r.send([{"iteration": 3, "x": 99}, {"iteration": 4, "x": 4}, {"nope": 1}])
    assert stats.pending == 4  # step 3 kept once, its first copy
    assert r._pending[3][1]["x"] == 3.0

    with pytest.raises(mt.MlflowError, match="could not log 1 metrics row"):
        mt.relay_rows(relay, [{"iteration": 1}])
    assert mt.relay_rows(relay, [{"iteration": 1}], strict=False).pending == 1


def test_relay_memory_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mt, "MAX_PENDING_ROWS", 5)
    r = mt.MetricsRelay({"tracking_uri": closed_port_uri(), "run_id": "x", "timeout": 1})
    r._add([{"iteration": i} for i in range(10)])
    assert sorted(r._pending) == [5, 6, 7, 8, 9]


async def test_async_sink_runs_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    ticks = 0

    def slow_send(self: mt.MetricsRelay, rows: list[dict[str, Any]]) -> mt.RelayStats:
        # A slow HTTP call that ends only once the event loop has ticked meanwhile:
        # run on the loop itself it could never see a tick (counted, not timed).
        seen = ticks
        deadline = time.monotonic() + 30
        while ticks < seen + 3:
            assert time.monotonic() < deadline, "event loop starved while sending"
            time.sleep(0.01)
        calls.append(len(rows))
        return mt.RelayStats(sent=len(rows))

    monkeypatch.setattr(mt.MetricsRelay, "send", slow_send)
    sink = mt.make_async_sink({"tracking_uri": "http://x", "run_id": "r"})

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    task = asyncio.create_task(ticker())
    await asyncio.gather(sink([{"iteration": 1}]), sink([{"iteration": 2}]))
    task.cancel()
    assert calls == [1, 1]


def test_check_reachable_names_the_uri() -> None:
    uri = closed_port_uri()
    with pytest.raises(mt.MlflowUnreachableError, match=uri.replace(".", r"\.")):
        mt.check_reachable(mt.MlflowSettings(uri, "e", request_timeout=1))


# -- finalize helpers -------------------------------------------------------------------


class LocalHook:
    """The SlurmHook surface finalize_run uses, on the local machine."""

    def __init__(self, sacct: str | None = None) -> None:
        self.sacct = sacct
        self.commands: list[str] = []

    def run(self, command: str, *, timeout: float | None = None, check: bool = False) -> Any:
        self.commands.append(command)
        if command.startswith("sacct"):
            ok = self.sacct is not None
            return type("R", (), {"exit_code": 0 if ok else 1, "stdout": self.sacct or ""})()
        proc = subprocess.run(["bash", "-c", command], capture_output=True, text=True)
        if check and proc.returncode:
            raise AssertionError(proc.stderr)
        return type("R", (), {"exit_code": proc.returncode, "stdout": proc.stdout})()

    def read_file(self, remote_path: str) -> bytes | None:
        p = Path(remote_path)
        return p.read_bytes() if p.exists() else None

    def download(self, remote_path: str, local_path: str) -> None:
        shutil.copyfile(remote_path, local_path)


def test_bundle_with_hostile_paths(tmp_path: Path) -> None:
    run_dir = tmp_path / "run dir '$(touch pwned)' `x`; echo"
    ckpt = run_dir / "checkpoints" / "iter 2 'q'"
    (ckpt / "sub").mkdir(parents=True)
    (ckpt / "sub" / "state.pkl").write_bytes(b"\x00\x01")
    (run_dir / "mlflow_model").mkdir()
    (run_dir / "mlflow_model" / "MLmodel").write_text("flavors: {}\n")
    (run_dir / "result.json").write_text("{}")
    (run_dir / "slurm-9.out").write_text("log")
    hook = LocalHook()
    dest = tmp_path / "dest"
    dest.mkdir()
    names = [*mt.RUN_DIR_ARTIFACTS, "slurm-9.out", mt.MODEL_DIRNAME]
    assert mt._fetch_bundle(hook, str(run_dir), names, str(ckpt), dest) == "checkpoints/iter 2 'q'"
    got = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert got == [
        "checkpoints/iter 2 'q'/sub/state.pkl",
        "mlflow_model/MLmodel",
        "result.json",
        "slurm-9.out",
    ]
    assert not list(tmp_path.rglob("pwned"))
    # the temp dir (inside the run dir) is removed afterwards
    assert hook.commands[-1].startswith("rm -rf -- ")
    assert [p.name for p in run_dir.iterdir() if p.name.startswith(".")] == []


def test_bundle_of_nothing(tmp_path: Path) -> None:
    dest = tmp_path / "d"
    dest.mkdir()
    mt._fetch_bundle(LocalHook(), str(tmp_path), ["result.json"], str(tmp_path / "nope"), dest)
    assert list(dest.iterdir()) == []


class EvilBundleHook(LocalHook):
    """The cluster answers the bundling step normally but hands back a hostile tarball."""

    def __init__(self, evil: Path) -> None:
        super().__init__()
        self.evil = evil

    def download(self, remote_path: str, local_path: str) -> None:
        shutil.copyfile(self.evil, local_path)


@pytest.mark.parametrize(
    ("member", "refused"),
    # an absolute name is refused or stripped into dest (tarfile's "data" filter strips it)
    [("../escaped.txt", True), ("{abs}/escaped-abs.txt", False), ("link", True)],
)
def test_bundle_extraction_refuses_escapes(tmp_path: Path, member: str, refused: bool) -> None:
    """_fetch_bundle itself (not just tarfile) keeps every member inside dest."""
    import io

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "result.json").write_text("{}")
    outside = tmp_path / "outside"
    outside.mkdir()
    evil = tmp_path / "evil.tgz"
    with tarfile.open(evil, "w:gz") as tar:
        if member == "link":  # a symlink pointing out of dest, then a file through it
            link = tarfile.TarInfo("link")
            link.type, link.linkname = tarfile.SYMTYPE, str(outside)
            tar.addfile(link)
            member = "link/escaped-link.txt"
        info = tarfile.TarInfo(member.format(abs=outside))
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    dest = tmp_path / "dest"
    dest.mkdir()
    hook = EvilBundleHook(evil)
    if refused:
        with pytest.raises(tarfile.FilterError):
            mt._fetch_bundle(hook, str(run_dir), ["result.json"], None, dest)
    else:
        mt._fetch_bundle(hook, str(run_dir), ["result.json"], None, dest)
    escaped = [p for p in tmp_path.rglob("escaped*") if dest not in p.parents]
    assert not escaped, escaped
    # the remote temp dir is removed even when extraction fails
    assert hook.commands[-1].startswith("rm -rf -- ")
    assert [p.name for p in run_dir.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("0:05", 5), ("01:13", 73), ("00:01:13", 73), ("1-02:00:00", 93600), ("12:34.5", 754.5)],
)
def test_elapsed_seconds(text: str, seconds: float) -> None:
    assert mt._elapsed_seconds(text) == seconds


def test_elapsed_seconds_bad() -> None:
    assert mt._elapsed_seconds(None) is None
    assert mt._elapsed_seconds("x-1:00") is None
    assert mt._elapsed_seconds("INVALID") is None


def test_slurm_efficiency_from_sacct_and_fallbacks() -> None:
    sacct = "77|3600|2|8|02:00:00\n77.batch|3600|1|4|01:00:00\n"
    eff = mt.slurm_efficiency(LocalHook(sacct=sacct), "77")
    assert eff == {
        "slurm.elapsed_s": 3600.0,
        "slurm.node_hours": 2.0,
        "slurm.cpu_efficiency": 0.25,
    }
    assert mt.slurm_efficiency(LocalHook(sacct=None), "77") == {}

    class WithStates(LocalHook):
        def states(self, ids: list[str]) -> dict[str, Any]:
            return {"77": type("I", (), {"elapsed": "00:30:00", "num_nodes": 2})()}

    assert mt.slurm_efficiency(WithStates(sacct=None), "77") == {
        "slurm.elapsed_s": 1800.0,
        "slurm.node_hours": 1.0,
    }


# -- PNG ------------------------------------------------------------------------------


def png_pixels(data: bytes) -> tuple[int, int, bytes]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body)
        chunks.append((kind, body))
        pos += 12 + length
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    width, height, depth, color, _, _, _ = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, color) == (8, 2)
    raw = zlib.decompress(b"".join(b for k, b in chunks if k == b"IDAT"))
    assert len(raw) == height * (1 + width * 3)
    return width, height, raw


@pytest.mark.parametrize(
    "series",
    [
        [("a", [(0.0, 1.0), (10.0, 5.0), (20.0, 3.0)]), ("b", [(5.0, -2.0), (15.0, 8.0)])],
        [("flat", [(1.0, 7.0), (2.0, 7.0)])],
        [("one point", [(3.0, 3.0)])],
        [("empty", [])],
        [],
        [("big", [(i * 1e6, math.sin(i / 50) * 1e4) for i in range(2000)])],
    ],
)
def test_png_renderer(series: list[tuple[str, list[tuple[float, float]]]]) -> None:
    data = mt.render_line_chart_png(series, title="return vs steps", x_label="env_steps")
    width, height, raw = png_pixels(data)
    assert (width, height) == (960, 600)
    colors = {raw[i : i + 3] for i in range(1, len(raw), 3)}
    for index, (_, pts) in enumerate(series):
        if pts:
            assert bytes(mt._PALETTE[index]) in colors


def test_nice_ticks() -> None:
    assert mt._nice_ticks(0, 100) == [0, 20, 40, 60, 80, 100]
    assert mt._nice_ticks(5, 5)  # degenerate range still gives ticks
    ticks = mt._nice_ticks(-3.3, 17.1)
    assert ticks[0] >= -3.3 and ticks[-1] <= 17.1 + 1e-9 and len(ticks) >= 3
    assert mt._fmt(150000) == "150K" and mt._fmt(2.5e6) == "2.5M" and mt._fmt(0.25) == "0.25"


def test_module_stays_light() -> None:
    code = (
        "import sys, slurm_ray.mlflow_tracking as m\n"
        "m.render_line_chart_png([('a', [(0, 1), (1, 2)])])\n"
        "bad = [n for n in ('ray', 'torch', 'numpy', 'pandas', 'mlflow') if n in sys.modules]\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]", (
        "importing the module must not pull heavy or MLflow imports"
    )


def test_remote_files_protocol_matches_slurm_hook() -> None:
    import inspect

    from slurm_ray.hooks.slurm import SlurmHook

    for name in ("run", "read_file", "download"):
        want = inspect.signature(getattr(mt.RemoteFiles, name)).parameters
        have = inspect.signature(getattr(SlurmHook, name)).parameters
        assert list(want) == list(have)[: len(want)], name
    assert posixpath.basename(mt.MODEL_DIRNAME) == "mlflow_model"


class FakeClient:
    """Records log_batch calls; keeps the sentinel's latest value like MLflow does."""

    def __init__(self, fail_on_call: int | None = None) -> None:
        self.calls: list[list[Any]] = []
        self.latest: dict[str, float] = {}
        self.fail_on_call = fail_on_call

    def get_run(self, run_id: str) -> Any:
        data = type("D", (), {"metrics": dict(self.latest)})()
        return type("R", (), {"data": data})()

    def log_batch(self, run_id: str, metrics: Any = (), synchronous: bool = True, **_: Any) -> None:
        if self.fail_on_call is not None and len(self.calls) + 1 == self.fail_on_call:
            self.fail_on_call = None
            raise ConnectionError("server went away")
        self.calls.append(list(metrics))
        for m in metrics:
            if m.key not in self.latest or m.step >= self.latest[m.key]:
                self.latest[m.key] = m.value


def test_relay_batches_whole_rows_sentinel_last(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeClient(fail_on_call=2)
    monkeypatch.setattr(mt, "_probe", lambda uri, timeout: None)
    monkeypatch.setattr(mt, "_client", lambda uri: fake)
    relay = mt.MetricsRelay({"tracking_uri": "http://x", "run_id": "r"})
    wide = [{"iteration": i, **{f"m{k}": float(k) for k in range(299)}} for i in range(1, 8)]

    stats = relay.send(wide)  # 300 metrics per row: 3 rows per batch; batch 2 fails
    assert stats.sent == 3 and stats.pending == 4 and stats.error
    assert relay._watermark is None  # re-read from MLflow before the next send
    stats = relay.send(wide)  # the same rows again (a re-read file): no duplicates
    assert (stats.sent, stats.skipped, stats.pending) == (4, 3, 0)  # 1-3 are in MLflow

    steps_logged = []
    for batch in fake.calls:
        assert len(batch) <= mt.MAX_METRICS_PER_BATCH
        assert batch[-1].key == mt.SENTINEL_METRIC
        rows_in_batch = sorted({m.step for m in batch})
        steps_logged += rows_in_batch
        for step in rows_in_batch:
            keys = [m.key for m in batch if m.step == step]
            assert len(keys) == 300 and keys[-1] == mt.SENTINEL_METRIC
    assert steps_logged == list(range(1, 8))

    # A restarted relay reads the watermark (7) and sends nothing again.
    again = mt.MetricsRelay({"tracking_uri": "http://x", "run_id": "r"}).send(wide)
    assert (again.sent, again.skipped) == (0, 7)
