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

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from slurm_ray.utils.quoting import quote

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

_MAX_JOB_NAME = 200
# Any ASCII control character (newline, CR, NUL, tab, escape…) in a directive
# value: a newline would end the #SBATCH line and start a new one, and none of
# them is meaningful in a Slurm option.
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_MEM_RE = re.compile(r"[0-9]+[KMGT]?", re.IGNORECASE | re.ASCII)
_HH = r"(?:[01]?[0-9]|2[0-3])"
_MS = r"[0-5]?[0-9]"
_TIME_RE = re.compile(
    rf"""
      [0-9]+                            # MM
    | [0-9]+:{_MS}                      # MM:SS
    | [0-9]+:{_MS}:{_MS}                # HH:MM:SS
    | [0-9]+-{_HH}                      # D-HH
    | [0-9]+-{_HH}:{_MS}                # D-HH:MM
    | [0-9]+-{_HH}:{_MS}:{_MS}          # D-HH:MM:SS
    | UNLIMITED | INFINITE
    """,
    re.VERBOSE | re.IGNORECASE | re.ASCII,
)
# --signal=[{R|B}:]<sig_num>[@sig_time]
_SIGNAL_RE = re.compile(
    r"(?:(?:R|B|RB|BR):)?(?:(?:SIG)?[A-Z][A-Z0-9]*|[0-9]+)(?:@[0-9]+)?", re.ASCII
)
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*", re.ASCII)
# Assigning these makes bash fail ("readonly variable"), which errexit turns
# into a dead job before the command ever runs.
_BASH_READONLY = frozenset({"BASHOPTS", "BASH_VERSINFO", "EUID", "PPID", "SHELLOPTS", "UID"})
_MEM_OPTIONS = ("mem", "mem-per-cpu", "mem-per-gpu")


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


def _err(name: str, message: str) -> JobSpecError:
    return JobSpecError(f"JobSpec.{name}: {message}")


def _check_text(name: str, value: object, *, optional: bool = True) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str):
        raise _err(name, f"expected a string, got {type(value).__name__} {value!r}")
    if not value:
        raise _err(name, "must not be empty (leave it unset instead)")
    bad = _CONTROL_RE.search(value)
    if bad:
        raise _err(
            name, f"must not contain control characters such as newline or NUL; found {bad[0]!r}"
        )


def _check_int(name: str, value: object, *, optional: bool) -> None:
    if value is None and optional:
        return
    # bool is an int subclass: True would silently become 1 node.
    if not isinstance(value, int) or isinstance(value, bool):
        raise _err(name, f"expected a positive integer, got {type(value).__name__} {value!r}")
    if value < 1:
        raise _err(name, f"must be a positive integer, got {value}")


def _check_flag(name: str, value: object, *, optional: bool) -> None:
    if value is None and optional:
        return
    if not isinstance(value, bool):
        raise _err(name, f"expected true or false, got {type(value).__name__} {value!r}")


