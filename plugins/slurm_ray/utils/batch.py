"""Build Slurm batch scripts from a validated :class:`JobSpec`.

Every ``#SBATCH`` value and every exported environment value goes through
:func:`slurm_ray.utils.quoting.quote`. ``#SBATCH`` lines are read by sbatch,
not by a shell; measured on Slurm 22.05 (``sbatch --parsable`` then
``scontrol show job``), sbatch's directive parser treats quotes like a
shell does (``'a b'``, ``'x"y'``, ``'a'"'"'b'`` are recorded as ``a b``,
``x"y``, ``a'b``; ``$(...)`` and backticks stay literal text), an unquoted
``#`` starts a comment and unquoted whitespace splits arguments, but a
backslash escapes the next character *even inside single quotes* (``'a\\b'``
is recorded as ``ab``). :func:`sbatch_word` therefore doubles backslashes
before quoting, so sbatch records every value byte for byte.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Annotated, Any, ClassVar

from pydantic import (
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from slurm_ray.utils.hetjob import check_gpu_component, het_components
from slurm_ray.utils.quoting import quote
from slurm_ray.validation import (
    MEM_PATTERN,
    NO_CONTROL_PATTERN,
    SIGNAL_PATTERN,
    SLURM_TIME_PATTERN,
    FieldError,
    Spec,
    describe,
)

__all__ = [
    "EXTRA_DIRECTIVES",
    "JobSpec",
    "JobSpecError",
    "render_batch_script",
    "sbatch_word",
]

#: Extra ``#SBATCH`` options a :class:`JobSpec` may carry in ``extra`` (long
#: option names without ``--``). Kept short on purpose: options that change how
#: the job is run (``--array``, ``--export``, ``--wrap``, ``--parsable``,
#: ``--ntasks``…) would break what the launcher assumes and are not offered.
EXTRA_DIRECTIVES: frozenset[str] = frozenset(
    {
        "begin",  # earliest start time, e.g. now+1hour
        "comment",
        "cpus-per-gpu",
        "deadline",
        "dependency",  # e.g. afterok:123
        "distribution",
        "exclude",  # nodes to avoid
        "gpus",  # total GPUs of the job, e.g. a100:4
        "hint",
        "licenses",
        "mail-type",
        "mail-user",
        "mem-per-cpu",
        "mem-per-gpu",
        "nice",
        "nodelist",
        "open-mode",  # append keeps the log of a requeued job
        "reservation",
        "switches",
        "tmp",  # minimum local scratch per node
        "wckey",
    }
)

_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*", re.ASCII)
# Assigning these makes bash fail ("readonly variable"), which errexit turns
# into a dead job before the command ever runs.
_BASH_READONLY = frozenset({"BASHOPTS", "BASH_VERSINFO", "EUID", "PPID", "SHELLOPTS", "UID"})
_MEM_OPTIONS = ("mem", "mem-per-cpu", "mem-per-gpu")

# Any ASCII control character (newline, CR, NUL, tab, escape…) in a directive
# value: a newline would end the #SBATCH line and start a new one, and none of
# them is meaningful in a Slurm option. Empty strings are refused too.
_Text = Annotated[StrictStr, Field(min_length=1, pattern=NO_CONTROL_PATTERN)]
_TEXT: TypeAdapter[str] = TypeAdapter(_Text, config=ConfigDict(regex_engine="python-re"))
_Count = Annotated[StrictInt, Field(ge=1)]
_Mem = Annotated[StrictStr, Field(min_length=1, pattern=MEM_PATTERN)]
_Time = Annotated[StrictStr, Field(min_length=1, pattern=SLURM_TIME_PATTERN)]
_Signal = Annotated[StrictStr, Field(min_length=1, pattern=SIGNAL_PATTERN)]


class JobSpecError(ValueError):
    """A job specification that Slurm would reject or misread; the message names the field."""


def sbatch_word(value: object) -> str:
    """
    Quote a value for an ``#SBATCH --key=VALUE`` line.

    The result is :func:`quote` of the value with backslashes doubled first:
    sbatch's directive parser honours ``'``/``"`` quoting like a shell but also
    treats ``\\`` as an escape inside single quotes, where a shell would not.

    :raises TypeError, ValueError: as :func:`quote`.
    """
    word = quote(value)  # rejects None, bytes and NUL like every other value
    return word if "\\" not in word else quote(str(value).replace("\\", "\\\\"))


class JobSpec(Spec):
    """
    Validated resources and options of one Slurm batch job.

    Field names are sbatch's long options with ``-`` written as ``_``; a field
    left at ``None`` (or ``False``) renders no directive and Slurm's default
    applies. Anything not covered by a field may be given in ``extra``, limited
    to :data:`EXTRA_DIRECTIVES`. Text values must be non-empty and free of
    control characters; counts are positive integers (``true`` is not one).

    :param job_name: ``--job-name``; 1 to 200 characters.
    :param nodes: ``--nodes``.
    :param ntasks_per_node: ``--ntasks-per-node``.
    :param cpus_per_task: ``--cpus-per-task``.
    :param mem: ``--mem`` per node: a Slurm size such as ``4G``, ``4000M`` or ``0`` (all).
    :param gpus_per_node: ``--gpus-per-node``.
    :param gres: ``--gres``, e.g. ``gpu:a100:2``.
    :param partition: ``--partition``.
    :param account: ``--account``.
    :param qos: ``--qos``.
    :param time: ``--time``: ``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``,
        ``D-HH:MM:SS`` or ``UNLIMITED``; a positive int means minutes.
    :param output: ``--output``; relative paths are relative to ``chdir`` (or the
        submission directory), which the caller makes the run directory.
    :param error: ``--error``; unset means stderr goes to ``output``.
    :param constraint: ``--constraint``.
    :param exclusive: ``--exclusive`` when true.
    :param signal: ``--signal``, e.g. ``B:USR1@60``.
    :param chdir: ``--chdir``.
    :param requeue: ``--requeue`` (true) / ``--no-requeue`` (false); ``None`` keeps the
        cluster's default.
    :param extra: further directives, long option name to value, from
        :data:`EXTRA_DIRECTIVES`; ``mail_type`` is accepted for ``mail-type``.
    :param learner_gpus: above 0: a GPU hetjob (:mod:`slurm_ray.utils.hetjob`) whose
        component 0 (``gpu_partition``, ``gpu_nodes``, ``gpu_cpus``) has the GPUs.
    :raises JobSpecError: naming the offending field.
    """

    spec_error: ClassVar[type[ValueError]] = JobSpecError
    spec_label: ClassVar[str] = "JobSpec."
    spec_unknown: ClassVar[str] = "Unavailable parameter(s) {keys}; valid parameters are: {valid}"

    job_name: Annotated[_Text, Field(max_length=200)]
    nodes: _Count = 1
    ntasks_per_node: _Count = 1
    cpus_per_task: _Count | None = None
    mem: _Mem | None = None
    gpus_per_node: _Count | None = None
    gres: _Text | None = None
    partition: _Text | None = None
    account: _Text | None = None
    qos: _Text | None = None
    time: _Time | None = None
    output: _Text | None = "slurm-%j.out"
    error: _Text | None = None
    constraint: _Text | None = None
    exclusive: StrictBool = False
    signal: _Signal | None = None
    chdir: _Text | None = None
    requeue: StrictBool | None = None
    extra: Mapping[str, str] = Field(default_factory=lambda: MappingProxyType({}))
    learner_gpus: Annotated[StrictInt, Field(ge=0, le=1024)] = 0
    gpu_partition: _Text | None = None
    gpu_nodes: _Count | None = None
    gpu_cpus: _Count | None = None

    @field_validator("time", mode="before")
    @classmethod
    def _minutes(cls, value: Any) -> Any:
        # Whole minutes, as Slurm reads a bare number (and as a rendered native
        # template such as "{{ 5 }}" arrives).
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return str(value)
        return value

    @field_validator("extra", mode="before")
    @classmethod
    def _normalized_extra(cls, extra: Any) -> dict[str, str]:
        if extra is None:
            return {}
        if not isinstance(extra, Mapping):
            raise ValueError(f"expected a mapping, got {type(extra).__name__}")
        out: dict[str, str] = {}
        unknown: list[str] = []
        for raw_key, value in extra.items():
            if not isinstance(raw_key, str):
                raise ValueError(f"directive names must be strings, got {raw_key!r}")
            key = raw_key.strip().lower().replace("_", "-")
            label = f"[{raw_key!r}]"
            if key.replace("-", "_") in cls.model_fields:
                raise FieldError(label, f"set it with the field {key.replace('-', '_')!r}")
            if key not in EXTRA_DIRECTIVES:
                unknown.append(raw_key)
            elif key in out:
                raise FieldError(label, f"given twice (as {key!r})")
            # ints are natural for nice=10; bool is not an option value.
            if isinstance(value, int) and not isinstance(value, bool):
                value = str(value)
            try:
                _TEXT.validate_python(value)
            except ValidationError as exc:
                raise FieldError(label, describe(exc, "", "", ()).lstrip(": ")) from None
            out[key] = value
        if unknown:
            raise ValueError(
                f"unavailable directive(s) {', '.join(map(repr, unknown))}; "
                f"allowed extra directives are: {', '.join(sorted(EXTRA_DIRECTIVES))}"
            )
        return dict(sorted(out.items()))

    @field_validator("extra", mode="after")
    @classmethod
    def _read_only(cls, extra: Mapping[str, str]) -> Mapping[str, str]:
        return MappingProxyType(dict(extra))

    @model_validator(mode="after")
    def _cross_field_rules(self) -> JobSpec:
        given = [opt for opt in _MEM_OPTIONS if (self.mem if opt == "mem" else self.extra.get(opt))]
        if len(given) > 1:
            raise FieldError(
                "mem", f"--{' and --'.join(given)} are mutually exclusive in Slurm; set one"
            )
        check_gpu_component(self)
        return self

    def __hash__(self) -> int:  # a mapping is not hashable; the rest of the spec is
        return hash(tuple(v for k, v in self.to_dict().items() if k != "extra"))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> JobSpec:
        """
        Build a spec from a mapping such as DAG params or a cluster profile.

        Keys are field names; sbatch spellings with ``-`` (``cpus-per-task``)
        are accepted too.

        :raises JobSpecError: for unknown or duplicated keys, a missing
            ``job_name``, or any invalid value.
        """
        if not isinstance(d, Mapping):
            raise JobSpecError(f"JobSpec: expected a mapping, got {type(d).__name__}")
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            name = key.replace("-", "_") if isinstance(key, str) else key
            if name in kwargs:
                raise JobSpecError(
                    f"JobSpec.{name}: given twice (as {name!r} and {name.replace('_', '-')!r})"
                )
            kwargs[name] = value
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-serialisable; ``JobSpec.from_dict(spec.to_dict()) == spec``."""
        out = {name: getattr(self, name) for name in type(self).model_fields}
        out["extra"] = dict(self.extra)
        return out

    def directives(self) -> list[tuple[str, str | None]]:
        """``(option, value)`` pairs in render order; ``None`` means a flag without value."""
        pairs: list[tuple[str, str | None]] = [("job-name", self.job_name)]
        for name in (
            "partition",
            "account",
            "qos",
            "time",
            "nodes",
            "ntasks_per_node",
            "cpus_per_task",
            "mem",
            "gpus_per_node",
            "gres",
            "constraint",
        ):
            value = getattr(self, name)
            if value is not None:
                pairs.append((name.replace("_", "-"), str(value)))
        if self.exclusive:
            pairs.append(("exclusive", None))
        if self.signal is not None:
            pairs.append(("signal", self.signal))
        if self.requeue is not None:
            pairs.append(("requeue" if self.requeue else "no-requeue", None))
        for name in ("chdir", "output", "error"):
            value = getattr(self, name)
            if value is not None:
                pairs.append((name, value))
        pairs.extend(self.extra.items())
        return pairs

    def components(self) -> list[list[tuple[str, str | None]]]:
        """:meth:`directives` per hetjob component (one list unless ``learner_gpus``)."""
        return het_components(self, self.directives()) if self.learner_gpus else [self.directives()]


