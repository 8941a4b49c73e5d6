"""SlurmRayOperator: one Slurm job that starts a multi-node Ray cluster and trains.

The operator validates and decides; ``SlurmJobManager`` acts on Slurm, ``MlflowTracking``
on MLflow, and what one execution knows lives in a ``RunState``.
"""

from __future__ import annotations

import posixpath
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator, conf
from airflow.sdk.exceptions import AirflowException

from slurm_ray.hooks.slurm import HostKeyError, SlurmHook, SlurmSSHError
from slurm_ray.links import MlflowRunLink, SlurmJobLink
from slurm_ray.operators import job_outcome, training_job
from slurm_ray.operators.deferral import ensure_still_running
from slurm_ray.operators.identity import resolve_remote_paths, run_identity
from slurm_ray.operators.job_manager import SlurmJobManager
from slurm_ray.operators.run_state import RunState
from slurm_ray.operators.tracking import MlflowTracking
from slurm_ray.profiles import DEFAULT_REMOTE_BASE_DIR, PLACEMENT_KWARGS, operator_defaults
from slurm_ray.utils.batch import JobSpec
from slurm_ray.utils.environment import EnvironmentSpec
from slurm_ray.utils.states import JobInfo, SlurmState, is_active, is_terminal

if TYPE_CHECKING:
    from airflow.sdk import Context

__all__ = ["SlurmRayOperator"]


def _given(value: Any, default: Any) -> Any:
    """``value`` unless it is None ("is None", not "or": an XComArg or template is kept)."""
    return value if value is not None else default


