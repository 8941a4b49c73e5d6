"""SlurmHook.run keeps a bounded end of a command's output (issue 12 item 7),
through the real sshd."""

from __future__ import annotations

import tracemalloc

import pytest

from tests.conftest import DevCluster
from tests.faults.helpers import tap

pytestmark = pytest.mark.cluster


def test_fifty_megabytes_of_output_keep_the_last_mebibyte(cluster: DevCluster) -> None:
    from slurm_ray.hooks.slurm import SlurmHook

    hook = SlurmHook("slurm_dev", max_output=1 << 20)
    logs = tap(hook)
    printed = 50_000_000
    # 50 MB on stdout without a newline, then an end marker; 3 MB on stderr.
    cmd = (
        f"head -c {printed} /dev/zero | tr '\\0' x; echo END; "
        "head -c 3000000 /dev/zero | tr '\\0' e >&2; echo ERR-END >&2"
    )
    tracemalloc.start()
    try:
        res = hook.run(cmd, timeout=300)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        hook.close()
    assert res.exit_code == 0
    assert len(res.stdout_bytes) == 1 << 20 and res.stdout_bytes.endswith(b"xxEND\n")
    assert res.stdout_cut == printed + 4 - (1 << 20)
    assert res.stderr.endswith("eeERR-END\n") and res.stderr_cut == 3_000_008 - (1 << 20)
    # What stays in memory is the cap, not the output (50 MB before the cap).
    assert peak < 16 << 20, peak
    said = logs.text
    assert f"printed {printed + 4} bytes on stdout; kept the last {1 << 20}" in said
    assert f"cut {res.stdout_cut}" in said and "on stderr" in said
