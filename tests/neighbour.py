"""The `neighbour` fixture: a second, unprivileged user of the dev cluster.

On a shared site strangers read `ps`, `squeue` and `/tmp`, and act on what
they see. scripts/devcluster.sh creates that stranger (user `neighbour`, its
own SSH key, `Host dev-cluster-neighbour` in .dev/ssh_config, same partition,
nodes shared by core). Tests act as it in three ways:

- ``neighbour.ssh(cmd)``: on the login node through the real sshd (sbatch,
  srun, squeue as the neighbour);
- ``neighbour.run(cmd, node="n1")``: a plain process as the neighbour inside
  a node's namespaces (network, hostname, /etc/hosts), not part of any job;
- ``neighbour.spawn(cmd, node=...)``: the same in the background (a watcher,
  a squatter, a listener), killed with its process group when the test ends.

``neighbour.sbatch(args, script)`` submits a job as the neighbour (cancelled
at the end). ``neighbour.litter(path)`` names a file the neighbour created; it is removed
(as root) when the test ends. ``squeue()`` and ``ps()`` are what the
neighbour sees.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

STATE = Path(os.environ.get("SLURM_RAY_DEV_STATE", "/var/lib/slurm-ray-dev"))
CLUSTER_SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "devcluster.sh"
NEIGHBOUR_USER = os.environ.get("SLURM_RAY_DEV_NEIGHBOUR", "neighbour")


@dataclass
class Neighbour:
    """Acts as the neighbour user: over its own ssh entry, or as a plain process."""

    user: str
    state: Path
    procs: list[subprocess.Popen[str]] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    jobs: list[str] = field(default_factory=list)

    @property
    def uid(self) -> int:
        return pwd.getpwnam(self.user).pw_uid

    @property
    def home(self) -> str:
        return pwd.getpwnam(self.user).pw_dir

    def ssh(
        self, command: str, *, timeout: float = 60, check: bool = True, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run `command` on the login node as the neighbour (its own key and ssh entry)."""
        proc = subprocess.run(
            ["ssh", "-F", str(self.state / "ssh_config"), "dev-cluster-neighbour", command],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"neighbour ssh failed rc={proc.returncode}: {command}\n{proc.stderr}"
            )
        return proc

    def sbatch(self, args: str, script: str) -> str:
        """Submit `script` as the neighbour from its home (`sbatch --parsable ARGS`);
        the job is cancelled when the test ends."""
        out = self.ssh(f"cd ~ && sbatch --parsable {args}", stdin=script).stdout
        jobid = out.strip().split(";")[0]
        assert jobid.isdigit(), out
        self.jobs.append(jobid)
        return jobid

    def argv(self, command: str, node: str | None = None) -> list[str]:
        """argv that runs `bash -c command` as the neighbour, in `node`'s namespaces."""
        pw = pwd.getpwnam(self.user)
        env = [
            "env",
            "-i",
            f"HOME={pw.pw_dir}",
            f"USER={self.user}",
            f"LOGNAME={self.user}",
            "PATH=/usr/local/bin:/usr/bin:/bin",
            f"SLURM_CONF={self.state / 'etc' / 'slurm.conf'}",
        ]
        drop = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups"]
        inner = [*drop, *env, "bash", "-c", f"cd ~ && {command}"]
        if node is None:
            return inner
        # Enter the node's slurmd namespaces: its network, hostname and /etc/hosts.
        pid = (self.state / "run" / f"slurmd-{node}.pid").read_text().strip()
        return ["nsenter", "-t", pid, "-n", "-u", "-m", *inner]

    def run(
        self, command: str, *, node: str | None = None, timeout: float = 60, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run `command` as a plain neighbour process (on `node`, or the login host)."""
        proc = subprocess.run(
            self.argv(command, node), capture_output=True, text=True, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"neighbour command failed rc={proc.returncode}: {command}\n"
                f"stdout: {proc.stdout}\nstderr: {proc.stderr}"
            )
        return proc

    def spawn(self, command: str, *, node: str | None = None) -> subprocess.Popen[str]:
        """Start `command` as the neighbour in the background; killed at teardown."""
        proc = subprocess.Popen(
            self.argv(command, node),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    def wait_line(self, proc: subprocess.Popen[str], prefix: str, timeout: float = 30) -> str:
        """Block until the spawned process prints a line starting with `prefix`."""
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout
        seen = []
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                raise AssertionError(f"neighbour process ended before {prefix!r}: {seen}")
            seen.append(line)
            if line.startswith(prefix):
                return line.rstrip("\n")
        raise AssertionError(f"no {prefix!r} from the neighbour process: {seen}")

    def litter(self, *paths: str) -> None:
        """Files or directories the neighbour made; removed when the test ends."""
        self.paths.extend(paths)

    def squeue(self) -> list[dict[str, str]]:
        """Every job on the cluster as the neighbour sees it (id, name, user, state, nodes)."""
        out = self.run("squeue -h -o '%i|%j|%u|%T|%N'").stdout
        keys = ("id", "name", "user", "state", "nodes")
        return [dict(zip(keys, line.split("|"), strict=False)) for line in out.splitlines()]

    def ps(self) -> list[tuple[int, str, str]]:
        """(pid, user, command line) of every process, as the neighbour's `ps` shows them."""
        out = self.run("ps -eo pid=,user:32=,args=").stdout
        rows = []
        for line in out.splitlines():
            pid, user, args = ([*line.split(None, 2), "", ""])[:3]
            rows.append((int(pid), user, args))
        return rows

    def close(self) -> None:
        if self.jobs:
            # As root on this host: needs neither sshd nor the neighbour's login.
            subprocess.run(
                ["scancel", *self.jobs],
                env={**os.environ, "SLURM_CONF": str(self.state / "etc" / "slurm.conf")},
                capture_output=True,
                check=False,
            )
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
            if proc.stdout:
                proc.stdout.close()
        for path in self.paths:
            subprocess.run(["rm", "-rf", "--", path], check=False)


def _ready(n: Neighbour) -> bool:
    try:
        pwd.getpwnam(n.user)
        entry = "Host dev-cluster-neighbour\n" in (n.state / "ssh_config").read_text()
    except (KeyError, OSError):
        return False
    for _ in range(3):  # other checkouts' `up` restart sshd (SIGHUP) now and then
        if entry and n.ssh("true", check=False, timeout=30).returncode == 0:
            return True
        time.sleep(1)
    return False


@pytest.fixture
def neighbour(cluster: object) -> Iterator[Neighbour]:
    """The second user of the dev cluster, acting in this test (see module doc)."""
    n = Neighbour(user=NEIGHBOUR_USER, state=STATE)
    if not _ready(n):
        # Another checkout's older devcluster.sh rewrote ssh_config/sshd_config
        # without the neighbour: this checkout's (idempotent) `up` puts it back.
        up = subprocess.run(
            ["bash", str(CLUSTER_SCRIPT), "up"],
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "SLURM_RAY_DEV_SKIP_VENV": "1"},
        )
        if up.returncode != 0 or not _ready(n):
            pytest.fail(f"the neighbour user is not set up (devcluster.sh up):\n{up.stderr}")
    yield n
    n.close()
