"""Wait until a Ray cluster started by ray_launch.sh has all its nodes.

    python ray_wait.py --address IP:PORT --nodes N [--timeout S]
                       [--watch PID=NODE ...] [--result FILE]
    python ray_wait.py worker-start IP:PORT TIMEOUT start [RAY START ARGS...]
    python ray_wait.py ports BASE[,BASE...] [SIZE] [--reap ROOT JOBID LIVE_IDS]

1. Polls the GCS TCP port (never calls into Ray before it accepts
   connections: a Ray client pointed at a closed port blocks for minutes).
2. Polls the GCS node table until N nodes are ALIVE.

Stops early when a watched process (the `srun ... ray start` steps, children
of the same batch shell) has exited. Writes ``key=value`` lines to --result
(``alive=K``, ``cpus=C``, ``gpus=G``, ``dead_node=NODE`` or empty): data that
the launcher parses strictly, never shell code.

Exit status: 0 all nodes joined; 3 timeout; 4 a watched step exited;
5 unexpected error talking to Ray.

The ``worker-start`` form is `ray start` for a worker node: it imports Ray
(about a second) while the head is still starting, waits until the head has
written its session name to the GCS and its raylet has registered (a worker
that reads either earlier falls into Ray's own 2-second retry sleeps), then
runs the `ray` console script in-process, beside the head's agents' start-up.

The ``ports`` form runs on every node of the job (one srun task per node)
before Ray starts: for each candidate port block (BASE .. BASE+SIZE-1, SIZE
100 by default) it prints ``taken BASE PORT NODE`` when a port of the block
cannot be bound on this node (someone listens, or it lies in this node's
ephemeral range: PORT is then ``ephemeral``). With ``--reap`` it first
removes this user's temp dirs ROOT/rs-<id>.XXXXXX of ended jobs (an id below
JOBID that is not in the comma-separated LIVE_IDS): what a cancelled job
could not remove (srun SIGKILLs its steps), after moving Ray's logs into
that job's run directory; it prints ``reaped DIR``. A dir another reaper
claimed (renamed to ``.reaping``) and left for ten minutes is taken again.

Needs the Ray job's environment: RAY_AUTH_MODE / RAY_AUTH_TOKEN_PATH.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import re
import shutil
import socket
import stat
import sys
import threading
import time

POLL_S = 0.2
PROGRESS_EVERY_S = 10.0


def log(msg: str) -> None:
    print(f"ray_wait: {msg}", file=sys.stderr, flush=True)


def process_alive(pid: int) -> bool:
    """True while PID exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    # "pid (comm) S ...": the state follows the last ')'.
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state not in ("Z", "X")


def port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class NodeTable:
    """The GCS node table, read without starting a Ray driver."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._client = None
        self._driver = False

    @staticmethod
    def private_api() -> bool:
        """Ray's GcsClient is importable (else a driver reads ``ray.nodes()``)."""
        try:
            from ray._raylet import GcsClient  # noqa: F401
        except (ImportError, AttributeError):
            return False
        return True

    def _connect(self) -> None:
        try:
            from ray._raylet import GcsClient

            self._client = GcsClient(address=self.address)
        except (ImportError, AttributeError, TypeError):  # private API moved
            import ray

            ray.init(address=self.address, logging_level="ERROR", log_to_driver=False)
            self._driver = True

    def alive(self) -> tuple[int, float, float]:
        """(alive node count, total CPUs, total GPUs)."""
        if self._client is None and not self._driver:
            self._connect()
        if self._driver:
            import ray

            nodes = [n for n in ray.nodes() if n.get("Alive")]
            cpus = sum(n.get("Resources", {}).get("CPU", 0) for n in nodes)
            gpus = sum(n.get("Resources", {}).get("GPU", 0) for n in nodes)
            return len(nodes), cpus, gpus
        from ray.core.generated import gcs_pb2

        infos = self._client.get_all_node_info(timeout=5).values()
        nodes = [i for i in infos if i.state == gcs_pb2.GcsNodeInfo.ALIVE]
        cpus = sum(i.resources_total.get("CPU", 0) for i in nodes)
        gpus = sum(i.resources_total.get("GPU", 0) for i in nodes)
        return len(nodes), cpus, gpus

    def close(self) -> None:
        if self._driver:
            import ray

            ray.shutdown()


class Reader(threading.Thread):
    """Reads the node table again and again in the background: a GCS call can
    block for ~40 s (something else answers on the port), and meanwhile the
    main loop must still notice a node's step that exited."""

    def __init__(self, table: NodeTable) -> None:
        super().__init__(daemon=True)
        self.table = table
        self.latest: tuple[int, float, float] | None = None
        self.fresh = threading.Event()  # set after each read
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                self.latest = self.table.alive()
            except Exception as e:  # GCS still starting; keep polling
                log(f"node table not readable yet: {e!r}")
            self.fresh.set()
            self.done.wait(POLL_S)

    def wait_fresh(self, timeout: float) -> None:
        """Until the next read (or `timeout`): the main loop wakes with it."""
        self.fresh.wait(timeout)
        self.fresh.clear()


def fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def head_ready(client: object) -> bool:
    """The head wrote its session name and its raylet is in the node table.

    A worker's `ray start` reads both with Ray's own retries, which sleep 2 s
    when an answer is empty: reading them here first (every 50 ms) keeps the
    worker out of those sleeps (bimodal 3.8 / 5.8 s formation, measured).
    """
    from ray.core.generated.gcs_service_pb2 import GetAllNodeInfoRequest

    if not client.internal_kv_get(b"session_name", b"session", timeout=2):  # type: ignore[attr-defined]
        return False
    head = GetAllNodeInfoRequest.NodeSelector()
    head.is_head_node = True
    return bool(client.get_all_node_info(timeout=2, node_selectors=[head]))  # type: ignore[attr-defined]


def worker_start(argv: list[str]) -> int:
    """worker-start IP:PORT TIMEOUT start ARGS...: wait for the head, then `ray ...`."""
    from ray.scripts.scripts import main as ray_main  # the slow import, done early

    address, timeout, ray_argv = argv[0], float(argv[1]), argv[2:]
    host, _, port_s = address.rpartition(":")
    port = int(port_s)
    t0 = time.monotonic()
    deadline = t0 + timeout
    while not port_open(host, port, timeout=1.0):
        if time.monotonic() >= deadline:
            log(f"head GCS {address} not reachable after {timeout:g}s")
            return 99
        time.sleep(0.1)
    try:
        from ray._raylet import GcsClient

        client = GcsClient(address=address)
    except Exception as e:  # private API moved: Ray's own retries take over
        log(f"cannot read the GCS ({e!r}); starting anyway")
        client = None
    while client is not None:
        try:
            if head_ready(client):
                break
        except Exception:  # GCS still starting
            pass
        if time.monotonic() >= deadline:
            log(f"the head has not registered in GCS {address} after {timeout:g}s")
            return 99
        time.sleep(0.05)
    log(f"head GCS ready after {time.monotonic() - t0:.2f}s; ray {' '.join(ray_argv)}")
    sys.argv = ["ray", *ray_argv]
    return ray_main()


def ephemeral_range(path: str = "/proc/sys/net/ipv4/ip_local_port_range") -> tuple[int, int]:
    """This node's (network namespace's) ephemeral port range."""
    try:
        with open(path) as f:
            lo, hi = (int(x) for x in f.read().split()[:2])
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def port_free(port: int) -> bool:
    """Nothing on this node holds `port` (a listener on any address, or a socket
    still bound to it): binding the wildcard address without SO_REUSEADDR fails."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


CLAIMED = ".reaping"  # a reaper renames a dir first: of several, one takes it
# rs-<job>.XXXXXX, or one a reaper claimed (again, after it died: .<pid>)
TMP_NAME = re.compile(r"rs-(\d+)\.[A-Za-z0-9]{6}(\.reaping(?:\.\d+)?)?")
NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
STALE_CLAIM_S = 600.0  # a reaper at work renamed its dir seconds ago


def first_line(path: str) -> str:
    try:
        with open(path) as f:
            return f.readline().rstrip("\n")
    except OSError:
        return ""


def reap(
    root: str, job: int, live: set[int], node: str, stale_claim_s: float = STALE_CLAIM_S
) -> None:
    """Remove this user's temp dirs of ended jobs under `root` (see the module doc)."""
    uid = os.getuid()
    for entry in os.scandir(root):
        m = TMP_NAME.fullmatch(entry.name)
        if not m or int(m.group(1)) >= job or int(m.group(1)) in live:
            continue
        try:
            st = entry.stat(follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid:
                continue
            # Where the temp root is shared (several nodes, or two jobs starting
            # at once), other reapers see the same dir: the rename decides. A
            # rename sets the dir's ctime: an old claim is a reaper that died.
            if not m.group(2):
                path = entry.path + CLAIMED
            elif time.time() - st.st_ctime >= stale_claim_s:
                path = os.path.join(root, f"{entry.name.split(CLAIMED)[0]}{CLAIMED}.{os.getpid()}")
            else:
                continue
            os.rename(entry.path, path)
        except OSError:
            continue
        run_dir = first_line(os.path.join(path, "run_dir"))
        # The dir names the node it was made on, which may not be this one.
        owner = first_line(os.path.join(path, "node"))
        if not NODE_NAME.fullmatch(owner):
            owner = node
        logs_dir = os.path.join(run_dir, "ray-logs")
        if run_dir and os.path.isdir(logs_dir) and os.stat(logs_dir).st_uid == uid:
            dest = os.path.join(logs_dir, f"{m.group(1)}.{owner}.ray")
            try:
                for logs in glob.glob(os.path.join(path, "ray", "session_2*", "logs")):
                    shutil.copytree(logs, dest, symlinks=True, dirs_exist_ok=True)
            except OSError as e:
                log(f"could not keep all of Ray's logs of {entry.path}: {e!r}")
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(logs_dir, f"{m.group(1)}.{owner}.tmp"))
        shutil.rmtree(path, ignore_errors=True)
        print(f"reaped {entry.path}")


