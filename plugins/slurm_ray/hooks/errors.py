"""Errors of the login node connection."""

from __future__ import annotations

from airflow.sdk.exceptions import AirflowException


class SlurmSSHError(AirflowException):
    """The login node could not be reached or a remote command failed."""


class HostKeyError(SlurmSSHError):
    """The server's host key is unknown or differs from the one configured."""


class RemoteCommandError(SlurmSSHError):
    """A remote command exited non-zero; carries the evidence."""

    def __init__(self, command: str, exit_code: int, stdout: str, stderr: str) -> None:
        self.command = command
        self.exit_code = exit_code
        self.stdout = stdout
        self.stderr = stderr
        detail = (stderr.strip() or stdout.strip())[-2000:]
        super().__init__(f"remote command failed (exit {exit_code}): {command[:300]}\n{detail}")
