"""SlurmJobManager: one Slurm job of a task try, from submit to its end.

The training operator delegates all it does with Slurm here (the Kubernetes
provider's ``PodManager`` pattern); shell text comes from :mod:`slurm_ray.slurm`.
"""

from __future__ import annotations

import json
import logging
import posixpath
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

from airflow.sdk.exceptions import AirflowException

from slurm_ray.hooks.slurm import SlurmHook, SlurmSSHError
from slurm_ray.operators import job_outcome
from slurm_ray.slurm import commands
from slurm_ray.slurm.follow import (
    ENDING_POLL_S,
    ENTRYPOINT_EXITED,
    JobWatch,
    TailStream,
    caught_up,
)
from slurm_ray.slurm.parsers import last_lines, parse_claim_output, parse_node_states
from slurm_ray.slurm.poll import TailRequest
from slurm_ray.utils.environment import EnvironmentSpec
from slurm_ray.utils.states import (
    JobInfo,
    SlurmState,
    end_from_run_dir,
    is_active,
)

__all__ = ["SlurmJobManager"]


class SlurmJobManager:
    """Submit, adopt, follow, cancel and collect the Slurm job of one task try.

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

        Atomic on the cluster (one lock file per task): a doubled try submits once,
        and earlier tries' jobs are cancelled and gone before this one is submitted.
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

        One remote command per poll, the trigger's, read as the trigger does.

        :param metrics: ``(path, offset)`` of ``metrics.jsonl``; complete new rows
            go to ``on_metrics``.
        :return: the job's last state (terminal, or a confirmed NOT_FOUND).
        """
        streams = [TailStream("log", log_path, 0, job_id, self.log)]
        if metrics and on_metrics is not None:
            streams.append(TailStream("metrics", metrics[0], metrics[1], job_id, self.log))
        watch = JobWatch(job_id, self.log)
        try:
            while True:
                tails = [TailRequest(s.path, s.offset) for s in streams]
                states, chunks = self.hook.poll([job_id], tails)
                new = [s.take(c) for s, c in zip(streams, chunks, strict=True)]
                streams[0].show(new[0])
                if ENTRYPOINT_EXITED in new[0]:
                    poll_interval = min(poll_interval, ENDING_POLL_S)
                if on_metrics is not None and len(streams) > 1:
                    rows = streams[1].lines(new[1])
                    if rows:
                        on_metrics(b"\n".join(rows) + b"\n")
                watch.see(states.get(job_id))
                if watch.done(caught_up(streams, chunks)):
                    streams[0].flush()
                    assert watch.ended is not None
                    return watch.ended
                if watch.ended is None:
                    time.sleep(poll_interval)  # a finished job's files are read on at once
        except BaseException:
            # execution_timeout, SIGTERM from a cleared task, or an error: never
            # leave the job running behind us.
            if watch.ended is None:
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
