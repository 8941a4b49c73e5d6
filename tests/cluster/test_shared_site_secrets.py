"""A shared site: what a neighbour (second Unix user) can see of our secrets and runs.

Issue 11, holes 4 (secrets), 5 (host keys) and 8 (uploads outside the run).
Each test plays the neighbour for real (tests/neighbour.py): its own processes
read /proc and the file system the way an attacker would, while our tasks
run through the real sshd, Slurm and MLflow. Canary values are searched
everywhere they could leak.
"""

from __future__ import annotations

import json
import shlex
import uuid
from pathlib import Path

import pytest

from tests.cluster.test_operator import FakeTI, make_op, run_deferred
from tests.conftest import DevCluster

pytestmark = pytest.mark.cluster

#: Watches every process's command line as the neighbour until a stop file
#: appears. The canary comes reversed in argv, so the watcher's own command
#: line never matches it.
WATCHER = r"""
import os, sys, time
canary, stop = sys.argv[1][::-1], sys.argv[2]
seen, hits, rounds = set(), [], 0
print("READY", flush=True)
deadline = time.time() + 300
while time.time() < deadline and not os.path.exists(stop):
    rounds += 1
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmd = fh.read().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
        if "build_env.sh" in cmd or "pip" in cmd:
            seen.add(cmd[:80])
        if canary in cmd:
            hits.append(cmd[:300])
    time.sleep(0.02)
print("RESULT " + __import__("json").dumps({"seen": sorted(seen), "hits": hits, "rounds": rounds}), flush=True)
"""


def _canary(tag: str) -> str:
    return f"SRCANARY{tag}{uuid.uuid4().hex[:12]}"


def test_no_secret_in_ps_during_a_build(cluster: DevCluster, neighbour, tmp_path: Path) -> None:
    """extra_env travels on stdin: the neighbour's `ps` never shows it while the env builds."""
    from slurm_ray import ClusterEnvOperator

    canary = _canary("PS")
    stop = f"/tmp/sr-watch-stop-{uuid.uuid4().hex[:8]}"
    neighbour.litter(stop)
    watcher = neighbour.spawn(
        f"python3 -c {shlex.quote(WATCHER)} {shlex.quote(canary[::-1])} {shlex.quote(stop)}"
    )
    neighbour.wait_line(watcher, "READY")
    spec = tmp_path / "requirements.txt"
    spec.write_text("# nothing to install: the venv and pip run are enough to watch\n")
    prefix = f"{cluster.new_dir('secret-env')}/venv"
    op = ClusterEnvOperator(
        task_id="env",
        ssh_conn_id="slurm_dev",
        environment={"kind": "venv", "prefix": prefix, "python": "/usr/bin/python3"},
        spec_path=str(spec),
        build_timeout=600,
        # pip reads PIP_INDEX_URL: the usual place for a token on a real site
        extra_env={"SR_BUILD_TOKEN": canary, "PIP_NO_INDEX": "1"},
    )
    try:
        assert op.execute({"ti": FakeTI(task_id="env")})["action"] == "built"
    finally:
        Path(stop).touch()
    result = json.loads(neighbour.wait_line(watcher, "RESULT", timeout=60).split(" ", 1)[1])
    assert result["seen"], f"the watcher never saw the build: {result}"
    assert not result["hits"], result["hits"]


def test_build_variables_reach_the_build(cluster: DevCluster, tmp_path: Path) -> None:
    """The stdin route delivers every byte (quotes, newlines, $(...)) and runs nothing."""
    from slurm_ray.hooks.slurm import SlurmHook
    from slurm_ray.slurm.environment import render_build_command, render_build_stdin
    from slurm_ray.utils.environment import EnvironmentSpec

    base = cluster.new_dir("stdin-env")
    stage = f"{base}/spec/.stage-x"
    marker = f"{base}/PWNED"
    value = f"a'b\"c $(touch {marker}) `touch {marker}`\nline2 ñ"
    hook = SlurmHook("slurm_dev")
    try:
        hook.makedirs(stage)
        hook.upload_bytes(
            b'printf "%s" "$SR_VALUE" > "$(dirname "$PWD")/got"\n',
            f"{stage}/build_env.sh",
            mode=0o700,
        )
        hook.upload_bytes(b"", f"{stage}/r.txt")
        env = EnvironmentSpec(kind="venv", prefix=f"{base}/venv", python="/usr/bin/python3")
        cmd = render_build_command(env, stage_dir=stage, spec_name="r.txt")
        res = hook.run(cmd, stdin=render_build_stdin(env, {"SR_VALUE": value}))
        assert res.exit_code == 0, res.stderr
        got = hook.read_file(f"{base}/spec/got")
        assert got is not None and got.decode() == value
        # a record that is not NAME=VALUE stops before build_env.sh runs
        hook.makedirs(f"{base}/spec/.stage-y")
        hook.upload_bytes(b"touch ../ran\n", f"{base}/spec/.stage-y/build_env.sh", mode=0o700)
        bad = hook.run(cmd.replace(".stage-x", ".stage-y"), stdin=b"BAD-NAME=x\0")
        assert bad.exit_code == 2 and "bad variable record" in bad.stderr
        assert hook.read_file(f"{base}/spec/ran") is None
    finally:
        hook.close()
    assert cluster.ssh(f"test -e {shlex.quote(marker)}", check=False).returncode != 0


