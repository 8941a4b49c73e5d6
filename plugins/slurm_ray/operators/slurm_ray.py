"""SlurmRayOperator: one Slurm job that starts a multi-node Ray cluster and trains."""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow.configuration import conf
from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException

from slurm_ray.hooks.slurm import HostKeyError, SlurmHook, SlurmSSHError
from slurm_ray.links import MlflowRunLink, SlurmJobLink
from slurm_ray.profiles import (
    DEFAULT_REMOTE_BASE_DIR,
    ProfileError,
    merge_placement,
    operator_defaults,
)
from slurm_ray.utils.batch import JobSpec, render_batch_script
from slurm_ray.utils.environment import EnvironmentSpec
from slurm_ray.utils.quoting import quote
from slurm_ray.utils.states import (
    NOT_FOUND_CONFIRMATIONS,
    JobInfo,
    SlurmState,
    end_from_run_dir,
    is_active,
    is_terminal,
)

if TYPE_CHECKING:
    from airflow.sdk import Context

#: Cluster-side files staged into every run directory.
INCLUDE_DIR = Path(__file__).resolve().parents[3] / "include"
PLUGIN_DIR = Path(__file__).resolve().parents[1]
DEFAULT_FILES = ("ray_launch.sh", "ray_wait.py", "train.py", "sanity_check.py", "export_model.py")
#: The job's env_vars, 0600, read by job.sbatch (never uploaded anywhere).
JOB_ENV_FILE = "job.env"
#: Exit code of the driver when it checkpointed on Slurm's pre-timeout signal.
EXIT_CHECKPOINTED = 75

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
# 64 bits: finding two run ids with one directory takes ~2**32 hashes.
_DIGEST_LEN = 16
_DIGESTED = re.compile(rf"-[0-9a-f]{{{_DIGEST_LEN}}}\Z")


def include_dir() -> Path:
    """Where the cluster-side files live (``SLURM_RAY_INCLUDE_DIR`` overrides)."""
    import os

    return Path(os.environ.get("SLURM_RAY_INCLUDE_DIR", str(INCLUDE_DIR)))


def sanitize(component: str, max_len: int = 120) -> str:
    """A path/job-name safe version of ``component`` (never ``.``/``..``), injective.

    Readable: a component that is already safe is kept as it is. Any other one
    (characters replaced, cut, or ending like a digest) gets ``-<digest>`` of
    the original, so ``a:b``, ``a+b`` and ``a_b`` never share a run directory.
    """
    text = _SAFE.sub("_", component).strip("_") or "x"
    if set(text) <= {"."}:
        text = text.replace(".", "_")
    if text == component and len(text) <= max_len and not _DIGESTED.search(text):
        return text
    digest = hashlib.sha256(component.encode()).hexdigest()[:_DIGEST_LEN]
    return f"{text[: max_len - _DIGEST_LEN - 1]}-{digest}"


def task_key(dag_id: str, run_id: str, task_id: str, map_index: int) -> str:
    """The job name prefix shared by every try of one task (the try number follows it)."""
    task = task_id if map_index < 0 else f"{task_id}__{map_index}"
    digest = hashlib.sha256(f"{dag_id}\0{run_id}\0{task}".encode()).hexdigest()[:12]
    return f"sr-{digest}-{sanitize(task, 40)}-t"


