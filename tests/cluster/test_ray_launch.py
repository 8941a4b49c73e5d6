"""include/ray_launch.sh on the real local Slurm cluster (n1, n2).

The `cluster` tests: each writes a fresh run directory under the shared scratch, stages the
launcher there, submits a hand-written batch script with `sbatch --parsable`
over the dev cluster's ssh, and always scancels what it submitted. The
unmarked tests source the launcher and check its pure helpers locally.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys
import time
import uuid
from typing import Any

import pytest

from tests.conftest import ROOT as REPO
from tests.conftest import STATE, DevCluster

INCLUDE = REPO / "include"
SSH_CONFIG = STATE / "ssh_config"
SCRATCH = STATE / "scratch" / "tests"
VENV = STATE / "venv"
TERMINAL = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
}
READY_RE = re.compile(
    r"ray_launch: cluster ready nodes=(\d+) cpus=(\S+) gpus=(\S+) in ([\d.]+)s "
    r"\(address=([\d.]+):(\d+)\)"
)


def ssh(cmd: str, *, check: bool = True, timeout: float = 60, stdin: str | None = None):
    r = subprocess.run(
        ["ssh", "-F", str(SSH_CONFIG), "dev-cluster", cmd],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and r.returncode != 0:
        raise AssertionError(f"ssh {cmd!r} failed ({r.returncode}): {r.stderr.strip()}")
    return r


class Job:
    """A run directory with the launcher staged in it, and its job(s)."""

    def __init__(self, tag: str) -> None:
        self.dir = SCRATCH / f"{tag}-{uuid.uuid4().hex[:10]}"
        self.jobs: list[str] = []
        ssh(f"mkdir -p {shlex.quote(str(self.dir))}")
        for name in ("ray_launch.sh", "ray_wait.py"):
            self.put(name, (INCLUDE / name).read_text())

    def put(self, name: str, text: str) -> None:
        ssh(f"cat > {shlex.quote(str(self.dir / name))}", stdin=text)

    def submit(self, entrypoint: str, *, sbatch: str = "", env: str = "") -> str:
        script = (
            "#!/bin/bash\n"
            "#SBATCH --nodes=2 --cpus-per-task=1 --time=10\n"
            "#SBATCH --output=slurm-%j.out\n"
            f"{sbatch}"
            f"source {VENV}/bin/activate\n"
            f"{env}"
            f"exec bash ./ray_launch.sh {entrypoint}\n"
        )
        name = f"job{len(self.jobs)}.sbatch"
        self.put(name, script)
        out = ssh(f"cd {shlex.quote(str(self.dir))} && sbatch --parsable {name}").stdout
        jobid = out.strip().split(";")[0]
        assert jobid.isdigit(), out
        self.jobs.append(jobid)
        return jobid

    def out(self, jobid: str) -> str:
        r = ssh(f"cat {shlex.quote(str(self.dir / f'slurm-{jobid}.out'))}", check=False)
        return r.stdout if r.returncode == 0 else ""

    def wait_output(self, jobid: str, pattern: str, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.out(jobid)
            if re.search(pattern, text):
                return text
            info = job_info(jobid)
            if info.get("JobState") in TERMINAL:
                text = self.out(jobid)
                assert re.search(pattern, text), f"job ended {info.get('JobState')}:\n{text}"
                return text
            time.sleep(0.5)
        raise AssertionError(f"{pattern!r} not in job {jobid}'s output:\n{self.out(jobid)}")

    def cancel(self) -> None:
        if self.jobs:
            ssh(f"scancel {' '.join(self.jobs)}", check=False)


@pytest.fixture
def job(cluster: DevCluster):
    # The shared fixture brought the cluster up (and built its venv) or failed.
    assert (cluster.venv / ".slurm_ray_spec_sha256").is_file(), "cluster venv not built"
    created: list[Job] = []

    def make(tag: str) -> Job:
        j = Job(tag)
        created.append(j)
        return j

    yield make
    for j in created:
        j.cancel()


def job_info(jobid: str) -> dict[str, str]:
    r = ssh(f"scontrol show job -o {jobid}", check=False)
    info: dict[str, str] = {}
    for tok in r.stdout.split():
        k, sep, v = tok.partition("=")
        if sep and k not in info:
            info[k] = v
    return info


def wait_done(jobid: str, timeout: float = 180) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = job_info(jobid)
        if info.get("JobState") in TERMINAL:
            return info
        time.sleep(0.5)
    raise AssertionError(f"job {jobid} not finished after {timeout}s: {job_info(jobid)}")


JOB_PROCS = r"""
for p in /proc/[0-9]*; do
  if tr '\0' '\n' <"$p/environ" 2>/dev/null | grep -qx "SLURM_JOB_ID=$1" ||
     tr '\0' ' ' <"$p/cmdline" 2>/dev/null | grep -Eq "/tmp/rs-$1[./]"; then
    echo "${p#/proc/} $(tr '\0' ' ' <"$p/cmdline" 2>/dev/null)"
  fi