def test_run_directory_is_private(cluster: DevCluster, neighbour) -> None:
    """Run dirs are 0700, files 0600; env_vars live in job.env, not in job.sbatch."""
    secret = _canary("ENV") + "'\"$(id)\n2nd line"
    base = f"{cluster.new_dir('private')}/runs"
    ti = FakeTI(task_id="private")
    op = make_op(
        cluster,
        ti.task_id,
        remote_base_dir=base,
        entrypoint='printenv SR_SECRET > "$SLURM_RAY_RUN_DIR/got.txt"',
        env_vars={"SR_SECRET": secret},
        job_spec={"nodes": 1, "time": "2"},
    )
    assert run_deferred(op, {"ti": ti}, timeout=180)["state"] == "COMPLETED"
    run_dir = ti.xcom["run_dir"]
    q = shlex.quote(run_dir)
    # the job got the value byte for byte
    assert cluster.ssh(f"cat {q}/got.txt").stdout == secret + "\n"
    assert secret.splitlines()[0] not in cluster.ssh(f"cat {q}/job.sbatch").stdout
    # every directory from the base down and every file: owner only
    modes = cluster.ssh(f"cd {shlex.quote(base)} && find . -printf '%m %y %p\\n'").stdout
    loose = [line for line in modes.splitlines() if int(line.split()[0], 8) & 0o077]
    assert not loose, loose
    assert any("job.env" in line for line in modes.splitlines()), modes
    # the neighbour can read nothing under it, nor list it
    assert neighbour.run(f"ls {q}", check=False).returncode != 0
    for name in ("job.env", "job.sbatch", "config.json", "got.txt"):
        assert neighbour.run(f"cat {q}/{name}", check=False).returncode != 0
    seen = neighbour.run(
        f"find {shlex.quote(base)} -readable -type f 2>/dev/null; true", check=False
    ).stdout
    assert not seen.strip(), seen


def _with_credentials(url: str, user: str, password: str) -> str:
    scheme, rest = url.split("://", 1)
    return f"{scheme}://{user}:{password}@{rest}"


