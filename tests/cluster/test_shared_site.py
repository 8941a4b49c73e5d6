"""include/ray_launch.sh on a shared site: a neighbour attacks our Ray job.

The neighbour (tests/neighbour.py) only does what any user of the cluster
can: read `squeue` and `ps`, write into the shared `/tmp`, listen on ports of
the nodes. Each test holds our job (`--hold`) so the neighbour can prepare
for exactly this job id (and never touches another developer's jobs), then
releases it. Issue 11, section 2, holes 1-3.
"""

from __future__ import annotations

import re
import shlex
import uuid
from collections.abc import Callable, Iterator

import pytest

from tests.cluster.test_ray_launch import READY_RE, Job, bash_fn, ssh, tmp_dirs, wait_done
from tests.conftest import DevCluster
from tests.neighbour import Neighbour

pytestmark = pytest.mark.cluster

# Prints, for every Ray node, the owner and mode of each directory above its
# plasma socket: Ray's session dir and everything it sits in (/tmp is shared
# by all nodes of the dev cluster, so the head can look at them all).
WHERE = """\
import os, pwd, ray
ray.init(address=os.environ["RAY_ADDRESS"], logging_level="ERROR")
for n in ray.nodes():
    if n["Alive"]:
        d, chain = os.path.dirname(n["ObjectStoreSocketName"]), []
        while d != "/":
            st = os.lstat(d)
            chain.append(f"{d}:{pwd.getpwuid(st.st_uid).pw_name}:{oct(st.st_mode & 0o7777)}")
            d = os.path.dirname(d)
        print("TMPDIR", n["NodeManagerHostname"], " ".join(chain), flush=True)
"""

# The squatter: waits until our launcher's `ray_wait.py --result FILE` shows
# up in ps, then writes shell code into FILE before ray_wait.py does.
SQUAT = r"""
job=$1 marker=$2
echo READY
while :; do
  for pid in $(pgrep -u slurmray -f 'ray_wait.py .*--result'); do
    path=$(tr '\0' '\n' <"/proc/$pid/cmdline" 2>/dev/null | sed -n '/^--result$/{n;p;q}')
    [[ $path == *"rs-$job"* ]] || continue
    if printf 'id -un >%q\n' "$marker" >"$path" 2>/dev/null; then
      echo "SQUATTED $path"
      exit 0
    fi
  done
  sleep 0.02
done
"""


@pytest.fixture
def ray_job(cluster: DevCluster) -> Iterator[Callable[[str], Job]]:
    """A run directory with the launcher staged; its jobs are cancelled at the end."""
    made: list[Job] = []

    def make(tag: str) -> Job:
        made.append(Job(tag))
        return made[-1]

    yield make
    for j in made:
        j.cancel()


def release(jobid: str) -> None:
    ssh(f"scontrol release {jobid}")


def test_squatted_wait_file_runs_no_neighbour_code(
    ray_job: Callable[[str], Job], neighbour: Neighbour
) -> None:
    """Hole 1: the neighbour writes shell code where the launcher reads its
    join result; the job must neither run it nor fail."""
    j = ray_job("squatwait")
    j.put("ok.py", "import os, ray\nray.init(address=os.environ['RAY_ADDRESS'])\nprint('OK')\n")
    jobid = j.submit("python -u ok.py", sbatch="#SBATCH --hold\n")
    marker = f"/tmp/nb-marker-{jobid}-{uuid.uuid4().hex[:6]}"
    neighbour.litter(marker)
    squatter = neighbour.spawn(f"bash -c {shlex.quote(SQUAT)} _ {jobid} {marker}", node="n1")
    neighbour.wait_line(squatter, "READY")
    release(jobid)
    info = wait_done(jobid)
    out = j.out(jobid)
    if squatter.poll() is not None:  # it found a path and wrote into it
        assert squatter.stdout is not None
        said = squatter.stdout.read()
        print(said)
        neighbour.litter(*re.findall(r"SQUATTED (\S+)", said))
    ran = ssh(f"cat {shlex.quote(marker)}", check=False)
    assert ran.returncode != 0, f"the neighbour's code ran as {ran.stdout.strip()!r}:\n{out}"
    assert info["JobState"] == "COMPLETED", out
    assert "OK" in out


