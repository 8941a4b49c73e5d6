"""Following a job from poll results: its state changes and its files as whole lines.

Shared by the trigger and the worker's wait (:meth:`SlurmJobManager.follow`), so
both log the same lines and read each byte of a file once, in order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from slurm_ray.slurm.poll import MAX_CHUNK, TailChunk
from slurm_ray.utils.states import (
    NOT_FOUND_CONFIRMATIONS,
    PENDING_STATES,
    JobInfo,
    SlurmState,
    describe,
    is_terminal,
)

#: Longest log line shown whole; the rest of a longer one (a ``\r`` progress
#: bar never ends a line) is cut, and the log says how much was.
LOG_LINE_MAX = 64 * 1024
#: Longest ``metrics.jsonl`` row kept; a longer one is dropped with a warning.
METRICS_LINE_MAX = 1024 * 1024
#: A Slurm log this far behind is skipped to near its end (the file keeps it all).
LOG_BACKLOG_MAX = 64 * 1024 * 1024
#: Polls a finished job's files are read for before its end is reported anyway.
DRAIN_POLLS = 10
#: The line include/ray_launch.sh writes when the training has exited: the job
#: ends within a second (Ray stops), so its watcher polls faster from then on.
ENTRYPOINT_EXITED = b"ray_launch: entrypoint exited with status"
#: Poll interval once that line is seen.
ENDING_POLL_S = 0.5


@dataclass
class TailStream:
    """A watched file (``log`` or ``metrics``) as consumed so far."""

    name: str
    path: str
    offset: int
    job_id: str
    log: Any
    buf: bytearray = field(default_factory=bytearray)
    #: Bytes dropped of the current overlong line (0: not cutting).
    cutting: int = 0

    def take(self, chunk: TailChunk) -> bytes:
        """The bytes of ``chunk`` that are new; advances the offset.

        A chunk read from an older offset (a poll built before the last one
        was consumed) is trimmed, one from beyond the offset is dropped (read
        again next time): every byte is consumed once, in order.
        """
        if 0 <= chunk.size < self.offset:
            self.log.warning(
                "Slurm job %s: %s shrank from %d to %d bytes (the job was requeued, or the "
                "file rewritten): reading it again from the start",
                self.job_id,
                self.path,
                self.offset,
                chunk.size,
            )
            if self.name == "log":
                self.log.info("[slurm %s] ----- log restarted -----", self.job_id)
            self.offset, self.cutting = 0, 0
            self.buf.clear()
        if self.name == "log" and chunk.size - self.offset > LOG_BACKLOG_MAX:
            skip_to = chunk.size - MAX_CHUNK
            self.log.warning(
                "Slurm job %s: the log is %d bytes behind; skipping %d bytes "
                "(the whole log stays in %s)",
                self.job_id,
                chunk.size - self.offset,
                skip_to - self.offset,
                self.path,
            )
            self.offset, self.cutting = skip_to, 1  # resume at the next whole line
            self.buf.clear()
            return b""
        if chunk.start > self.offset or chunk.start + len(chunk.data) <= self.offset:
            return b""
        data = chunk.data[self.offset - chunk.start :]
        self.offset += len(data)
        return data

    def lines(self, data: bytes) -> list[bytes]:
        """Complete lines; an unfinished one is kept up to the line limit."""
        limit = LOG_LINE_MAX if self.name == "log" else METRICS_LINE_MAX
        if self.cutting:
            nl = data.find(b"\n")
            if nl < 0:
                self.cutting += len(data)
                return []
            self.log.warning(
                "Slurm job %s: cut %d bytes of an overlong line of %s (more than %d bytes)",
                self.job_id,
                self.cutting + nl,
                self.name,
                limit,
            )
            self.cutting = 0
            data = data[nl + 1 :]
        self.buf += data
        *lines, rest = bytes(self.buf).split(b"\n")
        self.buf = bytearray(rest)
        if len(self.buf) > limit:
            if self.name == "log":
                lines.append(bytes(self.buf[:limit]) + b" [...]")
            self.cutting = len(self.buf) - (limit if self.name == "log" else 0)
            self.buf.clear()
        return lines

    def show(self, data: bytes) -> None:
        """Log the complete lines of ``data`` into the task log."""
        for line in self.lines(data):
            self._emit(line)

    def flush(self) -> None:
        """The job is over: its last unfinished line is shown as it is."""
        if self.buf:
            self._emit(bytes(self.buf))
            self.buf.clear()

    def _emit(self, line: bytes) -> None:
        self.log.info("[slurm %s] %s", self.job_id, line.decode("utf-8", "replace"))


class JobWatch:
    """A job's state poll after poll: logs what changed and decides when it has ended."""

    def __init__(self, job_id: str, log: Any) -> None:
        self.job_id, self.log = job_id, log
        self.last_state: SlurmState | None = None
        self.last_note: tuple[str, ...] | None = None  # what the task log last said
        self.not_found = 0  # polls in a row that found the job NOT_FOUND
        self.ended: JobInfo | None = None
        self.polls_after_end = 0

    def see(self, info: JobInfo | None) -> None:
        """Take one poll's state of the job (None: the poll did not say)."""
        if self.ended is not None:
            self.polls_after_end += 1
            return
        if info is None:
            return
        self._note(info)
        self.last_state = info.state
        self.not_found = self.not_found + 1 if info.state == SlurmState.NOT_FOUND else 0
        # A confirmed NOT_FOUND ended unobserved and was purged (MinJobAge, no
        # accounting): its end is decided from the run directory.
        if is_terminal(info.state) or self.not_found >= NOT_FOUND_CONFIRMATIONS:
            self.ended = info

    def done(self, caught_up: bool) -> bool:
        """Ended, and its files read to the end (or drained for long enough)."""
        return self.ended is not None and (caught_up or self.polls_after_end >= DRAIN_POLLS)

    def _note(self, info: JobInfo) -> None:
        """Log the state when it, its reason or its start estimate changed."""
        text, note = describe(info, datetime.now(UTC))
        if note == self.last_note:
            return
        if self.last_state in (SlurmState.RUNNING, SlurmState.COMPLETING) and (
            info.state in PENDING_STATES
        ):
            self.log.warning(
                "Slurm job %s was requeued by Slurm (%s) after it had started "
                "(a node failure or preemption; the site requeues jobs): still watching, "
                "it runs again when nodes are free",
                self.job_id,
                info.reason or info.state.value,
            )
        self.log.info("%s", text)
        self.last_note = note


def caught_up(streams: list[TailStream], chunks: list[TailChunk]) -> bool:
    """Every file read to the size the poll saw (taken after the job had ended)."""
    return all(c.size <= s.offset for s, c in zip(streams, chunks, strict=True))
