"""SlurmJobManager: one Slurm job of a task try, from submit to its end.

The training operator delegates everything it does with Slurm here, as the
Kubernetes provider's operator does with its ``PodManager``: submit once (or
adopt the try's job), follow it from a worker, cancel it, and collect how it
ended. All shell text comes from :mod:`slurm_ray.slurm.commands`.
"""

from __future__ import annotations

import json
import logging
import posixpath
import re
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from airflow.sdk.exceptions import AirflowException

from slurm_ray.hooks.slurm import SlurmHook, SlurmSSHError
from slurm_ray.operators import job_outcome
from slurm_ray.slurm import commands
from slurm_ray.slurm.parsers import last_lines, parse_claim_output, parse_node_states
from slurm_ray.slurm.poll import TailChunk, TailRequest
from slurm_ray.utils.environment import EnvironmentSpec
from slurm_ray.utils.states import (
    NOT_FOUND_CONFIRMATIONS,
    JobInfo,
    SlurmState,
    describe,
    end_from_run_dir,
    is_active,
    is_terminal,
)

__all__ = ["SlurmJobManager"]

#: Longest log line shown whole in the non-deferrable wait (as in the trigger).
LOG_LINE_MAX = 64 * 1024
#: Polls a finished job's log is read for before the wait ends anyway.
DRAIN_POLLS = 10


