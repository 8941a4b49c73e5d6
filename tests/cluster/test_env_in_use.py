"""Issue 12 item 10: a rebuild of an environment never changes packages under a
running job. A tiny venv (``six``) in a per-test scratch prefix, never the
shared cluster venv; a real Slurm job activates it the way the batch script
does (``EnvironmentSpec.activation_lines``) and imports ``six`` at its start
and again at its end, while ``ClusterEnvOperator`` rebuilds with another version.
"""

from __future__ import annotations

import shlex
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.test_cluster_env import PYTHON, ctx, env_op
from tests.conftest import DevCluster

pytestmark = pytest.mark.cluster

PROBE = "python -c 'import six; print(\"SIX\", six.__version__)'"


def test_rebuild_waits_for_the_running_job(cluster: DevCluster, tmp_path: Path) -> None:
    from slurm_ray.utils.environment import EnvironmentSpec

    base = cluster.new_dir("envlock")
    prefix = f"{base}/venv"
    spec = tmp_path / "requirements.txt"
    spec.write_text("six==1.16.0\n")
    assert env_op(prefix, spec).execute(ctx())["action"] == "built"

    env = EnvironmentSpec(kind="venv", prefix=prefix, python=PYTHON)
    script = "\n".join(
        [
            "#!/bin/bash",
            f"#SBATCH --output={base}/job.out",
            "#SBATCH --nodes=1 --ntasks=1 --cpus-per-task=1 --time=5",
            "set -e",
            *env.activation_lines(),
            f"{PROBE} | sed 's/^/START /'",
            f"while [ ! -e {shlex.quote(base)}/go ]; do sleep 0.2; done",
            "sleep 3",  # the rebuild, if it runs now, is done with pip by then
            f"{PROBE} | sed 's/^/END /'",
        ]
    )
    cluster.ssh(
        f"printf '%s' {shlex.quote(script + chr(10))} > {shlex.quote(base)}/job.sh",
    )
    job_id = cluster.ssh(f"cd {shlex.quote(base)} && sbatch --parsable job.sh").stdout.strip()
    try:
        deadline = time.monotonic() + 120
        while "START SIX 1.16.0" not in cluster.ssh(f"cat {base}/job.out", check=False).stdout:
            assert time.monotonic() < deadline, "the job never started"
            time.sleep(0.5)

        spec.write_text("six==1.15.0\n")
        result: dict[str, Any] = {}

        def rebuild() -> None:
            try:
                result.update(env_op(prefix, spec).execute(ctx()))
            except BaseException as exc:
                result["error"] = exc

        builder = threading.Thread(target=rebuild)
        builder.start()
        time.sleep(8)  # give a build that does not wait time to reach pip
        cluster.ssh(f"touch {shlex.quote(base)}/go")
        deadline = time.monotonic() + 120
        while cluster.ssh(f"squeue -h -j {job_id} -o %T", check=False).stdout.strip():
            assert time.monotonic() < deadline, "the job did not end"
            time.sleep(0.5)
        out = cluster.ssh(f"cat {base}/job.out").stdout
        # the job ran with the packages it started with, start to end
        assert "END SIX 1.16.0" in out, out
        builder.join(600)
        assert "error" not in result, result.get("error")
        assert result["action"] == "built", result
        after = cluster.ssh(f"{shlex.quote(prefix)}/bin/{PROBE}").stdout.strip()
        assert after == "SIX 1.15.0", after
    finally:
        cluster.ssh(f"scancel {job_id}", check=False)
