"""SlurmJobTrigger: follow a Slurm job from the triggerer, without a worker slot.

All triggers of one SSH connection in a triggerer process share one
connection and one poll loop (:class:`_HostPoller`): every interval it runs a
single remote command that returns the states of all watched jobs and the new
bytes of their log files.  Each trigger turns its share into task-log lines
and, when the job ends, exactly one event.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from slurm_ray.hooks.slurm import AsyncSlurmClient, HostKeyError
from slurm_ray.utils.poll import TailRequest, build_poll_command, parse_poll_output
from slurm_ray.utils.states import (
    NOT_FOUND_CONFIRMATIONS,
    PENDING_STATES,
    JobInfo,
    SlurmState,
    is_terminal,
)

#: Called with the new complete ``metrics.jsonl`` rows; set by the MLflow relay.
MetricsSink = Callable[[list[dict[str, Any]]], Awaitable[None]]


@dataclass
class PollResult:
    """What one poll brought a subscriber."""

    info: JobInfo | None = None
    chunks: dict[str, bytes] = field(default_factory=dict)
    error: str | None = None
    fatal: bool = False


@dataclass
class _Subscription:
    job_id: str
    interval: float
    files: dict[str, list[Any]]  # name -> [path, offset]
    queue: asyncio.Queue[PollResult] = field(default_factory=asyncio.Queue)


class _HostPoller:
    """One connection and one poll loop per (event loop, ssh_conn_id).

    A poller leaves the registry when its last subscriber goes, so the registry
    holds only hosts being watched (and never a poller of a closed loop).
    """

    registry: dict[tuple[int, str], _HostPoller] = {}

    def __init__(self, ssh_conn_id: str, key: tuple[int, str] | None = None) -> None:
        self.ssh_conn_id = ssh_conn_id
        self.key = key
        self.client = AsyncSlurmClient(ssh_conn_id)
        self.subs: dict[int, _Subscription] = {}
        self.task: asyncio.Task[None] | None = None
        self.wake = asyncio.Event()
        self.commands_run = 0

    @classmethod
    def get(cls, ssh_conn_id: str) -> _HostPoller:
        key = (id(asyncio.get_running_loop()), ssh_conn_id)
        poller = cls.registry.get(key)
        if poller is None:
            poller = cls.registry[key] = cls(ssh_conn_id, key)
        return poller

    def subscribe(self, sub: _Subscription) -> None:
        if self.key is not None:
            # Back in the registry if it was pruned between get() and now.
            self.registry.setdefault(self.key, self)
        self.subs[id(sub)] = sub
        self.wake.set()
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._loop())

    def unsubscribe(self, sub: _Subscription) -> None:
        self.subs.pop(id(sub), None)
        self.wake.set()

    async def _loop(self) -> None:
        failures = 0
        try:
            while self.subs:
                subs = list(self.subs.values())
                job_ids = sorted({s.job_id for s in subs})
                tails: list[TailRequest] = []
                owners: list[tuple[_Subscription, str]] = []
                for s in subs:
                    for name, (path, offset) in s.files.items():
                        tails.append(TailRequest(path, int(offset)))
                        owners.append((s, name))
                try:
                    command = build_poll_command(job_ids, tails)
                except ValueError as exc:
                    # A malformed job id or offset is a bug, not a network blip.
                    for s in subs:
                        s.queue.put_nowait(PollResult(error=str(exc), fatal=True))
                    return
                try:
                    res = await self.client.run(command)
                    self.commands_run += 1
                    states, chunks = parse_poll_output(res.stdout, job_ids, len(tails))
                    failures = 0
                    per_sub: dict[int, PollResult] = {
                        id(s): PollResult(info=states.get(s.job_id)) for s in subs
                    }
                    for (s, name), chunk in zip(owners, chunks, strict=True):
                        per_sub[id(s)].chunks[name] = chunk
                    for s in subs:
                        s.queue.put_nowait(per_sub[id(s)])
                except HostKeyError as exc:
                    for s in subs:
                        s.queue.put_nowait(PollResult(error=str(exc), fatal=True))
                    return
                except (TimeoutError, OSError, Exception) as exc:
                    # Connection-level trouble: drop the connection, tell the
                    # subscribers, back off with jitter and reconnect.
                    failures += 1
                    await self._reset()
                    msg = f"{type(exc).__name__}: {exc}".strip()
                    for s in subs:
                        s.queue.put_nowait(PollResult(error=msg))
                    delay = min(30.0, 1.0 * 2 ** min(failures - 1, 5)) * random.uniform(0.5, 1.0)
                    await self._sleep(delay)
                    continue
                await self._sleep(min(s.interval for s in subs))
        finally:
            await self._reset()
            if not self.subs and self.key is not None and self.registry.get(self.key) is self:
                del self.registry[self.key]

    async def _sleep(self, seconds: float) -> None:
        """Wait out the interval; end early only when nobody is watching any more.

        A trigger that subscribes mid-interval waits for the next poll rather
        than forcing one: one command per interval, however jobs arrive.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while self.subs:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), timeout=remaining)

    async def _reset(self) -> None:
        try:
            await self.client.close()
        except Exception:
            self.client._conn = None


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
        from slurm_ray.mlflow_tracking import make_async_sink

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
        poller = _HostPoller.get(self.ssh_conn_id)
        files: dict[str, list[Any]] = {"log": [self.log_path, self.log_offset]}
        if self.metrics_path:
            files["metrics"] = [self.metrics_path, self.metrics_offset]
        sub = _Subscription(job_id=self.job_id, interval=self.poll_interval, files=files)
        sink = self._make_sink()
        log_buf = b""
        metrics_buf = b""
        last_ok = time.monotonic()
        failing_since: float | None = None
        last_state: SlurmState | None = None
        not_found = 0  # polls in a row that found the job NOT_FOUND
        poller.subscribe(sub)
        self.log.info(
            "Watching Slurm job %s via %s every %.0fs",
            self.job_id,
            self.ssh_conn_id,
            self.poll_interval,
        )
        try:
            while True:
                result = await sub.queue.get()
                if self.deadline is not None and time.time() > self.deadline:
                    await self._cancel()
                    yield self._event(
                        "timeout",
                        result.info,
                        f"execution_timeout passed; cancelled job {self.job_id}",
                    )
                    return
                if result.error is not None:
                    if result.fatal:
                        yield self._event("error", None, result.error)
                        return
                    now = time.monotonic()
                    if failing_since is None:
                        failing_since = now
                        self.log.warning(
                            "Lost the SSH connection to %s (%s); reconnecting with backoff",
                            self.ssh_conn_id,
                            result.error,
                        )
                    if now - last_ok > self.max_disconnect_s:
                        yield self._event(
                            "error",
                            None,
                            f"no answer from {self.ssh_conn_id} for {now - last_ok:.0f}s "
                            f"(last error: {result.error}); job {self.job_id} may still run",
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

                chunk = result.chunks.get("log", b"")
                if chunk:
                    self.log_offset += len(chunk)
                    files["log"][1] = self.log_offset
                    log_buf = self._emit_log(log_buf + chunk)
                mchunk = result.chunks.get("metrics", b"")
                if mchunk:
                    self.metrics_offset += len(mchunk)
                    files["metrics"][1] = self.metrics_offset
                    metrics_buf = await self._relay(metrics_buf + mchunk, sink)

                info = result.info
                if info is None:
                    continue
                if info.state != last_state and (
                    last_state in (SlurmState.RUNNING, SlurmState.COMPLETING)
                    and info.state in PENDING_STATES
                ):
                    self.log.warning(
                        "Slurm job %s was requeued by Slurm (%s) after it had started "
                        "(a node failure or preemption; the site requeues jobs): still watching, "
                        "it runs again when nodes are free",
                        self.job_id,
                        info.reason or info.state.value,
                    )
                if info.state != last_state:
                    self.log.info(
                        "Slurm job %s is %s%s",
                        self.job_id,
                        info.state.value,
                        f" ({info.reason})" if info.reason and info.reason != "None" else "",
                    )
                    last_state = info.state
                not_found = not_found + 1 if info.state == SlurmState.NOT_FOUND else 0
                # A confirmed NOT_FOUND ended unobserved and was purged (MinJobAge, no
                # accounting): execute_complete decides its end from the run directory.
                if is_terminal(info.state) or not_found >= NOT_FOUND_CONFIRMATIONS:
                    # The poll that saw the end may have raced the last writes.
                    poller.unsubscribe(sub)
                    log_buf, metrics_buf = await self._drain(files, log_buf, metrics_buf, sink)
                    if log_buf:
                        self.log.info("%s", log_buf.decode("utf-8", "replace"))
                    yield self._event(
                        "terminal", info, f"job {self.job_id} ended {info.state.value}"
                    )
                    return
        finally:
            poller.unsubscribe(sub)

    def _emit_log(self, data: bytes) -> bytes:
        """Log complete lines; return the unfinished tail."""
        *lines, rest = data.split(b"\n")
        for line in lines:
            self.log.info("[slurm %s] %s", self.job_id, line.decode("utf-8", "replace"))
        return rest

    async def _relay(self, data: bytes, sink: MetricsSink | None) -> bytes:
        *lines, rest = data.split(b"\n")
        rows = []
        for line in lines:
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                self.log.warning("skipping malformed metrics line: %r", line[:200])
        if rows and sink is not None:
            await sink(rows)
        return rest

    async def _drain(
        self,
        files: dict[str, list[Any]],
        log_buf: bytes,
        metrics_buf: bytes,
        sink: MetricsSink | None,
    ) -> tuple[bytes, bytes]:
        # Its own connection: the shared poller may close its one as soon as
        # this trigger unsubscribed and it has nothing else to watch.
        client = AsyncSlurmClient(self.ssh_conn_id)
        try:
            return await self._drain_with(client, files, log_buf, metrics_buf, sink)
        finally:
            await client.close()

    async def _drain_with(
        self,
        client: AsyncSlurmClient,
        files: dict[str, list[Any]],
        log_buf: bytes,
        metrics_buf: bytes,
        sink: MetricsSink | None,
    ) -> tuple[bytes, bytes]:
        names = list(files)
        for _ in range(20):
            tails = [TailRequest(files[n][0], int(files[n][1])) for n in names]
            try:
                res = await client.run(build_poll_command([], tails))
            except Exception as exc:
                self.log.warning("could not read the rest of the job's files: %s", exc)
                break
            _, chunks = parse_poll_output(res.stdout, [], len(tails))
            if not any(chunks):
                break
            for name, chunk in zip(names, chunks, strict=True):
                files[name][1] = int(files[name][1]) + len(chunk)
                if name == "log":
                    self.log_offset += len(chunk)
                    log_buf = self._emit_log(log_buf + chunk)
                else:
                    self.metrics_offset += len(chunk)
                    metrics_buf = await self._relay(metrics_buf + chunk, sink)
        return log_buf, metrics_buf

    async def on_kill(self) -> None:
        """The user cleared/failed the deferred task: cancel the Slurm job."""
        await self._cancel()

    async def _cancel(self) -> None:
        client = AsyncSlurmClient(self.ssh_conn_id)
        try:
            res = await asyncio.wait_for(client.cancel(self.job_id), timeout=30)
            self.log.info("Cancelled Slurm job %s (scancel exit %s)", self.job_id, res.exit_code)
        finally:
            await client.close()