def test_squatted_temp_dirs_neither_stop_nor_host_ray(
    ray_job: Callable[[str], Job], neighbour: Neighbour
) -> None:
    """Hole 2: the neighbour pre-creates every predictable temp name of our
    next job (a world-writable /tmp/rs-<id> with a read-only n2 inside, the
    old per-node layout); the job still succeeds, and no directory the
    neighbour owns holds Ray's session dir."""
    j = ray_job("squatdir")
    j.put("where.py", WHERE)
    jobid = j.submit("python -u where.py", sbatch="#SBATCH --hold\n")
    squat = f"/tmp/rs-{jobid}"
    neighbour.litter(squat)
    neighbour.run(
        f"mkdir -m 777 {squat} && chmod 777 {squat} && mkdir -m 755 {squat}/n2", node="n1"
    )
    release(jobid)
    info = wait_done(jobid)
    out = j.out(jobid)
    assert info["JobState"] == "COMPLETED", out
    rows = re.findall(r"^TMPDIR (\S+) (.*)$", out, re.M)
    assert sorted(host for host, _ in rows) == ["n1", "n2"], out
    for _, chain in rows:
        assert ":neighbour:" not in chain, chain
        assert chain.split()[-1].startswith("/tmp:root:"), chain
    # Ended well: the job's own temp dirs are gone, the neighbour's are not ours to touch.
    left = ssh(f"find /tmp -maxdepth 1 -user slurmray -name 'rs-{jobid}*'").stdout.split()
    assert left == []
    assert ssh(f"test -d {squat}/n2", check=False).returncode == 0


def _preferred_block(jobid: str, neighbour: Neighbour) -> int:
    """The first port block the launcher tries for `jobid` (its own rule)."""
    rng = neighbour.run("cat /proc/sys/net/ipv4/ip_local_port_range", node="n1").stdout.split()
    return int(bash_fn(f"port_blocks {rng[0]} {rng[1]} | preferred_block {jobid}"))


def test_ports_taken_by_neighbour_move_the_block(
    ray_job: Callable[[str], Job], neighbour: Neighbour
) -> None:
    """Hole 3: the neighbour listens on ports of the block our next job would
    use (on both nodes); the job moves to another block, says so, and forms."""
    j = ray_job("ports")
    j.put("ok.py", "import os, ray\nray.init(address=os.environ['RAY_ADDRESS'])\nprint('OK')\n")
    jobid = j.submit("python -u ok.py", sbatch="#SBATCH --hold\n")
    base = _preferred_block(jobid, neighbour)
    listen = (
        "import socket, sys, time\n"
        "socks = [socket.create_server(('0.0.0.0', int(p))) for p in sys.argv[1:]]\n"
        "print('LISTENING', flush=True)\n"
        "time.sleep(600)\n"
    )
    # GCS port on the head's node, a worker port on the other one.
    for node, port in (("n1", base), ("n2", base + 50)):
        proc = neighbour.spawn(f"python3 -c {shlex.quote(listen)} {port}", node=node)
        neighbour.wait_line(proc, "LISTENING")
    release(jobid)
    info = wait_done(jobid)
    out = j.out(jobid)
    assert info["JobState"] == "COMPLETED", out
    taken = re.search(rf"port block {base}-{base + 99} is taken \((.*)\); trying the next", out)
    assert taken, out
    assert f"port {base} on n1" in taken.group(1) and f"port {base + 50} on n2" in taken.group(1)
    m = READY_RE.search(out)
    assert m and m.group(1) == "2", out
    gcs = int(m.group(6))
    assert not base <= gcs <= base + 99
    lo, hi = (
        int(x) for x in neighbour.run("cat /proc/sys/net/ipv4/ip_local_port_range").stdout.split()
    )
    assert gcs + 99 < lo or gcs > hi, (gcs, lo, hi)


