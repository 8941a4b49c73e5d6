"""Two lanes of real tests at once, and the lock that keeps them out of each other's way.

With ``TEST_LANES=2`` (``make test``'s default) the real tiers run on two xdist
workers at once: the fault suite in lane ``real_a``, the cluster and end-to-end
tiers in lane ``real_b``. Each lane has its own Airflow and MLflow (session
fixtures are per worker) and both use the one dev cluster, as two users of a
shared site would, so a real test never assumes it is alone on the cluster
unless it says so: a test marked ``exclusive`` (it stops or restarts a shared
daemon: sshd, slurmd, the whole cluster) runs while no other real test runs.

The lock is a readers-writer lock on two files (``fcntl.flock``): every real
test holds ``cluster.lock`` shared; an exclusive test first takes ``intent.lock``
(so that no new test starts meanwhile) and then ``cluster.lock`` exclusively.
The files live in the dev cluster's state directory, so checkouts that share
the cluster share the lock too.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LANES_ENV = "TEST_LANES"
EXCLUSIVE = "exclusive"


def lanes() -> int:
    """How many lanes the real tiers run in (1: all in order on one worker)."""
    value = os.environ.get(LANES_ENV, "1")
    return 2 if value.strip() == "2" else 1


def lane_of(tier: str) -> str:
    """The xdist group of a real test of ``tier`` (``faults``, ``cluster``, ``e2e``, ...)."""
    if lanes() == 1:
        return "real"
    # Balanced by the last clean-clone run: faults 16:49; cluster 11:27 + e2e 4:19.
    return "real_a" if tier == "faults" else "real_b"


def _lock_dir() -> Path:
    state = Path(os.environ.get("SLURM_RAY_DEV_STATE", "/var/lib/slurm-ray-dev"))
    path = state / "run" / "test-locks"
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


@contextmanager
def _flock(path: Path, mode: int) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, mode)
        yield
    finally:
        os.close(fd)  # closing releases the lock


@contextmanager
def cluster_lock(*, exclusive: bool) -> Iterator[None]:
    """Hold the dev cluster shared (any real test) or alone (an ``exclusive`` test)."""
    locks = _lock_dir()
    if exclusive:
        with (
            _flock(locks / "intent.lock", fcntl.LOCK_EX),
            _flock(locks / "cluster.lock", fcntl.LOCK_EX),
        ):
            yield
        return
    # Wait behind an exclusive test that is waiting, instead of starving it.
    with _flock(locks / "intent.lock", fcntl.LOCK_SH):
        pass
    with _flock(locks / "cluster.lock", fcntl.LOCK_SH):
        yield