def probe_ports(argv: list[str]) -> int:
    """ports BASE[,BASE...] [SIZE] [--reap ROOT JOBID LIVE]: the blocks this node cannot use."""
    node = os.environ.get("SLURMD_NODENAME") or socket.gethostname().split(".")[0]
    if "--reap" in argv:
        i = argv.index("--reap")
        root, job, live = argv[i + 1 : i + 4]
        argv = argv[:i]
        try:
            reap(root, int(job), {int(x) for x in live.split(",") if x.isdigit()}, node)
        except OSError as e:  # never a reason to fail the job
            log(f"could not clean up old temp dirs in {root}: {e!r}")
    bases = [int(b) for b in argv[0].split(",") if b]
    size = int(argv[1]) if len(argv) > 1 else 100
    lo, hi = ephemeral_range()
    for base in bases:
        if base <= hi and base + size - 1 >= lo:
            print(f"taken {base} ephemeral {node}")
            continue
        busy = next((p for p in range(base, base + size) if not port_free(p)), None)
        if busy is not None:
            print(f"taken {base} {busy} {node}")
    sys.stdout.flush()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker-start"]:
        return worker_start(argv[1:])
    if argv[:1] == ["ports"]:
        return probe_ports(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--address", required=True, help="GCS address IP:PORT")
    p.add_argument("--nodes", type=int, required=True, help="expected node count")
    p.add_argument("--timeout", type=float, default=180.0)
    p.add_argument("--watch", action="append", default=[], metavar="PID=NODE")
    p.add_argument("--result", help="file for shell assignments alive=/cpus=/gpus=")
    a = p.parse_args(argv)

    host, _, port_s = a.address.rpartition(":")
    port = int(port_s)
    watches = []
    for w in a.watch:
        pid, _, node = w.partition("=")
        watches.append((int(pid), node or pid))

    t0 = time.monotonic()
    deadline = t0 + a.timeout
    state = {"alive": 0, "cpus": 0.0, "gpus": 0.0, "dead_node": ""}

    def write_result() -> None:
        if not a.result:
            return
        tmp = a.result + ".tmp"
        with open(tmp, "w") as f:
            f.write(f"alive={int(state['alive'])}\n")
            f.write(f"cpus={fmt(state['cpus'])}\n")
            f.write(f"gpus={fmt(state['gpus'])}\n")
            f.write(f"dead_node={state['dead_node']}\n")
        os.replace(tmp, a.result)

    def dead_step() -> str | None:
        for pid, node in watches:
            if not process_alive(pid):
                return node
        return None

    next_progress = t0 + PROGRESS_EVERY_S
    table = NodeTable(a.address)
    # A driver (the fallback) must connect from the main thread.
    reader = Reader(table) if NodeTable.private_api() else None
    rc = 3
    try:
        phase = "gcs"
        while True:
            now = time.monotonic()
            dead = dead_step()
            if dead is not None:
                state["dead_node"] = dead
                rc = 4
                break
            if now >= deadline:
                rc = 3
                break
            if phase == "gcs":
                if port_open(host, port, timeout=min(1.0, max(0.1, deadline - now))):
                    phase = "nodes"
                    log(f"GCS {a.address} is up after {now - t0:.2f}s")
                    continue
            else:
                if reader is not None:
                    if reader.ident is None:
                        reader.start()
                    got = reader.latest
                else:
                    try:
                        got = table.alive()
                    except Exception as e:  # GCS still starting; keep polling
                        log(f"node table not readable yet: {e!r}")
                        got = None
                n, cpus, gpus = got or (state["alive"], state["cpus"], state["gpus"])
                state.update(alive=n, cpus=cpus, gpus=gpus)
                if n >= a.nodes:
                    rc = 0
                    break
            if now >= next_progress:
                log(f"waiting: {state['alive']}/{a.nodes} nodes after {now - t0:.0f}s ({phase})")
                next_progress = now + PROGRESS_EVERY_S
            if reader is not None and reader.ident is not None:
                reader.wait_fresh(POLL_S)
            else:
                time.sleep(POLL_S)
    except KeyboardInterrupt:
        rc = 5
    except Exception as e:
        log(f"unexpected error: {e!r}")
        rc = 5
    finally:
        write_result()
        table.close()
    if reader is not None and reader.is_alive():
        reader.done.set()
        reader.join(1.0)
        if reader.is_alive():  # blocked in a GCS call: do not wait for it
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(rc)
    return rc


if __name__ == "__main__":
    sys.exit(main())
