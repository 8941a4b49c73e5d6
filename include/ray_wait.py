"""Wait until a Ray cluster started by ray_launch.sh has all its nodes.

    python ray_wait.py --address IP:PORT --nodes N [--timeout S]
                       [--watch PID=NODE ...] [--result FILE]
    python ray_wait.py worker-start IP:PORT TIMEOUT start [RAY START ARGS...]

1. Polls the GCS TCP port (never calls into Ray before it accepts
   connections: a Ray client pointed at a closed port blocks for minutes).
2. Polls the GCS node table until N nodes are ALIVE.

Stops early when a watched process (the `srun ... ray start` steps, children
of the same batch shell) has exited. Writes shell assignments to --result:
``alive=K cpus=C gpus=G`` and, when a step died, ``dead_node=NODE``.

Exit status: 0 all nodes joined; 3 timeout; 4 a watched step exited;
5 unexpected error talking to Ray.

The ``worker-start`` form is `ray start` for a worker node: it imports Ray
(about a second) while the head is still starting, waits until the head
node is ALIVE in the GCS (a worker that connects earlier falls into Ray's
own 2-second retry sleeps), then runs the `ray` console script in-process.

Needs the Ray job's environment: RAY_AUTH_MODE / RAY_AUTH_TOKEN_PATH.
"""

from __future__ import annotations

import argparse
import os
import shlex
import socket
import sys
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


def fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


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
        from ray.core.generated import gcs_pb2

        client = GcsClient(address=address)
    except Exception as e:  # private API moved: Ray's own retries take over
        log(f"cannot read the node table ({e!r}); starting anyway")
        client = None
    while client is not None:
        try:
            infos = client.get_all_node_info(timeout=2).values()
            if any(i.is_head_node and i.state == gcs_pb2.GcsNodeInfo.ALIVE for i in infos):
                break
        except Exception:  # GCS still starting
            pass
        if time.monotonic() >= deadline:
            log(f"head node not registered in GCS {address} after {timeout:g}s")
            return 99
        time.sleep(0.1)
    log(f"head is up after {time.monotonic() - t0:.2f}s; ray {' '.join(ray_argv)}")
    sys.argv = ["ray", *ray_argv]
    return ray_main()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker-start"]:
        return worker_start(argv[1:])
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
            f.write(f"dead_node={shlex.quote(str(state['dead_node']))}\n")
        os.replace(tmp, a.result)

    def dead_step() -> str | None:
        for pid, node in watches:
            if not process_alive(pid):
                return node
        return None

    next_progress = t0 + PROGRESS_EVERY_S
    table = NodeTable(a.address)
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
                try:
                    n, cpus, gpus = table.alive()
                except Exception as e:  # GCS still starting; keep polling
                    log(f"node table not readable yet: {e!r}")
                    n, cpus, gpus = state["alive"], state["cpus"], state["gpus"]
                state.update(alive=n, cpus=cpus, gpus=gpus)
                if n >= a.nodes:
                    rc = 0
                    break
            if now >= next_progress:
                log(f"waiting: {state['alive']}/{a.nodes} nodes after {now - t0:.0f}s ({phase})")
                next_progress = now + PROGRESS_EVERY_S
            time.sleep(POLL_S)
    except KeyboardInterrupt:
        rc = 5
    except Exception as e:
        log(f"unexpected error: {e!r}")
        rc = 5
    finally:
        write_result()
        table.close()
    return rc


if __name__ == "__main__":
    sys.exit(main())