def _as_bool(value: Any, field: str) -> bool:
    """A rendered template field as a bool (Jinja renders to strings)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no", ""):
        return False
    raise AirflowException(f"{field}: expected true or false, got {str(value)[:40]!r}")


class SlurmRayOperator(BaseOperator):
    """Run a Ray program across the nodes of one Slurm job, submitted over SSH.

    Minimal example (the local dev cluster, both nodes)::

        probe = SlurmRayOperator(
            task_id="probe",
            profile="local",
            nodes=2,
            entrypoint='python -c "import ray; ray.init(); print(ray.cluster_resources())"',
        )

    The job starts a Ray head on its first node and a worker on every other
    node (``include/ray_launch.sh``), then runs ``entrypoint`` on the head node;
    by default the RLlib driver ``train.py`` with ``config``.

    :param profile: cluster profile (:mod:`slurm_ray.profiles`) giving the connection,
        ``remote_base_dir``, ``environment`` and placement (partition, account, qos,
        job page); every explicit argument overrides it.
    :param ssh_conn_id: SSH connection of the cluster's login node (or from ``profile``).
    :param nodes: ``job_spec["nodes"]``; likewise ``cpus_per_node`` (``cpus_per_task``,
        one task per node), ``time_limit`` (``time``), ``partition`` and ``account``.
    :param job_spec: Slurm job parameters (:class:`~slurm_ray.utils.batch.JobSpec`
        fields: nodes, ntasks_per_node, cpus_per_task, mem, gpus_per_node, partition,
        account, qos, time, constraint, exclusive, extra, ...). ``job_name`` is derived.
    :param environment: how the job activates Python
        (:class:`~slurm_ray.utils.environment.EnvironmentSpec` fields).
    :param entrypoint: shell command run on the head node once Ray is up
        (default: the RLlib driver). ``RAY_ADDRESS`` and ``SLURM_RAY_RUN_DIR`` are set.
    :param config: training config (dict, templated), written to ``config.json``.
    :param remote_base_dir: root of run directories (``{user}`` = remote user, ``{home}`` =
        its home); default: the profile's, else ``{home}/slurm_ray/runs``.
    :param poll_interval: seconds between job state polls.
    :param deferrable: wait in the triggerer instead of a worker slot (templated:
        a Param or XCom may choose; "true"/"false" strings are understood).
    :param env_vars: extra environment for the job (values are quoted).
    :param extra_files: more local files to stage (name -> local path).
    :param join_timeout: seconds the launcher waits for all Ray nodes.
    :param checkpoint_signal_s: Slurm sends SIGUSR1 this many seconds before the
        time limit so the driver can checkpoint (0 disables).
    :param mlflow: MLflow settings for the live metrics relay (:mod:`slurm_ray.mlflow`).
    :param mlflow_conn_id: Airflow connection (type ``mlflow``) of the tracking
        server: its URI when ``mlflow`` names none, and its credentials.
    :param mlflow_wait_s: at completion, how long to wait for an MLflow server
        that does not answer before failing the task (its rows stay on disk).
    :param job_url_template: the site's job web page for the *Slurm job* link
        (``{job_id}``, ``{cluster}``); empty: the link opens the task's log.
    :param export_model: the driver builds the MLflow model (``run_dir/mlflow_model``)
        at the end of a successful job, while it still holds the checkpoint in memory.
    :param env_modules: modules a ``module:Name`` env id may import on the cluster
        (the profile's ``env_modules``; none by default).
    """

    template_fields: Sequence[str] = (
        "ssh_conn_id",
        "cluster_name",
        "job_url_template",
        "mlflow",
        "config",
        "job_spec",
        "entrypoint",
        "remote_base_dir",
        "env_vars",
        "environment",
        "deferrable",
        "env_modules",
    )
    template_fields_renderers = {"config": "json", "job_spec": "json", "environment": "json"}
    operator_extra_links = (SlurmJobLink(), MlflowRunLink())
    ui_color = "#d8ecf7"
    _run: RunState | None = None
    _killed = False  # on_kill ran: Airflow's SIGTERM handler lets execute go on

    def __init__(
        self,
        *,
        ssh_conn_id: str | None = None,
        remote_base_dir: str | None = None,
        profile: str | None = None,
        nodes: int | None = None,
        cpus_per_node: int | None = None,
        time_limit: str | None = None,
        partition: str | None = None,
        account: str | None = None,
        job_spec: Mapping[str, Any] | None = None,
        environment: Mapping[str, Any] | None = None,
        entrypoint: str | None = None,
        config: Mapping[str, Any] | None = None,
        poll_interval: float = 10.0,
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        env_vars: Mapping[str, str] | None = None,
        extra_files: Mapping[str, str] | None = None,
        join_timeout: int = 180,
        checkpoint_signal_s: int = 60,
        mlflow: Mapping[str, Any] | None = None,
        cluster_name: str = "",
        job_url_template: str = "",
        export_model: bool = False,
        mlflow_wait_s: float = 600.0,
        mlflow_conn_id: str | None = None,
        env_modules: Sequence[str] = (),
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        # Merged into job_spec at run time (job_spec may be an XComArg until then).
        given = locals()
        self.placement = {kwarg: given[kwarg] for kwarg in PLACEMENT_KWARGS}
        site = operator_defaults(profile)
        if ssh_conn_id is None and not site:
            raise ValueError("ssh_conn_id: give ssh_conn_id or profile")
        # Templated (an XComArg in the DAGs); a profile's list when none is given.
        self.env_modules = env_modules or site.get("env_modules", ())
        self.ssh_conn_id = _given(ssh_conn_id, site.get("ssh_conn_id"))
        base_dir = site.get("remote_base_dir", DEFAULT_REMOTE_BASE_DIR)
        self.remote_base_dir = _given(remote_base_dir, base_dir)
        self.profile, self.profile_placement = profile, site.get("placement", {})
        self.job_spec = _given(job_spec, {})
        self.environment = _given(environment, site.get("environment", {}))
        self.entrypoint = entrypoint
        self.config = _given(config, {})
        self.poll_interval = poll_interval
        self.deferrable = deferrable
        self.env_vars = _given(env_vars, {})
        self.extra_files = dict(extra_files or {})
        self.join_timeout = join_timeout
        self.checkpoint_signal_s = checkpoint_signal_s
        self.mlflow = mlflow or None
        self.cluster_name = cluster_name or site.get("name") or self.ssh_conn_id
        self.job_url_template = job_url_template or site.get("job_url_template", "")
        self.export_model = export_model
        self.mlflow_wait_s = mlflow_wait_s
        self.mlflow_conn_id = mlflow_conn_id

    # -- collaborators -------------------------------------------------------------

    @property
    def hook(self) -> SlurmHook:
        if not hasattr(self, "_hook"):
            self._hook = SlurmHook(self.ssh_conn_id)
        return self._hook

    @property
    def manager(self) -> SlurmJobManager:
        """Everything done with Slurm."""
        return SlurmJobManager(self.hook, self.log)

    @property
    def tracking(self) -> MlflowTracking:
        """Everything done with MLflow."""
        mlflow = self.mlflow
        if self.mlflow_conn_id:
            mlflow = {**(mlflow or {}), "conn_id": self.mlflow_conn_id}
        return MlflowTracking(mlflow, self.hook, self.log, wait_s=self.mlflow_wait_s)

    def render_script(
        self, spec: JobSpec, env: EnvironmentSpec, run_dir: str, config: dict[str, Any] | None
    ) -> str:
        """The batch script: environment, then the Ray launcher running the entrypoint."""
        return training_job.render_script(self, spec, env, run_dir, config)

    # -- execute ------------------------------------------------------------------

    def execute(self, context: Context) -> Any:
        self.deferrable = _as_bool(self.deferrable, "deferrable")
        ti = context["ti"]
        job_name, suffix = run_identity(
            ti.dag_id, ti.run_id, ti.task_id, getattr(ti, "map_index", -1), ti.try_number
        )
        spec, env, config = training_job.validate_job(self, job_name, "slurm-%j.out")
        # Before MLflow is touched: a refused connection must leave nothing behind.
        self.hook.check_connection()
        base, env = resolve_remote_paths(self.hook, self.remote_base_dir, env)
        run = self._run = RunState(context=context, run_dir=posixpath.join(base, suffix))
        manager, tracking = self.manager, self.tracking
        tracking.start(run, config if config is not None else dict(self.config))
        try:
            self.hook.makedirs(run.run_dir)
        except HostKeyError:
            raise  # its own message says what to do; nothing ran on the host
        except SlurmSSHError as exc:
            raise AirflowException(f"{exc}; nothing was submitted") from exc
        # Adopt this try's job, or cancel earlier tries' jobs and wait until they
        # left the queue: a retry must not race the job of the try it replaces.
        action, claimed = manager.claim(run.run_dir, job_name, submit=False)
        if ti.try_number > 1:
            tracking.catch_up_earlier_tries(run)
        job = manager.existing_job(job_name) if action != "attach" else None
        if action == "attach" or (job is not None and is_active(job.state)):
            run.job_id = claimed if action == "attach" else job.job_id  # type: ignore[union-attr]
            self.log.info("Re-attaching to Slurm job %s named %s", run.job_id, job_name)
            self._push_job(run)
            return self._follow(run)
        result = manager.read_result(run.run_dir)
        if job is not None and is_terminal(job.state):
            self.log.info(
                "This try's job %s already ended %s; collecting it", job.job_id, job.state.value
            )
            run.job_id = job.job_id
            return self._finish(run, job, result)
        if result is not None and result.get("status") == "succeeded":
            self.log.info("result.json already present in %s; collecting it", run.run_dir)
            run.job_id = str(result.get("slurm_job_id", ""))
            return self._summary(run, None, result)
        return self._submit(run, job_name, spec, env, config)

    def _submit(
        self,
        run: RunState,
        job_name: str,
        spec: JobSpec,
        env: EnvironmentSpec,
        config: dict[str, Any] | None,
    ) -> Any:
        """Stage the run directory, submit (once) and follow the job."""
        manager = self.manager
        manager.check_environment(env, self.cluster_name)
        resume = manager.previous_checkpoint(run.run_dir) if config is not None else None
        if resume:
            self.log.info("Resuming from checkpoint of an earlier try: %s", resume)
        script = self.render_script(spec, env, run.run_dir, config)
        run.staged = training_job.run_dir_files(
            self.extra_files, config if config is not None else self.config, script
        )
        # Owner only: on a shared site nobody else reads a run directory.
        files = dict(run.staged)
        if self.env_vars:
            files[training_job.JOB_ENV_FILE] = training_job.job_env_file(self.env_vars)
        manager.stage(run.run_dir, files, {n: 0o700 if n.endswith(".sh") else 0o600 for n in files})
        if resume:
            # The driver resumes from the newest checkpoint in its own run dir.
            manager.resume_from(resume, run.run_dir)
        run.job_id, attached = manager.submit_once(run.run_dir, job_name)
        self.log.info(
            "%s Slurm job %s (%s) in %s",
            "Re-attached to" if attached else "Submitted",
            run.job_id,
            job_name,
            run.run_dir,
        )
        self._push_job(run)
        self.tracking.record_job(
            run, cluster=self.cluster_name, num_nodes=self.job_spec.get("nodes")
        )
        return self._follow(run)

    def _push_job(self, run: RunState) -> None:
        """XComs of the job: its id and run directory, and what the *Slurm job* link needs
        (links are built on the API server, from XCom)."""
        ti = run.context["ti"]
        ti.xcom_push(key="slurm_job_id", value=run.job_id)
        ti.xcom_push(key="run_dir", value=run.run_dir)
        ti.xcom_push(key="slurm_cluster", value=self.cluster_name)
        if self.job_url_template:
            ti.xcom_push(key="slurm_job_url_template", value=self.job_url_template)

    def _follow(self, run: RunState) -> Any:
        assert run.job_id is not None
        log_path = posixpath.join(run.run_dir, f"slurm-{run.job_id}.out")
        metrics_path = posixpath.join(run.run_dir, "metrics.jsonl")
        run.relay = self.tracking.relay_settings(run)
        if self.deferrable or self._killed:
            cancel, ti = self.manager.cancel_quietly, run.context["ti"]
            ensure_still_running(ti, run.job_id, cancel, self.log, killed=self._killed)
        if self.deferrable:
            from slurm_ray.triggers.slurm_job import SlurmJobTrigger

            deadline = None
            if self.execution_timeout:
                deadline = time.time() + self.execution_timeout.total_seconds()
            self.defer(
                trigger=SlurmJobTrigger(
                    job_id=run.job_id,
                    ssh_conn_id=self.ssh_conn_id,
                    log_path=log_path,
                    metrics_path=metrics_path,
                    poll_interval=self.poll_interval,
                    deadline=deadline,
                    relay=run.relay,
                ),
                method_name="execute_complete",
                kwargs={"run_dir": run.run_dir},
            )
        tracking = self.tracking
        info = self.manager.follow(
            run.job_id,
            log_path,
            self.poll_interval,
            metrics=(metrics_path, 0) if run.relay else None,
            on_metrics=lambda rows: tracking.relay_live(run, rows),
        )
        return self._finish(run, info, self.manager.read_result(run.run_dir))

    def execute_complete(self, context: Context, event: dict[str, Any], run_dir: str = "") -> Any:
        """Turn the trigger's final event into the task's result or a clear error."""
        job_id = str(event.get("job_id", ""))
        # Some runners (`airflow dags test` with mapped tasks) drop the defer
        # kwargs; the event carries the log path, whose directory is run_dir.
        run_dir = run_dir or posixpath.dirname(str(event.get("log_path") or ""))
        run = self._run = RunState(context=context, run_dir=run_dir, job_id=job_id)
        status = event.get("status")
        if status == "timeout":
            from airflow.sdk.exceptions import AirflowTaskTimeout

            raise AirflowTaskTimeout(
                f"execution_timeout reached; Slurm job {job_id} was cancelled. {event.get('message', '')}"
            )
        if status != "terminal":
            self.manager.cancel_quietly(job_id)
            raise AirflowException(
                f"lost track of Slurm job {job_id}: {event.get('message')} (a cancel was attempted)"
            )
        run.relay = event.get("relay")
        info = job_outcome.info_from_event(event)
        return self._finish(run, info, self.manager.read_result(run_dir))

    def _finish(self, run: RunState, info: JobInfo | None, result: dict[str, Any] | None) -> Any:
        assert run.job_id is not None
        manager = self.manager
        info = manager.settle(run.job_id, run.run_dir, info, result)
        if info.state == SlurmState.COMPLETED:
            return self._summary(run, info, result)
        try:
            self.tracking.catch_up(run, strict=False)
        except Exception as exc:
            self.log.warning("MLflow catch-up failed: %s", exc)
        raise AirflowException(
            manager.failure(run.job_id, run.run_dir, info, result, driver=self.entrypoint is None)
        )

    def _summary(
        self, run: RunState, info: JobInfo | None, result: dict[str, Any] | None
    ) -> dict[str, Any]:
        self.tracking.catch_up(run)
        return job_outcome.summary(
            run.job_id or "",
            run.run_dir,
            info,
            result,
            cluster=self.cluster_name,
            mlflow_run_id=(run.relay or {}).get("run_id"),
        )

    def on_kill(self) -> None:
        """The task was killed while running in a worker: cancel the job (one
        submitted after this is cancelled before it is followed)."""
        self._killed = True
        if self._run is not None:
            self.manager.cancel_quietly(self._run.job_id)