done
"""


def ray_procs(jobid: str) -> list[str]:
    """Processes of this job still alive: Slurm put SLURM_JOB_ID=<jobid> in
    their environment (Ray workers inherit it even after renaming themselves
    `ray::IDLE`), or they name the job's Ray temp dir."""
    out = ssh(f"bash -s {jobid}", stdin=JOB_PROCS, check=False).stdout
    return [
        line.strip()
        for line in out.splitlines()
        if line.strip() and "bash -s" not in line and "/proc/[0-9]" not in line
    ]


def tmp_dirs(jobid: str) -> list[str]:
    """The job's temp dirs still in /tmp (the dev nodes share it)."""
    return ssh(f"ls -d /tmp/rs-{jobid}.* 2>/dev/null", check=False).stdout.split()


def wait_no_ray(jobid: str, timeout: float) -> float:
    t0 = time.monotonic()
    while True:
        left = ray_procs(jobid)
        if not left:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"Ray processes of job {jobid} still alive:\n" + "\n".join(left))
        time.sleep(0.5)


PROBE = """\
import os, socket, sys, time
import ray
ray.init(address=os.environ["RAY_ADDRESS"], logging_level="ERROR")
alive = [n for n in ray.nodes() if n["Alive"]]
hosts = sorted({n["NodeManagerHostname"] for n in alive})
print(f"ALIVE {len(alive)} HOSTS {','.join(hosts)}", flush=True)

@ray.remote(num_cpus=1)
def where():
    # The private dir a worker is given, against the one its node's Ray runs in.
    ray_dir = ray._private.worker.global_worker.node.get_temp_dir_path()
    mine = os.environ.get("SLURM_RAY_TMPDIR", "")
    st = os.stat(mine) if os.path.isdir(mine) else None
    ok = (
        os.path.dirname(ray_dir) == mine
        and os.environ.get("RAY_TMPDIR") == mine
        and st is not None and st.st_uid == os.getuid() and st.st_mode & 0o777 == 0o700
    )
    return socket.gethostname(), ok, f"{mine} {os.environ.get('RAY_TMPDIR')} ray={ray_dir}"

from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as Pin
seen = ray.get([
    where.options(scheduling_strategy=Pin(n["NodeID"], soft=False)).remote() for n in alive
])
print(f"TASKS_RAN_ON {','.join(sorted({h for h, _, _ in seen}))}", flush=True)
for host, ok, dirs in sorted(seen):
    print(f"NODE_TMPDIR {host} {'own' if ok else 'WRONG'} {dirs}", flush=True)
driver_tmp = os.environ.get("SLURM_RAY_TMPDIR", "")
print("DRIVER_TMPDIR", "own" if os.path.isdir(driver_tmp)
      and os.environ.get("RAY_TMPDIR") == driver_tmp else "WRONG", driver_tmp, flush=True)
mode = os.stat(os.environ["RAY_AUTH_TOKEN_PATH"]).st_mode & 0o777
print("AUTH", os.environ.get("RAY_AUTH_MODE"), oct(mode))
# Optional rendezvous: wait until N jobs have written their marker.
rdv = os.environ.get("RDV_DIR")
if rdv:
    open(os.path.join(rdv, "ready-" + os.environ["SLURM_JOB_ID"]), "w").close()
    deadline = time.time() + 120
    while len([f for f in os.listdir(rdv) if f.startswith("ready-")]) < int(os.environ["RDV_N"]):
        assert time.time() < deadline, "the other job never became ready"
        time.sleep(0.2)
    print("RENDEZVOUS OK", flush=True)
"""

