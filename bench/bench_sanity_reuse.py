"""What the recorded sanity pass saves: the sanity task's execute, checked vs reused.

Runs ``GymSanityCheckOperator.execute`` as the demo's ``sanity_check`` task does
(the dev cluster's venv, a one-task ``srun`` step on partition ``debug``),
interleaved A B A B...: A with ``force=True`` (the check runs for real and
records its pass), B without (the pass A just recorded is reused: one SSH
command, no ``srun``). Prints each run, the medians and the load average.

    .venv/bin/python bench/bench_sanity_reuse.py [--pairs 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from _cluster import CONN_ID, VENV, setup_airflow_env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=3)
    args = parser.parse_args()
    setup_airflow_env()
    from slurm_ray import GymSanityCheckOperator

    def execute(force: bool) -> tuple[float, bool]:
        op = GymSanityCheckOperator(
            task_id="sanity_check",
            ssh_conn_id=CONN_ID,
            environment={"kind": "venv", "prefix": str(VENV)},
            where="compute",
            partition="debug",
            quiet=True,
            force=force,
        )
        started = time.perf_counter()
        summary = op.execute({})
        return time.perf_counter() - started, bool(summary["reused"])

    load_before = os.getloadavg()
    execute(True)  # warm-up: the first connection's costs and a fresh record
    times: dict[str, list[float]] = {"checked": [], "reused": []}
    print("| pair | checked (force) s | reused s | load1 |")
    print("|---|---|---|---|")
    for i in range(1, args.pairs + 1):
        a, a_reused = execute(True)
        b, b_reused = execute(False)
        assert not a_reused and b_reused, (a_reused, b_reused)
        times["checked"].append(a)
        times["reused"].append(b)
        print(f"| {i} | {a:.3f} | {b:.3f} | {os.getloadavg()[0]:.2f} |")
    med = {k: statistics.median(v) for k, v in times.items()}
    load_after = os.getloadavg()
    print(
        f"\nmedians: checked {med['checked']:.3f} s, reused {med['reused']:.3f} s, "
        f"saved {med['checked'] - med['reused']:.3f} s"
    )
    print(
        "load average (1/5/15 min): "
        f"{'/'.join(f'{x:.2f}' for x in load_before)} at start, "
        f"{'/'.join(f'{x:.2f}' for x in load_after)} at end; nproc {os.cpu_count()}"
    )


if __name__ == "__main__":
    main()
