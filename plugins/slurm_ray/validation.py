"""Declarative validation: the shared rules, strict pydantic specs, and their errors.

The rules that several inputs share (a gymnasium env id, a shell variable name,
a Slurm time limit) are regular expressions written once, in a form that
Python, JSON Schema and the browser's JavaScript read alike (``$(?!\\n)``
instead of ``\\Z``). The env-id rule belongs to the training config's JSON
Schema in :mod:`slurm_ray.training_config`, because the cluster side checks
configs with that same file.

:class:`Spec` is the base of the pydantic models (``JobSpec``,
``EnvironmentSpec``, ``ClusterProfile``): unknown keys are refused, and every
pydantic error becomes one ``<label><field>: <message>`` line by
:func:`describe`, the only place that translates them.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from slurm_ray.slurm.timefmt import TIME_PATTERN
from slurm_ray.training_config import ENV_ID_PATTERN, ConfigError, check_env_module

__all__ = [
    "ENV_ID_PATTERN",
    "SLURM_TIME_PATTERN",
    "VAR_NAME_PATTERN",
    "FieldError",
    "Spec",
    "describe",
    "validate_env_id",
    "validate_extra_env",
]

_END = r"$(?!\n)"  # `$` alone also matches before a trailing newline
#: No ASCII control character: a newline would end an ``#SBATCH`` line.
NO_CONTROL_PATTERN = r"^[^\x00-\x1f\x7f]*" + _END
#: A shell variable name.
VAR_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*" + _END
#: A Python module name (a profile's ``env_modules``).
MODULE_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.]*" + _END
#: Slurm ``--time``: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS or UNLIMITED
#: (the one time grammar, :mod:`slurm_ray.slurm.timefmt`).
SLURM_TIME_PATTERN = TIME_PATTERN
MEM_PATTERN = r"^[0-9]+[KMGTkmgt]?" + _END
# --signal=[{R|B}:]<sig_num>[@sig_time]
SIGNAL_PATTERN = r"^(?:(?:R|B|RB|BR):)?(?:(?:SIG)?[A-Z][A-Z0-9]*|[0-9]+)(?:@[0-9]+)?" + _END

#: What a pattern means, for the error message of a value that does not match it.
_PATTERN_MESSAGES = {
    NO_CONTROL_PATTERN: "must not contain control characters such as newline or NUL, got {input!r}",
    VAR_NAME_PATTERN: "{input!r} is not a valid variable name",
    MODULE_PATTERN: "{input!r} is not a module name",
    SLURM_TIME_PATTERN: "{input!r} is not a Slurm time limit (MM, MM:SS, HH:MM:SS, D-HH, "
    "D-HH:MM, D-HH:MM:SS or UNLIMITED)",
    MEM_PATTERN: "{input!r} is not a Slurm size such as 4000M, 4G or 0",
    SIGNAL_PATTERN: "{input!r} is not [{{R|B}}:]SIGNAL[@SECONDS], e.g. B:USR1@60",
}
_MESSAGES = {
    "missing": "is required",
    "int_type": "expected an integer, got {kind} {input!r}",
    "bool_type": "expected true or false, got {kind} {input!r}",
    "string_type": "expected a string, got {kind} {input!r}",
    "greater_than_equal": "must be >= {ge}, got {input!r}",
    "string_too_short": "must not be empty (leave it unset instead)",
    "string_too_long": "is {length} characters long; at most {max_length}",
    "literal_error": "{input!r} is not one of {expected}",
}


class FieldError(ValueError):
    """Raised by a validator: ``field`` is the path under the model, e.g. ``extra['nice']``."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(message)