# Safe preamble; see render_batch_script's docstring for why each option.
_PREAMBLE = "set -o errexit -o errtrace -o nounset -o pipefail"


def _check_no_nul(what: str, text: str) -> None:
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a string, got {type(text).__name__}")
    if "\x00" in text:
        raise ValueError(f"{what} contains a NUL byte")


def _export_line(name: str, value: str) -> str:
    """``export NAME='value'``; the error names ``env[NAME]``."""
    if not isinstance(name, str) or not _ENV_NAME_RE.fullmatch(name):
        raise ValueError(f"env: {name!r} is not a valid shell variable name")
    if name in _BASH_READONLY:
        raise ValueError(f"env: {name!r} is read-only in bash and cannot be exported")
    if not isinstance(value, str):
        raise ValueError(f"env[{name!r}]: expected a string, got {type(value).__name__}")
    try:
        return f"export {name}={quote(value)}"
    except ValueError as exc:
        raise ValueError(f"env[{name!r}]: {exc}") from None


def render_batch_script(
    spec: JobSpec,
    *,
    command: str,
    setup_lines: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    header_comment: str | None = None,
) -> str:
    """
    Render the text of a batch script for ``sbatch``.

    Layout: ``#!/bin/bash``; the header comment (every line prefixed ``# ``, so
    it can never turn into a directive); one ``#SBATCH --key=VALUE`` per set
    field with VALUE through :func:`sbatch_word`; the preamble; ``export K=V``
    per ``env`` entry (values through :func:`quote`); ``setup_lines`` verbatim;
    ``command`` verbatim. sbatch stops reading directives at the first command
    line, so the preamble comes right after them.

    The preamble is ``set -o errexit -o errtrace -o nounset -o pipefail``:
    a failing step stops the job instead of training on a broken environment,
    ``errtrace`` lets an ``ERR`` trap fire inside functions too, and ``nounset``
    catches typos in ``$SLURM_*`` names. ``setup_lines`` (``module load``,
    ``conda activate``, ``source venv/bin/activate``) run with ``nounset``
    switched off, because third-party activation scripts read unset variables.
    A ``command`` that traps signals must run long work in the background and
    ``wait "$pid" || rc=$?`` (bash runs traps between commands; errexit).

    :param spec: the validated job specification.
    :param command: trusted shell text run last (e.g. the Ray launcher).
    :param setup_lines: trusted shell lines that prepare the environment.
    :param env: variables to export; names must be shell identifiers.
    :param header_comment: free text shown at the top, e.g. which DAG run made it.
    :raises ValueError: for an invalid env name, or a NUL byte anywhere.
    """
    if not isinstance(spec, JobSpec):
        raise TypeError(f"spec must be a JobSpec, got {type(spec).__name__}")
    _check_no_nul("command", command)
    lines = ["#!/bin/bash"]
    if header_comment is not None:
        _check_no_nul("header_comment", header_comment)
        lines.extend(f"# {line}".rstrip() for line in header_comment.splitlines())
    for i, component in enumerate(spec.components()):
        lines += ["#SBATCH hetjob"] if i else []
        for option, value in component:
            lines.append(
                f"#SBATCH --{option}" + ("" if value is None else f"={sbatch_word(value)}")
            )
    lines += ["", _PREAMBLE]
    lines += [_export_line(name, value) for name, value in (env or {}).items()]
    if setup_lines:
        lines.append("set +o nounset  # activation scripts read unset variables")
        for i, line in enumerate(setup_lines):
            _check_no_nul(f"setup_lines[{i}]", line)
            lines.append(line)
        lines.append("set -o nounset")
    lines.append(command)
    return "\n".join(lines) + "\n"
