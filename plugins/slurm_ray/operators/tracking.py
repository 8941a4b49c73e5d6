"""MlflowTracking: the training operator's MLflow side (run, job record, metrics relay).

Every call is a no-op without ``mlflow`` settings. The metrics themselves
stay in the run directory's ``metrics.jsonl``; this relays them, and at the
end makes sure MLflow has every row.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Mapping
from typing import Any

from airflow.sdk.exceptions import AirflowException

from slurm_ray.hooks.slurm import SlurmHook
from slurm_ray.operators.run_state import RunState
from slurm_ray.slurm.commands import build_earlier_metrics_command
from slurm_ray.utils.quoting import quote

__all__ = ["QUEUE_WAIT_METRIC", "MlflowTracking"]


def _cat_trials(run_dir: str) -> str:
    """Shell text printing every Tune trial's metrics.jsonl of ``run_dir``."""
    return (
        f'for f in {quote(run_dir)}/trials/*/metrics.jsonl; do [ -f "$f" ] && cat -- "$f" && echo; '
        "done; true"
    )


#: Seconds the job waited in Slurm's queue (SubmitTime to StartTime).
QUEUE_WAIT_METRIC = "slurm_queue_wait_s"


class MlflowTracking:
    """MLflow for one training task.

    :param mlflow: the operator's ``mlflow`` settings (None: no tracking).
    :param hook: the login node (metrics files are read through it).
    :param log: the task log.
    :param wait_s: at completion, how long to wait for an MLflow server that
        does not answer before failing the task.
    """

    def __init__(
        self, mlflow: Mapping[str, Any] | None, hook: SlurmHook, log: Any, *, wait_s: float
    ) -> None:
        self.mlflow = mlflow
        self.hook = hook
        self.log = log
        self.wait_s = wait_s

    def settings(self, run: RunState) -> Any:
        if not self.mlflow:
            return None
        from slurm_ray.mlflow.settings import MlflowSettings

        try:
            return MlflowSettings.from_dict(
                self.mlflow, default_experiment=run.context["ti"].dag_id
            )
        except ValueError as exc:
            raise AirflowException(str(exc)) from exc

    @staticmethod
    def tags(run: RunState) -> dict[str, str]:
        from slurm_ray.mlflow.keys import task_identity_tags

        ti = run.context["ti"]
        return task_identity_tags(ti.dag_id, ti.run_id, ti.task_id, getattr(ti, "map_index", -1))

    def start(self, run: RunState, params: Mapping[str, Any]) -> None:
        """Find or create the task's MLflow run before anything is submitted."""
        run.mlflow_run_id = None
        settings = self.settings(run)
        if settings is None:
            return
        from slurm_ray.mlflow.errors import MlflowUnreachableError
        from slurm_ray.mlflow.reachability import check_reachable
        from slurm_ray.mlflow.runs import ensure_run

        try:
            check_reachable(settings)
        except MlflowUnreachableError:
            if not settings.relay_later:
                raise
            self.log.warning(
                "MLflow at %s is unreachable; training anyway, metrics are relayed once it is back",
                settings.tracking_uri,
            )
            return
        run.mlflow_run_id = ensure_run(settings, tags=self.tags(run), params=dict(params))
        ti = run.context["ti"]
        ti.xcom_push(key="mlflow_run_id", value=run.mlflow_run_id)
        ti.xcom_push(key="mlflow_tracking_uri", value=settings.tracking_uri)
        try:
            from slurm_ray.mlflow.runs import client_for

            found = client_for(settings).get_run(run.mlflow_run_id)
            ti.xcom_push(key="mlflow_experiment_id", value=found.info.experiment_id)
        except Exception as exc:
            self.log.warning("could not read the MLflow run's experiment: %s", exc)
        self.log.info("MLflow run %s at %s", run.mlflow_run_id, settings.tracking_uri)

    def record_job(self, run: RunState, *, cluster: str, num_nodes: Any) -> None:
        """Tag the run with the job it was submitted as."""
        settings = self.settings(run)
        if settings is None or run.mlflow_run_id is None or run.job_id is None:
            return
        from slurm_ray.mlflow.runs import include_files_hash, record_job

        record_job(
            settings,
            run.mlflow_run_id,
            job_id=run.job_id,
            try_number=run.context["ti"].try_number,
            cluster=cluster,
            run_dir=run.run_dir,
            num_nodes=num_nodes,
            include_hash=include_files_hash(run.staged),
        )

    def relay_settings(self, run: RunState) -> dict[str, Any] | None:
        """What the trigger (or the worker's wait) relays metrics with; None without MLflow."""
        settings = self.settings(run)
        if settings is None:
            return None
        from slurm_ray.mlflow.relay import make_relay

        return make_relay(settings, run_id=run.mlflow_run_id, tags=self.tags(run))

    def catch_up_earlier_tries(self, run: RunState) -> None:
        """Relay the rows earlier tries' jobs wrote that MLflow lacks.

        A try that failed while MLflow was down leaves rows behind; once this
        try logs later steps, the relay's watermark would pass them for good.
        """
        settings = self.settings(run)
        if run.mlflow_run_id is None or settings is None:
            return
        task_dir, me = posixpath.split(run.run_dir)
        raw = self.hook.run(build_earlier_metrics_command(task_dir, me)).stdout_bytes
        if not raw.strip():
            return
        from slurm_ray.mlflow.relay import make_relay, parse_metrics_jsonl, relay_rows

        stats = relay_rows(
            # The task's tags: a Tune trial's nested run is found again by them.
            make_relay(settings, run_id=run.mlflow_run_id, tags=self.tags(run)),
            parse_metrics_jsonl(raw, self.log),
            log=self.log,
            strict=False,
        )
        self.log.info("MLflow: rows of earlier tries: %s", stats)

    def relay_live(self, run: RunState, rows: bytes) -> None:
        """Non-deferrable wait: relay complete new ``metrics.jsonl`` rows."""
        if not run.relay:
            return
        from slurm_ray.mlflow.relay import MetricsRelay, parse_metrics_jsonl

        if run.live_relay is None:
            # One relay for the whole wait: rows MLflow refused stay queued in it.
            run.live_relay = MetricsRelay(run.relay, self.log)
        run.live_relay.send(parse_metrics_jsonl(rows, self.log))

    def catch_up(self, run: RunState, *, strict: bool = True) -> None:
        """At completion: relay every metrics row MLflow does not have yet.

        ``strict``: the rows must arrive. While the server does not answer, wait
        with backoff (up to ``wait_s``: the job is done, its rows are safe in
        metrics.jsonl, and a retry would submit a new job), then fail the task
        instead of losing rows.
        """
        relay = run.relay
        if not relay:
            return
        from slurm_ray.mlflow.relay import deliver_rows, parse_metrics_jsonl, relay_rows

        path = posixpath.join(run.run_dir, "metrics.jsonl")
        raw = self.hook.read_file(path)
        rows = parse_metrics_jsonl(raw, self.log) if raw else []
        if any("trial_id" in row for row in rows):
            # A Tune run: each trial's own file is the complete record (the
            # stream misses what trials wrote after the driver stopped listening).
            path = posixpath.join(run.run_dir, "trials", "*", "metrics.jsonl")
            rows = self._trial_rows(run.run_dir)
        if strict:
            stats = deliver_rows(relay, rows, wait_s=self.wait_s, log=self.log, where=path)
        else:
            stats = relay_rows(relay, rows, log=self.log, strict=False)
        # relay_later: the relay found or created the task's run once the server answered
        run.relay = {**relay, "run_id": stats.run_id or relay.get("run_id")}
        self.log.info("MLflow metrics relay at completion: %s", stats)
        self._end_trials(run, stats.trial_runs, "FINISHED" if strict else "KILLED")
        self.record_queue_wait(run)
        self.record_cost(run)

    def record_cost(self, run: RunState) -> None:
        """Log the job's cost from Slurm accounting (h-acct: issue 15 §3)."""
        run_id, settings = (run.relay or {}).get("run_id"), self.settings(run)
        if run_id and settings is not None and run.job_id:
            from slurm_ray.mlflow.accounting import record_job_cost
            from slurm_ray.mlflow.runs import client_for

            record_job_cost(client_for(settings), run_id, self.hook, run.job_id, log=self.log)

    def _trial_rows(self, run_dir: str) -> list[dict[str, Any]]:
        """Every trial's metrics.jsonl rows: one command, or one read per trial when
        the command's output passed the hook's cap (it keeps only the tail)."""
        from slurm_ray.mlflow.relay import parse_metrics_jsonl

        res = self.hook.run(_cat_trials(run_dir))
        if not res.stdout_cut:
            return parse_metrics_jsonl(res.stdout_bytes, self.log)
        rows: list[dict[str, Any]] = []
        for trial in self.hook.run(f"ls -1 -- {quote(run_dir)}/trials").stdout.split():
            if re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", trial):
                raw = self.hook.read_file(posixpath.join(run_dir, "trials", trial, "metrics.jsonl"))
                rows += parse_metrics_jsonl(raw or b"", self.log)
        return rows

    def _end_trials(self, run: RunState, trials: Mapping[str, str | None], status: str) -> None:
        """End the nested runs of Ray Tune trials (the parent is ended by its own path)."""
        settings = self.settings(run)
        if not trials or settings is None:
            return
        from slurm_ray.mlflow.runs import end_run

        for trial, run_id in trials.items():
            if run_id:
                try:
                    end_run(settings, run_id, status)
                except Exception as exc:
                    self.log.warning("MLflow: could not end the run of trial %s: %s", trial, exc)

    def record_queue_wait(self, run: RunState) -> None:
        """Log ``slurm_queue_wait_s`` (SubmitTime to StartTime, as Slurm reports them).

        Asked of Slurm once at completion (squeue, else scontrol, while it
        remembers the job): the trigger's event does not carry the times. Best
        effort: a job Slurm forgot, or never started, gets no metric.
        """
        run_id, settings = (run.relay or {}).get("run_id"), self.settings(run)
        if not run_id or settings is None or not run.job_id:
            return
        try:
            info = self.hook.states([run.job_id]).get(run.job_id)
            wait = info.queue_wait_s() if info is not None else None
            if wait is None:
                self.log.info(
                    "MLflow: no queue wait for job %s (Slurm no longer reports it)", run.job_id
                )
                return
            from slurm_ray.mlflow.runs import client_for

            client_for(settings).log_metric(run_id, QUEUE_WAIT_METRIC, wait)
            self.log.info("MLflow: %s = %.0f", QUEUE_WAIT_METRIC, wait)
        except Exception as exc:
            self.log.warning("MLflow: could not log %s: %s", QUEUE_WAIT_METRIC, exc)
