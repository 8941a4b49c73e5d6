"""Pure parts of slurm_ray.mlflow: no server, no cluster.

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
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest
from mlflow.utils.validation import (
    MAX_ENTITY_KEY_LENGTH,
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
)
from slurm_ray.mlflow import relay as relay_mod
from slurm_ray.mlflow.artifacts import MODEL_DIRNAME, RUN_DIR_ARTIFACTS, RemoteFiles, _fetch_bundle
from slurm_ray.mlflow.errors import MlflowError, MlflowUnreachableError
from slurm_ray.mlflow.hook import _CREDENTIALS, credentialed_uri
from slurm_ray.mlflow.keys import flatten_params, limit_params, task_identity_tags
from slurm_ray.mlflow.keys import task_key as _task_key
from slurm_ray.mlflow.reachability import check_reachable
from slurm_ray.mlflow.relay import (
    SENTINEL_METRIC,
    MetricsRelay,
    RelayStats,
    deliver_rows,
    make_async_sink,
    make_relay,
    metrics_from_row,
    parse_metrics_jsonl,
    relay_rows,
)
from slurm_ray.mlflow.runs import include_files_hash
from slurm_ray.mlflow.settings import MlflowSettings
from slurm_ray.slurm.timefmt import parse_elapsed


def closed_port_uri() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# -- limits and names -----------------------------------------------------------------


def test_flatten_params() -> None:
    flat = flatten_params(
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
    out, changed = limit_params(params)
    assert out["ok"] == "1"
    assert len(out["huge"]) == MAX_PARAM_VAL_LENGTH and out["huge"].endswith("[truncated]")
    assert set(changed) == set(params) - {"ok"}
    assert len(out) == len(params)
    for key in out:
        assert len(key) <= MAX_ENTITY_KEY_LENGTH
        assert validate_param_and_metric_name(key) and not path_not_unique(key), key


def test_task_key_ignores_order_and_identity_tags_have_no_try() -> None:
    a = task_identity_tags("d", "manual__2024-01-01T00:00:00+00:00", "t", 2)
    assert "try_number" not in a and a["map_index"] == "2"
    assert task_identity_tags("d", "r", "t")["map_index"] == "-1"
    assert _task_key(a) == _task_key(dict(reversed(list(a.items()))))
    assert _task_key(a) != _task_key({**a, "map_index": "3"})
    assert all(c in "0123456789abcdef" for c in _task_key(a))  # safe inside a filter string


def test_include_files_hash() -> None:
    files = {"train.py": b"print(1)", "launch.sh": b"#!/bin/bash"}
    assert include_files_hash(files) == include_files_hash(dict(reversed(files.items())))
    assert include_files_hash(files) != include_files_hash({**files, "train.py": b"print(2)"})
    # name/content boundaries are part of the hash
    assert include_files_hash({"ab": b"c"}) != include_files_hash({"a": b"bc"})


# -- settings ------------------------------------------------------------------------


def test_settings_round_trip_and_defaults() -> None:
    s = MlflowSettings.from_dict(
        {"tracking_uri": "http://127.0.0.1:5055/", "min_improvement": 5}, default_experiment="dag"
    )
    assert s.tracking_uri == "http://127.0.0.1:5055" and s.experiment_name == "dag"
    assert s.min_improvement == 5.0 and s.relay_later is False
    assert MlflowSettings.from_dict(json.loads(json.dumps(s.to_dict()))) == s


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
        MlflowSettings.from_dict(data)


# -- relay ----------------------------------------------------------------------------


def test_metrics_from_row() -> None:
    step, ts, metrics = metrics_from_row(
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
    assert metrics_from_row({"env_steps": 1}) is None
    assert metrics_from_row({"iteration": "3"}) is None
    assert metrics_from_row({"iteration": 2})[1] is None  # type: ignore[index]


def test_parse_metrics_jsonl_skips_torn_lines() -> None:
    data = b'{"iteration": 1}\n\nnot json\n{"iteration": 2}\n[1]\n{"iteration": 3'
    assert [r["iteration"] for r in parse_metrics_jsonl(data)] == [1, 2]


def test_relay_unreachable_keeps_rows_and_never_raises() -> None:
    relay = make_relay(MlflowSettings(closed_port_uri(), "e", request_timeout=2), run_id="abc")
    json.dumps(relay)
    r = MetricsRelay(relay)
    started = time.monotonic()
    stats = r.send([{"iteration": i, "x": i} for i in range(1, 4)])
    assert time.monotonic() - started < 5, "no MLflow retry loop on a dead server"
    assert stats.error and stats.pending == 3 and stats.sent == 0
    stats = r.send([{"iteration": 3, "x": 99}, {"iteration": 4, "x": 4}, {"nope": 1}])
    assert stats.pending == 4  # step 3 kept once, its first copy
    assert r._pending[3][1]["x"] == 3.0

    with pytest.raises(MlflowError, match="could not log 1 metrics row"):
        relay_rows(relay, [{"iteration": 1}])
    assert relay_rows(relay, [{"iteration": 1}], strict=False).pending == 1


def test_relay_memory_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(relay_mod, "MAX_PENDING_ROWS", 5)
    r = MetricsRelay({"tracking_uri": closed_port_uri(), "run_id": "x", "timeout": 1})
    r._add([{"iteration": i} for i in range(10)])
    assert sorted(r._pending) == [5, 6, 7, 8, 9]


async def test_async_sink_runs_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    ticks = 0

    def slow_send(self: MetricsRelay, rows: list[dict[str, Any]]) -> RelayStats:
        # A slow HTTP call that ends only once the event loop has ticked meanwhile:
        # run on the loop itself it could never see a tick (counted, not timed).
        seen = ticks
        deadline = time.monotonic() + 30
        while ticks < seen + 3:
            assert time.monotonic() < deadline, "event loop starved while sending"
            time.sleep(0.01)
        calls.append(len(rows))
        return RelayStats(sent=len(rows))

    monkeypatch.setattr(MetricsRelay, "send", slow_send)
    sink = make_async_sink({"tracking_uri": "http://x", "run_id": "r"})

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
    with pytest.raises(MlflowUnreachableError, match=uri.replace(".", r"\.")):
        check_reachable(MlflowSettings(uri, "e", request_timeout=1))


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
    names = [*RUN_DIR_ARTIFACTS, "slurm-9.out", MODEL_DIRNAME]
    assert _fetch_bundle(hook, str(run_dir), names, str(ckpt), dest) == "checkpoints/iter 2 'q'"
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
    _fetch_bundle(LocalHook(), str(tmp_path), ["result.json"], str(tmp_path / "nope"), dest)
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
            _fetch_bundle(hook, str(run_dir), ["result.json"], None, dest)
    else:
        _fetch_bundle(hook, str(run_dir), ["result.json"], None, dest)
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
    assert parse_elapsed(text) == seconds


def test_elapsed_seconds_bad() -> None:
    assert parse_elapsed(None) is None
    assert parse_elapsed("x-1:00") is None
    assert parse_elapsed("INVALID") is None


def test_module_stays_light() -> None:
    code = (
        "import importlib, pkgutil, sys, slurm_ray.mlflow as pkg\n"
        "for m in pkgutil.iter_modules(pkg.__path__): importlib.import_module(f'{pkg.__name__}.{m.name}')\n"
        "import slurm_ray.mlflow.compare as c\n"
        "c.plot_spec('t', 'env_steps', 'episode_return_mean', [('a', [(0, 1), (1, 2)])], [{}])\n"
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
        want = inspect.signature(getattr(RemoteFiles, name)).parameters
        have = inspect.signature(getattr(SlurmHook, name)).parameters
        assert list(want) == list(have)[: len(want)], name
    assert posixpath.basename(MODEL_DIRNAME) == "mlflow_model"


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
    monkeypatch.setattr(relay_mod, "_probe", lambda uri, timeout: None)
    monkeypatch.setattr(relay_mod, "_client", lambda uri: fake)
    relay = MetricsRelay({"tracking_uri": "http://x", "run_id": "r"})
    wide = [{"iteration": i, **{f"m{k}": float(k) for k in range(299)}} for i in range(1, 8)]

    stats = relay.send(wide)  # 300 metrics per row: 3 rows per batch; batch 2 fails
    assert stats.sent == 3 and stats.pending == 4 and stats.error
    assert relay._watermark is None  # re-read from MLflow before the next send
    stats = relay.send(wide)  # the same rows again (a re-read file): no duplicates
    assert (stats.sent, stats.skipped, stats.pending) == (4, 3, 0)  # 1-3 are in MLflow

    steps_logged = []
    for batch in fake.calls:
        assert len(batch) <= MAX_METRICS_PER_BATCH
        assert batch[-1].key == SENTINEL_METRIC
        rows_in_batch = sorted({m.step for m in batch})
        steps_logged += rows_in_batch
        for step in rows_in_batch:
            keys = [m.key for m in batch if m.step == step]
            assert len(keys) == 300 and keys[-1] == SENTINEL_METRIC
    assert steps_logged == list(range(1, 8))

    # A restarted relay reads the watermark (7) and sends nothing again.
    again = MetricsRelay({"tracking_uri": "http://x", "run_id": "r"}).send(wide)
    assert (again.sent, again.skipped) == (0, 7)


# -- comparison figure spec -------------------------------------------------------------


def test_config_labels_name_what_differs() -> None:
    from slurm_ray.mlflow.compare import config_labels

    params = [
        {"env": "CartPole-v1", "lr": "0.0003", "seed": "1"},
        {"env": "CartPole-v1", "lr": "0.001", "seed": "1"},
        {"env": "CartPole-v1", "lr": "0.001", "seed": "7"},
    ]
    assert config_labels(["a", "b", "c"], params) == [
        "lr=0.0003, seed=1",
        "lr=0.001, seed=1",
        "lr=0.001, seed=7",
    ]
    # nothing differs (or one run): the run names
    assert config_labels(["only"], params[:1]) == ["only"]
    assert config_labels(["x", "y"], [{}, {}]) == ["x", "y"]
    # a key only one run has shows as '-' for the others
    assert config_labels(["x", "y"], [{"gamma": "0.9"}, {}]) == ["gamma=0.9", "gamma=-"]
    # bookkeeping keys are no label; labels stop at a key boundary near 60 characters
    noise = [{"checkpoint_every": "1", "stop.minutes": "2", "eval_episodes": "3"}, {}]
    assert config_labels(["x", "y"], noise) == ["x", "y"]
    wide = [{f"key_{k}": "1" * 9 for k in "abcde"}, {f"key_{k}": "2" * 9 for k in "abcde"}]
    assert (
        config_labels(["x", "y"], wide)[0] == "key_a=111111111, key_b=111111111, key_c=111111111, …"
    )
    # runs that the config does not tell apart are numbered
    same = [{"lr": "1", "gamma": "0.9"}, {"lr": "2"}, {"lr": "2"}]
    assert config_labels(list("abc"), same) == [
        "gamma=0.9, lr=1",
        "gamma=-, lr=2 (#1)",
        "gamma=-, lr=2 (#2)",
    ]
    # the most varied key leads
    runs = [{"a": "1", "z": str(i)} for i in range(3)] + [{"a": "2", "z": "0"}]
    assert config_labels(list("pqrs"), runs) == ["z=0, a=1", "z=1, a=1", "z=2, a=1", "z=0, a=2"]


def test_plot_spec_axes_colours_and_stop_thresholds() -> None:
    from slurm_ray.mlflow.compare import PALETTE, plot_spec

    params = [
        {"stop.return_mean": "450.0", "stop.env_steps": "None", "lr": "0.1"},
        {"stop.return_mean": "450.0", "lr": "0.2"},
    ]
    spec = plot_spec(
        "t", "env_steps", "episode_return_mean", [("lr=0.1", [(1.0, 2.0)]), ("lr=0.2", [])], params
    )
    assert spec["x_label"] == "Environment steps (count)"
    assert spec["y_label"] == "Mean episode return (reward per episode)"
    assert [s["color"] for s in spec["series"]] == ["#0072b2", "#e69f00"]
    assert bytes.fromhex(spec["series"][1]["color"][1:]) == bytes(PALETTE[1])
    assert spec["thresholds"] == [{"axis": "y", "value": 450.0, "label": "stop: return_mean ≥ 450"}]
    json.dumps(spec)  # travels to the cluster as JSON
    # a threshold on an axis that is not drawn is left out; the x one is drawn vertically
    spec = plot_spec("t", "env_steps", "wall_s", [], [{"stop.env_steps": "20000"}, *params])
    assert spec["thresholds"] == [
        {"axis": "x", "value": 20000.0, "label": "stop: env_steps ≥ 20000"}
    ]


# -- the MLflow connection --------------------------------------------------------------


def _conn(monkeypatch: pytest.MonkeyPatch, conn_id: str, **fields: Any) -> None:
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(fields))


def test_connection_uri_forms(monkeypatch: pytest.MonkeyPatch) -> None:
    from slurm_ray.mlflow.hook import MlflowHook

    _conn(monkeypatch, "m_plain", conn_type="mlflow", host="10.1.2.3", port=5055)
    _conn(
        monkeypatch,
        "m_auth",
        conn_type="mlflow",
        host="mlflow.example.org",
        schema="https",
        login="al ice",
        password="p@ss:w/rd",
        extra={"path": "/prefix/"},
    )
    _conn(monkeypatch, "m_url", conn_type="mlflow", host="https://x.org:8443/ml", login="u")
    assert MlflowHook("m_plain").tracking_uri == "http://10.1.2.3:5055"
    hook = MlflowHook("m_auth")
    assert hook.tracking_uri == "https://mlflow.example.org/prefix"
    assert credentialed_uri(hook.tracking_uri) == (
        "https://al%20ice:p%40ss%3Aw%2Frd@mlflow.example.org/prefix"
    )
    assert MlflowHook("m_url").tracking_uri == "https://x.org:8443/ml"
    assert MlflowHook.default_conn_name == "mlflow_default"
    assert MlflowHook.conn_type == "mlflow" and MlflowHook.conn_name_attr == "mlflow_conn_id"


def test_settings_from_a_connection_keep_its_password_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    password = "S3cr3t-conn-pw"
    _conn(
        monkeypatch,
        "mlflow_default",
        conn_type="mlflow",
        host="10.9.9.9",
        port=5099,
        login="bob",
        password=password,
    )
    monkeypatch.delenv("SLURM_RAY_MLFLOW_URI", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    _CREDENTIALS.clear()
    s = MlflowSettings.from_dict({}, default_experiment="dag")  # mlflow_default
    # the DAGs' resolve step gives "" when no URI is in the environment: the same
    assert MlflowSettings.from_dict({"tracking_uri": ""}, default_experiment="dag") == s
    assert (s.tracking_uri, s.conn_id) == ("http://10.9.9.9:5099", "mlflow_default")
    stored = json.dumps([s.to_dict(), make_relay(s, run_id="r")])
    assert password not in stored and "bob" not in stored
    assert MlflowSettings.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    # another process (the triggerer) gets the credentials back from the connection
    _CREDENTIALS.clear()
    assert credentialed_uri(s.tracking_uri) == s.tracking_uri  # not without the conn id
    assert credentialed_uri(s.tracking_uri, "mlflow_default") == (
        f"http://bob:{password}@10.9.9.9:5099"
    )
    # a named connection that does not exist: the error names the field and the connection
    with pytest.raises(ValueError, match=r"mlflow\.tracking_uri: required .*'nope'"):
        MlflowSettings.from_dict({"experiment_name": "e", "conn_id": "nope"})


async def test_relay_reads_the_connection_asynchronously(monkeypatch: pytest.MonkeyPatch) -> None:
    """In the triggerer the sink reads the connection with get_async_connection, off the loop."""
    _conn(
        monkeypatch,
        "m_trig",
        conn_type="mlflow",
        host="10.7.7.7",
        port=1,
        login="u",
        password="pw9",
    )
    seen: list[str] = []

    def fake_send(self: MetricsRelay, rows: list[dict[str, Any]]) -> RelayStats:
        seen.append(credentialed_uri(self.tracking_uri))
        return RelayStats()

    monkeypatch.setattr(MetricsRelay, "send", fake_send)
    _CREDENTIALS.clear()
    sink = make_async_sink(
        {"tracking_uri": "http://10.7.7.7:1", "run_id": "r", "conn_id": "m_trig"}
    )
    await sink([{"iteration": 1}])
    assert seen == ["http://u:pw9@10.7.7.7:1"]


def test_provider_registers_the_connection_type() -> None:
    import importlib

    import jsonschema
    from airflow import providers_manager
    from slurm_ray.provider import get_provider_info

    info = get_provider_info()
    schema = json.loads(
        (Path(providers_manager.__file__).parent / "provider_info.schema.json").read_text()
    )
    jsonschema.validate(info, schema)
    (conn_type,) = info["connection-types"]
    assert conn_type["connection-type"] == "mlflow"
    module, _, name = conn_type["hook-class-name"].rpartition(".")
    hook = getattr(importlib.import_module(module), name)
    assert hook.conn_type == "mlflow" and hook.hook_name == conn_type["hook-name"]
    behaviour = conn_type["ui-field-behaviour"]
    assert "schema" in behaviour["relabeling"] and "host" in behaviour["placeholders"]
    form_schema = json.loads(
        (
            Path(providers_manager.__file__).parent / "customized_form_field_behaviours.schema.json"
        ).read_text()
    )
    jsonschema.validate({k.replace("-", "_"): v for k, v in behaviour.items()}, form_schema)
    assert "path" in conn_type["conn-fields"]


# -- catch-up at completion (tenacity) --------------------------------------------------


def test_deliver_rows_waits_for_the_server_then_sends(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeClient()
    answers = iter(["Connection refused", "Connection refused", "timed out", None])
    naps: list[float] = []
    monkeypatch.setattr(relay_mod, "_probe", lambda uri, timeout: next(answers))
    monkeypatch.setattr(relay_mod, "_client", lambda uri: fake)
    monkeypatch.setattr(time, "sleep", naps.append)  # tenacity's nap
    stats = deliver_rows(
        {"tracking_uri": "http://x", "run_id": "r"}, [{"iteration": i} for i in (1, 2)], wait_s=600
    )
    assert (stats.sent, stats.pending) == (2, 0)
    assert naps == [2, 4, 8]  # exponential backoff between the three failed attempts


def test_deliver_rows_gives_up_after_wait_s_and_on_refusal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(relay_mod, "_probe", lambda uri, timeout: "Connection refused")
    with pytest.raises(MlflowError, match=r"waited \d+s\): Connection refused; they are in /r/m"):
        deliver_rows(
            {"tracking_uri": "http://x", "run_id": "r"}, [{"iteration": 1}], wait_s=0, where="/r/m"
        )

    class Refusing(FakeClient):
        def log_batch(self, *args: Any, **kwargs: Any) -> None:
            raise ValueError("INVALID_PARAMETER_VALUE")

    calls: list[int] = []
    monkeypatch.setattr(relay_mod, "_probe", lambda uri, timeout: calls.append(1))
    monkeypatch.setattr(relay_mod, "_client", lambda uri: Refusing())
    with pytest.raises(MlflowError, match="INVALID_PARAMETER_VALUE"):
        deliver_rows({"tracking_uri": "http://x", "run_id": "r"}, [{"iteration": 1}], wait_s=600)
    assert calls == [1]  # a refusal is not retried
