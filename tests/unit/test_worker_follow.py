"""The worker's wait (SlurmJobManager.follow) reads the metrics file as the trigger does."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from slurm_ray.operators.job_manager import SlurmJobManager
from slurm_ray.slurm.poll import TailChunk
from slurm_ray.utils.states import JobInfo, SlurmState


class FileHook:
    """Answers polls from local files as the poll command does; runs ``steps`` between polls."""

    def __init__(self, steps: list[Any]) -> None:
        self.steps = steps

    def poll(self, job_ids: list[str], tails: list[Any]) -> tuple[dict, list[TailChunk]]:
        state = self.steps.pop(0)() if self.steps else SlurmState.COMPLETED
        chunks = []
        for req in tails:
            path = Path(req.path)
            if not path.exists():
                chunks.append(TailChunk())
                continue
            data = path.read_bytes()
            start = req.offset if req.offset <= len(data) else 0  # shrunk: read from 0
            chunks.append(TailChunk(start, len(data), data[start:]))
        return {job_ids[0]: JobInfo(job_ids[0], state)}, chunks


def test_rows_of_a_rewritten_metrics_file_are_relayed(tmp_path: Path, monkeypatch) -> None:
    """A requeued job starts metrics.jsonl again (shorter than what was read): the
    wait read it on from its old offset and relayed none of the new rows."""
    from slurm_ray.operators import job_manager

    monkeypatch.setattr(job_manager.time, "sleep", lambda s: None)
    metrics, log = tmp_path / "metrics.jsonl", tmp_path / "slurm-7.out"
    log.write_bytes(b"")

    def write(*rows: int, mode: str = "ab", torn: bytes = b"") -> Any:
        def step() -> SlurmState:
            with metrics.open(mode) as fh:
                fh.write(b"".join(b'{"i": %d, "pad": "%s"}\n' % (i, b"x" * 40) for i in rows))
                fh.write(torn)
            return SlurmState.RUNNING

        return step

    steps = [
        write(1, 2, 3, torn=b'{"i": 4'),
        write(torn=b', "pad": ""}\n'),
        write(10, mode="wb"),  # requeued: the file starts again, shorter than before
        write(11),
    ]
    got: list[int] = []
    manager = SlurmJobManager(FileHook(steps), logging.getLogger("t.follow"))  # type: ignore[arg-type]
    ended = manager.follow(
        "7",
        str(log),
        0,
        metrics=(str(metrics), 0),
        on_metrics=lambda data: got.extend(json.loads(r)["i"] for r in data.splitlines()),
    )
    assert ended.state is SlurmState.COMPLETED
    assert got == [1, 2, 3, 4, 10, 11]


def test_the_wait_polls_faster_once_the_entrypoint_exited(tmp_path: Path, monkeypatch) -> None:
    """After ray_launch's "entrypoint exited" line the worker's wait sleeps 0.5 s, not
    a whole poll interval, so the job's end is noticed at once (as the trigger does)."""
    from slurm_ray.operators import job_manager
    from slurm_ray.slurm.follow import ENTRYPOINT_EXITED

    sleeps: list[float] = []
    monkeypatch.setattr(job_manager.time, "sleep", sleeps.append)
    log = tmp_path / "slurm-8.out"
    log.write_bytes(b"training\n")

    def running() -> SlurmState:
        return SlurmState.RUNNING

    def exited() -> SlurmState:
        log.write_bytes(log.read_bytes() + ENTRYPOINT_EXITED + b" 0\n")
        return SlurmState.RUNNING

    manager = SlurmJobManager(
        FileHook([running, exited, running, lambda: SlurmState.COMPLETED]),  # type: ignore[arg-type]
        logging.getLogger("t.follow"),
    )
    assert manager.follow("8", str(log), 10.0).state is SlurmState.COMPLETED
    assert sleeps == [10.0, 0.5, 0.5], sleeps