def run_identity(
    dag_id: str, run_id: str, task_id: str, map_index: int, try_number: int
) -> tuple[str, str]:
    """(job name, run-dir suffix) derived deterministically from the task try."""
    task = task_id if map_index < 0 else f"{task_id}__{map_index}"
    job_name = f"{task_key(dag_id, run_id, task_id, map_index)}{try_number}"
    suffix = posixpath.join(sanitize(dag_id), sanitize(run_id), sanitize(task), f"try_{try_number}")
    return job_name, suffix


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
    """
    Run a Ray program across the nodes of one Slurm job, submitted over SSH.

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
    :param mlflow: MLflow settings for the live metrics relay (see ``slurm_ray.mlflow_relay``).
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
        site = operator_defaults(profile)
        # Templated (an XComArg in the DAGs); a profile's list when none is given.
        self.env_modules = env_modules or site.get("env_modules", ())
        # "is None", not "or": an XComArg or a template is kept as given.
        if ssh_conn_id is None and not site:
            raise ValueError("ssh_conn_id: give ssh_conn_id or profile")
        self.ssh_conn_id = ssh_conn_id if ssh_conn_id is not None else site["ssh_conn_id"]
        if remote_base_dir is None:
            remote_base_dir = site.get("remote_base_dir", DEFAULT_REMOTE_BASE_DIR)
        self.remote_base_dir = remote_base_dir
        self.profile = profile
        # Merged into job_spec at run time (job_spec may be an XComArg until then).
        self.placement = {
            "nodes": nodes,
            "cpus_per_node": cpus_per_node,
            "time_limit": time_limit,
            "partition": partition,
            "account": account,
        }
        self.profile_placement = site.get("placement", {})
        # Templated arguments are kept as given: XComArgs resolve at run time.
        self.job_spec = job_spec if job_spec is not None else {}
        if environment is None:
            environment = site.get("environment", {})
        self.environment = environment
        self.entrypoint = entrypoint
        self.config = config if config is not None else {}
        self.poll_interval = poll_interval
        self.deferrable = deferrable
        self.env_vars = env_vars if env_vars is not None else {}
        self.extra_files = dict(extra_files or {})
        self.join_timeout = join_timeout
        self.checkpoint_signal_s = checkpoint_signal_s
        self.mlflow = mlflow or None
        self.cluster_name = cluster_name or site.get("name") or self.ssh_conn_id
        self.job_url_template = job_url_template or site.get("job_url_template", "")
        self.export_model = export_model
        self.mlflow_wait_s = mlflow_wait_s
        self.mlflow_conn_id = mlflow_conn_id
        self._job_id: str | None = None

    # -- helpers ------------------------------------------------------------------

    @property
    def hook(self) -> SlurmHook:
        if not hasattr(self, "_hook"):
            self._hook = SlurmHook(self.ssh_conn_id)
        return self._hook

    def _validated(
        self, job_name: str, log_path: str
    ) -> tuple[JobSpec, EnvironmentSpec, dict[str, Any] | None]:
        """Validate everything before the cluster is touched; errors name the field."""
        try:
            merged = merge_placement(
                self.profile_placement, self.job_spec, self.placement, profile=self.profile or ""
            )
        except ProfileError as exc:
            raise AirflowException(str(exc)) from exc
        spec_dict = {k: v for k, v in merged.items() if v is not None}
        if "job_name" in spec_dict:
            raise AirflowException("job_spec.job_name: derived from the task; do not set it")
        for key in ("output", "error", "chdir"):
            value = spec_dict.get(key)
            if isinstance(value, str) and (
                value.startswith("/") or ".." in value.replace("\\", "/").split("/")
            ):
                raise AirflowException(
                    f"job_spec.{key}: {value[:80]!r} must be a path inside the run directory "
                    "(relative, no '..')"
                )
        spec_dict.setdefault("output", log_path)
        if self.checkpoint_signal_s and self.entrypoint is None:
            spec_dict.setdefault("signal", f"B:USR1@{int(self.checkpoint_signal_s)}")
        try:
            spec = JobSpec.from_dict({**spec_dict, "job_name": job_name})
            env = EnvironmentSpec.from_dict(self.environment)
        except ValueError as exc:
            raise AirflowException(str(exc)) from exc
        config: dict[str, Any] | None = None
        if self.entrypoint is None:
            from slurm_ray.training_config import ConfigError, validate_config

            try:
                config = validate_config(self.config, env_modules=self._env_modules()).to_dict()
            except ConfigError as exc:
                raise AirflowException(str(exc)) from exc
        for key, value in self.env_vars.items():
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
                raise AirflowException(f"env_vars: {key!r} is not a valid variable name")
            if not isinstance(value, str) or "\0" in value:
                raise AirflowException(f"env_vars[{key!r}]: expected a string without NUL bytes")
        return spec, env, config

    def _env_modules(self) -> tuple[str, ...]:
        mods = self.env_modules
        if isinstance(mods, str) or not all(isinstance(m, str) for m in mods):
            raise AirflowException(f"env_modules: expected a list of module names, got {mods!r}")
        return tuple(mods)

    def _push_job_link(self, ti: Any) -> None:
        """What the *Slurm job* link needs: links are built on the API server, from XCom."""
        ti.xcom_push(key="slurm_cluster", value=self.cluster_name)
        if self.job_url_template:
            ti.xcom_push(key="slurm_job_url_template", value=self.job_url_template)

    def _remote_identity(self) -> dict[str, str]:
        """``{user}`` and ``{home}`` of the remote account (one SSH command)."""
        out = self.hook.run('id -un && printf "%s\\n" "$HOME"', check=True).stdout.split("\n")
        return {"{user}": out[0].strip(), "{home}": out[1].strip().rstrip("/")}

    @staticmethod
    def _resolve_user(text: str, identity: Mapping[str, str] | None) -> str:
        for key, value in (identity or {}).items():
            text = text.replace(key, value)
        return text

    def _identity(self, context: Context) -> tuple[str, str]:
        ti = context["ti"]
        return run_identity(
            ti.dag_id, ti.run_id, ti.task_id, getattr(ti, "map_index", -1), ti.try_number
        )

    def render_script(
        self, spec: JobSpec, env: EnvironmentSpec, run_dir: str, config: dict[str, Any] | None
    ) -> str:
        """The batch script: environment, then the Ray launcher running the entrypoint."""
        if config is not None:
            command = f"python -u train.py --config config.json --run-dir {quote(run_dir)}"
            if self.export_model:
                command += " --export-model"
        else:
            command = f"bash -c {quote(self.entrypoint or 'true')}"
        env_vars = {
            "SLURM_RAY_RUN_DIR": run_dir,
            "SLURM_RAY_JOIN_TIMEOUT": str(self.join_timeout),
            "RAY_USAGE_STATS_ENABLED": "0",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "PYTHONUNBUFFERED": "1",
        }
        if self._env_modules():
            env_vars["SLURM_RAY_ENV_MODULES"] = ",".join(self._env_modules())
        setup = [f"cd {quote(run_dir)}"]
        if self.env_vars:
            # env_vars may hold secrets: they live in the 0600 job.env (NUL-separated
            # records, read as data, never sourced), not in this script, which is
            # kept for audit and uploaded to MLflow.
            setup.append(f"while IFS= read -r -d '' kv; do export \"$kv\"; done < {JOB_ENV_FILE}")
        setup += env.activation_lines()
        return render_batch_script(
            spec,
            command=f"exec bash ray_launch.sh {command}",
            setup_lines=setup,
            env=env_vars,
            header_comment=f"slurm_ray {self.task_id}: rendered by SlurmRayOperator",
        )

    def _find_previous_checkpoint(self, run_dir: str) -> str | None:
        """Newest checkpoint of an earlier try of this task (a retry resumes from it)."""
        task_dir = posixpath.dirname(run_dir)
        cmd = (
            f"cd {quote(task_dir)} 2>/dev/null && "
            "ls -1d try_*/checkpoints/iter_* 2>/dev/null | "
            "awk -F/ '{n=$3; sub(/iter_/,\"\",n); print n+0, $0}' | sort -n | tail -1 | cut -d' ' -f2"
        )
        found = self.hook.run(cmd).stdout.strip()
        if found and not found.startswith(posixpath.basename(run_dir) + "/"):
            return posixpath.join(task_dir, found)
        return None

    # -- execute ------------------------------------------------------------------

    def execute(self, context: Context) -> Any:
        self._context = context
        self.deferrable = _as_bool(self.deferrable, "deferrable")
        job_name, suffix = self._identity(context)
        user = None
        base = self.remote_base_dir
        prefix = str(self.environment.get("prefix", ""))
        needs_user = any(k in base or k in prefix for k in ("{user}", "{home}"))
        log_rel = "slurm-%j.out"
        spec, env, config = self._validated(job_name, log_rel)
        # Before MLflow is touched: a refused connection must leave nothing behind.
        self.hook.check_connection()
        if needs_user:
            user = self._remote_identity()
            base = self._resolve_user(base, user)
            if env.prefix:
                env = EnvironmentSpec.from_dict(
                    {**env.to_dict(), "prefix": self._resolve_user(env.prefix, user)}
                )
        run_dir = posixpath.join(base, suffix)
        ti = context["ti"]
        self._mlflow_start(context, config)
        try:
            self.hook.makedirs(run_dir)
        except HostKeyError:
            raise  # its own message says what to do; nothing ran on the host
        except SlurmSSHError as exc:
            raise AirflowException(f"{exc}; nothing was submitted") from exc
        # Adopt this try's job, or cancel earlier tries' jobs and wait until they
        # left the queue: a retry must not race the job of the try it replaces.
        action, claimed = self._claim(run_dir, job_name, submit=False)
        if ti.try_number > 1:
            self._catch_up_earlier_tries(run_dir)
        job = self._existing_job(job_name) if action != "attach" else None
        if action == "attach" or (job is not None and is_active(job.state)):
            job_id = claimed if action == "attach" else job.job_id  # type: ignore[union-attr]
            self.log.info("Re-attaching to Slurm job %s named %s", job_id, job_name)
            ti.xcom_push(key="slurm_job_id", value=job_id)
            ti.xcom_push(key="run_dir", value=run_dir)
            self._push_job_link(ti)
            return self._follow(context, job_id, run_dir)
        result = self._read_result(run_dir)
        if job is not None and is_terminal(job.state):
            self.log.info(
                "This try's job %s already ended %s; collecting it", job.job_id, job.state.value
            )
            return self._finish(job.job_id, run_dir, job, result)
        if result is not None and result.get("status") == "succeeded":
            self.log.info("result.json already present in %s; collecting it", run_dir)
            return self._summary(result.get("slurm_job_id", ""), run_dir, None, result)

        self._check_environment(env)
        self._resume_from = self._find_previous_checkpoint(run_dir) if config is not None else None
        if self._resume_from:
            self.log.info("Resuming from checkpoint of an earlier try: %s", self._resume_from)
        self._stage(run_dir, config, self.render_script(spec, env, run_dir, config))
        if self._resume_from:
            # The driver resumes from the newest checkpoint in its own run dir.
            self.hook.run(
                f"mkdir -p {quote(run_dir)}/checkpoints && "
                f"cp -a {quote(self._resume_from)} {quote(run_dir)}/checkpoints/",
                check=True,
            )
        job_id, attached = self._submit_once(run_dir, job_name)
        self.log.info(
            "%s Slurm job %s (%s) in %s",
            "Re-attached to" if attached else "Submitted",
            job_id,
            job_name,
            run_dir,
        )
        ti.xcom_push(key="slurm_job_id", value=job_id)
        ti.xcom_push(key="run_dir", value=run_dir)
        self._push_job_link(ti)
        self._mlflow_record_job(context, job_id, run_dir)
        return self._follow(context, job_id, run_dir)

    def _check_environment(self, env: EnvironmentSpec) -> None:
        """Fail before submitting when the job's Python environment is missing."""
        if env.kind == "venv" and env.prefix:
            probe = f"test -f {quote(posixpath.join(env.prefix, 'bin', 'activate'))}"
        elif env.kind == "conda" and env.prefix:
            probe = f"test -d {quote(posixpath.join(env.prefix, 'conda-meta'))}"
        else:
            return
        # A build in progress holds PREFIX.lock; the job waits for it (activation_lines).
        probe = f"{probe} || test -e {quote(env.prefix + '.lock')}"
        if self.hook.run(probe).exit_code != 0:
            raise AirflowException(
                f"environment.prefix: {env.kind} environment {env.prefix!r} does not exist on "
                f"{self.cluster_name} (build it with ClusterEnvOperator); nothing was submitted"
            )

    def _existing_job(self, job_name: str) -> JobInfo | None:
        jobs = self.hook.find_jobs_by_name(job_name)
        active = [j for j in jobs if is_active(j.state)]
        if active:
            return active[0]
        return max(jobs, key=lambda j: int(re.sub(r"\D.*", "", j.job_id) or 0), default=None)

    def _read_result(self, run_dir: str) -> dict[str, Any] | None:
        raw = self.hook.read_file(posixpath.join(run_dir, "result.json"))
        if raw is None:
            return None
        try:
            data = json.loads(raw)
        except json.JSONDecodeError:
            return None
        return data if isinstance(data, dict) else None

    def _stage(self, run_dir: str, config: dict[str, Any] | None, script: str) -> None:
        """Upload the cluster-side files, ``config.json`` and ``job.sbatch`` (one SFTP session)."""
        files: dict[str, Path] = {name: include_dir() / name for name in DEFAULT_FILES}
        files["training_config.py"] = PLUGIN_DIR / "training_config.py"
        files.update({name: Path(path) for name, path in self.extra_files.items()})
        self._staged: dict[str, bytes] = {}
        uploads: dict[str, tuple[bytes, int]] = {}
        for name, local in files.items():
            if "/" in name or name in ("", ".", ".."):
                raise AirflowException(f"extra_files: {name!r} must be a plain file name")
            data = local.read_bytes()
            self._staged[name] = data
            # Owner only: on a shared site nobody else reads a run directory.
            mode = 0o700 if name.endswith(".sh") else 0o600
            uploads[posixpath.join(run_dir, name)] = (data, mode)
        payload = config if config is not None else self.config
        uploads[posixpath.join(run_dir, "config.json")] = (
            json.dumps(payload, indent=2, sort_keys=True).encode(),
            0o600,
        )
        uploads[posixpath.join(run_dir, "job.sbatch")] = (script.encode(), 0o600)
        if self.env_vars:
            records = b"".join(f"{k}={v}".encode() + b"\0" for k, v in self.env_vars.items())
            uploads[posixpath.join(run_dir, JOB_ENV_FILE)] = (records, 0o600)
        self.hook.upload_many(uploads)

    def _submit_once(self, run_dir: str, job_name: str) -> tuple[str, bool]:
        """Submit unless this try already has a job; returns (job id, re-attached).

        Atomic on the cluster: every try of the task serialises on one lock
        file, so a double execution of a try submits once, a late ``sbatch``
        of an earlier try cannot slip in, and earlier tries' jobs are
        cancelled (and gone) before this one is submitted.
        """
        action, job_id = self._claim(run_dir, job_name, submit=True)
        return job_id, action == "attach"

    def _claim(self, run_dir: str, job_name: str, *, submit: bool) -> tuple[str, str]:
        """Run :func:`~slurm_ray.utils.remote.build_claim_command`; ``(action, job id)``."""
        from slurm_ray.utils import remote

        key, try_number = re.fullmatch(r"(.*-t)([0-9]+)", job_name).groups()  # type: ignore[union-attr]
        cmd = remote.build_claim_command(
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
            action, job_id, cancelled = remote.parse_claim_output(res.stdout)
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

    def _follow(self, context: Context, job_id: str, run_dir: str) -> Any:
        self._job_id = job_id
        log_path = posixpath.join(run_dir, f"slurm-{job_id}.out")
        deadline = None
        if self.execution_timeout:
            deadline = time.time() + self.execution_timeout.total_seconds()
        self._relay = self._relay_settings(context, job_id, run_dir)
        if self.deferrable:
            from slurm_ray.triggers.slurm_job import SlurmJobTrigger

            self.defer(
                trigger=SlurmJobTrigger(
                    job_id=job_id,
                    ssh_conn_id=self.ssh_conn_id,
                    log_path=log_path,
                    metrics_path=posixpath.join(run_dir, "metrics.jsonl"),
                    poll_interval=self.poll_interval,
                    deadline=deadline,
                    relay=self._relay,
                ),
                method_name="execute_complete",
                kwargs={"run_dir": run_dir},
            )
        return self._poll_until_done(job_id, run_dir, log_path)

    # -- MLflow ---------------------------------------------------------------------

    def _mlflow_settings(self, context: Context) -> Any:
        if not self.mlflow and not self.mlflow_conn_id:
            return None
        from slurm_ray.mlflow_tracking import MlflowSettings

        data = {
            **(self.mlflow or {}),
            **({"conn_id": self.mlflow_conn_id} if self.mlflow_conn_id else {}),
        }
        try:
            return MlflowSettings.from_dict(data, default_experiment=context["ti"].dag_id)
        except ValueError as exc:
            raise AirflowException(str(exc)) from exc

    def _mlflow_tags(self, context: Context) -> dict[str, str]:
        from slurm_ray.mlflow_tracking import task_identity_tags

        ti = context["ti"]
        return task_identity_tags(ti.dag_id, ti.run_id, ti.task_id, getattr(ti, "map_index", -1))

    def _mlflow_start(self, context: Context, config: dict[str, Any] | None) -> None:
        """Find or create the task's MLflow run before anything is submitted."""
        self._mlflow_run_id: str | None = None
        settings = self._mlflow_settings(context)
        if settings is None:
            return
        from slurm_ray.mlflow_tracking import MlflowUnreachableError, check_reachable, ensure_run

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
        params = config if config is not None else dict(self.config)
        self._mlflow_run_id = ensure_run(settings, tags=self._mlflow_tags(context), params=params)
        context["ti"].xcom_push(key="mlflow_run_id", value=self._mlflow_run_id)
        context["ti"].xcom_push(key="mlflow_tracking_uri", value=settings.tracking_uri)
        try:
            from slurm_ray.mlflow_tracking import client_for

            run = client_for(settings).get_run(self._mlflow_run_id)
            context["ti"].xcom_push(key="mlflow_experiment_id", value=run.info.experiment_id)
        except Exception as exc:
            self.log.warning("could not read the MLflow run's experiment: %s", exc)
        self.log.info("MLflow run %s at %s", self._mlflow_run_id, settings.tracking_uri)

    def _mlflow_record_job(self, context: Context, job_id: str, run_dir: str) -> None:
        settings = self._mlflow_settings(context)
        run_id = getattr(self, "_mlflow_run_id", None)
        if settings is None or run_id is None:
            return
        from slurm_ray.mlflow_tracking import include_files_hash, record_job

        record_job(
            settings,
            run_id,
            job_id=job_id,
            try_number=context["ti"].try_number,
            cluster=self.cluster_name,
            run_dir=run_dir,
            num_nodes=self.job_spec.get("nodes"),
            include_hash=include_files_hash(getattr(self, "_staged", {})),
        )

    def _relay_settings(self, context: Context, job_id: str, run_dir: str) -> dict[str, Any] | None:
        settings = self._mlflow_settings(context)
        if settings is None:
            return None
        from slurm_ray.mlflow_tracking import make_relay

        return make_relay(
            settings, run_id=getattr(self, "_mlflow_run_id", None), tags=self._mlflow_tags(context)
        )

    def _catch_up_earlier_tries(self, run_dir: str) -> None:
        """Relay the rows earlier tries' jobs wrote that MLflow lacks.

        A try that failed while MLflow was down leaves rows behind; once this
        try logs later steps, the relay's watermark would pass them for good.
        """
        run_id = getattr(self, "_mlflow_run_id", None)
        settings = self._mlflow_settings(self._context)
        if run_id is None or settings is None:
            return
        task_dir, me = posixpath.split(run_dir)
        cmd = (
            f"cd {quote(task_dir)} 2>/dev/null || exit 0; "
            "for d in $(ls -1d try_* 2>/dev/null | sort -t_ -k2 -n); do "
            f'[ "$d" != {quote(me)} ] && [ -f "$d/metrics.jsonl" ] && cat -- "$d/metrics.jsonl"; '
            "done; exit 0"
        )
        raw = self.hook.run(cmd).stdout_bytes
        if not raw.strip():
            return
        from slurm_ray.mlflow_tracking import make_relay, parse_metrics_jsonl, relay_rows

        stats = relay_rows(
            make_relay(settings, run_id=run_id),
            parse_metrics_jsonl(raw, self.log),
            log=self.log,
            strict=False,
        )
        self.log.info("MLflow: rows of earlier tries: %s", stats)

    def _relay_catch_up(self, run_dir: str, *, strict: bool = True) -> None:
        """At completion: relay every metrics row MLflow does not have yet.

        ``strict``: the rows must arrive. While the server does not answer, wait
        with backoff (up to ``mlflow_wait_s``: the job is done, its rows are safe
        in metrics.jsonl, and a retry would submit a new job), then fail the task
        instead of losing rows.
        """
        relay = getattr(self, "_relay", None)
        if not relay:
            return
        from slurm_ray.mlflow_tracking import deliver_rows, parse_metrics_jsonl, relay_rows

        path = posixpath.join(run_dir, "metrics.jsonl")
        raw = self.hook.read_file(path)
        rows = parse_metrics_jsonl(raw, self.log) if raw else []
        if strict:
            stats = deliver_rows(relay, rows, wait_s=self.mlflow_wait_s, log=self.log, where=path)
        else:
            stats = relay_rows(relay, rows, log=self.log, strict=False)
        # relay_later: the relay found or created the task's run once the server answered
        self._relay = {**relay, "run_id": stats.run_id or relay.get("run_id")}
        self.log.info("MLflow metrics relay at completion: %s", stats)

    def _poll_until_done(self, job_id: str, run_dir: str, log_path: str) -> Any:
        """Non-deferrable mode: poll from the worker; cancel the job if we are stopped."""
        offset = 0
        buf = b""
        last_state = None
        not_found = 0
        try:
            while True:
                info = self.hook.states([job_id]).get(job_id)
                not_found = not_found + 1 if info and info.state == SlurmState.NOT_FOUND else 0
                chunk = self.hook.read_from_offset(log_path, offset)
                if chunk:
                    offset += len(chunk)
                    *lines, buf = (buf + chunk).split(b"\n")
                    for line in lines:
                        self.log.info("[slurm %s] %s", job_id, line.decode("utf-8", "replace"))
                self._relay_live(run_dir)
                if info is not None and info.state != last_state:
                    self.log.info("Slurm job %s is %s", job_id, info.state.value)
                    last_state = info.state
                if info is not None and (
                    is_terminal(info.state) or not_found >= NOT_FOUND_CONFIRMATIONS
                ):
                    return self._finish(job_id, run_dir, info, self._read_result(run_dir))
                time.sleep(self.poll_interval)
        except BaseException:
            # execution_timeout, SIGTERM from a cleared task, or an error: never
            # leave the job running behind us.
            if last_state is None or not is_terminal(last_state):
                self._cancel_quietly(job_id)
            raise

    def _relay_live(self, run_dir: str) -> None:
        """Non-deferrable mode: relay new metrics rows as they appear."""
        relay = getattr(self, "_relay", None)
        if not relay:
            return
        from slurm_ray.mlflow_tracking import MetricsRelay, parse_metrics_jsonl

        if getattr(self, "_live_relay", None) is None:
            # One relay for the whole wait: rows MLflow refused stay queued in it.
            self._live_relay = MetricsRelay(relay, self.log)
        offset = getattr(self, "_metrics_offset", 0)
        chunk = self.hook.read_from_offset(posixpath.join(run_dir, "metrics.jsonl"), offset)
        complete = chunk[: chunk.rfind(b"\n") + 1]
        if complete:
            self._metrics_offset = offset + len(complete)
            self._live_relay.send(parse_metrics_jsonl(complete, self.log))

    def execute_complete(self, context: Context, event: dict[str, Any], run_dir: str = "") -> Any:
        """Turn the trigger's final event into the task's result or a clear error."""
        job_id = str(event.get("job_id", ""))
        self._job_id = job_id
        self._context = context
        # Some runners (`airflow dags test` with mapped tasks) drop the defer
        # kwargs; the event carries the log path, whose directory is run_dir.
        run_dir = run_dir or posixpath.dirname(str(event.get("log_path") or ""))
        status = event.get("status")
        if status == "timeout":
            from airflow.sdk.exceptions import AirflowTaskTimeout

            raise AirflowTaskTimeout(
                f"execution_timeout reached; Slurm job {job_id} was cancelled. {event.get('message', '')}"
            )
        if status != "terminal":
            self._cancel_quietly(job_id)
            raise AirflowException(
                f"lost track of Slurm job {job_id}: {event.get('message')} (a cancel was attempted)"
            )
        self._relay = event.get("relay")
        info = JobInfo(
            job_id=job_id,
            state=SlurmState(event["state"]),
            reason=event.get("reason") or "",
            name="",
            nodelist=event.get("nodelist") or "",
            num_nodes=None,
            exit_code=event.get("exit_code"),
            elapsed=None,
            source="trigger",
        )
        return self._finish(job_id, run_dir, info, self._read_result(run_dir))

    def _log_tail(self, run_dir: str, job_id: str, lines: int = 40) -> str:
        path = posixpath.join(run_dir, f"slurm-{job_id}.out")
        res = self.hook.run(f"tail -n {int(lines)} -- {quote(path)} 2>&1")
        return res.stdout.rstrip()

    def _finish(
        self, job_id: str, run_dir: str, info: JobInfo | None, result: dict[str, Any] | None
    ) -> Any:
        state = info.state if info else SlurmState.UNKNOWN
        if state == SlurmState.NOT_FOUND:
            info = end_from_run_dir(job_id, result, self._log_tail(run_dir, job_id))
            state = info.state
            self.log.warning(
                "Slurm no longer knows job %s (purged after MinJobAge; no accounting): "
                "its end is read from the run directory: %s (%s)",
                job_id,
                state.value,
                info.reason,
            )
        if state == SlurmState.COMPLETED:
            return self._summary(job_id, run_dir, info, result)
        try:
            self._relay_catch_up(run_dir, strict=False)
        except Exception as exc:
            self.log.warning("MLflow catch-up failed: %s", exc)
        reason = info.reason if info else ""
        # exit 75 means "checkpointed on the pre-timeout signal" only for our driver
        if self._hit_time_limit(state, info, result) and (
            state == SlurmState.TIMEOUT or self.entrypoint is None
        ):
            raise AirflowException(self._time_limit_message(job_id, run_dir, state, info, result))
        hint = {
            SlurmState.TIMEOUT: "the job hit its time limit; a retry resumes from the newest checkpoint",
            SlurmState.OUT_OF_MEMORY: "a step ran out of memory; raise job_spec.mem",
            SlurmState.CANCELLED: "the job was cancelled (scancel, or by an administrator)",
            SlurmState.PREEMPTED: "the job was preempted by a higher-priority job",
            SlurmState.NOT_FOUND: "Slurm no longer knows the job, the site has no accounting, and "
            "neither result.json nor the Slurm log says how it ended",
        }.get(state, "")
        if state == SlurmState.NODE_FAIL:
            hint = self._node_fail_hint(info)
        raise AirflowException(
            f"Slurm job {job_id} ended {state.value}"
            + (f" (reason: {reason})" if reason and reason != "None" else "")
            + (f", exit code {info.exit_code}" if info and info.exit_code else "")
            + (f": {hint}" if hint else "")
            + f"\nrun dir: {run_dir}\n--- last lines of slurm-{job_id}.out ---\n"
            + self._log_tail(run_dir, job_id)
        )

    def _node_fail_hint(self, info: JobInfo | None) -> str:
        """Name the job's node(s) Slurm considers down / not responding."""
        nodelist = info.nodelist if info else ""
        if not nodelist:
            return "a node of the job failed; a retry can run on the remaining nodes"
        bad: list[str] = []
        try:
            out = self.hook.run(f"sinfo -h -N -n {quote(nodelist)} -o '%N|%T'").stdout
            for line in out.splitlines():
                node, _, state = line.strip().partition("|")
                st = state.lower()
                down = "*" in st or st.startswith(("down", "drain", "fail", "no_respond"))
                if node and down and node not in bad:
                    bad.append(node)
        except Exception as exc:
            self.log.warning("could not ask Slurm which node failed: %s", exc)
        if bad:
            return (
                f"node {', '.join(bad)} failed (job nodes: {nodelist}); a retry can run on the "
                "remaining nodes when job_spec allows fewer"
            )
        return f"a node of {nodelist} failed; a retry can run on the remaining nodes"

    @staticmethod
    def _hit_time_limit(
        state: SlurmState, info: JobInfo | None, result: dict[str, Any] | None
    ) -> bool:
        """Slurm's TIMEOUT, or the driver checkpointed on the pre-timeout signal (exit 75)."""
        if state == SlurmState.TIMEOUT:
            return True
        if info is not None and str(info.exit_code or "").split(":")[0] == str(EXIT_CHECKPOINTED):
            return True
        return bool(result and str(result.get("stop_reason", "")) == "signal:SIGUSR1")

    def _newest_checkpoint_iteration(self, run_dir: str) -> int | None:
        cmd = (
            f"ls -1d {quote(posixpath.join(run_dir, 'checkpoints'))}/iter_* 2>/dev/null | "
            "sed 's/.*iter_//' | sort -n | tail -1"
        )
        try:
            out = self.hook.run(cmd).stdout.strip()
        except Exception:
            return None
        return int(out) if out.isdigit() else None

    def _time_limit_message(
        self,
        job_id: str,
        run_dir: str,
        state: SlurmState,
        info: JobInfo | None,
        result: dict[str, Any] | None,
    ) -> str:
        how = (
            f"Slurm state {state.value}"
            if state == SlurmState.TIMEOUT
            else f"Slurm state {state.value}, exit code {EXIT_CHECKPOINTED}: the driver "
            "checkpointed on the pre-timeout signal"
        )
        it = self._newest_checkpoint_iteration(run_dir)
        where = (
            f"checkpointed at iteration {it}; a retry resumes from it"
            if it is not None
            else "no checkpoint was written; a retry starts over"
        )
        return (
            f"Slurm job {job_id} reached its time limit (TIMEOUT; {how}): {where}. "
            "Raise job_spec.time or let the retry continue."
            + f"\nrun dir: {run_dir}\n--- last lines of slurm-{job_id}.out ---\n"
            + self._log_tail(run_dir, job_id)
        )

    def _summary(
        self, job_id: str, run_dir: str, info: JobInfo | None, result: dict[str, Any] | None
    ) -> dict[str, Any]:
        self._relay_catch_up(run_dir)
        summary: dict[str, Any] = {
            "mlflow_run_id": (getattr(self, "_relay", None) or {}).get("run_id"),
            "job_id": job_id,
            "run_dir": run_dir,
            "state": SlurmState.COMPLETED.value,
            "nodelist": info.nodelist if info else "",
            "cluster": self.cluster_name,
        }
        if result:
            for key in (
                "iterations",
                "env_steps",
                "episode_return_mean",
                "eval_return_mean",
                "checkpoint",
                "rl_module_checkpoint",
                "stop_reason",
                "wall_s",
            ):
                if key in result:
                    summary[key] = result[key]
        return summary

    def _cancel_quietly(self, job_id: str | None) -> None:
        if not job_id:
            return
        try:
            self.hook.cancel(job_id)
            self.log.info("Cancelled Slurm job %s", job_id)
        except Exception as exc:
            self.log.warning("Could not cancel Slurm job %s: %s", job_id, exc)

    def on_kill(self) -> None:
        """The task was killed while running in a worker: cancel the job."""
        self._cancel_quietly(self._job_id)
