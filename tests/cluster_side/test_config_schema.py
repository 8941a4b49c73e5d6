"""The cluster side checks the config against the same JSON Schema (issue 14.5).

training_config.py is copied alone (as a job's run directory holds it) and run
by the cluster venv's Python: what the Airflow side refuses, it refuses by the
same field name, and a field added to the schema is checked there too.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from tests.cluster_side.conftest import subprocess_env
from tests.cluster_side.test_train_driver import result, run_driver, stage
from tests.conftest import ROOT
from tests.unit.test_config_schema import REFUSED, _config_of

# Reads configs (JSON lines) on stdin; prints the refused field of each, or null.
CHECK = """
import json, sys
import training_config as tc
if sys.argv[1:] == ["--add-field"]:
    tc.SCHEMA["properties"]["entropy_coeff"] = {"type": "number", "minimum": 0}
for line in sys.stdin:
    try:
        tc.validate_config(json.loads(line))
        print(json.dumps(None))
    except tc.ConfigError as exc:
        print(json.dumps([exc.field, str(exc)]))
"""


def _cluster_fields(
    python: Path, tmp_path: Path, configs: list[dict[str, Any]], *args: str
) -> list[Any]:
    shutil.copy(ROOT / "plugins" / "slurm_ray" / "training_config.py", tmp_path)
    proc = subprocess.run(
        [
            str(python),
            "-I",
            "-c",
            f"import sys; sys.path.insert(0, {str(tmp_path)!r})\n{CHECK}",
            *args,
        ],
        input="".join(json.dumps(c) + "\n" for c in configs),
        capture_output=True,
        text=True,
        timeout=120,
        env=subprocess_env(),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()]


def test_cluster_refuses_what_the_form_refuses_by_the_same_field(
    cluster_python: Path, tmp_path: Path
) -> None:
    import slurm_ray.training_config as tc

    configs = [_config_of(param, value) for param, value, _ in REFUSED]
    out = _cluster_fields(cluster_python, tmp_path, configs)
    assert [o[0] for o in out] == [field for _, _, field in REFUSED]
    for config, (_, message) in zip(configs, out, strict=True):
        try:
            tc.validate_config(config)
        except tc.ConfigError as exc:
            assert str(exc) == message  # the same words on both sides
    assert _cluster_fields(cluster_python, tmp_path, [{"lr": 0.01}]) == [None]


def test_a_field_added_to_the_schema_is_checked_on_the_cluster(
    cluster_python: Path, tmp_path: Path
) -> None:
    out = _cluster_fields(cluster_python, tmp_path, [{"entropy_coeff": -1}], "--add-field")
    assert out == [["entropy_coeff", "config.entropy_coeff: must be >= 0, got -1"]]


def test_driver_refuses_a_config_over_the_schema_maximum(
    cluster_python: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    script = stage(run_dir)
    proc = run_driver(cluster_python, script, {"lr": 5}, run_dir, tmp_path, "--local")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip() == "CONFIG_ERROR: config.lr: must be <= 1, got 5"
    assert result(run_dir)["status"] == "config_error"
