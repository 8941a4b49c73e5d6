"""Host key verification: connection extras that switch it off are refused."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from slurm_ray.hooks.errors import HostKeyError


def host_key_message(conn_id: str | None, exc: BaseException) -> str:
    return (
        f"SSH host key verification failed for connection {conn_id!r}: {exc}. "
        "Refusing to run anything. Put the server's public key into the connection's "
        "`host_key` extra (e.g. `ssh-keyscan -p PORT HOST`, verified out of band)."
    )


#: Connection extras with which the SSH provider skips or weakens host key
#: verification, and why each is refused.
_UNSAFE_EXTRAS = {
    "no_host_key_check": "accepts any server key (auto-add)",
    "ignore_hostkey_verification": "accepts any server key (old name of no_host_key_check)",
    "allow_host_key_change": "accepts a server key that differs from the known one",
}


def check_host_key_extras(conn_id: str | None, extra: Mapping[str, Any]) -> None:
    """Refuse connection extras that switch host key verification off.

    The SSH provider honours them silently; a man in the middle (or a
    neighbour on the login node's port) would then get our key and commands.

    :raises HostKeyError: naming the extra and what it does.
    """
    bad = [
        f"{name}={extra[name]!r} {why}"
        for name, why in _UNSAFE_EXTRAS.items()
        if name in extra and str(extra[name]).strip().lower() in ("true", "1", "yes")
    ]
    known = extra.get("known_hosts")
    if isinstance(known, str) and known.strip().lower() in ("none", "/dev/null"):
        bad.append(f"known_hosts={known!r} turns verification off")
    if bad:
        raise HostKeyError(
            f"SSH connection {conn_id!r}: refusing extras that disable host key verification: "
            + "; ".join(bad)
            + ". Pin the server's key in the `host_key` extra instead (`ssh-keyscan`, "
            "verified out of band)."
        )