SLEEPER = """\
import os, signal, sys, time
import ray
ray.init(address=os.environ["RAY_ADDRESS"], logging_level="ERROR")

def on_usr1(signum, frame):
    print("got USR1", flush=True)
    sys.exit(75)

signal.signal(signal.SIGUSR1, on_usr1)
print("RUNNING", len([n for n in ray.nodes() if n["Alive"]]), flush=True)
while True:
    time.sleep(0.5)
"""


@pytest.mark.cluster
def test_two_node_cluster_runs_entrypoint(job):
    j = job("ok")
    j.put("probe.py", PROBE)
    jobid = j.submit("python -u probe.py")
    info = wait_done(jobid)
    out = j.out(jobid)
    assert info["JobState"] == "COMPLETED", out
    assert info["ExitCode"] == "0:0", out
    m = READY_RE.search(out)
    assert m, out
    assert m.group(1) == "2"
    assert float(m.group(2)) == 2  # 1 CPU per node (--cpus-per-task=1), head included
    assert "ALIVE 2 HOSTS n1,n2" in out
    assert "TASKS_RAN_ON n1,n2" in out
    # Each node's Ray workers get that node's private dir (a path from the
    # batch node does not exist on another node of a real site).
    assert re.findall(r"NODE_TMPDIR (\S+) own ", out) == ["n1", "n2"], out
    assert "DRIVER_TMPDIR own " in out, out
    assert "AUTH token 0o600" in out
    assert "entrypoint exited with status 0" in out
    wait_no_ray(jobid, timeout=15)
    # success: temp dirs removed everywhere (no Ray logs kept), token removed
    assert tmp_dirs(jobid) == []
    assert ssh(f"ls -d {j.dir}/ray-logs/{jobid}.*.ray", check=False).returncode != 0
    assert ssh(f"ls {shlex.quote(str(j.dir))}/.ray_auth_token.{jobid}", check=False).returncode != 0


@pytest.mark.cluster
def test_failing_entrypoint_exit_code(job):
    j = job("fail")
    j.put(
        "fail.py",
        "import os, ray\nray.init(address=os.environ['RAY_ADDRESS'])\nraise SystemExit(7)\n",
    )
    jobid = j.submit("python -u fail.py")
    info = wait_done(jobid)
    out = j.out(jobid)
    assert info["JobState"] == "FAILED", out
    assert info["ExitCode"] == "7:0", out
    assert "entrypoint exited with status 7" in out
    assert f"kept Ray's logs in {j.dir}/ray-logs/{jobid}.<node>.ray/" in out
    assert "could not remove Ray's temp dirs" not in out
    m = READY_RE.search(out)
    assert m, out
    wait_no_ray(jobid, timeout=15)
    # failure: Ray's logs moved into the run directory, no temp dir left behind
    assert tmp_dirs(jobid) == []
    for node in ("n1", "n2"):
        ssh(f"test -s {j.dir}/ray-logs/{jobid}.{node}.ray/raylet.out")


@pytest.mark.cluster
def test_two_jobs_share_the_nodes(job):
    j = job("pair")
    ssh(f"mkdir -p {shlex.quote(str(j.dir / 'rdv'))}")
    j.put("probe.py", PROBE)
    env = f"export RDV_DIR={shlex.quote(str(j.dir / 'rdv'))} RDV_N=2\n"
    a = j.submit("python -u probe.py", env=env)
    b = j.submit("python -u probe.py", env=env)
    ia, ib = wait_done(a), wait_done(b)
    outs = {a: j.out(a), b: j.out(b)}
    for jobid, info in ((a, ia), (b, ib)):
        assert info["JobState"] == "COMPLETED", outs[jobid]
        assert "ALIVE 2 HOSTS n1,n2" in outs[jobid]
        assert "RENDEZVOUS OK" in outs[jobid]  # both clusters were up at once
        assert "n[1-2]" in info["NodeList"]
    pa = READY_RE.search(outs[a]).group(6)
    pb = READY_RE.search(outs[b]).group(6)
    assert pa != pb


