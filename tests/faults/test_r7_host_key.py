"""R7: a connection whose host_key does not match, and a server key changed after a first run.

Both must be refused before any command runs (the server's log shows no
accepted login and no session for the attempt), with a clear error.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import DevCluster
from tests.faults.helpers import first_event

pytestmark = [pytest.mark.faults, pytest.mark.cluster]

PORT2 = 22029


def new_host_key(directory: Path, name: str) -> tuple[Path, str]:
    key = directory / name
    for p in (key, key.with_suffix(".pub")):
        p.unlink(missing_ok=True)
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True, timeout=30
    )
    pub = key.with_suffix(".pub").read_text().split()
    return key, f"{pub[0]} {pub[1]}"


def conn_json(cluster: DevCluster, *, port: int | None = None, host_key: str | None = None) -> str:
    conn = json.loads(cluster.env["AIRFLOW_CONN_SLURM_DEV"])
    if port is not None:
        conn["port"] = port
    if host_key is not None:
        conn["extra"]["host_key"] = host_key
    return json.dumps(conn)


class SecondSshd:
    """A temporary sshd with its own host key, same users and keys as the login node."""

    def __init__(self, cluster: DevCluster, workdir: Path) -> None:
        self.cluster = cluster
        self.dir = workdir
        self.pidfile = workdir / "sshd.pid"
        self.log = workdir / "sshd.log"
        self.key, self.pub = new_host_key(workdir, "host_key_a")

    def start(self) -> None:
        base = (self.cluster.state / "ssh" / "sshd_config").read_text().splitlines()
        lines = [
            line
            for line in base
            if not line.startswith(("Port ", "HostKey ", "PidFile ", "Subsystem"))
        ]
        lines += [f"Port {PORT2}", f"HostKey {self.key}", f"PidFile {self.pidfile}"]
        cfg = self.dir / "sshd_config"
        cfg.write_text("\n".join(lines) + "\n")
        os.chmod(self.key, 0o600)
        subprocess.run(
            ["/usr/sbin/sshd", "-f", str(cfg), "-E", str(self.log)], check=True, timeout=30
        )
        deadline = time.monotonic() + 10
        while not self.pidfile.exists() and time.monotonic() < deadline:
            time.sleep(0.1)

    def stop(self) -> None:
        if self.pidfile.exists():
            pid = int(self.pidfile.read_text().strip())
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            self.pidfile.unlink(missing_ok=True)

    def rotate_key(self) -> str:
        """The server's key changes (reinstalled node): restart with a new key."""
        self.stop()
        self.key, self.pub = new_host_key(self.dir, "host_key_b")
        self.start()
        return self.pub


@pytest.fixture
def second_sshd(cluster: DevCluster) -> Iterator[SecondSshd]:
    workdir = Path(tempfile.mkdtemp(prefix="r7-sshd-"))
    server = SecondSshd(cluster, workdir)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


CONNECTED = re.compile(r"Connection from \S+ port (\d+) on ")
ENDED = r"(Connection closed by|Connection reset by|Disconnected from|Received disconnect from) .*port {port}\b"


def close_refused_transports() -> None:
    """Close paramiko transports left open by a refused connect.

    paramiko raises on a bad host key without closing its transport thread, so
    the server would only log the end of the attempt after LoginGraceTime.
    """
    import paramiko

    for thread in threading.enumerate():
        if isinstance(thread, paramiko.Transport) and not thread.is_authenticated():
            thread.close()


def no_session_since(log: Path, offset: int, timeout: float = 30) -> str:
    """The attempts since ``offset`` reached this (private) sshd and ended without a login.

    Waits for each attempt's own end line instead of a fixed sleep: a session,
    if one were opened, is logged before its connection ends.
    """
    close_refused_transports()
    deadline = time.monotonic() + timeout
    while True:
        text = log.read_text(errors="replace")[offset:]
        ports = CONNECTED.findall(text)
        ended = [p for p in ports if re.search(ENDED.format(port=p), text)]
        if ports and len(ended) == len(ports):
            break
        assert time.monotonic() < deadline, f"no ended connection attempt in the sshd log:\n{text}"
        time.sleep(0.1)
    assert "Accepted publickey" not in text, text
    assert "Starting session" not in text, text
    return text


