"""SlurmJobTrigger: follow a Slurm job from the triggerer, without a worker slot.

Its share of the host's one poll (:mod:`~slurm_ray.triggers.host_poller`) becomes
task-log lines and, when the job ends, exactly one event.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from slurm_ray.hooks.async_client import AsyncSlurmClient
from slurm_ray.slurm.follow import (
    ENDING_POLL_S,
    ENTRYPOINT_EXITED,
    JobWatch,
    TailStream,
    caught_up,
)
from slurm_ray.slurm.ids import validate_job_id
from slurm_ray.slurm.poll import TailChunk, TailRequest, validate_tail
from slurm_ray.triggers.host_poller import PollResult, _HostPoller, _Subscription
from slurm_ray.utils.states import JobInfo, SlurmState, is_terminal

# Cancels that outlive the on_kill that started them (the loop keeps only weak references).
_CANCELS: set[asyncio.Future[Any]] = set()

#: Called with the new complete ``metrics.jsonl`` rows; set by the MLflow relay.
MetricsSink = Callable[[list[dict[str, Any]]], Awaitable[None]]


class SlurmJobTrigger(BaseTrigger):
    """Wait for a Slurm job to end, streaming its log into the task log.

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

    #: Connection health during :meth:`run`: the last good poll, the start of an outage.
    _last_ok: float = 0.0
    _failing_since: float | None = None

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
        streams = {"log": TailStream("log", self.log_path, self.log_offset, self.job_id, self.log)}
        if self.metrics_path:
            streams["metrics"] = TailStream(
                "metrics", self.metrics_path, self.metrics_offset, self.job_id, self.log
            )
        files = {n: [s.path, s.offset] for n, s in streams.items()}
        sub = _Subscription(job_id=self.job_id, interval=self.poll_interval, files=files)
        sink = self._make_sink()
        watch = JobWatch(self.job_id, self.log)
        self._last_ok, self._failing_since = time.monotonic(), None
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
                    yield await self._timed_out(result)
                    return
                if result is None or result.error is not None:
                    event = self._outage(result)
                    if event is not None:
                        yield event
                        return
                    continue
                self._reconnected()
                if await self._consume(result, streams, files, sink):
                    poller.hurry(sub, ENDING_POLL_S)
                watch.see(result.info)
                chunks = [result.chunks.get(n, TailChunk()) for n in streams]
                if watch.done(caught_up(list(streams.values()), chunks)):
                    assert watch.ended is not None
                    poller.unsubscribe(sub)
                    streams["log"].flush()
                    yield self._event(
                        "terminal",
                        watch.ended,
                        f"job {self.job_id} ended {watch.ended.state.value}",
                    )
                    return
        finally:
            poller.unsubscribe(sub)

    async def _timed_out(self, result: PollResult | None) -> TriggerEvent:
        """Past the deadline: cancel the job; the event says whether that was confirmed."""
        confirmed, how = await self._cancel()
        return self._event(
            "timeout",
            result.info if result else None,
            f"execution_timeout passed; cancel of job {self.job_id} {how}",
            cancel_confirmed=confirmed,
        )

    def _outage(self, result: PollResult | None) -> TriggerEvent | None:
        """A poll that failed: the error event once it is fatal or lasted too long."""
        if result is not None and result.fatal:
            return self._event("error", None, result.error or "")
        error = result.error if result else "no poll result in time"
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
            self.log.warning(
                "Lost the SSH connection to %s (%s); reconnecting with backoff",
                self.ssh_conn_id,
                error,
            )
        if now - self._last_ok > self.max_disconnect_s:
            return self._event(
                "error",
                None,
                f"no answer from {self.ssh_conn_id} for {now - self._last_ok:.0f}s "
                f"(last error: {error}); job {self.job_id} may still run",
            )
        return None

    def _reconnected(self) -> None:
        if self._failing_since is not None:
            self.log.info(
                "Reconnected to %s after %.1fs",
                self.ssh_conn_id,
                time.monotonic() - self._failing_since,
            )
            self._failing_since = None
        self._last_ok = time.monotonic()

    async def _consume(
        self,
        result: PollResult,
        streams: dict[str, TailStream],
        files: dict[str, list[Any]],
        sink: MetricsSink | None,
    ) -> bool:
        """Show the new log lines and relay the new metrics rows of one poll.

        :return: whether the job's entrypoint has just exited (its end is near).
        """
        # Offsets move before anything is awaited, so the next poll (built
        # while the relay below may still run) reads on from here.
        new = {n: streams[n].take(c) for n, c in result.chunks.items()}
        for name, stream in streams.items():
            files[name][1] = stream.offset
        self.log_offset = streams["log"].offset
        if "metrics" in streams:
            self.metrics_offset = streams["metrics"].offset
        if new.get("log"):
            streams["log"].show(new["log"])
        if new.get("metrics"):
            rows = streams["metrics"].lines(new["metrics"])
            if rows and sink is not None:
                from slurm_ray.mlflow.relay import parse_metrics_jsonl

                parsed = parse_metrics_jsonl(b"\n".join(rows), self.log)
                if parsed:
                    await sink(parsed)
        return ENTRYPOINT_EXITED in new.get("log", b"")

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

    async def on_kill(self) -> None:
        """The user cleared/failed the deferred task: cancel the Slurm job.

        Shielded: the triggerer can cancel the trigger's task once more while
        on_kill waits, and swallows that silently (seen under load: the
        scancel never ran). The cancel then completes in the background."""
        task = asyncio.ensure_future(self._cancel())
        _CANCELS.add(task)
        task.add_done_callback(_CANCELS.discard)
        await asyncio.shield(task)

    #: scancel attempts, their backoff multiplier (s) and the time they may take in all.
    CANCEL_ATTEMPTS = 5
    CANCEL_BACKOFF = 1.0
    CANCEL_MAX_WAIT = 120.0

    async def _cancel(self) -> tuple[bool, str]:
        """``scancel`` with retries, confirmed once Slurm shows the job ending; never raises."""
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