class SlurmJobManager:
    """Submit, adopt, follow, cancel and collect the Slurm job of one task try.

    :param hook: the login node.
    :param log: where progress and the job's log lines go (the task log).
    """

    def __init__(self, hook: SlurmHook, log: logging.Logger | Any) -> None:
        self.hook = hook
        self.log = log

    # -- before submitting ------------------------------------------------------------

    def check_environment(self, env: EnvironmentSpec, cluster_name: str) -> None:
        """Fail before submitting when the job's Python environment is missing."""
        probe = commands.build_env_probe_command(env.kind, env.prefix or "")
        if probe is None or not env.prefix:
            return
        if self.hook.run(probe).exit_code != 0:
            raise AirflowException(
                f"environment.prefix: {env.kind} environment {env.prefix!r} does not exist on "
                f"{cluster_name} (build it with ClusterEnvOperator); nothing was submitted"
            )

    def existing_job(self, job_name: str) -> JobInfo | None:
        """This try's active job, else its newest one Slurm still knows."""
        jobs = self.hook.find_jobs_by_name(job_name)
        active = [j for j in jobs if is_active(j.state)]
        if active:
            return active[0]
        return max(jobs, key=lambda j: int(re.sub(r"\D.*", "", j.job_id) or 0), default=None)

    def read_result(self, run_dir: str) -> dict[str, Any] | None:
        """The driver's ``result.json``, or None (absent or unreadable)."""
        raw = self.hook.read_file(posixpath.join(run_dir, "result.json"))
        if raw is None:
            return None
        try:
            data = json.loads(raw)
        except json.JSONDecodeError:
            return None
        return data if isinstance(data, dict) else None

    def previous_checkpoint(self, run_dir: str) -> str | None:
        """Newest checkpoint of an earlier try of this task (a retry resumes from it)."""
        task_dir = posixpath.dirname(run_dir)
        found = self.hook.run(commands.build_previous_checkpoint_command(task_dir)).stdout.strip()
        if found and not found.startswith(posixpath.basename(run_dir) + "/"):
            return posixpath.join(task_dir, found)
        return None

    def resume_from(self, checkpoint: str, run_dir: str) -> None:
        """Copy ``checkpoint`` into the run directory: the driver resumes its newest one."""
        self.hook.run(commands.build_resume_copy_command(checkpoint, run_dir), check=True)

    def stage(self, run_dir: str, files: Mapping[str, bytes], modes: Mapping[str, int]) -> None:
        """Upload ``{name: data}`` into ``run_dir`` (one SFTP session)."""
        self.hook.upload_many(
            {posixpath.join(run_dir, name): (data, modes[name]) for name, data in files.items()}
        )

    # -- submit once / adopt ------------------------------------------------------------

    def submit_once(self, run_dir: str, job_name: str) -> tuple[str, bool]:
        """Submit unless this try already has a job; returns (job id, re-attached).

        Atomic on the cluster: every try of the task serialises on one lock
        file, so a double execution of a try submits once, a late ``sbatch``
        of an earlier try cannot slip in, and earlier tries' jobs are
        cancelled (and gone) before this one is submitted.
        """
        action, job_id = self.claim(run_dir, job_name, submit=True)
        return job_id, action == "attach"

    def claim(self, run_dir: str, job_name: str, *, submit: bool) -> tuple[str, str]:
        """Run :func:`~slurm_ray.slurm.commands.build_claim_command`; ``(action, job id)``."""
        key, try_number = re.fullmatch(r"(.*-t)([0-9]+)", job_name).groups()  # type: ignore[union-attr]
        cmd = commands.build_claim_command(
            posixpath.dirname(run_dir), run_dir, key, int(try_number), submit=submit
        )
        res = self.hook.run(cmd, timeout=self.hook.command_timeout + 150)
        if res.exit_code != 0:
            raise SlurmSSHError(
                f"could not check for other jobs of this task before submitting "
                f"(exit {res.exit_code}): {(res.stderr.strip() or res.stdout.strip())[-500:]}"
                + ("; nothing was submitted" if "submitted:" not in res.stdout else "")
            )
        try:
            action, job_id, cancelled = parse_claim_output(res.stdout)
        except ValueError as exc:
            raise SlurmSSHError(str(exc)) from exc
        if cancelled:
            self.log.warning(
                "Cancelled Slurm job(s) %s of earlier tries of this task; they have left the "
                "queue, so this try resumes from their newest checkpoint alone",
                ", ".join(cancelled),
            )
        if action == "superseded":
            raise AirflowException(
                f"a later try of this task already has Slurm job {job_id}; this try "
                "(a stale execution) does not submit"
            )
        return action, job_id

    # -- follow (from a worker) -----------------------------------------------------------

    def follow(
        self,
        job_id: str,
        log_path: str,
        poll_interval: float,
        *,
        metrics: tuple[str, int] | None = None,
        on_metrics: Callable[[bytes], None] | None = None,
    ) -> JobInfo:
        """Wait for the job to end, streaming its log; cancel it if the wait is stopped.

        One remote command per poll (the trigger's: states and new bytes of the
        log and of ``metrics``), so the worker costs the login node what a
        trigger does.

        :param metrics: ``(path, offset)`` of ``metrics.jsonl``; complete new rows
            go to ``on_metrics``.
        :return: the job's last state (terminal, or a confirmed NOT_FOUND).
        """
        log_stream = _LogStream(self.log, job_id)
        m_path, m_offset = metrics or ("", 0)
        last_state: SlurmState | None = None
        last_note: tuple[str, ...] | None = None
        not_found = 0
        ended: JobInfo | None = None
        drained = 0
        try:
            while True:
                tails = [TailRequest(log_path, log_stream.offset)]
                if m_path:
                    tails.append(TailRequest(m_path, m_offset))
                states, chunks = self.hook.poll([job_id], tails)
                log_stream.take(chunks[0])
                if m_path and on_metrics is not None:
                    data = _from_offset(chunks[1], m_offset)
                    complete = data[: data.rfind(b"\n") + 1]
                    if complete:
                        m_offset += len(complete)
                        on_metrics(complete)
                info = states.get(job_id)
                if ended is None and info is not None:
                    # as the trigger: a line when the state, reason or start estimate changed
                    text, note = describe(info, datetime.now(UTC))
                    if note != last_note:
                        self.log.info("%s", text)
                    last_state, last_note = info.state, note
                    not_found = not_found + 1 if info.state == SlurmState.NOT_FOUND else 0
                    if is_terminal(info.state) or not_found >= NOT_FOUND_CONFIRMATIONS:
                        ended = info
                if ended is not None:
                    drained += 1
                    if chunks[0].size <= log_stream.offset or drained >= DRAIN_POLLS:
                        log_stream.flush()
                        return ended
                    continue  # more of the log to read: no wait
                time.sleep(poll_interval)
        except BaseException:
            # execution_timeout, SIGTERM from a cleared task, or an error: never
            # leave the job running behind us.
            if ended is None and (last_state is None or not is_terminal(last_state)):
                self.cancel_quietly(job_id)
            raise

    def cancel_quietly(self, job_id: str | None) -> None:
        """``scancel`` the job; a failure is logged, never raised."""
        if not job_id:
            return
        try:
            self.hook.cancel(job_id)
            self.log.info("Cancelled Slurm job %s", job_id)
        except Exception as exc:
            self.log.warning("Could not cancel Slurm job %s: %s", job_id, exc)

    # -- collect ---------------------------------------------------------------------------

    def log_tail(self, run_dir: str, job_id: str, lines: int = 40) -> str:
        """The last ``lines`` lines of the job's Slurm log, read capped in bytes."""
        path = posixpath.join(run_dir, f"slurm-{job_id}.out")
        return last_lines(self.hook.run(commands.build_log_tail_command(path)).stdout, lines)

    def settle(
        self, job_id: str, run_dir: str, info: JobInfo | None, result: dict[str, Any] | None
    ) -> JobInfo:
        """The job's end; a job Slurm forgot (NOT_FOUND) is judged from its run directory."""
        if info is None:
            return JobInfo(job_id, SlurmState.UNKNOWN)
        if info.state != SlurmState.NOT_FOUND:
            return info
        ended = end_from_run_dir(job_id, result, self.log_tail(run_dir, job_id))
        self.log.warning(
            "Slurm no longer knows job %s (purged after MinJobAge; no accounting): "
            "its end is read from the run directory: %s (%s)",
            job_id,
            ended.state.value,
            ended.reason,
        )
        return ended

    def failure(
        self,
        job_id: str,
        run_dir: str,
        info: JobInfo,
        result: dict[str, Any] | None,
        *,
        driver: bool,
    ) -> str:
        """The error of a job that did not complete (``driver``: it ran our training driver)."""
        tail = self.log_tail(run_dir, job_id)
        # exit 75 means "checkpointed on the pre-timeout signal" only for our driver
        if job_outcome.hit_time_limit(info, result) and (
            info.state == SlurmState.TIMEOUT or driver
        ):
            iteration = self.newest_checkpoint_iteration(run_dir)
            return job_outcome.time_limit_message(job_id, run_dir, info, iteration, tail)
        failed = (
            self.failed_nodes(info.nodelist)
            if info.state == SlurmState.NODE_FAIL and info.nodelist
            else None
        )
        return job_outcome.failure_message(job_id, run_dir, info, tail, failed_nodes=failed)

    def failed_nodes(self, nodelist: str) -> list[str]:
        """The nodes of ``nodelist`` Slurm considers down or not responding."""
        try:
            out = self.hook.run(commands.build_node_states_command(nodelist)).stdout
        except Exception as exc:
            self.log.warning("could not ask Slurm which node failed: %s", exc)
            return []
        return parse_node_states(out)

    def newest_checkpoint_iteration(self, run_dir: str) -> int | None:
        """Iteration of the newest checkpoint in ``run_dir``, None when there is none."""
        try:
            out = self.hook.run(commands.build_checkpoint_iteration_command(run_dir)).stdout
        except Exception:
            return None
        out = out.strip()
        return int(out) if out.isdigit() else None


