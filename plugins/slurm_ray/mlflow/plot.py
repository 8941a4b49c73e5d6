"""Draw the comparison figure where matplotlib is: the cluster environment, over SSH.

The Airflow side has no matplotlib; the cluster environment has it through full
``mlflow``. ``include/plot_curves.py`` runs in a private temporary directory there.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from slurm_ray.mlflow.errors import MlflowError
from slurm_ray.utils.quoting import quote

_TMP_RE = re.compile(r"/[\w./-]*/slurm-ray-plot\.[A-Za-z0-9]+")


def plot_script() -> Path:
    """``include/plot_curves.py`` (``SLURM_RAY_INCLUDE_DIR`` overrides the folder)."""
    default = Path(__file__).resolve().parents[3] / "include"
    return Path(os.environ.get("SLURM_RAY_INCLUDE_DIR", str(default))) / "plot_curves.py"


def plot_command(tmp: str, activation: list[str]) -> str:
    """Shell: run the plot script in ``tmp`` with the environment activated first."""
    steps = [f"cd {quote(tmp)}", *(line.rstrip(";") for line in activation)]
    steps.append("MPLBACKEND=Agg python -u plot_curves.py spec.json curves.png")
    return " && ".join(f"{{ {step}; }}" for step in steps)


class RemotePlotter:
    """A :class:`slurm_ray.mlflow.compare.CurvePlotter` that runs on the login node.

    :param environment: the cluster-side ``EnvironmentSpec`` dict whose Python has matplotlib.
    """

    def __init__(self, hook: Any, environment: Mapping[str, Any] | None = None) -> None:
        self.hook = hook
        self.environment = dict(environment or {})

    def __call__(self, spec: Mapping[str, Any]) -> bytes:
        """The PNG of ``spec``, drawn on the cluster."""
        from slurm_ray.utils.environment import EnvironmentSpec

        activation = EnvironmentSpec.from_dict(self.environment).activation_lines()
        made = self.hook.run('mktemp -d "${TMPDIR:-/tmp}/slurm-ray-plot.XXXXXX"', check=True)
        tmp = (made.stdout or "").strip()
        if not _TMP_RE.fullmatch(tmp):
            raise MlflowError(f"unexpected temporary directory from the login node: {tmp!r}")
        try:
            self.hook.upload_bytes(plot_script().read_bytes(), f"{tmp}/plot_curves.py")
            self.hook.upload_bytes(json.dumps(spec).encode(), f"{tmp}/spec.json")
            res = self.hook.run(plot_command(tmp, list(activation)), timeout=300)
            if res.exit_code != 0:
                raise MlflowError(
                    f"plotting the learning curves on the cluster failed (exit {res.exit_code}): "
                    f"{(res.stderr or res.stdout or '').strip()[-1500:]}"
                )
            png = self.hook.read_file(f"{tmp}/curves.png")
        finally:
            self.hook.run(f"rm -rf -- {quote(tmp)}")
        if not png or not png.startswith(b"\x89PNG\r\n\x1a\n"):
            raise MlflowError("plotting the learning curves on the cluster produced no PNG")
        return bytes(png)
