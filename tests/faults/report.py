"""Turn recorded fault trials into bench/reliability.md."""

from __future__ import annotations

import json
import os
import platform
import statistics
from collections import defaultdict
from pathlib import Path

DESCRIPTIONS = {
    "R1": "task marked failed / cleared while deferred or running → job cancelled, nothing left",
    "R2": "triggerer killed and restarted while the job runs → re-attach, one job, no duplicate steps",
    "R3": "sshd down 20 s while watched → reconnect with backoff, task completes",
    "R4": "time limit after checkpoints → TIMEOUT, retry resumes, same MLflow run",
    "R5": "slurmd of one node killed → NODE_FAIL named, retry on one node succeeds",
    "R6": "hostile values in Params / job spec → refused naming the field or inert",
    "R7": "wrong or changed host key → refused before any command",
    "R8": "MLflow down 30 s during training → every metric row arrives",
    "R9": "double trigger / retry while running → never two jobs for one try",
    "R10": "run dir not writable, env missing, sanity failing → early one-line failure",
    "R12.1": "every MLflow request delayed 3 s during training → each row relayed live "
    "exactly once, in order",
    "R12.2": "worker SIGKILLed mid-job, Airflow retries → earlier job cancelled first, "
    "never two jobs, steps continuous",
    "R12.3": "job ended unwatched and purged (MinJobAge, no sacct) → collected from its run dir",
    "S": "secrets never in task log, batch script, XCom or MLflow params",
}


#: What "time to recover" measures for each fault.
CLOCKS = {
    "R1": "REST action -> the job has left squeue (limit 15 s)",
    "R2": "new triggerer started -> the task moves again (new MLflow steps or done)",
    "R3": "sshd back -> the trigger's first good poll",
    "R4": "first try failed -> the resumed retry finished",
    "R5": "one-node retry started -> it finished",
    "R6": "the refusal or the inert run, end to end",
    "R7": "the refusal (before any command)",
    "R8": "MLflow back -> every row of the outage is in MLflow",
    "R9": "both executions returned (one job)",
    "R10": "the early failure",
    "R12.1": "trigger started -> the job's last row relayed (through the slow proxy)",
    "R12.2": "worker killed -> the retried run finished",
    "R12.3": "trigger restarted after the purge -> both jobs' outcomes decided",
    "S": "the run whose outputs are searched",
}


SHARED_SITE = "## Shared site"


def write_report(sources: list[Path], target: Path) -> None:
    """Aggregate every results-*.jsonl file into a markdown table."""
    rows: dict[str, list[dict]] = defaultdict(list)
    for src in sources:
        for line in src.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                rows[row["fault"].split(":")[0]].append(row)
    lines = [
        "# Reliability: faults caused for real on the local cluster",
        "",
        f"Machine: {platform.node()}, {os.cpu_count()} cores, load average "
        f"{', '.join(f'{x:.2f}' for x in os.getloadavg())} when written. "
        "Written by the fault suite (`make test-faults`; `make test` runs each fault once).",
        "",
        "| fault | what | trials | passed | skipped | time to recover (median / max) |",
        "|---|---|---|---|---|---|",
    ]
    # A fault that was skipped (or never ran) stays in the table: an absent row
    # would read as "nothing to report" rather than "not tested".
    for fault in DESCRIPTIONS:
        if not any(f.split()[0] == fault for f in rows):
            rows[fault] = []
    # "R1 deferred clear": a variant of R1, shown as its own row.
    for fault in sorted(rows, key=lambda f: (len(f.split()[0]), f)):
        ran = [r for r in rows[fault] if not r.get("skipped")]
        skipped = len(rows[fault]) - len(ran)
        passed = sum(1 for r in ran if r["passed"])
        times = [r["recover_s"] for r in ran if r["passed"] and r["recover_s"] is not None]
        rec = f"{statistics.median(times):.1f} s / {max(times):.1f} s" if times else "-"
        if not rows[fault]:
            rec = "not run"
        elif not ran:
            reasons = sorted({r.get("note", "") for r in rows[fault]} - {""})
            rec = "skipped: " + "; ".join(reasons) if reasons else "skipped"
        lines.append(
            f"| {fault} | {DESCRIPTIONS.get(fault.split()[0], '')} | {len(ran)} "
            f"| {passed} | {skipped} | {rec} |"
        )
    lines += ["", "Time to recover, per fault:", ""]
    lines += [f"- {fault}: {CLOCKS[fault]}" for fault in sorted(CLOCKS, key=lambda f: (len(f), f))]
    # The hand-kept "shared site" section (attacks by a second user) stays.
    old = target.read_text() if target.exists() else ""
    if SHARED_SITE in old:
        lines += ["", old[old.index(SHARED_SITE) :].rstrip("\n")]
    target.write_text("\n".join(lines) + "\n")
