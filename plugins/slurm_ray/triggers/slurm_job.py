"""SlurmJobTrigger: follow a Slurm job from the triggerer, without a worker slot.

All triggers of one SSH connection in a triggerer process share one
connection and one poll loop (:mod:`~slurm_ray.triggers.host_poller`): every interval it runs a
single remote command that returns the states of all watched jobs and the new
bytes of their log files.  Each trigger turns its share into task-log lines
and, when the job ends, exactly one event.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from slurm_ray.hooks.slurm import AsyncSlurmClient
from slurm_ray.slurm.ids import validate_job_id
from slurm_ray.slurm.poll import MAX_CHUNK, TailChunk, TailRequest, validate_tail
from slurm_ray.triggers.host_poller import PollResult, _HostPoller, _Subscription
from slurm_ray.utils.states import (
    NOT_FOUND_CONFIRMATIONS,
    PENDING_STATES,
    JobInfo,
    SlurmState,
    describe,
    is_terminal,
)

log = logging.getLogger(__name__)

#: Called with the new complete ``metrics.jsonl`` rows; set by the MLflow relay.
MetricsSink = Callable[[list[dict[str, Any]]], Awaitable[None]]

#: Longest log line shown whole; the rest of a longer one (a ``\r`` progress
#: bar never ends a line) is cut, and the log says how much was.
LOG_LINE_MAX = 64 * 1024
#: Longest ``metrics.jsonl`` row kept; a longer one is dropped with a warning.
METRICS_LINE_MAX = 1024 * 1024
#: A Slurm log this far behind is skipped to near its end (the file keeps it all).
LOG_BACKLOG_MAX = 64 * 1024 * 1024
#: Polls a finished job's files are read for before its event goes out anyway.
DRAIN_POLLS = 10


@dataclass
class _Stream:
    """A watched file as the trigger has consumed it."""

    name: str
    offset: int
    buf: bytearray = field(default_factory=bytearray)
    #: Bytes dropped of the current overlong line (0: not cutting).
    cutting: int = 0


class SlurmJobTrigger(BaseTrigger):
    """
    Wait for a Slurm job to end, streaming its log into the task log.

    :param job_id: the Slurm job id.
    :param ssh_conn_id: SSH connection of the cluster's login node.
    :param log_path: remote path of the job's Slurm output file.
    :param metrics_path: remote ``metrics.jsonl`` to relay (optional).
    :param poll_interval: seconds between polls.
    :param log_offset: byte offset of the log already shown.
    :param metrics_offset: byte offset of metrics already relayed.
    :param max_disconnect_s: give up after this long without a successful poll.
    :param deadline: epoch seconds (the task's execution_timeout); past it the
        job is cancelled and a ``timeout`` event ends the wait.
    :param relay: serialisable settings for the MLflow metrics relay (or None).
    """

    def __init__(
        self,
        *,
        job_id: str,
        ssh_conn_id: str,
        log_path: str,
        metrics_path: str | None = None,
        poll_interval: float = 10.0,
        log_offset: int = 0,
        metrics_offset: int = 0,
        max_disconnect_s: float = 900.0,
        deadline: float | None = None,
        relay: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.job_id = str(job_id)
        self.ssh_conn_id = ssh_conn_id
        self.log_path = log_path
        self.metrics_path = metrics_path
        self.poll_interval = float(poll_interval)
        self.log_offset = int(log_offset)
        self.metrics_offset = int(metrics_offset)
        self.max_disconnect_s = float(max_disconnect_s)
        self.deadline = deadline
        self.relay = relay

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "job_id": self.job_id,
                "ssh_conn_id": self.ssh_conn_id,
                "log_path": self.log_path,
                "metrics_path": self.metrics_path,
                "poll_interval": self.poll_interval,
                "log_offset": self.log_offset,
                "metrics_offset": self.metrics_offset,
                "max_disconnect_s": self.max_disconnect_s,
                "deadline": self.deadline,
                "relay": self.relay,
            },
        )

    # Seams for tests and for the MLflow relay.
    def _make_sink(self) -> MetricsSink | None:
        if not self.relay:
            return None
        from slurm_ray.mlflow.relay import make_async_sink

        return make_async_sink(self.relay, log=self.log)

    def _event(self, status: str, info: JobInfo | None, message: str, **extra: Any) -> TriggerEvent:
        payload: dict[str, Any] = {
            "status": status,
            "job_id": self.job_id,
            "state": info.state.value if info else SlurmState.UNKNOWN.value,
            "reason": info.reason if info else "",
            "exit_code": info.exit_code if info else None,
            "nodelist": info.nodelist if info else "",
            "message": message,
            "log_path": self.log_path,
            "log_offset": self.log_offset,
            "metrics_offset": self.metrics_offset,
            "relay": self.relay,
        }
        payload.update(extra)
        return TriggerEvent(payload)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        try:
            validate_job_id(self.job_id)
            for path in (self.log_path, self.metrics_path):
                if path is not None:
                    validate_tail(TailRequest(path, 0))
        except (TypeError, ValueError) as exc:
            # Only this trigger fails; the other jobs of the host are polled on.
            yield self._event("error", None, str(exc))
            return
        poller = _HostPoller.get(self.ssh_conn_id, AsyncSlurmClient)
        streams = {"log": _Stream("log", self.log_offset)}
        files: dict[str, list[Any]] = {"log": [self.log_path, self.log_offset]}
        if self.metrics_path:
            streams["metrics"] = _Stream("metrics", self.metrics_offset)
            files["metrics"] = [self.metrics_path, self.metrics_offset]
        sub = _Subscription(job_id=self.job_id, interval=self.poll_interval, files=files)
        sink = self._make_sink()
        last_ok = time.monotonic()
        failing_since: float | None = None
        last_state: SlurmState | None = None
        last_note: tuple[str, ...] | None = None  # what the task log last said of the job
        not_found = 0  # polls in a row that found the job NOT_FOUND
        ended: JobInfo | None = None
        polls_after_end = 0
        poller.subscribe(sub)
        self.log.info(
            "Watching Slurm job %s via %s every %.0fs",
            self.job_id,
            self.ssh_conn_id,
            self.poll_interval,
        )
        try:
            while True:
                result = await self._next_result(sub, poller)
                if self.deadline is not None and time.time() > self.deadline:
                    poller.unsubscribe(sub)
                    confirmed, how = await self._cancel()
                    yield self._event(
                        "timeout",
                        result.info if result else None,
                        f"execution_timeout passed; cancel of job {self.job_id} {how}",
                        cancel_confirmed=confirmed,
                    )
                    return
                if result is None or result.error is not None:
                    if result is not None and result.fatal:
                        yield self._event("error", None, result.error or "")
                        return
                    error = result.error if result else "no poll result in time"
                    now = time.monotonic()
                    if failing_since is None:
                        failing_since = now
                        self.log.warning(
                            "Lost the SSH connection to %s (%s); reconnecting with backoff",
                            self.ssh_conn_id,
                            error,
                        )
                    if now - last_ok > self.max_disconnect_s:
                        yield self._event(
                            "error",
                            None,
                            f"no answer from {self.ssh_conn_id} for {now - last_ok:.0f}s "
                            f"(last error: {error}); job {self.job_id} may still run",
                        )
                        return
                    continue
                if failing_since is not None:
                    self.log.info(
                        "Reconnected to %s after %.1fs",
                        self.ssh_conn_id,
                        time.monotonic() - failing_since,
                    )
                    failing_since = None
                last_ok = time.monotonic()

                # Offsets move before anything is awaited, so the next poll
                # (built while the relay below may still run) reads on from here.
                new = {n: self._take(streams[n], c) for n, c in result.chunks.items()}
                for name, stream in streams.items():
                    files[name][1] = stream.offset
                self.log_offset = streams["log"].offset
                if "metrics" in streams:
                    self.metrics_offset = streams["metrics"].offset
                if new.get("log"):
                    self._emit_log(streams["log"], new["log"])
                if new.get("metrics"):
                    await self._relay(streams["metrics"], new["metrics"], sink)

                info = result.info
                if ended is not None:
                    polls_after_end += 1
                elif info is not None:
                    last_note = self._note_state(info, last_state, last_note)
                    last_state = info.state
                    not_found = not_found + 1 if info.state == SlurmState.NOT_FOUND else 0
                    # A confirmed NOT_FOUND ended unobserved and was purged (MinJobAge, no
                    # accounting): execute_complete decides its end from the run directory.
                    if is_terminal(info.state) or not_found >= NOT_FOUND_CONFIRMATIONS:
                        ended = info
                if ended is not None and (
                    polls_after_end >= DRAIN_POLLS or self._caught_up(streams, result)
                ):
                    poller.unsubscribe(sub)
                    self._flush(streams)
                    yield self._event(
                        "terminal", ended, f"job {self.job_id} ended {ended.state.value}"
                    )
                    return
        finally:
            poller.unsubscribe(sub)

    async def _next_result(self, sub: _Subscription, poller: _HostPoller) -> PollResult | None:
        """The next poll result; None when none came in time (or the deadline passed)."""
        # Results come every interval; waiting longer means the poller is stuck
        # or gone, and the deadline must not wait for a result to be checked.
        wait = max(60.0, 4 * self.poll_interval)
        if self.deadline is not None:
            wait = min(wait, max(0.0, self.deadline - time.time()) + 0.01)
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a
        # cancellation that arrives as the result does, and the trigger never ends.
        try:
            async with asyncio.timeout(wait):
                return await sub.queue.get()
        except TimeoutError:
            poller.ensure_running()
            return None

    def _note_state(
        self, info: JobInfo, last_state: SlurmState | None, last_note: tuple[str, ...] | None
    ) -> tuple[str, ...]:
        """Log the job's state when it, its reason or its start estimate changed."""
        text, note = describe(info, datetime.now(UTC))
        if note == last_note:
            return note
        if last_state in (SlurmState.RUNNING, SlurmState.COMPLETING) and (
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
        return note

    @staticmethod
    def _caught_up(streams: dict[str, _Stream], result: PollResult) -> bool:
        """Every file read to the size the poll saw (taken after the job had ended)."""
        return all(result.chunks.get(n, TailChunk()).size <= s.offset for n, s in streams.items())

    def _take(self, stream: _Stream, chunk: TailChunk) -> bytes:
        """The bytes of ``chunk`` that are new to ``stream``; advances its offset.

        A chunk read from an older offset (a poll built before the last one
        was consumed) is trimmed, one from beyond the offset is dropped (read
        again next time): every byte is consumed once, in order.
        """
        if 0 <= chunk.size < stream.offset:
            self.log.warning(
                "Slurm job %s: %s shrank from %d to %d bytes (the job was requeued, or the "
                "file rewritten): reading it again from the start",
                self.job_id,
                self.log_path if stream.name == "log" else self.metrics_path,
                stream.offset,
                chunk.size,
            )
            if stream.name == "log":
                self.log.info("[slurm %s] ----- log restarted -----", self.job_id)
            stream.offset = 0
            stream.buf.clear()
            stream.cutting = 0
        if stream.name == "log" and chunk.size - stream.offset > LOG_BACKLOG_MAX:
            skip_to = chunk.size - MAX_CHUNK
            self.log.warning(
                "Slurm job %s: the log is %d bytes behind; skipping %d bytes "
                "(the whole log stays in %s)",
                self.job_id,
                chunk.size - stream.offset,
                skip_to - stream.offset,
                self.log_path,
            )
            stream.offset = skip_to
            stream.buf.clear()
            stream.cutting = 1  # resume at the next whole line
            return b""
        data = chunk.data
        if chunk.start > stream.offset or chunk.start + len(data) <= stream.offset:
            return b""
        data = data[stream.offset - chunk.start :]
        stream.offset += len(data)
        return data

    def _lines(self, stream: _Stream, data: bytes, limit: int) -> list[bytes]:
        """Complete lines of ``stream``; an unfinished one is kept up to ``limit`` bytes."""
        if stream.cutting:
            nl = data.find(b"\n")
            if nl < 0:
                stream.cutting += len(data)
                return []
            self.log.warning(
                "Slurm job %s: cut %d bytes of an overlong line of %s (more than %d bytes)",
                self.job_id,
                stream.cutting + nl,
                stream.name,
                limit,
            )
            stream.cutting = 0
            data = data[nl + 1 :]
        stream.buf += data
        *lines, rest = bytes(stream.buf).split(b"\n")
        stream.buf = bytearray(rest)
        if len(stream.buf) > limit:
            if stream.name == "log":
                lines.append(bytes(stream.buf[:limit]) + b" [...]")
            stream.cutting = len(stream.buf) - (limit if stream.name == "log" else 0)
            stream.buf.clear()
        return lines

    def _emit_log(self, stream: _Stream, data: bytes) -> None:
        for line in self._lines(stream, data, LOG_LINE_MAX):
            self.log.info("[slurm %s] %s", self.job_id, line.decode("utf-8", "replace"))

    async def _relay(self, stream: _Stream, data: bytes, sink: MetricsSink | None) -> None:
        rows = []
        for line in self._lines(stream, data, METRICS_LINE_MAX):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                self.log.warning("skipping malformed metrics line: %r", line[:200])
        if rows and sink is not None:
            await sink(rows)

    def _flush(self, streams: dict[str, _Stream]) -> None:
        """The job is over: its log's last unfinished line is shown as it is."""
        log_stream = streams["log"]
        if log_stream.buf:
            self.log.info("[slurm %s] %s", self.job_id, log_stream.buf.decode("utf-8", "replace"))
            log_stream.buf.clear()

    async def on_kill(self) -> None:
        """The user cleared/failed the deferred task: cancel the Slurm job."""
        await self._cancel()

    #: scancel attempts, their backoff multiplier (s) and the time they may take in all.
    CANCEL_ATTEMPTS = 5
    CANCEL_BACKOFF = 1.0
    CANCEL_MAX_WAIT = 120.0

    async def _cancel(self) -> tuple[bool, str]:
        """``scancel`` with retries; confirmed once Slurm shows the job ended or ending.

        Never raises: the caller still has an event to send.
        """
        from tenacity import (
            AsyncRetrying,
            RetryError,
            stop_after_attempt,
            stop_after_delay,
            wait_exponential,
        )

        client = AsyncSlurmClient(self.ssh_conn_id)
        last = "not tried"

        async def attempt() -> None:
            nonlocal last
            try:
                res = await asyncio.wait_for(client.cancel(self.job_id), timeout=30)
                if res.exit_code != 0:
                    last = f"scancel exit {res.exit_code}: {res.stderr.strip()[:200]}"
                    raise RuntimeError(last)
                info = (await asyncio.wait_for(client.states([self.job_id]), 30)).get(self.job_id)
            except Exception as exc:
                last = last if isinstance(exc, RuntimeError) else f"{type(exc).__name__}: {exc}"
                await client.close()
                raise
            state = info.state if info else SlurmState.UNKNOWN
            if not (is_terminal(state) or state in (SlurmState.COMPLETING, SlurmState.NOT_FOUND)):
                last = f"still {state.value} after scancel"
                raise RuntimeError(last)
            last = f"confirmed ({state.value})"

        try:
            async for trial in AsyncRetrying(
                stop=stop_after_attempt(self.CANCEL_ATTEMPTS)
                | stop_after_delay(self.CANCEL_MAX_WAIT),
                wait=wait_exponential(
                    multiplier=self.CANCEL_BACKOFF, min=self.CANCEL_BACKOFF, max=15
                ),
                reraise=False,
            ):
                with trial:
                    await attempt()
            self.log.info("Cancelled Slurm job %s: %s", self.job_id, last)
            return True, last
        except RetryError:
            self.log.error(
                "Could not confirm the cancel of Slurm job %s after retries (%s): "
                "it may still run; cancel it by hand (scancel %s)",
                self.job_id,
                last,
                self.job_id,
            )
            return False, f"NOT confirmed ({last})"
        finally:
            with contextlib.suppress(Exception):
                await client.close()