def _path(loc: tuple[int | str, ...]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")


def describe(exc: ValidationError, label: str, unknown: str, valid: Collection[str]) -> str:
    """One line for the first error of ``exc``: ``label + field + ": " + message``.

    Unknown keys come first, all of them at once, formatted with ``unknown``
    (``{keys}``: the unknown ones, ``{valid}``: the ``valid`` keys, sorted).
    """
    errors = exc.errors(include_url=False)
    extra = [e["loc"][0] for e in errors if e["type"] == "extra_forbidden" and len(e["loc"]) == 1]
    if extra:
        keys = ", ".join(map(repr, extra))
        return unknown.format(keys=keys, valid=", ".join(sorted(valid)))
    err = errors[0]
    ctx = err.get("ctx") or {}
    cause = ctx.get("error")
    field = _path(err["loc"])
    if getattr(cause, "spec_described", False):  # a nested spec's error names its field
        return f"{label}{cause}"
    if isinstance(cause, FieldError):
        sep = "" if cause.field.startswith("[") else "."
        field = f"{field}{sep}{cause.field}".lstrip(".")
        message = str(cause)
    elif isinstance(cause, Exception):
        message = str(cause)
    elif err["type"] == "string_pattern_mismatch" and ctx["pattern"] in _PATTERN_MESSAGES:
        message = _PATTERN_MESSAGES[ctx["pattern"]].format(input=err["input"])
    else:
        value = err.get("input")
        fields = {**ctx, "input": value, "kind": type(value).__name__}
        if isinstance(value, str):
            fields["length"] = len(value)
        template = _MESSAGES.get(err["type"])
        message = template.format(**fields) if template else f"{err['msg']}, got {value!r}"
    return f"{label}{field}: {message}"


class Spec(BaseModel):
    """A frozen, strict pydantic model whose errors are one line naming the field."""

    model_config = ConfigDict(extra="forbid", frozen=True, regex_engine="python-re")

    #: raised for any invalid input
    spec_error: ClassVar[type[ValueError]] = ValueError
    #: prefix of a field name in messages, e.g. ``environment.``
    spec_label: ClassVar[str] = ""
    #: message for unknown keys; ``{keys}``, ``{valid}`` and ``{label}`` are filled in
    spec_unknown: ClassVar[str] = "{label}: unknown key(s) {keys}; valid keys are: {valid}"

    def __init__(self, /, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            label = self._label(data)
            unknown = self.spec_unknown.replace("{label}", label.rstrip(".: "))
            error = self.spec_error(describe(exc, label, unknown, self.parameter_names()))
            error.spec_described = True  # type: ignore[attr-defined]
            raise error from None

    @classmethod
    def _label(cls, data: Mapping[str, Any]) -> str:
        return cls.spec_label

    @classmethod
    def parameter_names(cls) -> list[str]:
        """The valid keys."""
        return list(cls.model_fields)


# -- the operators' own inputs ---------------------------------------------------------

# Set by ClusterEnvOperator itself; an extra_env entry must not replace them silently.
_RESERVED_ENV = frozenset({"SLURM_RAY_MODULE_LINES", "SLURM_RAY_UNSET_LD_PRELOAD"})


def _airflow_error(message: str) -> Exception:
    from airflow.sdk.exceptions import AirflowException

    return AirflowException(message)


def validate_env_id(env_id: object, env_modules: Collection[str] = ()) -> str:
    """Check a Gym env id before it nears a shell; the error names ``env_id``.

    The rule is the training config's (:data:`ENV_ID_PATTERN`): a sanity check accepts
    exactly the ids a training run does. ``env_modules``: what a ``module:Name`` id may import.
    """
    if not isinstance(env_id, str) or len(env_id) > 200 or not re.search(ENV_ID_PATTERN, env_id):
        raise _airflow_error(
            f"env_id: {env_id!r} is not a Gym environment id such as 'CartPole-v1' or "
            "'module:Name-v0' (letters, digits and _ . - only, at most 200 characters)"
        )
    try:
        check_env_module("env_id", env_id, env_modules)
    except ConfigError as exc:
        raise _airflow_error(str(exc).removeprefix("config.")) from exc
    return env_id


def validate_extra_env(extra_env: Mapping[str, Any]) -> dict[str, str]:
    """``extra_env`` with string values; names are shell variable names, not reserved ones."""
    out: dict[str, str] = {}
    for key, value in extra_env.items():
        if not isinstance(key, str) or not re.search(VAR_NAME_PATTERN, key):
            raise _airflow_error(f"extra_env: {key!r} is not a valid variable name")
        if key in _RESERVED_ENV:
            raise _airflow_error(
                f"extra_env: {key} is set from `environment`; change the environment instead"
            )
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise _airflow_error(
                f"extra_env[{key!r}]: expected a string, got {type(value).__name__}"
            )
        text = str(value)
        if "\0" in text:
            raise _airflow_error(f"extra_env[{key!r}]: contains a NUL byte")
        out[key] = text
    return out