def test_canary_secrets_nowhere_in_logs_xcom_trigger_or_mlflow(
    cluster: DevCluster,
    neighbour,
    mlflow_server,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    """An MLflow password (in the tracking URI) and an env_vars token: searched everywhere."""
    import asyncio

    from airflow.sdk.exceptions import TaskDeferred
    from mlflow import MlflowClient
    from slurm_ray.hooks.slurm import SlurmHook
    from slurm_ray.mlflow.artifacts import finalize_run
    from slurm_ray.mlflow.settings import MlflowSettings
    from slurm_ray.params import param_specs, resolve_run

    from tests.faults.helpers import SMALL_CONFIG, first_event, tap

    password, token = _canary("PW"), _canary("TOK")
    monkeypatch.setenv(
        "SLURM_RAY_MLFLOW_URI", _with_credentials(mlflow_server.url, "sruser", password)
    )
    defaults = {name: spec["default"] for name, spec in param_specs().items()}
    resolved = resolve_run({**defaults, "experiment_name": "shared-site-secrets"})
    capfd.readouterr()
    ti = FakeTI(task_id="canary")
    op = make_op(
        cluster,
        ti.task_id,
        remote_base_dir=f"{cluster.new_dir('canary')}/runs",
        config={**SMALL_CONFIG, "stop": {"iterations": 2}, "eval_episodes": 1},
        job_spec={"nodes": 1, "cpus_per_task": 2, "time": "5"},
        mlflow=resolved["mlflow"],
        env_vars={"SR_API_TOKEN": token},
    )
    op_log = tap(op)
    with pytest.raises(TaskDeferred) as deferred:
        op.execute({"ti": ti})
    trigger = deferred.value.trigger
    trig_log = tap(trigger)
    kwargs_json = json.dumps(trigger.serialize(), default=str)
    event = asyncio.run(first_event(trigger, 300))
    summary = op.execute_complete({"ti": ti}, event.payload, **(deferred.value.kwargs or {}))
    assert summary["state"] == "COMPLETED", summary
    run_id = ti.xcom["mlflow_run_id"]
    hook = SlurmHook("slurm_dev")
    try:
        finalize_run(
            # artifacts only: registering needs the exported model (not built here)
            MlflowSettings.from_dict({**resolved["mlflow"], "registered_model_name": None}),
            run_id,
            hook=hook,
            run_dir=summary["run_dir"],
            job_id=str(summary["job_id"]),
            result=None,
        )
    finally:
        hook.close()
    out = capfd.readouterr()
    client = MlflowClient(tracking_uri=mlflow_server.url)
    run = client.get_run(run_id)
    art = tmp_path / "artifacts"
    client.download_artifacts(run_id, "", str(art))
    files = [p for p in art.rglob("*") if p.is_file()]
    assert any(p.name == "job.sbatch" for p in files), files
    # the checkpoint inside the run directory is still uploaded (hole 8 confines, not drops)
    assert any(p.relative_to(art).parts[0] == "checkpoint" for p in files), files
    # The taps saw the task's own lines: an empty log would hide any leak.
    assert op_log.records and trig_log.records, (op_log.text, trig_log.text)
    places: dict[str, str] = {
        "task log (operator)": op_log.text,
        "task log (trigger)": trig_log.text,
        "task log (stdout/stderr)": out.out + out.err,
        "xcom": json.dumps(ti.xcom, default=str) + json.dumps(summary, default=str),
        "resolve task xcom": json.dumps(resolved, default=str),
        "trigger kwargs": kwargs_json,
        "mlflow params": json.dumps(run.data.params),
        "mlflow tags": json.dumps(run.data.tags),
        **{
            f"mlflow artifact {p.relative_to(art)}": p.read_bytes().decode("latin-1") for p in files
        },
    }
    leaks = [
        (where, text[max(0, text.find(c) - 200) : text.find(c)])  # what precedes it
        for where, text in places.items()
        for c in (password, token)
        if c in text
    ]
    assert not leaks, leaks
    # the run did use the password-bearing URI: the server saw the run's metrics
    assert run.data.metrics, "nothing was relayed: the check above proves nothing"
    assert run.data.params


def test_no_host_key_check_extra_cannot_skip_verification(
    cluster: DevCluster, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A connection with no pinned key and no_host_key_check: refused, never connected.

    (Before: the hook accepted whatever key the server showed, so a neighbour
    listening on the login node's address would have received our commands.)
    """
    from slurm_ray.hooks.slurm import HostKeyError, SlurmHook

    conn = json.loads(cluster.env["AIRFLOW_CONN_SLURM_DEV"])
    extra = {k: v for k, v in conn["extra"].items() if k != "host_key"}
    extra["no_host_key_check"] = True
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ssh/known_hosts to fall back on
    monkeypatch.setenv("AIRFLOW_CONN_SR_NOCHECK", json.dumps({**conn, "extra": extra}))
    hook = SlurmHook("sr_nocheck")
    marker = f"{cluster.scratch}/tests/nocheck-{uuid.uuid4().hex[:8]}"
    with pytest.raises(HostKeyError, match="no_host_key_check"):
        hook.run(f"touch {shlex.quote(marker)}")
    hook.close()
    assert cluster.ssh(f"test -e {shlex.quote(marker)}", check=False).returncode != 0


def test_finalize_uploads_nothing_from_outside_the_run(
    cluster: DevCluster, mlflow_server, tmp_path: Path
) -> None:
    """result.json naming a directory outside the run (directly or by a symlink): not uploaded."""
    from mlflow import MlflowClient
    from slurm_ray.hooks.slurm import SlurmHook
    from slurm_ray.mlflow.artifacts import finalize_run
    from slurm_ray.mlflow.runs import ensure_run
    from slurm_ray.mlflow.settings import MlflowSettings

    base = cluster.new_dir("outside")
    secret = _canary("OUT")
    run_dir = f"{base}/run"
    q = shlex.quote
    cluster.ssh(
        f"mkdir -p {q(base)}/keys {q(run_dir)}/checkpoints/iter_000001 && "
        f"printf %s {q(secret)} > {q(base)}/keys/id_ed25519 && "
        f"echo inside > {q(run_dir)}/checkpoints/iter_000001/state && "
        f"ln -s {q(base)}/keys {q(run_dir)}/checkpoints/iter_000002 && "
        f"ln -s {q(base)}/keys/id_ed25519 {q(run_dir)}/config.json"
    )
    settings = MlflowSettings(mlflow_server.url, "shared-site-outside")
    hook = SlurmHook("slurm_dev")
    client = MlflowClient(tracking_uri=mlflow_server.url)
    try:
        for ckpt in (f"{base}/keys", f"{run_dir}/checkpoints/iter_000002", f"{run_dir}/../keys"):
            run_id = ensure_run(settings, tags={"slurm_ray.test": uuid.uuid4().hex})
            result = {"status": "succeeded", "iterations": 1, "checkpoint": ckpt}
            hook.upload_bytes(json.dumps(result).encode(), f"{run_dir}/result.json")
            finalize_run(settings, run_id, hook=hook, run_dir=run_dir, job_id="1", result=None)
            art = tmp_path / run_id
            client.download_artifacts(run_id, "", str(art))
            names = sorted(str(p.relative_to(art)) for p in art.rglob("*") if p.is_file())
            assert names == ["result.json"], (ckpt, names)
            assert all(secret not in p.read_text() for p in art.rglob("*") if p.is_file())
    finally:
        hook.close()