def _from_offset(chunk: TailChunk, offset: int) -> bytes:
    """The bytes of ``chunk`` from ``offset`` on (empty if it was read from elsewhere)."""
    if chunk.start > offset or chunk.start + len(chunk.data) <= offset:
        return b""
    return chunk.data[offset - chunk.start :]


class _LogStream:
    """The Slurm log as the worker shows it: whole lines, each at most LOG_LINE_MAX bytes."""

    def __init__(self, log: Any, job_id: str) -> None:
        self.log, self.job_id, self.offset, self.buf = log, job_id, 0, b""

    def take(self, chunk: TailChunk) -> None:
        if 0 <= chunk.size < self.offset:
            # A requeued job truncates its log: read it again from the start.
            self.log.warning(
                "Slurm job %s: the log shrank from %d to %d bytes (requeued?): reading it "
                "again from the start",
                self.job_id,
                self.offset,
                chunk.size,
            )
            self.log.info("[slurm %s] ----- log restarted -----", self.job_id)
            self.offset, self.buf = 0, b""
        data = _from_offset(chunk, self.offset)
        self.offset += len(data)
        *lines, self.buf = (self.buf + data).split(b"\n")
        if len(self.buf) > LOG_LINE_MAX:
            lines.append(self.buf[:LOG_LINE_MAX] + b" [...]")
            self.log.warning(
                "Slurm job %s: cut %d bytes of an overlong log line",
                self.job_id,
                len(self.buf) - LOG_LINE_MAX,
            )
            self.buf = b""
        for line in lines:
            self._emit(line)

    def flush(self) -> None:
        if self.buf:
            self._emit(self.buf)
            self.buf = b""

    def _emit(self, line: bytes) -> None:
        self.log.info("[slurm %s] %s", self.job_id, line.decode("utf-8", "replace"))
