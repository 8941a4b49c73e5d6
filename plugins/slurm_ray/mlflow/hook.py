"""The MLflow connection: :class:`MlflowHook`, and credentials kept out of stored state.

Settings, relay descriptions, XCom and trigger kwargs carry the tracking URI
without ``user:password@``. Each process gets the credentials back from the
Airflow connection (``mlflow_conn_id``), from a URI it was given itself, or,
as a fallback for deployments that set it, from ``SLURM_RAY_MLFLOW_URI`` /
``MLFLOW_TRACKING_URI`` in its own environment.
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING, Any
from urllib.parse import quote as urlquote

from airflow.sdk.bases.hook import BaseHook

if TYPE_CHECKING:
    from mlflow import MlflowClient

# MLflow's client telemetry phones home from every process that imports it;
# Airflow workers and HPC-adjacent hosts often have no internet (each attempt
# then waits for a timeout). An explicit setting by the user wins.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

DEFAULT_CONN_ID = "mlflow_default"
#: Where the Airflow processes may get a tracking URI with credentials (fallback).
URI_ENV_VARS = ("SLURM_RAY_MLFLOW_URI", "MLFLOW_TRACKING_URI")

_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/?#\s]*@")
_USERINFO_ANYWHERE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/?#\s@]*:[^/?#\s@]*@")
#: public URI -> the same URI with credentials, for URIs this process was given.
_CREDENTIALS: dict[str, str] = {}


def public_uri(uri: str) -> str:
    """``uri`` without ``user:password@``: the form that may be stored, logged or shown."""
    return _USERINFO.sub(r"\1", uri.strip()).rstrip("/")


def scrub(text: str) -> str:
    """``text`` with the password of any ``scheme://user:password@`` replaced by ``***``."""
    return _USERINFO_ANYWHERE.sub(lambda m: m.group(0).split(":")[0] + "://***@", text)


def remember_uri(uri: str) -> str:
    """Keep ``uri``'s credentials in this process; returns its public form."""
    given = uri.strip().rstrip("/")
    public = public_uri(given)
    if given != public:
        _CREDENTIALS[public] = given
    return public


def connection_uri(conn: Any) -> str:
    """The tracking URI (with credentials) of an Airflow connection of type ``mlflow``.

    ``host`` may be a whole URL (``https://mlflow.example.org/prefix``) or a
    host name completed by ``schema`` (the scheme, default http), ``port`` and
    the extra ``path``; ``login``/``password`` become HTTP basic auth.
    """
    host = (conn.host or "").strip()
    if not host:
        raise ValueError(f"connection {conn.conn_id!r}: host is empty")
    if "://" in host:
        base = public_uri(host)  # credentials belong in login/password, not in the host
    else:
        port = f":{conn.port}" if conn.port else ""
        path = str((conn.extra_dejson or {}).get("path") or "").strip("/")
        base = f"{conn.schema or 'http'}://{host}{port}" + (f"/{path}" if path else "")
    if not conn.login:
        return base.rstrip("/")
    scheme, rest = base.split("://", 1)
    auth = urlquote(conn.login, safe="")
    if conn.password:
        auth += ":" + urlquote(conn.password, safe="")
    return f"{scheme}://{auth}@{rest}".rstrip("/")


def _remember_connection(conn: Any) -> str:
    # Remembered even without credentials: the connection is read once per process.
    given = connection_uri(conn)
    public = public_uri(given)
    _CREDENTIALS[public] = given
    return public


def uri_from_connection(conn_id: str) -> str | None:
    """Public tracking URI of connection ``conn_id`` (credentials remembered); None if absent."""
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        conn = BaseHook.get_connection(conn_id)
    except AirflowNotFoundException:
        return None
    return _remember_connection(conn)


async def aremember_connection(conn_id: str) -> None:
    """The triggerer's way to :func:`uri_from_connection` (never blocks the event loop)."""
    from airflow.providers.common.compat.connection import get_async_connection

    _remember_connection(await get_async_connection(conn_id))


def credentialed_uri(uri: str, conn_id: str | None = None) -> str:
    """The URI to connect with: credentials from this process, never from stored state.

    In order: a URI given to this process (settings, connection already read),
    the connection ``conn_id``, then :data:`URI_ENV_VARS`.
    """
    if uri in _CREDENTIALS:
        return _CREDENTIALS[uri]
    if conn_id and uri_from_connection(conn_id) == uri:
        return _CREDENTIALS[uri]
    for name in URI_ENV_VARS:
        value = os.environ.get(name, "").strip().rstrip("/")
        if value and value != uri and public_uri(value) == uri:
            return value
    return uri


def client_for_uri(tracking_uri: str, conn_id: str | None = None) -> MlflowClient:
    """An :class:`mlflow.MlflowClient` for a public URI (credentials from this process)."""
    from mlflow import MlflowClient

    uri = credentialed_uri(tracking_uri, conn_id)
    if uri != tracking_uri:
        # MLflow prints "View run ... at: <the URI>" to stdout (the task log).
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


class MlflowHook(BaseHook):
    """An MLflow tracking server, from an Airflow connection of type ``mlflow``.

    :param mlflow_conn_id: the connection; its password never leaves this process.
    """

    conn_name_attr = "mlflow_conn_id"
    default_conn_name = DEFAULT_CONN_ID
    conn_type = "mlflow"
    hook_name = "MLflow"

    def __init__(self, mlflow_conn_id: str = DEFAULT_CONN_ID, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.mlflow_conn_id = mlflow_conn_id

    @property
    def tracking_uri(self) -> str:
        """The public URI (no credentials): safe for logs, XCom and MLflow tags."""
        return _remember_connection(self.get_connection(self.mlflow_conn_id))

    def get_conn(self) -> MlflowClient:
        """An :class:`mlflow.MlflowClient` with the connection's credentials."""
        return client_for_uri(self.tracking_uri, self.mlflow_conn_id)

    def test_connection(self) -> tuple[bool, str]:
        """One request without retries (the UI's Test button)."""
        from slurm_ray.mlflow.reachability import probe

        uri = self.tracking_uri
        problem = probe(uri, 5.0)
        return (problem is None, f"{uri}: " + (problem or "reachable"))
