"""SlurmHook: commands, files and jobs on a Slurm login node over SSH (the SSH provider's
paramiko ``SSHHook``; triggers use :mod:`~slurm_ray.hooks.async_client`).

All shell text comes from the pure builders in :mod:`slurm_ray.slurm`; this only transports.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseHook

from slurm_ray.hooks.async_client import AsyncSlurmClient
from slurm_ray.hooks.command_output import MAX_OUTPUT, CommandResult, TailBuffer, drain
from slurm_ray.hooks.errors import HostKeyError, RemoteCommandError, SlurmSSHError
from slurm_ray.hooks.host_keys import check_host_key_extras, host_key_message
from slurm_ray.slurm import commands, parsers
from slurm_ray.slurm.poll import TailChunk, TailRequest, build_poll, parse_poll_output
from slurm_ray.utils.states import JobInfo

if TYPE_CHECKING:
    import paramiko

__all__ = [
    "AsyncSlurmClient",
    "CommandResult",
    "HostKeyError",
    "RemoteCommandError",
    "SlurmHook",
    "SlurmSSHError",
]


class SlurmHook(BaseHook):
    """Talk to a Slurm cluster through its login node over SSH.

    :param ssh_conn_id: Airflow SSH connection of the login node. Its ``host_key``
        extra pins the server key; without it the key must be in ``known_hosts``.
    :param command_timeout: default seconds a remote command may take.
    :param conn_timeout: seconds to establish the SSH connection.
    :param max_output: bytes of stdout and of stderr a command's result keeps (the
        end of each); more is cut and the log says how much.
    """

    conn_name_attr = "ssh_conn_id"
    default_conn_name = "slurm_default"
    conn_type = "ssh"
    hook_name = "Slurm (SSH)"

    def __init__(
        self,
        ssh_conn_id: str = default_conn_name,
        *,
        command_timeout: float = 120.0,
        conn_timeout: int = 10,
        max_output: int = MAX_OUTPUT,
    ) -> None:
        super().__init__()
        self.ssh_conn_id = ssh_conn_id
        self.command_timeout = command_timeout
        self.conn_timeout = conn_timeout
        self.max_output = max_output

    def check_connection(self) -> None:
        """Refuse a connection whose extras disable host key checks (no network used)."""
        check_host_key_extras(self.ssh_conn_id, self.get_connection(self.ssh_conn_id).extra_dejson)

    @cached_property
    def ssh_hook(self) -> Any:
        from airflow.providers.ssh.hooks.ssh import SSHHook

        self.check_connection()
        # One attempt: our callers decide about retries, and a host key
        # mismatch must not be retried at all.
        return SSHHook(
            ssh_conn_id=self.ssh_conn_id, conn_timeout=self.conn_timeout, conn_retry_attempts=1
        )

    def get_conn(self) -> paramiko.SSHClient:
        """The (cached) paramiko client; host key failures become :class:`HostKeyError`."""
        import paramiko

        try:
            return self.ssh_hook.get_conn()
        except paramiko.BadHostKeyException as exc:
            raise HostKeyError(host_key_message(self.ssh_conn_id, exc)) from exc
        except paramiko.SSHException as exc:
            if "known_hosts" in str(exc) or "host key" in str(exc).lower():
                raise HostKeyError(host_key_message(self.ssh_conn_id, exc)) from exc
            raise SlurmSSHError(f"SSH to {self.ssh_conn_id!r} failed: {exc}") from exc
        except OSError as exc:
            raise SlurmSSHError(f"SSH to {self.ssh_conn_id!r} failed: {exc}") from exc

    def close(self) -> None:
        """Close the SSH connection if one is open."""
        if "ssh_hook" not in self.__dict__:
            return  # never connected (or refused before connecting)
        client = self.ssh_hook.client
        if client is not None:
            client.close()
            self.ssh_hook.client = None

    # -- commands ---------------------------------------------------------------

    def run(
        self,
        command: str,
        *,
        timeout: float | None = None,
        check: bool = False,
        stdin: bytes | None = None,
    ) -> CommandResult:
        """Run ``command`` in the login node's shell (``check``: raise on a non-zero exit).

        :param timeout: seconds before the command is abandoned (channel closed).
        :param stdin: bytes for its stdin: secrets go here, never in ``command`` (`ps`).
        """
        limit = self.command_timeout if timeout is None else timeout
        transport = self.get_conn().get_transport()
        if transport is None:
            raise SlurmSSHError(f"SSH transport to {self.ssh_conn_id!r} is closed")
        chan = transport.open_session()
        try:
            chan.settimeout(limit)
            chan.exec_command(command)
            if stdin:
                chan.sendall(stdin)
            chan.shutdown_write()
            out, err = TailBuffer(self.max_output), TailBuffer(self.max_output)
            if not drain(chan, out, err, time.monotonic() + limit):
                raise SlurmSSHError(f"remote command timed out after {limit}s: {command[:300]}")
            code = chan.recv_exit_status()
        finally:
            chan.close()
        for name, buf in (("stdout", out), ("stderr", err)):
            if buf.cut:
                self.log.warning(
                    "remote command printed %d bytes on %s; kept the last %d, cut %d: %s",
                    buf.cut + len(buf.data),
                    name,
                    len(buf.data),
                    buf.cut,
                    command[:120],
                )
        result = CommandResult(
            # -1: the remote side died from a signal; never read that as success.
            exit_code=code if code is not None else -1,
            stdout=out.data.decode("utf-8", "replace"),
            stderr=err.data.decode("utf-8", "replace"),
            stdout_bytes=bytes(out.data),
            stdout_cut=out.cut,
            stderr_cut=err.cut,
        )
        return result.check(command) if check else result

    # -- files ------------------------------------------------------------------

    def _sftp(self) -> paramiko.SFTPClient:
        return self.get_conn().open_sftp()

    def upload_bytes(self, data: bytes, remote_path: str, *, mode: int = 0o644) -> None:
        """Write ``data`` to ``remote_path`` (atomically: temp file then rename)."""
        self.upload_many({remote_path: (data, mode)})

    def upload_many(self, files: Mapping[str, tuple[bytes, int]]) -> None:
        """Write several ``{remote_path: (data, mode)}`` files over one SFTP session.

        Each file is written atomically (temp file, then rename); one session
        instead of one per file saves a round trip set per file when staging.
        """
        with self._sftp() as sftp:
            for remote_path, (data, mode) in files.items():
                # A unique temp name: two executions of the same try (a double
                # trigger) stage the same files at once and must not rename each
                # other's temp file.
                tmp = f"{remote_path}.part-{uuid.uuid4().hex[:12]}"
                # The mode is set while the file is still empty: a 0600 file
                # must never hold its data under the login umask, even briefly.
                with sftp.open(tmp, "wb") as fh:
                    fh.chmod(mode)
                    fh.set_pipelined(True)
                    fh.write(data)
                sftp.posix_rename(tmp, remote_path)

    def download(self, remote_path: str, local_path: str) -> None:
        """Copy a remote file to ``local_path``."""
        with self._sftp() as sftp:
            sftp.get(remote_path, local_path)

    def read_file(self, remote_path: str) -> bytes | None:
        """Whole remote file, or None when it does not exist."""
        with self._sftp() as sftp:
            try:
                with sftp.open(remote_path, "rb") as fh:
                    return fh.read()
            except FileNotFoundError:
                return None

    def makedirs(self, remote_path: str) -> None:
        """``mkdir -p`` and prove the directory is writable (one-line error if not)."""
        res = self.run(commands.build_makedirs_command(remote_path))
        if res.exit_code != 0:
            reason = (res.stderr.strip().splitlines() or ["unknown error"])[-1]
            raise SlurmSSHError(f"remote run directory {remote_path!r} is not writable: {reason}")

    # -- jobs -------------------------------------------------------------------

    def states(self, job_ids: Sequence[str]) -> dict[str, JobInfo]:
        """States of many jobs with one remote command (squeue → scontrol → sacct)."""
        if not job_ids:
            return {}
        res = self.run(commands.build_states_command(job_ids))
        return parsers.parse_states_output(res.stdout, job_ids)

    def poll(
        self, job_ids: Sequence[str], tails: Sequence[TailRequest]
    ) -> tuple[dict[str, JobInfo], list[TailChunk]]:
        """States of ``job_ids`` and new bytes of ``tails``: the trigger's one poll command."""
        poll = build_poll(job_ids, tails)
        res = self.run(poll.command, stdin=poll.stdin)
        if res.exit_code != 0:
            raise SlurmSSHError(f"poll failed (exit {res.exit_code}): {res.stderr.strip()[-500:]}")
        return parse_poll_output(res.stdout, job_ids, len(tails))

    def find_jobs_by_name(self, name: str) -> list[JobInfo]:
        """The current user's jobs named exactly ``name``, any state Slurm still knows."""
        res = self.run(commands.build_find_jobs_by_name_command(name), check=True)
        return parsers.parse_find_jobs_by_name(res.stdout, name)

    def cancel(self, job_id: str, *, signal: str | None = None) -> None:
        """``scancel`` the job (or send it ``signal``)."""
        self.run(commands.build_cancel_command(job_id, signal=signal), check=True)
