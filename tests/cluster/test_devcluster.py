"""The local dev cluster itself: lifecycle, two real nodes, networking, errors."""

from __future__ import annotations

import os
import re
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import CLUSTER_SCRIPT, ROOT, DevCluster
from tests.neighbour import Neighbour

pytestmark = pytest.mark.cluster


def devcluster(*args: str, env: dict[str, str] | None = None, timeout: float = 600):
    return subprocess.run(
        ["bash", str(CLUSTER_SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def daemon_pids(state: Path) -> dict[str, int]:
    pids = {}
    for pf in [*(state / "run").glob("*.pid"), state / "mariadb" / "run" / "mysqld.pid"]:
        if not pf.exists():
            continue
        text = pf.read_text().strip()
        if text.isdigit() and Path(f"/proc/{text}").exists():
            pids[pf.stem] = int(text)
    return pids


@pytest.mark.exclusive
def test_up_is_idempotent_and_down_up_cycles_twice(cluster: DevCluster) -> None:
    before = daemon_pids(cluster.state)
    assert {"munged", "slurmctld", "slurmd-n1", "slurmd-n2", "sshd", "slurmdbd", "mysqld"} <= set(
        before
    )
    # up on a running cluster changes nothing: same daemons, same host key.
    hostkey = (cluster.state / "ssh" / "ssh_host_ed25519_key.pub").read_text()
    assert devcluster("up").returncode == 0
    assert daemon_pids(cluster.state) == before
    for _ in range(2):
        down = devcluster("down")
        assert down.returncode == 0, down.stderr
        assert daemon_pids(cluster.state) == {}
        for pid in before.values():
            assert not Path(f"/proc/{pid}").exists()
        assert not Path("/run/netns/sr-n1").exists()
        assert subprocess.run(["ip", "link", "show", "srbr0"], capture_output=True).returncode
        # the neighbour user goes with the cluster (up creates it again)
        assert subprocess.run(["id", "neighbour"], capture_output=True).returncode
        # down twice in a row is fine
        assert devcluster("down").returncode == 0
        started = time.monotonic()
        up = devcluster("up")
        assert up.returncode == 0, up.stderr
        assert time.monotonic() - started < 60
        before = daemon_pids(cluster.state)
    assert (cluster.state / "ssh" / "ssh_host_ed25519_key.pub").read_text() == hostkey
    # the repository's .dev points at the state, with the files users need
    for name in ("ssh_config", "cluster.env", "log/slurmctld.log", "etc/slurm.conf"):
        assert (ROOT / ".dev" / name).exists(), name
    cluster.ssh("sinfo -h -o %t | sort -u | grep -qx idle")
    neighbour = ["ssh", "-F", str(cluster.ssh_config), "dev-cluster-neighbour", "id -un"]
    assert subprocess.run(neighbour, capture_output=True, text=True).stdout == "neighbour\n"


def test_ssh_config_checks_host_key_strictly(cluster: DevCluster) -> None:
    text = cluster.ssh_config.read_text()
    assert "StrictHostKeyChecking yes" in text
    out = cluster.ssh("id -un; sinfo -h -N -o '%N %t'").stdout.split("\n")
    assert out[0] == "slurmray"
    assert re.search(r"n1 idle", "\n".join(out)) and re.search(r"n2 idle", "\n".join(out))
    # the Airflow connection pins the same host key and never disables the check
    conn = cluster.env["AIRFLOW_CONN_SLURM_DEV"]
    assert "host_key" in conn and "no_host_key_check" not in conn
    pub = (cluster.state / "ssh" / "ssh_host_ed25519_key.pub").read_text().split()[1]
    assert pub in conn


def test_two_node_job_as_normal_user(cluster: DevCluster) -> None:
    d = cluster.new_dir("twonode")
    script = textwrap.dedent(
        """\
        #!/bin/bash
        #SBATCH --nodes=2 --ntasks-per-node=1 --output=out-%j.txt --time=2
        srun --export=ALL bash -c 'echo "$(id -un) $(hostname) $(getent ahostsv4 "$(hostname)" | head -1 | cut -d" " -f1) $(nice)"'
        """
    )
    cluster.ssh(f"cd {d} && cat > job.sh <<'EOF'\n{script}EOF")
    job = cluster.ssh(f"cd {d} && sbatch --parsable --wait job.sh").stdout.strip()
    lines = cluster.ssh(f"cat {d}/out-{job}.txt").stdout.split("\n")
    rows = sorted(line.split() for line in lines if line.strip())
    assert [r[0] for r in rows] == ["slurmray", "slurmray"]
    assert [r[1] for r in rows] == ["n1", "n2"]
    assert len({r[2] for r in rows}) == 2 and all(r[2].startswith("10.213.77.") for r in rows)
    # Jobs yield the shared cores to Airflow and MLflow (devcluster.sh start_slurmd).
    assert [r[3] for r in rows] == [os.environ.get("SLURM_RAY_DEV_NODE_NICE", "10")] * 2


def test_tcp_from_n2_step_to_listener_on_n1(cluster: DevCluster) -> None:
    d = cluster.new_dir("tcp")
    script = textwrap.dedent(
        """\
        #!/bin/bash
        #SBATCH --nodes=2 --ntasks-per-node=1 --output=out-%j.txt --time=2
        set -e
        srun --export=ALL -N1 -n1 -w n1 python3 -c '
        import socket
        s = socket.create_server(("0.0.0.0", 18999)); s.settimeout(60)
        c, addr = s.accept(); c.sendall(b"hello from n1"); print("n1 accepted", addr[0])
        ' &
        for i in $(seq 100); do
          srun --export=ALL -N1 -n1 -w n2 python3 -c '
        import socket
        c = socket.create_connection(("n1", 18999), timeout=5); print("n2 got", c.recv(64).decode())
        ' && break
          sleep 0.2
        done
        wait
        """
    )
    cluster.ssh(f"cd {d} && cat > job.sh <<'EOF'\n{script}EOF")
    job = cluster.ssh(f"cd {d} && sbatch --parsable --wait job.sh").stdout.strip()
    out = cluster.ssh(f"cat {d}/out-{job}.txt").stdout
    assert "n2 got hello from n1" in out
    assert "n1 accepted 10.213.77.12" in out


def test_status_reports_bad_slurm_conf_clearly(cluster: DevCluster) -> None:
    started = time.monotonic()
    proc = devcluster("status", env={"SLURM_CONF": "/nonexistent/slurm.conf"}, timeout=60)
    assert proc.returncode != 0
    assert "SLURM_CONF=/nonexistent/slurm.conf" in proc.stderr
    assert time.monotonic() - started < 30
    ok = devcluster("status")
    assert ok.returncode == 0, ok.stderr
    assert "n1" in ok.stdout and "JOBID" in ok.stdout and "sshd: up" in ok.stdout


@pytest.mark.exclusive
def test_status_reports_stopped_sshd_clearly(cluster: DevCluster) -> None:
    pid = int((cluster.state / "run" / "sshd.pid").read_text())
    os.kill(pid, 15)
    try:
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        started = time.monotonic()
        proc = devcluster("status", timeout=60)
        assert proc.returncode != 0
        assert "sshd" in proc.stderr and "not answering" in proc.stderr
        assert time.monotonic() - started < 30
    finally:
        assert devcluster("up").returncode == 0
    cluster.ssh("true")


def test_neighbour_is_a_second_user_on_the_same_nodes(
    cluster: DevCluster, neighbour: Neighbour
) -> None:
    """A shared site: a second user with its own key and ssh entry submits to the
    same partition, its job shares the nodes with ours, and it sees our jobs and
    processes the way a stranger would."""
    text = cluster.ssh_config.read_text()
    assert "Host dev-cluster\n" in text and "Host dev-cluster-neighbour\n" in text
    assert neighbour.ssh("id -un").stdout.strip() == "neighbour"
    # Its key is not ours: it cannot log in as the job user.
    key = cluster.state / "ssh" / "neighbour_ed25519"
    as_us = subprocess.run(
        ["ssh", "-F", str(cluster.ssh_config), "-o", f"IdentityFile={key}", "-l", "slurmray",
         "-o", "IdentitiesOnly=yes", "dev-cluster-neighbour", "id -un"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert as_us.returncode != 0
    # Its job (one core on each node) runs while ours runs on the same nodes.
    theirs = neighbour.sbatch(
        "-N2 --ntasks-per-node=1 --cpus-per-task=1 --time=2 -o /dev/null",
        "#!/bin/bash\nsrun sleep 120\n",
    )
    d = cluster.new_dir("shared")
    ours = cluster.ssh(
        f"cd {d} && sbatch --parsable -N2 --ntasks-per-node=1 --cpus-per-task=1 --time=2"
        f" -o out-%j.txt --wait --wrap 'squeue -h -t R -o \"%i %u %N\"; srun hostname'",
        timeout=120,
    ).stdout.strip()
    out = cluster.ssh(f"cat {d}/out-{ours}.txt").stdout
    assert f"{theirs} neighbour n[1-2]" in out, out
    assert f"{ours} slurmray n[1-2]" in out, out
    # What the neighbour sees: our job in squeue, our processes in ps, from a node.
    assert neighbour.run("hostname", node="n1").stdout.strip() == "n1"
    assert "10.213.77.11" in neighbour.run("ip -4 -o addr show", node="n1").stdout
    assert any(row["id"] == theirs for row in neighbour.squeue())
    pid = int(cluster.ssh("setsid sleep 37 >/dev/null 2>&1 </dev/null & echo $!").stdout)
    try:
        assert (pid, "slurmray", "sleep 37") in neighbour.ps()
    finally:
        cluster.ssh(f"kill {pid}", check=False)


def test_accounting_records_finished_jobs(cluster: DevCluster) -> None:
    """slurmdbd on MariaDB: sacct answers for a finished job as on a real site."""
    job = cluster.ssh(
        "sbatch --parsable --wait -J acct-probe -n 1 -c 2 -t 1 -o /dev/null "
        "--wrap 'python3 -c \"sum(i * i for i in range(3 * 10**7))\"'",
        timeout=180,
    ).stdout.strip()
    assert job.isdigit()
    rows: list[str] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        out = cluster.ssh(
            f"sacct -n -P -j {job} -o JobID,JobName,State,ExitCode,AllocCPUS,Elapsed,TotalCPU"
        ).stdout
        rows = [r for r in out.splitlines() if r]
        # slurmdbd fills a record in over several messages (the name may come last)
        if rows and rows[0].split("|")[1:3] == ["acct-probe", "COMPLETED"]:
            break
        time.sleep(1)
    head = rows[0].split("|")
    assert head[:5] == [job, "acct-probe", "COMPLETED", "0:0", "2"], rows
    assert any(r.startswith(f"{job}.batch|") for r in rows), rows
    # a job that never existed: no row and no error (the poller's NOT_FOUND)
    assert cluster.ssh("sacct -n -P -j 999999 -o JobID").stdout.strip() == ""


def test_gpu_partition_gives_gres_on_n1(cluster: DevCluster) -> None:
    """The `gpu` partition: n1 only, GRES gpu:2 that Slurm hands out like real GPUs."""
    parts = cluster.ssh("sinfo -h -N -p gpu -o '%N %G'").stdout.split()
    assert parts == ["n1", "gpu:2"]
    out = cluster.ssh(
        "srun -p gpu --gres=gpu:1 -t 1 bash -c 'echo $(hostname) $CUDA_VISIBLE_DEVICES'",
        timeout=120,
    ).stdout.split()
    assert out == ["n1", "0"]
    refused = cluster.ssh("srun -p gpu --gres=gpu:3 -t 1 true", check=False, timeout=60)
    assert refused.returncode != 0
    assert "Requested node configuration is not available" in refused.stderr
