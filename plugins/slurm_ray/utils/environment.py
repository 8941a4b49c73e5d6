"""How a job (or a login-node command) activates the cluster-side environment."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from slurm_ray.utils.quoting import quote

EnvKind = Literal["conda", "venv", "modules", "none"]
_KINDS = ("conda", "venv", "modules", "none")
# venv/conda activation scripts paste the prefix into shell code (unquoted in
# unpatched Pythons, CVE-2024-9287), so only plain absolute paths are allowed.
_PREFIX_RE = re.compile(r"/[A-Za-z0-9_.+,@%=:/{}-]*")


class EnvironmentSpecError(ValueError):
    """An invalid environment description; names the field."""


@dataclass(frozen=True)
class EnvironmentSpec:
    """
    The cluster-side Python environment.

    :param kind: ``conda`` (``conda activate PREFIX``), ``venv`` (``PREFIX/bin/activate``),
        ``modules`` (module lines only) or ``none``.
    :param prefix: environment directory (conda and venv).
    :param spec_file: environment.yml / requirements file name inside ``include/``
        used to build it (ClusterEnvOperator).
    :param module_lines: site shell lines run first (``module purge``, ``module load conda``).
        Trusted configuration from a cluster profile, never from run parameters.
    :param conda_setup: shell line that makes ``conda activate`` available
        (e.g. ``source /opt/conda/etc/profile.d/conda.sh``); default ``eval "$(conda shell.bash hook)"``.
    :param unset_ld_preload: the Eagle quirk: a preloaded library broke Ray there.
    :param python: interpreter used to create a venv.
    """

    kind: EnvKind = "none"
    prefix: str | None = None
    spec_file: str | None = None
    module_lines: Sequence[str] = field(default_factory=tuple)
    conda_setup: str | None = None
    unset_ld_preload: bool = False
    python: str = "python3"

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise EnvironmentSpecError(
                f"environment.kind: {self.kind!r} is not one of {', '.join(_KINDS)}"
            )
        if self.kind in ("conda", "venv") and not self.prefix:
            raise EnvironmentSpecError(f"environment.prefix: required for kind={self.kind}")
        if self.kind in ("conda", "venv") and (
            not _PREFIX_RE.fullmatch(self.prefix or "") or "/../" in f"{self.prefix}/"
        ):
            raise EnvironmentSpecError(
                f"environment.prefix: {self.prefix!r} must be an absolute path of letters, "
                "digits and _ . + , @ % = : / - only (activation scripts embed it in shell code)"
            )
        for name in ("prefix", "spec_file", "python", "conda_setup"):
            value = getattr(self, name)
            if value is not None and ("\n" in value or "\0" in value):
                raise EnvironmentSpecError(f"environment.{name}: must be a single line")
        if isinstance(self.module_lines, str):
            object.__setattr__(self, "module_lines", (self.module_lines,))
        object.__setattr__(self, "module_lines", tuple(self.module_lines))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> EnvironmentSpec:
        """Build from a plain dict; unknown keys are an error listing the valid ones."""
        data = dict(data or {})
        valid = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - valid)
        if unknown:
            raise EnvironmentSpecError(
                f"environment: unknown key(s) {', '.join(map(repr, unknown))}; "
                f"valid keys are: {', '.join(sorted(valid))}"
            )
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "prefix": self.prefix,
            "spec_file": self.spec_file,
            "module_lines": list(self.module_lines),
            "conda_setup": self.conda_setup,
            "unset_ld_preload": self.unset_ld_preload,
            "python": self.python,
        }

    def preamble_lines(self) -> list[str]:
        """Site lines that precede everything (module setup, LD_PRELOAD quirk)."""
        lines = list(self.module_lines)
        if self.unset_ld_preload:
            lines.append("unset LD_PRELOAD")
        return lines

    def activation_lines(self) -> list[str]:
        """Shell lines that activate the environment inside a job or SSH command."""
        lines = self.preamble_lines()
        if self.kind in ("venv", "conda"):
            assert self.prefix is not None
            p = quote(self.prefix)
            # Hold PREFIX.lock shared for the life of this shell (a job: the whole
            # job; fd 8 survives `exec`): a ClusterEnvOperator build takes it
            # exclusively, so a job never starts on a half-built environment and a
            # rebuild waits until no running job uses the environment.
            lock = quote(self.prefix + ".lock")
            lines.append(
                f"if [ -e {lock} ] || touch {lock} 2>/dev/null; "
                f"then exec 8<{lock} && flock -s 8; fi"
            )
        if self.kind == "venv":
            missing = quote(f"slurm_ray: venv {self.prefix} does not exist")
            lines.append(f"[ -f {p}/bin/activate ] || {{ echo {missing} >&2; exit 2; }}")
            lines.append(f". {p}/bin/activate")
        elif self.kind == "conda":
            lines.append(self.conda_setup or 'eval "$(conda shell.bash hook)"')
            lines.append(f"conda activate {p}")
        return lines