def test_r7_wrong_host_key_refused_before_any_command(
    cluster: DevCluster,
    faults,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    second_sshd: SecondSshd,
) -> None:
    from slurm_ray.hooks.slurm import HostKeyError, SlurmHook

    _, other = new_host_key(tmp_path, "not_the_server")
    monkeypatch.setenv("AIRFLOW_CONN_R7_WRONG", conn_json(cluster, port=PORT2, host_key=other))
    marker = f"/tmp/R7_RAN_{os.getpid()}"
    sshd_log = second_sshd.log

    def body() -> float:
        offset = len(sshd_log.read_text(errors="replace"))
        started = time.monotonic()
        hook = SlurmHook("r7_wrong")
        with pytest.raises(HostKeyError) as err:
            hook.run(f"touch {marker}")
        took = time.monotonic() - started
        msg = str(err.value)
        assert "host key" in msg.lower() and "r7_wrong" in msg and "Refusing" in msg
        no_session_since(sshd_log, offset)
        assert not Path(marker).exists()
        assert cluster.ssh(f"test -e {marker}", check=False).returncode != 0
        return took

    faults.trial("R7")(body)


def test_r7_wrong_host_key_async_trigger(
    cluster: DevCluster,
    faults,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    second_sshd: SecondSshd,
) -> None:
    from slurm_ray.triggers.slurm_job import SlurmJobTrigger

    _, other = new_host_key(tmp_path, "not_the_server")
    monkeypatch.setenv(
        "AIRFLOW_CONN_R7_WRONG_ASYNC", conn_json(cluster, port=PORT2, host_key=other)
    )
    sshd_log = second_sshd.log

    def body() -> float:
        offset = len(sshd_log.read_text(errors="replace"))
        started = time.monotonic()
        trigger = SlurmJobTrigger(
            job_id="1",
            ssh_conn_id="r7_wrong_async",
            log_path=f"{cluster.scratch}/r7-none.out",
            poll_interval=1.0,
        )
        event = asyncio.run(first_event(trigger, 60))
        took = time.monotonic() - started
        assert event.payload["status"] == "error", event.payload
        assert "host key" in event.payload["message"].lower(), event.payload
        no_session_since(sshd_log, offset)
        return took

    faults.trial("R7")(body)


def test_r7_server_key_changed_after_first_run(
    cluster: DevCluster, faults, monkeypatch: pytest.MonkeyPatch, second_sshd: SecondSshd
) -> None:
    from slurm_ray.hooks.slurm import HostKeyError, SlurmHook
    from slurm_ray.triggers.slurm_job import SlurmJobTrigger

    monkeypatch.setenv(
        "AIRFLOW_CONN_R7_PINNED", conn_json(cluster, port=PORT2, host_key=second_sshd.pub)
    )

    def body() -> float:
        # first run: the pinned key matches, commands run
        hook = SlurmHook("r7_pinned")
        assert hook.run("echo first-run-ok").stdout.strip() == "first-run-ok"
        hook.close()
        second_sshd.rotate_key()
        offset = len(second_sshd.log.read_text(errors="replace"))
        started = time.monotonic()
        with pytest.raises(HostKeyError) as err:
            SlurmHook("r7_pinned").run("echo should-not-run")
        took = time.monotonic() - started
        assert "host key" in str(err.value).lower()
        trigger = SlurmJobTrigger(
            job_id="1", ssh_conn_id="r7_pinned", log_path="/tmp/r7-none.out", poll_interval=1.0
        )
        event = asyncio.run(first_event(trigger, 60))
        assert event.payload["status"] == "error" and "host key" in event.payload["message"].lower()
        no_session_since(second_sshd.log, offset)
        return took

    faults.trial("R7")(body)