@pytest.mark.cluster
def test_scancel_leaves_no_ray_process(job):
    j = job("cancel")
    j.put("sleeper.py", SLEEPER)
    jobid = j.submit("python -u sleeper.py")
    out = j.wait_output(jobid, r"RUNNING 2")
    assert READY_RE.search(out), out
    running = "\n".join(ray_procs(jobid))
    for name in ("raylet", "gcs_server"):
        assert name in running, f"no {name} process found for the running job:\n{running}"
    ssh(f"scancel {jobid}")
    took = wait_no_ray(jobid, timeout=15)
    info = wait_done(jobid, timeout=60)
    assert info["JobState"] == "CANCELLED"
    print(f"Ray gone {took:.1f}s after scancel")
    # cancelled: srun SIGKILLs the steps, so the temp dirs stay (private)
    # until this user's next job starts on the nodes: it moves Ray's logs
    # into the cancelled job's run directory and removes them.
    left = tmp_dirs(jobid)
    modes = ssh(f"stat -c '%a %U' {' '.join(left)}", check=False).stdout.split("\n")
    assert all(m == "700 slurmray" for m in modes if m), modes
    nxt = j.submit("true")
    assert wait_done(nxt)["JobState"] == "COMPLETED", j.out(nxt)
    assert tmp_dirs(jobid) == [], j.out(nxt)
    # Reaped by ours, or by another job of the same user that started on the
    # node first (a parallel test lane, another session): either way the dirs
    # are gone and Ray's logs were moved into the cancelled job's run directory.
    moved = ssh(f"test -s {j.dir}/ray-logs/{jobid}.n2.ray/raylet.out", check=False)
    assert moved.returncode == 0, (
        f"no Ray logs of n2 moved; left={left}\n"
        + ssh(f"ls -la {j.dir}/ray-logs {j.dir}/ray-logs/*.ray", check=False).stdout
        + f"\ncancelled job:\n{j.out(jobid)}\nnext job:\n{j.out(nxt)}"
    )
    reaped = "temp dir(s) that ended jobs (cancelled) left"
    if reaped not in j.out(nxt):
        print(f"job {jobid}'s temp dirs were reaped by another job of this user")


def ray_components(procs: list[str]) -> dict[str, int]:
    """How many of each Ray daemon a job runs (from ray_procs lines)."""
    kinds = {
        "gcs_server": r"/gcs_server ",
        "raylet": r"/raylet ",
        "autoscaler monitor": r"/autoscaler/(_private|v2)/monitor\.py ",
        "log monitor": r"/log_monitor\.py ",
    }
    return {k: sum(1 for p in procs if re.search(rx, p)) for k, rx in kinds.items()}


@pytest.mark.cluster
def test_only_the_ray_daemons_a_batch_job_needs(job):
    """No autoscaler monitor (the allocation is fixed); log monitors unless
    SLURM_RAY_LOG_MONITOR=0. Both jobs run at once on the same two nodes."""
    j = job("daemons")
    j.put("sleeper.py", SLEEPER)
    full = j.submit("python -u sleeper.py")
    lean = j.submit("python -u sleeper.py", env="export SLURM_RAY_LOG_MONITOR=0\n")
    for jobid in (full, lean):
        j.wait_output(jobid, r"RUNNING 2")
    got = {jobid: ray_components(ray_procs(jobid)) for jobid in (full, lean)}
    j.cancel()
    base = {"gcs_server": 1, "raylet": 2, "autoscaler monitor": 0}
    assert got[full] == {**base, "log monitor": 2}, got
    assert got[lean] == {**base, "log monitor": 0}, got
    for jobid in (full, lean):
        wait_no_ray(jobid, timeout=30)


@pytest.mark.cluster
def test_usr1_reaches_entrypoint(job):
    j = job("usr1")
    j.put("sleeper.py", SLEEPER)
    jobid = j.submit("python -u sleeper.py", sbatch="#SBATCH --signal=B:USR1@60\n")
    out = j.wait_output(jobid, r"RUNNING 2")
    assert READY_RE.search(out), out
    ssh(f"scancel --signal=USR1 --batch {jobid}")
    info = wait_done(jobid, timeout=60)
    out = j.out(jobid)
    assert "got USR1" in out, out
    assert "forwarding SIGUSR1 to the entrypoint" in out
    assert info["ExitCode"] == "75:0", out
    assert info["JobState"] == "FAILED"
    wait_no_ray(jobid, timeout=15)
    assert tmp_dirs(jobid) == []


