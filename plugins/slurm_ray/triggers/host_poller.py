"""The shared poll loop of the triggers of one host: one connection, one command per interval.

The command (:func:`~slurm_ray.slurm.poll.build_poll`) returns the states of all
watched jobs and the new bytes of their files; each subscriber gets its share.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    retry_if_not_exception_type,
    wait_exponential_jitter,
)

from slurm_ray.hooks.async_client import AsyncSlurmClient
from slurm_ray.hooks.command_output import CommandResult
from slurm_ray.hooks.errors import HostKeyError
from slurm_ray.slurm.ids import validate_job_id
from slurm_ray.slurm.poll import (
    MAX_CHUNK,
    PollCommand,
    TailChunk,
    TailRequest,
    build_poll,
    parse_poll_output,
    validate_tail,
)
from slurm_ray.utils.states import JobInfo, SlurmState

__all__ = ["RECONNECT_WAIT", "PollResult"]

log = logging.getLogger("slurm_ray.triggers.slurm_job")

#: Reconnect backoff after a failed poll: 1, 2, 4, ... s up to 30 s, plus up to
#: 1 s of jitter so that triggerers restarted together do not knock in step.
RECONNECT_WAIT = wait_exponential_jitter(initial=1.0, max=30.0, jitter=1.0)


def _quiet_asyncssh() -> None:
    """asyncssh logs every command whole at INFO (a poll is megabytes); unless set explicitly."""
    logger = logging.getLogger("asyncssh")
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.WARNING)


@dataclass
class PollResult:
    """What one poll brought a subscriber."""

    info: JobInfo | None = None
    chunks: dict[str, TailChunk] = field(default_factory=dict)
    error: str | None = None
    fatal: bool = False


@dataclass
class _Subscription:
    job_id: str
    interval: float
    files: dict[str, list[Any]]  # name -> [path, offset]
    # One slot: a subscriber still busy with its last result (a slow MLflow
    # relay) is left out of the next polls instead of piling results up.
    queue: asyncio.Queue[PollResult] = field(default_factory=lambda: asyncio.Queue(maxsize=1))

    def deliver(self, result: PollResult, *, replace: bool = False) -> None:
        if self.queue.full():
            if not replace:
                return
            self.queue.get_nowait()
        self.queue.put_nowait(result)


class _HostPoller:
    """One connection and one poll loop per (event loop, ssh_conn_id).

    It leaves the registry with its last subscriber: never a poller of a closed loop there.
    """

    registry: dict[tuple[int, str], _HostPoller] = {}

    def __init__(
        self,
        ssh_conn_id: str,
        key: tuple[int, str] | None = None,
        client: Callable[[str], AsyncSlurmClient] = AsyncSlurmClient,
    ) -> None:
        _quiet_asyncssh()
        self.ssh_conn_id = ssh_conn_id
        self.key = key
        self.client = client(ssh_conn_id)
        self.subs: dict[int, _Subscription] = {}
        self.task: asyncio.Task[None] | None = None
        self.wake = asyncio.Event()
        self.commands_run = 0
        #: Largest command text and standard input sent so far (bytes).
        self.max_command = 0
        self.max_stdin = 0

    @classmethod
    def get(
        cls, ssh_conn_id: str, client: Callable[[str], AsyncSlurmClient] = AsyncSlurmClient
    ) -> _HostPoller:
        """The poller of ``ssh_conn_id`` in this event loop; ``client`` makes its connection."""
        key = (id(asyncio.get_running_loop()), ssh_conn_id)
        poller = cls.registry.get(key)
        if poller is None:
            poller = cls.registry[key] = cls(ssh_conn_id, key, client)
        return poller

    def subscribe(self, sub: _Subscription) -> None:
        if self.key is not None:
            # Back in the registry if it was pruned between get() and now.
            self.registry.setdefault(self.key, self)
        self.subs[id(sub)] = sub
        self.wake.set()
        self.ensure_running()

    def ensure_running(self) -> None:
        """Start the poll loop unless it runs (a loop that is closing restarts itself)."""
        if self.subs and (self.task is None or self.task.done()):
            self.task = asyncio.get_running_loop().create_task(self._loop())

    def unsubscribe(self, sub: _Subscription) -> None:
        self.subs.pop(id(sub), None)
        self.wake.set()

    async def _loop(self) -> None:
        try:
            while True:
                try:
                    await self._poll_while_watched()
                except Exception:
                    # A bug here must not leave every trigger of the host waiting.
                    log.exception("poll loop of %s failed; restarting it", self.ssh_conn_id)
                    await asyncio.sleep(1.0)
                await self._reset()
                # A trigger may have subscribed while the connection closed:
                # it would otherwise wait for a loop that has ended.
                if not self.subs:
                    break
        finally:
            if not self.subs and self.key is not None and self.registry.get(self.key) is self:
                del self.registry[self.key]

    def _requests(
        self, subs: list[_Subscription]
    ) -> tuple[list[_Subscription], list[TailRequest], list[tuple[_Subscription, str]]]:
        """The subscriptions that can be polled and their tails; the others get a fatal error.

        One malformed subscription must not fail the poll of every job on the host.
        """
        ok: list[_Subscription] = []
        tails: list[TailRequest] = []
        owners: list[tuple[_Subscription, str]] = []
        for s in subs:
            try:
                validate_job_id(s.job_id)
                mine = [
                    (validate_tail(TailRequest(path, int(offset), MAX_CHUNK)), name)
                    for name, (path, offset) in s.files.items()
                ]
            except (TypeError, ValueError) as exc:
                s.deliver(PollResult(error=str(exc), fatal=True), replace=True)
                self.unsubscribe(s)
                continue
            ok.append(s)
            for req, name in mine:
                tails.append(req)
                owners.append((s, name))
        return ok, tails, owners

    async def _poll_while_watched(self) -> None:
        while self.subs:
            interval = min(s.interval for s in self.subs.values())
            ready = [s for s in self.subs.values() if not s.queue.full()]
            subs, tails, owners = self._requests(ready)
            if not subs:
                await self._sleep(interval)
                continue
            job_ids = sorted({s.job_id for s in subs})
            poll = build_poll(job_ids, tails)
            t0 = time.monotonic()
            try:
                res = await self._run_reconnecting(poll, subs)
            except HostKeyError as exc:
                for s in subs:
                    s.deliver(PollResult(error=str(exc), fatal=True), replace=True)
                await self._sleep(interval)
                continue
            if res is None:
                continue  # nobody watches any more
            self.commands_run += 1
            self.max_command = max(self.max_command, len(poll.command.encode()))
            self.max_stdin = max(self.max_stdin, len(poll.stdin))
            log.info(
                "poll %s: %d jobs, %d files, sent %d B, got %d B, exit %s, %.2fs%s",
                self.ssh_conn_id,
                len(job_ids),
                len(tails),
                len(poll.command) + len(poll.stdin),
                len(res.stdout_bytes),
                res.exit_code,
                time.monotonic() - t0,
                f" ({res.stderr.strip()[:200]})" if res.exit_code else "",
            )
            self._hand_out(res.stdout, subs, job_ids, owners)
            await self._sleep()

    async def _run_reconnecting(
        self, poll: PollCommand, subs: list[_Subscription]
    ) -> CommandResult | None:
        """Run ``poll``; on connection trouble reconnect with backoff while anyone watches.

        None when the last subscriber left during the outage.

        :raises HostKeyError: at once: a changed host key is never retried.
        """

        async def failed(state: Any) -> None:
            # Drop the connection and tell the subscribers; they decide when to give up.
            await self._reset()
            exc = state.outcome.exception()
            msg = f"{type(exc).__name__}: {exc}".strip()
            log.warning("poll %s failed (%s); reconnecting", self.ssh_conn_id, msg[:300])
            for s in subs:
                s.deliver(PollResult(error=msg))

        try:
            async for attempt in AsyncRetrying(
                # Exception only: a cancellation (BaseException) is never retried.
                retry=retry_if_exception_type(Exception)
                & retry_if_not_exception_type(HostKeyError),
                wait=RECONNECT_WAIT,
                stop=lambda _state: not self.subs,
                sleep=self._sleep,
                before_sleep=failed,
                reraise=True,
            ):
                with attempt:
                    return await self.client.run(poll.command, input=poll.stdin)
        except HostKeyError:
            raise
        except Exception:
            if self.subs:
                raise
        return None

    def _hand_out(
        self,
        stdout: str,
        subs: list[_Subscription],
        job_ids: list[str],
        owners: list[tuple[_Subscription, str]],
    ) -> None:
        try:
            states, chunks = parse_poll_output(stdout, job_ids, len(owners))
        except Exception as exc:
            # A parser bug is not connection trouble: every job is UNKNOWN for
            # this round, and nobody's job gets cancelled for it.
            log.exception("could not parse the poll output of %s", self.ssh_conn_id)
            why = f"poll output not understood: {type(exc).__name__}: {exc}"
            states = {j: JobInfo(j, SlurmState.UNKNOWN, reason=why[:300]) for j in job_ids}
            chunks = [TailChunk()] * len(owners)
        per_sub: dict[int, PollResult] = {
            id(s): PollResult(info=states.get(s.job_id)) for s in subs
        }
        for (s, name), chunk in zip(owners, chunks, strict=True):
            per_sub[id(s)].chunks[name] = chunk
        for s in subs:
            s.deliver(per_sub[id(s)])

    def hurry(self, sub: _Subscription, interval: float) -> None:
        """Poll every ``interval`` s for ``sub`` from now on (its job is about to end)."""
        if interval < sub.interval:
            sub.interval = interval
            self.wake.set()

    async def _sleep(self, seconds: float | None = None) -> None:
        """Wait out ``seconds`` (None: the shortest interval of the subscribers, read
        again when one hurries); end early when nobody is watching any more.

        A trigger that subscribes mid-interval waits for the next poll rather
        than forcing one: one command per interval, however jobs arrive.
        """
        loop = asyncio.get_running_loop()
        start = loop.time()
        while self.subs:
            wait = seconds if seconds is not None else min(s.interval for s in self.subs.values())
            remaining = start + wait - loop.time()
            if remaining <= 0:
                return
            self.wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self.wake.wait()

    async def _reset(self) -> None:
        try:
            await self.client.close()
        except Exception:
            self.client._conn = None