@dataclass(frozen=True)
class JobSpec:
    """
    Validated resources and options of one Slurm batch job.

    Field names are sbatch's long options with ``-`` written as ``_``; a field
    left at ``None`` (or ``False``) renders no directive and Slurm's default
    applies. Anything not covered by a field may be given in ``extra``, limited
    to :data:`EXTRA_DIRECTIVES`.

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
        ``D-HH:MM:SS`` or ``UNLIMITED``.
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
    :raises JobSpecError: naming the offending field.
    """

    job_name: str
    nodes: int = 1
    ntasks_per_node: int = 1
    cpus_per_task: int | None = None
    mem: str | None = None
    gpus_per_node: int | None = None
    gres: str | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str | None = None
    output: str | None = "slurm-%j.out"
    error: str | None = None
    constraint: str | None = None
    exclusive: bool = False
    signal: str | None = None
    chdir: str | None = None
    requeue: bool | None = None
    # hash=False: a mapping is not hashable, the rest of the spec still is.
    extra: Mapping[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        _check_text("job_name", self.job_name, optional=False)
        if len(self.job_name) > _MAX_JOB_NAME:
            raise _err(
                "job_name", f"is {len(self.job_name)} characters long; at most {_MAX_JOB_NAME}"
            )
        _check_int("nodes", self.nodes, optional=False)
        _check_int("ntasks_per_node", self.ntasks_per_node, optional=False)
        _check_int("cpus_per_task", self.cpus_per_task, optional=True)
        _check_int("gpus_per_node", self.gpus_per_node, optional=True)
        for name in ("gres", "partition", "account", "qos", "output", "error", "constraint"):
            _check_text(name, getattr(self, name))
        _check_text("chdir", self.chdir)
        _check_flag("exclusive", self.exclusive, optional=False)
        _check_flag("requeue", self.requeue, optional=True)

        _check_text("mem", self.mem)
        if self.mem is not None and not _MEM_RE.fullmatch(self.mem):
            raise _err("mem", f"{self.mem!r} is not a Slurm size such as 4000M, 4G or 0")
        if isinstance(self.time, int) and not isinstance(self.time, bool) and self.time > 0:
            # Whole minutes, as Slurm reads a bare number (and as a rendered
            # native template such as "{{ 5 }}" arrives).
            object.__setattr__(self, "time", str(self.time))
        _check_text("time", self.time)
        if self.time is not None and not _TIME_RE.fullmatch(self.time):
            raise _err(
                "time",
                f"{self.time!r} is not a Slurm time limit (MM, MM:SS, HH:MM:SS, D-HH, "
                "D-HH:MM, D-HH:MM:SS or UNLIMITED)",
            )
        _check_text("signal", self.signal)
        if self.signal is not None and not _SIGNAL_RE.fullmatch(self.signal):
            raise _err(
                "signal", f"{self.signal!r} is not [{{R|B}}:]SIGNAL[@SECONDS], e.g. B:USR1@60"
            )
        object.__setattr__(self, "extra", MappingProxyType(self._normalized_extra()))

    def _normalized_extra(self) -> dict[str, str]:
        if not isinstance(self.extra, Mapping):
            raise _err("extra", f"expected a mapping, got {type(self.extra).__name__}")
        fields = {f.name for f in dataclasses.fields(self)}
        out: dict[str, str] = {}
        unknown: list[str] = []
        for raw_key, raw_value in self.extra.items():
            if not isinstance(raw_key, str):
                raise _err("extra", f"directive names must be strings, got {raw_key!r}")
            key = raw_key.strip().lower().replace("_", "-")
            label = f"extra[{raw_key!r}]"
            if key.replace("-", "_") in fields:
                raise _err(label, f"set it with the field {key.replace('-', '_')!r}")
            if key not in EXTRA_DIRECTIVES:
                unknown.append(raw_key)
                continue
            if key in out:
                raise _err(label, f"given twice (as {key!r})")
            # ints are natural for nice=10; bool is not an option value.
            if isinstance(raw_value, int) and not isinstance(raw_value, bool):
                raw_value = str(raw_value)
            _check_text(label, raw_value, optional=False)
            out[key] = raw_value
        if unknown:
            raise _err(
                "extra",
                f"unavailable directive(s) {', '.join(map(repr, unknown))}; "
                f"allowed extra directives are: {', '.join(sorted(EXTRA_DIRECTIVES))}",
            )
        given = [opt for opt in _MEM_OPTIONS if (self.mem if opt == "mem" else out.get(opt))]
        if len(given) > 1:
            raise _err("mem", f"--{' and --'.join(given)} are mutually exclusive in Slurm; set one")
        return dict(sorted(out.items()))

    @classmethod
    def parameter_names(cls) -> list[str]:
        """The valid keys of :meth:`from_dict` (``-`` spellings are accepted too)."""
        return [f.name for f in dataclasses.fields(cls)]

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
        valid = cls.parameter_names()
        kwargs: dict[str, Any] = {}
        unknown: list[str] = []
        for key, value in d.items():
            name = key.replace("-", "_") if isinstance(key, str) else key
            if name not in valid:
                unknown.append(repr(key))
                continue
            if name in kwargs:
                raise _err(name, f"given twice (as {name!r} and {name.replace('_', '-')!r})")
            kwargs[name] = value
        if unknown:
            raise JobSpecError(
                f"Unavailable parameter(s) {', '.join(unknown)}; "
                f"valid parameters are: {', '.join(sorted(valid))}"
            )
        if "job_name" not in kwargs:
            raise _err("job_name", "is required")
        if kwargs.get("extra") is None:
            kwargs.pop("extra", None)
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-serialisable; ``JobSpec.from_dict(spec.to_dict()) == spec``."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
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


# Safe preamble; see render_batch_script's docstring for why each option.
_PREAMBLE = "set -o errexit -o errtrace -o nounset -o pipefail"


def _check_no_nul(what: str, text: str) -> None:
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a string, got {type(text).__name__}")
    if "\x00" in text:
        raise ValueError(f"{what} contains a NUL byte")


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
    For a ``command`` that traps signals (``--signal=B:USR1@60``, ``scancel``'s
    SIGTERM) remember that bash runs a trap only after the foreground command
    returns, so long work must run in the background and be ``wait``-ed for; a
    trapped signal makes ``wait`` return 128+N, which ``errexit`` turns into
    the script's exit once the handler has run: a handler that means to keep
    going must be paired with ``wait "$pid" || rc=$?``.

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
    for option, value in spec.directives():
        lines.append(f"#SBATCH --{option}" + ("" if value is None else f"={sbatch_word(value)}"))
    lines += ["", _PREAMBLE]
    for name, value in (env or {}).items():
        if not isinstance(name, str) or not _ENV_NAME_RE.fullmatch(name):
            raise ValueError(f"env: {name!r} is not a valid shell variable name")
        if name in _BASH_READONLY:
            raise ValueError(f"env: {name!r} is read-only in bash and cannot be exported")
        if not isinstance(value, str):
            raise ValueError(f"env[{name!r}]: expected a string, got {type(value).__name__}")
        try:
            lines.append(f"export {name}={quote(value)}")
        except ValueError as exc:
            raise ValueError(f"env[{name!r}]: {exc}") from None
    if setup_lines:
        lines.append("set +o nounset  # activation scripts read unset variables")
        for i, line in enumerate(setup_lines):
            _check_no_nul(f"setup_lines[{i}]", line)
            lines.append(line)
        lines.append("set -o nounset")
    lines.append(command)
    return "\n".join(lines) + "\n"
