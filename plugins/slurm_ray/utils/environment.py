"""How a job (or a login-node command) activates the cluster-side environment."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, StrictBool, StrictStr, field_validator, model_validator

from slurm_ray.utils.quoting import quote
from slurm_ray.validation import FieldError, Spec

EnvKind = Literal["conda", "venv", "modules", "none"]
# venv/conda activation scripts paste the prefix into shell code (unquoted in
# unpatched Pythons, CVE-2024-9287), so only plain absolute paths are allowed.
_PREFIX_PATTERN = r"^/[A-Za-z0-9_.+,@%=:/{}-]*$(?!\n)"
_Line = Annotated[StrictStr, Field(pattern=r"^[^\n\x00]*$(?!\n)")]


class EnvironmentSpecError(ValueError):
    """An invalid environment description; names the field."""


class EnvironmentSpec(Spec):
    """The cluster-side Python environment.

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

    spec_error: ClassVar[type[ValueError]] = EnvironmentSpecError
    spec_label: ClassVar[str] = "environment."

    kind: EnvKind = "none"
    prefix: _Line | None = None
    spec_file: _Line | None = None
    module_lines: tuple[StrictStr, ...] = ()
    conda_setup: _Line | None = None
    unset_ld_preload: StrictBool = False
    python: _Line = "python3"

    @field_validator("module_lines", mode="before")
    @classmethod
    def _one_line_is_a_list(cls, value: Any) -> Any:
        return (value,) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _prefix_for_kind(self) -> EnvironmentSpec:
        if self.kind not in ("conda", "venv"):
            return self
        if not self.prefix:
            raise FieldError("prefix", f"required for kind={self.kind}")
        if not re.search(_PREFIX_PATTERN, self.prefix) or "/../" in f"{self.prefix}/":
            raise FieldError(
                "prefix",
                f"{self.prefix!r} must be an absolute path of letters, digits and "
                "_ . + , @ % = : / - only (activation scripts embed it in shell code)",
            )
        return self

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> EnvironmentSpec:
        """Build from a plain dict; unknown keys are an error listing the valid ones."""
        return cls(**dict(data or {}))

    def to_dict(self) -> dict[str, Any]:
        return {**self.model_dump(), "module_lines": list(self.module_lines)}

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
