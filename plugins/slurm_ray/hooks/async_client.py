"""AsyncSlurmClient: the triggers' asyncssh connection to a login node."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from slurm_ray.hooks.command_output import CommandResult
from slurm_ray.hooks.errors import HostKeyError
from slurm_ray.hooks.host_keys import check_host_key_extras, host_key_message
from slurm_ray.slurm import commands, parsers
from slurm_ray.utils.states import JobInfo

if TYPE_CHECKING:
    import asyncssh


class AsyncSlurmClient:
    """One asyncssh connection to a login node (``ssh_conn_id``), for triggers."""

    def __init__(self, ssh_conn_id: str, *, command_timeout: float = 60.0) -> None:
        self.ssh_conn_id = ssh_conn_id
        self.command_timeout = command_timeout
        self._conn: asyncssh.SSHClientConnection | None = None

    async def connect(self) -> None:
        """Open the connection (no-op while one is open)."""
        import asyncssh
        from airflow.providers.ssh.hooks.ssh import SSHHookAsync

        if self._conn is not None and not self._conn.is_closed():
            return
        from airflow.providers.common.compat.connection import get_async_connection

        conn = await get_async_connection(self.ssh_conn_id)
        check_host_key_extras(self.ssh_conn_id, conn.extra_dejson)
        try:
            self._conn = await SSHHookAsync(ssh_conn_id=self.ssh_conn_id).get_conn()
        except asyncssh.HostKeyNotVerifiable as exc:
            raise HostKeyError(host_key_message(self.ssh_conn_id, exc)) from exc

    async def close(self) -> None:
        """Close the connection."""
        if self._conn is not None:
            self._conn.close()
            await self._conn.wait_closed()
            self._conn = None

    async def run(
        self, command: str, *, timeout: float | None = None, input: bytes | None = None
    ) -> CommandResult:
        """Run ``command``, ``input`` on its stdin; connection failures raise ``OSError``."""
        await self.connect()
        assert self._conn is not None
        res = await self._conn.run(
            command,
            input=input,
            check=False,
            encoding=None,
            timeout=self.command_timeout if timeout is None else timeout,
        )
        out = res.stdout if isinstance(res.stdout, bytes) else (res.stdout or "").encode()
        err = res.stderr if isinstance(res.stderr, bytes) else (res.stderr or "").encode()
        return CommandResult(
            # None means killed by a signal or the channel dropped: not success.
            exit_code=res.exit_status if res.exit_status is not None else -1,
            stdout=out.decode("utf-8", "replace"),
            stderr=err.decode("utf-8", "replace"),
            stdout_bytes=out,
        )

    async def states(self, job_ids: Sequence[str]) -> dict[str, JobInfo]:
        """Same as :meth:`SlurmHook.states`, async."""
        res = await self.run(commands.build_states_command(job_ids))
        return parsers.parse_states_output(res.stdout, job_ids)

    async def cancel(self, job_id: str) -> CommandResult:
        """``scancel`` the job."""
        return await self.run(commands.build_cancel_command(job_id))
