"""A remote command's outcome, and reading its output capped to its last bytes."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from slurm_ray.hooks.errors import RemoteCommandError

if TYPE_CHECKING:
    import paramiko


@dataclass(frozen=True)
class CommandResult:
    """Outcome of one remote command."""

    exit_code: int
    stdout: str
    stderr: str
    stdout_bytes: bytes = b""
    #: Bytes of the start of stdout / stderr dropped to keep within the hook's cap.
    stdout_cut: int = 0
    stderr_cut: int = 0

    def check(self, command: str) -> CommandResult:
        """Raise :class:`RemoteCommandError` unless the command succeeded."""
        if self.exit_code != 0:
            raise RemoteCommandError(command, self.exit_code, self.stdout, self.stderr)
        return self


#: Default bytes of stdout (and of stderr) :meth:`SlurmHook.run` keeps.
MAX_OUTPUT = 64 * 1024 * 1024


class TailBuffer:
    """The last ``limit`` bytes of a stream, and how many were dropped before them."""

    def __init__(self, limit: int) -> None:
        self.limit, self.data, self.cut = limit, bytearray(), 0

    def add(self, chunk: bytes) -> None:
        self.data += chunk
        over = len(self.data) - self.limit
        if over > 0:
            # Deleting from the front of a bytearray does not copy the rest.
            del self.data[:over]
            self.cut += over


def drain(chan: paramiko.Channel, out: TailBuffer, err: TailBuffer, deadline: float) -> bool:
    """Read stdout and stderr until the command exited; False when ``deadline`` passed.

    Both streams as they come: reading one to the end first deadlocks once the
    other fills its window.
    """
    while True:
        busy = False
        if chan.recv_ready():
            out.add(chan.recv(1 << 16))
            busy = True
        if chan.recv_stderr_ready():
            err.add(chan.recv_stderr(1 << 16))
            busy = True
        if (
            not busy
            and chan.exit_status_ready()
            and not chan.recv_ready()
            and not chan.recv_stderr_ready()
        ):
            return True
        if time.monotonic() > deadline:
            return False
        if not busy:
            time.sleep(0.005)
