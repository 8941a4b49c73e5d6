"""Where and how a training task is tracked: :class:`MlflowSettings`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    ValidationError,
    field_validator,
)

from slurm_ray.mlflow.hook import DEFAULT_CONN_ID, remember_uri, uri_from_connection


def _field_errors(exc: ValidationError) -> ValueError:
    """pydantic's errors as ``mlflow.<field>: <why>`` (the form every caller expects)."""
    parts = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "mlflow"
        why = "unknown setting" if err["type"] == "extra_forbidden" else err["msg"]
        parts.append(f"mlflow.{field}: {why}")
    known = sorted(MlflowSettings.model_fields)
    if any(e["type"] == "extra_forbidden" for e in exc.errors()):
        parts.append(f"known settings: {known}")
    return ValueError("; ".join(parts))


class MlflowSettings(BaseModel):
    """Where and how a training task is tracked.

    :param tracking_uri: the tracking server, e.g. ``http://127.0.0.1:5055``;
        kept without credentials (settings travel in XCom and trigger kwargs).
        Missing: taken from the Airflow connection ``conn_id``.
    :param experiment_name: MLflow experiment (the DAG id unless a parameter says otherwise).
    :param conn_id: Airflow connection of type ``mlflow`` (URI and credentials).
    :param registered_model_name: register the trained model under this name; None: don't.
    :param relay_later: if the server is unreachable when the task starts, warn and
        train anyway (metrics are relayed once it is back) instead of failing.
    :param min_improvement: how much a new version's metric must beat the champion's
        to take the ``champion`` alias.
    :param log_checkpoint: upload the final RLlib checkpoint as artifacts.
    :param request_timeout: seconds for the reachability probe.
    """

    model_config = ConfigDict(extra="forbid", frozen=False)

    tracking_uri: str
    experiment_name: str = Field(min_length=1, max_length=500)
    conn_id: str | None = None
    registered_model_name: str | None = None
    relay_later: StrictBool = False
    min_improvement: StrictFloat = Field(default=0.0, ge=0, allow_inf_nan=False)
    log_checkpoint: StrictBool = True
    request_timeout: StrictFloat = Field(default=5.0, gt=0, allow_inf_nan=False)

    def __init__(
        self, tracking_uri: str | None = None, experiment_name: str | None = None, **data: Any
    ) -> None:
        # Positional (uri, experiment) stays allowed, as before the pydantic model.
        given = {"tracking_uri": tracking_uri, "experiment_name": experiment_name}
        try:
            super().__init__(**{k: v for k, v in given.items() if v is not None}, **data)
        except ValidationError as exc:
            raise _field_errors(exc) from None

    @field_validator("tracking_uri")
    @classmethod
    def _public_tracking_uri(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must be a non-empty string")
        # This process remembers the credentials for its own clients.
        return remember_uri(value)

    @field_validator("experiment_name")
    @classmethod
    def _experiment_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must be a non-empty string")
        return value

    @field_validator("registered_model_name", "conn_id")
    @classmethod
    def _null_or_named(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must be a non-empty string or null")
        return value

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], *, default_experiment: str | None = None
    ) -> MlflowSettings:
        """From a plain dict (operator argument, DAG params); ValueError names the bad key.

        Without a ``tracking_uri`` the URI comes from the connection ``conn_id``
        (default ``mlflow_default``) when there is one; ``default_experiment``
        is used when ``experiment_name`` is missing (the DAG id).
        """
        values = dict(data)
        if not values.get("experiment_name"):
            if not default_experiment:
                raise ValueError("mlflow.experiment_name: required")
            values["experiment_name"] = default_experiment
        if not values.get("tracking_uri"):  # missing or "" (no SLURM_RAY_MLFLOW_URI)
            conn_id = values.get("conn_id") or DEFAULT_CONN_ID
            uri = uri_from_connection(conn_id)
            if uri is None:
                raise ValueError(
                    f"mlflow.tracking_uri: required (none given, and no Airflow connection "
                    f"{conn_id!r} of type mlflow)"
                )
            values["tracking_uri"], values["conn_id"] = uri, conn_id
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict; ``from_dict(to_dict())`` round-trips."""
        return self.model_dump()