@pytest.mark.cluster
def test_ray_start_failure_stops_waiting(job):
    """A `ray start` step that dies ends the wait at once with exit 3."""
    j = job("badstart")
    j.put("never.py", "raise SystemExit('must not run')\n")
    # 1 byte of object store is refused by `ray start` on every node.
    jobid = j.submit(
        "python -u never.py",
        env="export SLURM_RAY_OBJECT_STORE_MEMORY=1 SLURM_RAY_JOIN_TIMEOUT=120\n",
    )
    info = wait_done(jobid, timeout=120)
    out = j.out(jobid)
    assert info["ExitCode"] == "3:0", out
    assert "exited before the cluster formed" in out
    m = re.search(r"only (\d+) of 2 Ray nodes joined after ([\d.]+) s; see \S+/ray-logs/", out)
    assert m, out
    assert float(m.group(2)) < 60  # did not sit out the 120 s timeout
    assert "must not run" not in out
    wait_no_ray(jobid, timeout=15)
    assert tmp_dirs(jobid) == []


@pytest.mark.cluster
def test_join_timeout(job):
    j = job("timeout")
    j.put("never.py", "raise SystemExit('must not run')\n")
    jobid = j.submit("python -u never.py", env="export SLURM_RAY_JOIN_TIMEOUT=1\n")
    info = wait_done(jobid, timeout=120)
    out = j.out(jobid)
    assert info["ExitCode"] == "3:0", out
    pattern = r"only [01] of 2 Ray nodes joined after [\d.]+ s; see \S+/ray-logs/"
    assert re.search(pattern, out), out
    assert "must not run" not in out
    wait_no_ray(jobid, timeout=15)
    assert tmp_dirs(jobid) == []


@pytest.mark.cluster
def test_scancel_while_forming_leaves_no_ray_process(job):
    j = job("cancelform")
    j.put("never.py", "raise SystemExit('must not run')\n")
    jobid = j.submit("python -u never.py")
    j.wait_output(jobid, rf"ray_launch: job {jobid}: head", timeout=120)
    ssh(f"scancel {jobid}")
    wait_no_ray(jobid, timeout=15)
    info = wait_done(jobid, timeout=60)
    assert info["JobState"] == "CANCELLED"
    assert "must not run" not in j.out(jobid)
    if tmp_dirs(jobid):
        # Slurm SIGKILLs steps still cleaning up after KillWait (seen under load
        # while Ray was starting): the next job's launcher reaps what was left.
        nxt = job("cancelform-next")
        wait_done(nxt.submit("true"), timeout=120)
    assert tmp_dirs(jobid) == []


# --- the launcher's helpers, sourced into a local bash (no cluster needed) ---


def bash_fn(expr: str, **env: str) -> str:
    script = f"source {shlex.quote(str(INCLUDE / 'ray_launch.sh'))}; {expr}"
    clean = {"PATH": "/usr/bin:/bin", **env}
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=clean)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("4(x2)", "4 4"),
        ("36", "36"),
        ("4(x2),2", "4 4 2"),
        ("2,1", "2 1"),
        ("8,4(x3),1", "8 4 4 4 1"),
        ("", ""),
    ],
)
def test_expand_counts(value, expected):
    assert bash_fn(f"expand_counts {shlex.quote(value)}") == expected


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, "0"),
        ({"CUDA_VISIBLE_DEVICES": "0,1,3"}, "3"),
        ({"CUDA_VISIBLE_DEVICES": "NoDevFiles", "SLURM_GPUS_ON_NODE": "2"}, "2"),
        ({"SLURM_GPUS_ON_NODE": "4"}, "4"),
        ({"SLURM_GPUS_PER_NODE": "a100:2"}, "2"),
        ({"SLURM_GPUS_PER_NODE": "gpu:h100:4"}, "4"),
        ({"SLURM_GPUS_PER_NODE": "1"}, "1"),
        ({"SLURM_RAY_NUM_GPUS": "0", "CUDA_VISIBLE_DEVICES": "0"}, "0"),
    ],
)
def test_detect_gpus(env, expected):
    assert bash_fn("detect_gpus", **env) == expected