# The racer: watches `ps` for our job's head `ray start` (its command line
# names the port and the job's temp dir) and listens on that port before
# Ray's GCS binds it, i.e. after the launcher's probe said it was free.
RACE = """\
import os, re, socket, sys, time
job = sys.argv[1]
print("WATCHING", flush=True)
while True:
    for pid in os.listdir("/proc"):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\\0", b" ").decode()
        except (OSError, ValueError):
            continue
        m = re.search(r"--port=(\\d+)", cmd)
        if m and " start " in cmd and "--head" in cmd and f"/rs-{job}." in cmd:
            server = socket.create_server(("0.0.0.0", int(m.group(1))))
            print("BOUND", m.group(1), flush=True)
            time.sleep(600)
            sys.exit()
    time.sleep(0.05)
"""


def test_port_taken_after_the_probe_starts_ray_again_on_another_block(
    ray_job: Callable[[str], Job], neighbour: Neighbour
) -> None:
    """The window the probe leaves: the neighbour listens on the head's GCS
    port once `ray start` runs. Ray itself gives up only after ~40 s with the
    job FAILED; the launcher notices Ray's bind error at once and forms the
    cluster on another block."""
    j = ray_job("portrace")
    j.put("ok.py", "import os, ray\nray.init(address=os.environ['RAY_ADDRESS'])\nprint('OK')\n")
    jobid = j.submit("python -u ok.py", sbatch="#SBATCH --hold\n")
    racer = neighbour.spawn(f"python3 -c {shlex.quote(RACE)} {jobid}", node="n1")
    neighbour.wait_line(racer, "WATCHING")
    release(jobid)
    info = wait_done(jobid)
    out = j.out(jobid)
    bound = int(neighbour.wait_line(racer, "BOUND", timeout=5).split()[1])
    assert info["JobState"] == "COMPLETED", out
    assert "OK" in out
    assert re.search(
        rf"a port of block {bound}-{bound + 99} was taken on n1 after the probe .*"
        r"starting Ray again on another block",
        out,
    ), out
    m = READY_RE.search(out)
    assert m and m.group(1) == "2", out
    assert not bound <= int(m.group(6)) <= bound + 99, out
    assert float(m.group(4)) < 30, f"the retry waited for Ray to give up:\n{out}"
    node_log = ssh(f"cat {shlex.quote(str(j.dir / 'ray-logs' / f'{jobid}.n1.log'))}").stdout
    assert f"The specified port is {bound}" in node_log, node_log
    assert tmp_dirs(jobid) == []


# On every node, takes the file lock Ray Train/Tune take around a checkpoint
# copy (`TempFileLock`: a lock file under `$RAY_TMPDIR/_ray_lockfiles`).
LOCK = """\
import os, socket, ray
ray.init(address=os.environ["RAY_ADDRESS"], logging_level="ERROR")

@ray.remote(num_cpus=1)
def lock():
    from ray.air._internal.filelock import TempFileLock
    try:
        with TempFileLock("/some/checkpoint", timeout=5):
            return socket.gethostname(), "ok"
    except Exception as exc:
        return socket.gethostname(), f"{type(exc).__name__}: {exc}"

from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as Pin
for host, said in sorted(ray.get([lock.options(scheduling_strategy=Pin(n["NodeID"], soft=False))
                                  .remote() for n in ray.nodes() if n["Alive"]])):
    print("LOCK", host, said, flush=True)
"""


def test_squatted_ray_lock_dir_does_not_stop_ray_file_locks(
    ray_job: Callable[[str], Job], neighbour: Neighbour
) -> None:
    """The neighbour owns /tmp/_ray_lockfiles, Ray's default lock dir: every node's
    Ray workers still take their file locks (in the node's private dir)."""
    squat = "/tmp/_ray_lockfiles"
    made = neighbour.run(f"mkdir -m 755 {squat}", node="n1", check=False).returncode == 0
    if made:
        neighbour.litter(squat)
    owner = ssh(f"stat -c %U {squat}").stdout.strip()
    if owner == "slurmray":
        pytest.skip(f"{squat} already belongs to the job user: nothing to squat")
    j = ray_job("lockdir")
    j.put("lock.py", LOCK)
    jobid = j.submit("python -u lock.py")
    info = wait_done(jobid)
    out = j.out(jobid)
    assert info["JobState"] == "COMPLETED", out
    assert re.findall(r"^LOCK (\S+) ok$", out, re.M) == ["n1", "n2"], out