def test_object_store_bytes():
    mb = 1024 * 1024
    assert bash_fn("object_store_bytes 4", SLURM_MEM_PER_NODE="10000") == str(10000 * mb * 3 // 10)
    assert bash_fn("object_store_bytes 4", SLURM_MEM_PER_CPU="1000") == str(4000 * mb * 3 // 10)
    assert bash_fn("object_store_bytes 4", SLURM_RAY_OBJECT_STORE_MEMORY="123") == "123"
    assert 100_000_000 <= int(bash_fn("object_store_bytes 4")) <= 2 * 1024**3


def test_port_block():
    out = bash_fn(
        'set_ports 31000; echo "$GCS_PORT $NODE_MANAGER_PORT $MIN_WORKER_PORT $MAX_WORKER_PORT"'
    )
    assert out == "31000 31001 31010 31099"
    # blocks stay out of Linux's ephemeral range and Ray's default worker range 10002-19999
    blocks = [int(b) for b in bash_fn("port_blocks 32768 60999").split()]
    assert blocks[0] == 20000 and blocks[-1] == 65400
    assert all(b + 99 < 32768 or b > 60999 for b in blocks)
    assert len(blocks) == 127 + 45
    narrow = bash_fn("port_blocks 1024 65535", SLURM_RAY_PORT_MIN="20000")
    assert narrow == ""
    # jobs spread over the blocks by id; the next job id starts one block further
    first = bash_fn("port_blocks 32768 60999 | preferred_block 171")
    assert first == "65400"
    assert bash_fn("port_blocks 32768 60999 | preferred_block 172") == "20000"


def test_read_result_is_data_only(tmp_path):
    """ray_wait's result is parsed, never executed: other lines are refused."""
    f = tmp_path / "wait"
    marker = tmp_path / "ran"
    f.write_text(
        f"alive=2\ncpus=3.5\ngpus=0\ndead_node=n1\ntouch {marker}\nalive=$(touch {marker})\n"
    )
    out = bash_fn(f'alive=0; read_result {f} 2>&1; echo "$alive $cpus $gpus $dead_node"')
    assert out.splitlines()[-1] == "2 3.5 0 n1"
    assert "ignoring unexpected line" in out
    assert not marker.exists()


def _fake_node_dir(root, run, jobid: int, suffix: str, node: str):
    """A node's temp dir as node_main leaves it when srun SIGKILLs the step."""
    d = root / f"rs-{jobid}.{suffix}"
    logs = d / "ray" / "session_2026-12-01_00-00-00_000000_1" / "logs"
    logs.mkdir(parents=True)
    (logs / "raylet.out").write_text(f"raylet of {node}\n")
    (d / "node").write_text(f"{node}\n")
    (d / "run_dir").write_text(f"{run}\n")
    (run / "ray-logs" / f"{jobid}.{node}.tmp").write_text(f"{d}\n")
    return d


def test_cleanup_on_a_shared_temp_root_keeps_each_nodes_logs(tmp_path):
    """The dev nodes (and sites with SLURM_RAY_TMP_ROOT on shared storage)
    share the temp root: one node's cleanup task must not take the other
    node's dir, or its logs land under the wrong node's name (or nowhere)."""
    root, run = tmp_path / "tmp", tmp_path / "run"
    root.mkdir()
    (run / "ray-logs").mkdir(parents=True)
    d1 = _fake_node_dir(root, run, 4242, "AAAAAA", "n1")
    d2 = _fake_node_dir(root, run, 4242, "BBBBBB", "n2")
    batch = root / "rs-4242.CCCCCC"  # the batch shell's own, between two tries
    batch.mkdir()
    (batch / "node").write_text("n1\n")
    (batch / "batch").touch()
    env = {"SLURM_JOB_ID": "4242", "_RL_RUN_DIR": str(run), "SLURM_RAY_TMP_ROOT": str(root)}
    bash_fn("cleanup_main 7", SLURMD_NODENAME="n1", **env)
    assert not d1.exists()
    assert d2.is_dir(), "n1's cleanup removed n2's temp dir"
    assert batch.is_dir(), "the cleanup removed the batch shell's dir"
    assert (run / "ray-logs/4242.n1.ray/raylet.out").read_text() == "raylet of n1\n"
    assert not (run / "ray-logs/4242.n1.tmp").exists()
    bash_fn("cleanup_main 7", SLURMD_NODENAME="n2", **env)
    assert not d2.exists()
    assert (run / "ray-logs/4242.n2.ray/raylet.out").read_text() == "raylet of n2\n"
    assert sorted(p.name for p in (run / "ray-logs").iterdir()) == [
        "4242.n1.log",
        "4242.n1.ray",
        "4242.n2.log",
        "4242.n2.ray",
    ]


def _ray_wait() -> Any:
    """include/ray_wait.py as a module (it is a script on the cluster side)."""
    spec = importlib.util.spec_from_file_location("ray_wait", INCLUDE / "ray_wait.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_next_jobs_reaper_names_logs_after_the_node_that_made_them(tmp_path):
    ray_wait = _ray_wait()
    root, run = tmp_path / "tmp", tmp_path / "run"
    root.mkdir()
    (run / "ray-logs").mkdir(parents=True)
    gone = _fake_node_dir(root, run, 41, "BBBBBB", "n2")
    live = _fake_node_dir(root, run, 42, "CCCCCC", "n2")
    ray_wait.reap(str(root), 50, {42}, "n1")
    assert not gone.exists() and live.is_dir()
    assert (run / "ray-logs/41.n2.ray/raylet.out").read_text() == "raylet of n2\n"
    assert not (run / "ray-logs/41.n2.tmp").exists()
    assert not (run / "ray-logs/41.n1.ray").exists()


def test_reapers_at_once_take_each_dir_once_and_keep_its_logs(tmp_path):
    """Both dev nodes share /tmp, and two jobs may start together: four reapers
    see the same dirs. Each dir is reaped once, with all of its logs."""
    root, run = tmp_path / "tmp", tmp_path / "run"
    root.mkdir()
    (run / "ray-logs").mkdir(parents=True)
    for i in range(40):
        logs = _fake_node_dir(root, run, 100 + i, f"D{i:05d}", "n2") / "ray"
        for k in range(20):
            (logs / "session_2026-12-01_00-00-00_000000_1/logs" / f"w{k}.log").write_text(
                "x" * 4096
            )
    code = "import sys, ray_wait; ray_wait.reap(sys.argv[1], 1000, set(), sys.argv[2])"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(root), node],
            cwd=INCLUDE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for node in ("n1", "n2", "n1", "n2")
    ]
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    reaped = [line for out, _ in outs for line in out.splitlines()]
    assert len(reaped) == len(set(reaped)) == 40, reaped
    assert list(root.iterdir()) == []
    for i in range(40):
        kept = run / "ray-logs" / f"{100 + i}.n2.ray"
        assert len(list(kept.iterdir())) == 21, kept


def test_each_node_srun_status_inside_the_exit_trap(tmp_path):
    """on_exit runs the cleanup step from the EXIT trap: a bare `return` there
    gave back the job's status, so every failed job also logged a cleanup failure."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "srun").chmod(0o755)
    out = bash_fn(
        'NUM_NODES=2; HET_SIZES=(); t() { each_node_srun 5 true; echo "rc=$?"; }; '
        "trap 't; exit 0' EXIT; (exit 7)",
        PATH=f"{bin_dir}:/usr/bin:/bin",
    )
    assert out == "rc=0"


def test_launcher_refuses_outside_slurm():
    r = subprocess.run(
        ["bash", str(INCLUDE / "ray_launch.sh"), "true"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert r.returncode == 2
    assert "not inside a Slurm job" in r.stderr
    r = subprocess.run(["bash", str(INCLUDE / "ray_launch.sh")], capture_output=True, text=True)
    assert r.returncode == 2
    assert "usage" in r.stderr


def test_launcher_is_clean_bash():
    assert subprocess.run(["bash", "-n", str(INCLUDE / "ray_launch.sh")]).returncode == 0


def test_a_dir_left_claimed_by_a_reaper_that_died_is_reaped_later(tmp_path):
    """A reaper renames a dir before it removes it; one killed in between left
    `rs-13.XXXXXX.reaping` in the dev nodes' /tmp for good."""
    ray_wait = _ray_wait()
    root, run = tmp_path / "tmp", tmp_path / "run"
    root.mkdir()
    (run / "ray-logs").mkdir(parents=True)
    left = _fake_node_dir(root, run, 13, "EEEEEE", "n2")
    claimed = left.rename(root / "rs-13.EEEEEE.reaping")
    # Just claimed: another reaper is at work on it.
    ray_wait.reap(str(root), 50, set(), "n1")
    assert claimed.is_dir()
    # Claimed longer ago than the limit (0 s here): taken again, logs kept.
    ray_wait.reap(str(root), 50, set(), "n1", stale_claim_s=0)
    assert list(root.iterdir()) == []
    assert (run / "ray-logs/13.n2.ray/raylet.out").read_text() == "raylet of n2\n"
