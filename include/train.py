#!/usr/bin/env python3
"""RLlib training driver, run by the Slurm job on the Ray head node.

    python -u train.py --config config.json --run-dir DIR [--local [--num-cpus N]]
                       [--export-model]

Connects to the job's Ray cluster at ``$RAY_ADDRESS`` (the launcher exports
``HEAD_IP:PORT``; ``--address auto`` must be asked for explicitly because it
can join another job's cluster), or starts a private local Ray with
``--local`` (tests, laptops). Trains with RLlib's current API stack until the
first stop criterion, resuming from the newest complete checkpoint in
``DIR/checkpoints/`` so a retried or requeued job continues its counters.

Files in DIR (the run-directory contract, see DESIGN.md):

    metrics.jsonl           one JSON object per iteration, appended + fsynced
    checkpoints/iter_NNNNNN RLlib checkpoints; written under a temp name, then
                            renamed, so a complete name is a complete checkpoint
    result.json             the final summary, written atomically (tmp + rename);
                            an earlier attempt's is renamed result.previous.json

metrics.jsonl rows: iteration, env_steps (lifetime), episode_return_mean/min/max,
episode_len_mean, num_episodes, env_steps_per_s, time_this_iter_s, time_total_s
(training seconds including earlier attempts), timestamp, sample_time_s,
learn_time_s, and the learner's losses/diagnostics as RLlib names them (PPO:
policy_loss, vf_loss, total_loss, entropy, mean_kl_loss, ...; DQN: qf_loss,
qf_mean, total_loss), learning_rate. Non-finite numbers are written as null.
After a crash (no signal), iterations after the restored checkpoint are trained
again and appear twice: the later line wins.

result.json: status, stop_reason (iterations | env_steps | return_mean | minutes
| signal:SIGUSR1 | signal:SIGTERM | error), exit_code, iterations, env_steps,
episode_return_mean, eval_episodes, eval_returns, eval_return_mean, checkpoint,
rl_module_checkpoint, resumed_from, time_total_s, env_steps_per_s (this
attempt), wall_s, started_at, finished_at, ray_nodes, ray_node_ips,
ray_node_hostnames, num_env_runners, env_runner_node_ips, env_runner_hostnames,
ray_gpus, learner_hostnames, learner_devices (one per learner, e.g. "cpu" or
"cuda:0"), config, effective_config, versions; error / eval_error when something failed;
with --export-model, model_export (the export summary) or model_export_error.

--export-model: after a successful run, build the MLflow pyfunc model in
DIR/mlflow_model with export_model.py (staged next to this file) in this
process, where torch and the checkpoint are already loaded, and load it back
once to prove it works. A failed export does not fail the run: the Airflow
side then exports on the login node instead.

Exit codes:

    0   finished: a stop criterion was reached (result.json status "succeeded")
    1   training failed (status "failed", with the error)
    2   bad config or usage; stderr has one line "CONFIG_ERROR: config.<field>: ..."
        (status "config_error"). Found before Ray starts, except a request for
        more env runners or GPUs than the Ray cluster has.
    75  interrupted by SIGUSR1 (Slurm's pre-timeout ``--signal``) or SIGTERM: the
        current iteration was finished and checkpointed (status "interrupted").
        75 is EX_TEMPFAIL: run again with the same DIR to continue.

``training_config`` is imported from this file's directory (it is staged next
to it) or, when run from the repository, from ``../plugins/slurm_ray``. It
checks config.json against the same JSON Schema (``training_config.SCHEMA``,
with ``jsonschema``, which Ray installs) that the Airflow side checks and
generates the DAG Params from, so both sides refuse a value by the same field.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL (sysexits.h): "try again"

CKPT_PREFIX = "iter_"
CKPT_RE = re.compile(r"^iter_(\d{6,})$")
CKPT_MARKER = "rllib_checkpoint.json"  # written by RLlib's save_to_path
DRIVER_STATE = "slurm_ray_state.json"  # our counters, stored inside each checkpoint
RL_MODULE_SUBPATH = Path("learner_group", "learner", "rl_module", "default_policy")


def _load_training_config() -> ModuleType:
    """Import ``training_config`` by file path, without touching sys.path.

    Adding ``plugins/slurm_ray`` to sys.path would expose its ``hooks`` and
    ``utils`` packages as top-level names, here and in Ray workers (which
    inherit the driver's path).
    """
    here = Path(__file__).resolve().parent
    for candidate in (here, here.parent / "plugins" / "slurm_ray"):
        path = candidate / "training_config.py"
        if path.is_file():
            spec = importlib.util.spec_from_file_location("training_config", path)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules["training_config"] = module  # dataclasses look it up
            spec.loader.exec_module(module)
            return module
    raise ImportError(f"training_config.py not found next to {__file__}")


tc = _load_training_config()


# --- signals -------------------------------------------------------------------


class _Stop:
    """Set by the signal handler; the training loop polls it between iterations."""

    signame: str | None = None


def _on_signal(signum: int, _frame: Any) -> None:
    if _Stop.signame is None:
        _Stop.signame = signal.Signals(signum).name
        # os.write, not print: the signal may interrupt a print (reentrant I/O).
        os.write(2, f"train: got {_Stop.signame}; stopping after this iteration\n".encode())


def _install_signal_handlers() -> None:
    # Called again after ray.init(), which installs its own SIGTERM handler
    # (sys.exit) that would kill us without a checkpoint.
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, _on_signal)


# --- small helpers -------------------------------------------------------------


def _now_iso() -> str:
    # timezone.utc, not datetime.UTC: the cluster env may run Python 3.10.
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")  # noqa: UP017


def _num(value: Any) -> float | None:
    """A finite float or None (json.dumps would write NaN, which is not JSON)."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _append_jsonl(path: Path, row: dict[str, Any]) -> None:
    # One write per line plus fsync: a reader tailing the file (the Airflow
    # trigger) never sees a torn line that is later completed differently.
    with open(path, "a") as f:
        f.write(json.dumps(row, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _fmt_s(secs: float) -> str:
    seconds = round(secs)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _where(_runner: Any = None) -> tuple[str, str]:
    """(node IP, hostname) of the process it runs in; shipped to env runners."""
    import ray

    return ray.util.get_node_ip_address(), socket.gethostname()


def _learner_where(learner: Any) -> tuple[str, str]:
    """(hostname, torch device) of a Learner; shipped to the learners."""
    return socket.gethostname(), str(getattr(learner, "_device", "?"))


def _cuda_probe() -> tuple[str, str, bool]:
    """(node IP, hostname, torch sees CUDA) where Ray places a GPU task."""
    import ray
    import torch

    return ray.util.get_node_ip_address(), socket.gethostname(), torch.cuda.is_available()


class ConfigProblem(Exception):
    """Raised after startup for config-vs-cluster mismatches (exit 2)."""


# --- validation before any Ray work --------------------------------------------


def check_env_id(env_id: str) -> None:
    """Raise ConfigError unless gymnasium knows ``env_id`` (importing a ``module:``)."""
    import gymnasium

    name = env_id
    if ":" in env_id:
        module, _, name = env_id.partition(":")
        try:
            importlib.import_module(module)
        except Exception as exc:
            raise tc.ConfigError(
                "env_id", f"cannot import module {module!r} for {env_id!r}: {exc}"
            ) from exc
    try:
        gymnasium.spec(name)
    except gymnasium.error.Error as exc:
        msg = " ".join(str(exc).split())
        raise tc.ConfigError("env_id", f"unknown gymnasium env {env_id!r}: {msg}") from exc


# --- checkpoints -----------------------------------------------------------------


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first. Temp names never match CKPT_RE."""
    found = []
    if ckpt_dir.is_dir():
        for p in ckpt_dir.iterdir():
            m = CKPT_RE.match(p.name)
            if m and p.is_dir() and (p / CKPT_MARKER).is_file():
                found.append((int(m.group(1)), p))
    return sorted(found)


def remove_stale_temp_checkpoints(ckpt_dir: Path) -> None:
    """Half-written checkpoints of a killed earlier attempt."""
    if ckpt_dir.is_dir():
        for p in ckpt_dir.iterdir():
            if p.name.startswith(".tmp-") or p.name.startswith(".old-"):
                shutil.rmtree(p, ignore_errors=True)


# --- the trainer -----------------------------------------------------------------


class Trainer:
    """One driver run: connect, build, resume, train, checkpoint, evaluate, report."""

    def __init__(self, cfg: Any, run_dir: Path, args: argparse.Namespace) -> None:
        self.cfg = cfg
        self.eff = cfg.resolved()
        self.run_dir = run_dir
        self.args = args
        self.ckpt_dir = run_dir / "checkpoints"
        self.metrics_path = run_dir / "metrics.jsonl"
        self.result_path = run_dir / "result.json"
        self.started = time.time()
        self.started_iso = _now_iso()
        self.algo: Any = None
        self.local_temp_dir: str | None = None
        self.rllib_log_dir: str | None = None
        self.num_env_runners = 0
        self.iteration = 0
        self.env_steps = 0
        self.time_total_base = 0.0  # training seconds of earlier attempts
        self.time_total = 0.0
        self.session_steps = 0
        self.session_seconds = 0.0
        self.last_return: float | None = None
        self.last_saved_iteration: int | None = None
        self.checkpoint: Path | None = None
        self.resumed_from: Path | None = None
        self.runner_nodes: set[tuple[str, str]] = set()
        self.learners: dict[str, Any] = {}  # .learners() arguments (plan_resources)
        self.learner_nodes: list[tuple[str, str]] = []  # (hostname, device) per learner
        self.ray_gpus = 0.0
        self.session_start_iteration = 0

    # -- setup

    def connect(self) -> None:
        import ray

        if self.args.local:
            # Short path: Ray's socket paths must fit in 107 bytes.
            self.local_temp_dir = tempfile.mkdtemp(prefix="rs-local-", dir="/tmp")
            ray.init(
                num_cpus=self.args.num_cpus,
                num_gpus=self.args.num_gpus,
                include_dashboard=False,
                object_store_memory=self.args.object_store_mb * 1024 * 1024,
                _temp_dir=self.local_temp_dir,
            )
        else:
            ray.init(address=self.args.address)
        _install_signal_handlers()

    def plan_resources(self) -> None:
        import ray

        res = ray.cluster_resources()
        cpus = int(res.get("CPU", 0))
        gpus = float(res.get("GPU", 0))
        cfg = self.cfg
        self.ray_gpus = gpus
        need_gpus = cfg.num_gpus_per_learner * max(1, cfg.num_learners)
        if need_gpus > gpus:
            raise ConfigProblem(
                f"config.num_gpus_per_learner: learners need {need_gpus:g} GPUs, "
                f"the Ray cluster has {gpus:g}"
            )
        self.learners = self.place_learners()
        # A Learner actor takes 1 CPU unless it has a GPU (RLlib's "auto").
        # num_learners=0 learns in this driver process, which Ray does not count.
        learner_cpus = cfg.num_learners if cfg.num_gpus_per_learner == 0 else 0
        if cfg.num_env_runners is None:
            self.num_env_runners = max(0, cpus - learner_cpus)
        else:
            self.num_env_runners = cfg.num_env_runners
            need = self.num_env_runners + learner_cpus
            if need > cpus:
                # Ray would wait forever for actors it cannot place.
                raise ConfigProblem(
                    f"config.num_env_runners: {self.num_env_runners} env runners + "
                    f"{learner_cpus} learner CPUs need {need} CPUs, "
                    f"the Ray cluster has {cpus}"
                )
        print(
            f"train: ray cluster: {len(self.alive_nodes())} node(s), {cpus} CPUs, "
            f"{gpus:g} GPUs; env runners: {self.num_env_runners} x "
            f"{cfg.num_envs_per_env_runner} envs; learners: {self.learners['num_learners']}",
            flush=True,
        )

    def place_learners(self) -> dict[str, Any]:
        """``.learners()`` arguments: GPU learners where torch sees CUDA, else CPU.

        Ray places a GPU learner on a node that offers GPUs (in a GPU hetjob
        the only such nodes are the GPU component's). Where torch there has no
        CUDA (a count-only GRES, a CPU-only torch) RLlib would still move the
        module to ``cuda:0`` and fail: one learner then runs on that node's
        CPUs instead, pinned there by Ray's ``node:<ip>`` resource.
        """
        import ray

        eff = self.eff
        out: dict[str, Any] = {
            "num_learners": eff.num_learners,
            "num_gpus_per_learner": eff.num_gpus_per_learner,
        }
        if eff.num_gpus_per_learner == 0:
            return out
        probe = ray.remote(num_gpus=min(1.0, eff.num_gpus_per_learner), num_cpus=0)(_cuda_probe)
        ip, host, cuda = ray.get(probe.remote(), timeout=300)
        if cuda:
            return out
        print(
            f"train: torch on {host} has no CUDA although Ray reports {self.ray_gpus:g} GPU(s) "
            f"(count-only GRES or CPU-only torch): the learner runs on CPU on {host}, "
            f"1 learner instead of {max(1, eff.num_learners)} on GPUs",
            flush=True,
        )
        return {
            "num_learners": 1,
            "num_gpus_per_learner": 0,
            "num_cpus_per_learner": 0,
            "custom_resources_per_learner": {f"node:{ip}": 0.001},
        }

    def build(self) -> None:
        # RLlib's Trainable makes a log dir under ~/ray_results on every build and
        # build_algo() cannot be given another one: repoint the module constant
        # (read at call time). The dir stays empty outside Tune and Ray makes it
        # world-writable, so a private temp dir removed at shutdown, not the run
        # dir; in a job, inside the launcher's private dir (SLURM_RAY_TMPDIR),
        # which goes even when a cancelled job never reaches shutdown (each
        # node's Ray workers get their node's own); with --local, in Ray's.
        import ray.tune.trainable.trainable as trainable_mod

        private = os.environ.get("SLURM_RAY_TMPDIR") or self.local_temp_dir or ""
        self.rllib_log_dir = tempfile.mkdtemp(
            prefix="rs-rllib-", dir=private if os.path.isdir(private) else None
        )
        trainable_mod.DEFAULT_STORAGE_PATH = self.rllib_log_dir

        eff = self.eff
        if eff.algorithm == "PPO":
            from ray.rllib.algorithms.ppo import PPOConfig as AlgoConfig
        else:
            from ray.rllib.algorithms.dqn import DQNConfig as AlgoConfig
        training: dict[str, Any] = {
            "lr": eff.lr,
            "gamma": eff.gamma,
            # Total over all learners; RLlib splits it (train_batch_size_per_learner).
            "train_batch_size": eff.train_batch_size,
        }
        if eff.algorithm == "PPO":
            training.update(minibatch_size=eff.minibatch_size, num_epochs=eff.num_epochs)
        config = (
            AlgoConfig()
            .environment(eff.env_id)
            .env_runners(
                num_env_runners=self.num_env_runners,
                num_envs_per_env_runner=eff.num_envs_per_env_runner,
            )
            .learners(**self.learners)
            .training(**training)
            .rl_module(model_config={"fcnet_hiddens": list(eff.hidden_sizes)})
        )
        if eff.seed is not None:
            config = config.debugging(seed=eff.seed)
        self.algo = config.build_algo()
        self.record_runner_nodes()
        self.record_learner_nodes()

    def resume(self) -> None:
        """Restore the newest checkpoint that loads; older ones are fallbacks."""
        remove_stale_temp_checkpoints(self.ckpt_dir)
        errors = []
        for iteration, path in reversed(list_checkpoints(self.ckpt_dir)):
            try:
                self.algo.restore_from_path(str(path))
            except Exception as exc:
                errors.append(f"{path.name}: {type(exc).__name__}: {exc}")
                print(f"train: cannot restore {path}: {exc}; trying an older one", flush=True)
                continue
            state = self._read_driver_state(path)
            self.iteration = int(self.algo.iteration)
            self.env_steps = int(state.get("env_steps") or self._lifetime_steps())
            self.time_total_base = float(state.get("time_total_s") or 0.0)
            self.time_total = self.time_total_base
            self.last_return = _num(state.get("episode_return_mean"))
            self.checkpoint = path
            self.resumed_from = path
            self.last_saved_iteration = iteration
            print(
                f"train: resumed from {path} (iteration {self.iteration}, "
                f"{self.env_steps} env steps)",
                flush=True,
            )
            return
        if errors:
            # Starting from zero would silently throw the earlier training away.
            raise RuntimeError("no checkpoint could be restored: " + "; ".join(errors))

    # -- helpers

    @staticmethod
    def alive_nodes() -> list[dict[str, Any]]:
        import ray

        return [n for n in ray.nodes() if n.get("Alive")]

    def record_runner_nodes(self) -> None:
        try:
            if self.num_env_runners > 0:
                found = self.algo.env_runner_group.foreach_env_runner(
                    _where, local_env_runner=False
                )
            else:
                found = [_where()]  # sampling happens in this process
            self.runner_nodes.update((str(ip), str(host)) for ip, host in found)
        except Exception as exc:  # informational only; never fail training on it
            print(f"train: could not ask env runners for their node: {exc}", flush=True)

    def record_learner_nodes(self) -> None:
        try:
            results = self.algo.learner_group.foreach_learner(_learner_where)
            self.learner_nodes = sorted(tuple(r.get()) for r in results if r.ok)
        except Exception as exc:  # informational only, like the env runners'
            print(f"train: could not ask the learners for their node: {exc}", flush=True)
            return
        where = ", ".join(f"{host} ({device})" for host, device in self.learner_nodes)
        print(f"train: learners on {where}", flush=True)

    def _lifetime_steps(self) -> int:
        from ray.rllib.utils.metrics import ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME

        key = (ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME)
        return int(_num(self.algo.metrics.peek(key, default=0)) or 0)

    @staticmethod
    def _read_driver_state(path: Path) -> dict[str, Any]:
        try:
            return dict(json.loads((path / DRIVER_STATE).read_text()))
        except (OSError, ValueError):
            return {}

    # -- the loop

    def metrics_row(self, res: dict[str, Any]) -> dict[str, Any]:
        from ray.rllib.core import DEFAULT_MODULE_ID

        runners = res.get("env_runners") or {}
        prev_steps = self.env_steps
        steps = int(_num(res.get("num_env_steps_sampled_lifetime")) or prev_steps)
        iter_s = float(_num(res.get("time_this_iter_s")) or 0.0)
        self.iteration = int(res["training_iteration"])
        self.env_steps = steps
        self.time_total = self.time_total_base + float(_num(res.get("time_total_s")) or 0.0)
        self.session_steps += steps - prev_steps
        self.session_seconds += iter_s
        ret = _num(runners.get("episode_return_mean"))
        if ret is not None:
            self.last_return = ret
        row: dict[str, Any] = {
            "iteration": self.iteration,
            "env_steps": steps,
            "episode_return_mean": ret,
            "episode_return_min": _num(runners.get("episode_return_min")),
            "episode_return_max": _num(runners.get("episode_return_max")),
            "episode_len_mean": _num(runners.get("episode_len_mean")),
            "num_episodes": _num(runners.get("num_episodes")),
            "env_steps_per_s": _num((steps - prev_steps) / iter_s) if iter_s > 0 else None,
            "time_this_iter_s": round(iter_s, 4),
            "time_total_s": round(self.time_total, 3),
            "timestamp": round(time.time(), 3),
        }
        timers = res.get("timers") or {}
        # RLlib's smoothed per-iteration timers: where the time goes (sampling
        # vs. learning) when throughput is lower than expected.
        row["sample_time_s"] = _num(timers.get("env_runner_sampling_timer"))
        row["learn_time_s"] = _num(timers.get("learner_update_timer"))
        learner = (res.get("learners") or {}).get(DEFAULT_MODULE_ID) or {}
        for key, value in learner.items():
            # Losses and a few diagnostics; whatever the algorithm reports.
            if "loss" in key or key in ("entropy", "vf_explained_var", "qf_mean", "curr_kl_coeff"):
                row[key] = _num(value)
            elif key == "default_optimizer_learning_rate":
                row["learning_rate"] = _num(value)
        return row

    def stop_reason(self) -> str | None:
        stop = self.cfg.stop
        if stop.iterations is not None and self.iteration >= stop.iterations:
            return "iterations"
        if stop.env_steps is not None and self.env_steps >= stop.env_steps:
            return "env_steps"
        if (
            stop.return_mean is not None
            and self.last_return is not None
            and self.last_return >= stop.return_mean
        ):
            return "return_mean"
        if stop.minutes is not None and self.time_total >= stop.minutes * 60:
            return "minutes"
        return None

    def eta(self) -> str:
        """Time to the nearest stop criterion that can be extrapolated."""
        stop = self.cfg.stop
        n_iters = self.iteration - self.session_start_iteration
        etas: list[tuple[float, str]] = []
        if stop.iterations is not None and n_iters > 0:
            per_iter = self.session_seconds / n_iters
            etas.append(((stop.iterations - self.iteration) * per_iter, "iterations"))
        if stop.env_steps is not None and self.session_seconds > 0 and self.session_steps > 0:
            rate = self.session_steps / self.session_seconds
            etas.append(((stop.env_steps - self.env_steps) / rate, "env_steps"))
        if stop.minutes is not None:
            etas.append((stop.minutes * 60 - self.time_total, "minutes"))
        if not etas:
            return "eta ? (return_mean)"
        seconds, which = min(etas)
        return f"eta {_fmt_s(max(0.0, seconds))} ({which})"

    def save_checkpoint(self) -> Path:
        """Save to a temp dir, then rename: a complete name is a complete checkpoint."""
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        name = f"{CKPT_PREFIX}{self.iteration:06d}"
        final = self.ckpt_dir / name
        tmp = self.ckpt_dir / f".tmp-{name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        t0 = time.time()
        self.algo.save_to_path(str(tmp))
        _write_json_atomic(
            tmp / DRIVER_STATE,
            {
                "iteration": self.iteration,
                "env_steps": self.env_steps,
                "time_total_s": self.time_total,
                "episode_return_mean": self.last_return,
                "config": self.cfg.to_dict(),
                "saved_at": _now_iso(),
            },
        )
        if final.exists():
            # Same iteration trained again after resuming from an older checkpoint.
            old = self.ckpt_dir / f".old-{name}-{os.getpid()}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(self.ckpt_dir)
        self.checkpoint = final
        self.last_saved_iteration = self.iteration
        for _, old_path in list_checkpoints(self.ckpt_dir)[: -self.cfg.keep_checkpoints]:
            shutil.rmtree(old_path, ignore_errors=True)
        print(f"train: checkpoint {final} ({time.time() - t0:.2f}s)", flush=True)
        return final

    def train_loop(self) -> str:
        """Train until a stop criterion or a signal; returns the stop reason."""
        cfg = self.cfg
        self.session_start_iteration = self.iteration
        reason = self.stop_reason()  # a resumed run may already be done
        while reason is None and _Stop.signame is None:
            res = self.algo.train()
            row = self.metrics_row(res)
            _append_jsonl(self.metrics_path, row)
            ret = row["episode_return_mean"]
            rate = row["env_steps_per_s"]
            print(
                f"iter {self.iteration:>5} | return {'-' if ret is None else f'{ret:.1f}'}"
                f" | {'-' if rate is None else f'{rate:,.0f}'} steps/s"
                f" | {self.env_steps:,} env steps | {self.eta()}",
                flush=True,
            )
            reason = self.stop_reason()
            if reason is None and self.iteration % cfg.checkpoint_every == 0:
                self.save_checkpoint()
        if reason is None:
            reason = f"signal:{_Stop.signame}"
        if self.iteration > 0 and self.last_saved_iteration != self.iteration:
            self.save_checkpoint()
        return reason

    # -- evaluation and result

    def evaluate(self) -> dict[str, Any]:
        """Greedy rollouts with the RLModule loaded from the final checkpoint.

        Loading it the way a server would also proves the checkpoint is usable.
        """
        out: dict[str, Any] = {"eval_episodes": 0, "eval_return_mean": None}
        if self.cfg.eval_episodes == 0 or self.checkpoint is None:
            return out
        try:
            returns = greedy_rollouts(
                self.checkpoint / RL_MODULE_SUBPATH,
                self.cfg.env_id,
                self.cfg.eval_episodes,
                self.cfg.seed,
            )
        except Exception as exc:  # a failed evaluation does not undo the training
            print(f"train: evaluation failed: {type(exc).__name__}: {exc}", flush=True)
            out["eval_error"] = f"{type(exc).__name__}: {exc}"
            return out
        out["eval_episodes"] = len(returns)
        out["eval_returns"] = returns
        out["eval_return_mean"] = sum(returns) / len(returns) if returns else None
        return out

    def result(self, status: str, stop_reason: str, **extra: Any) -> dict[str, Any]:
        import ray

        nodes = self.alive_nodes() if ray.is_initialized() else []
        ckpt = self.checkpoint
        return {
            "status": status,
            "stop_reason": stop_reason,
            "iterations": self.iteration,
            "env_steps": self.env_steps,
            "episode_return_mean": self.last_return,
            "checkpoint": str(ckpt) if ckpt else None,
            "rl_module_checkpoint": str(ckpt / RL_MODULE_SUBPATH) if ckpt else None,
            "resumed_from": str(self.resumed_from) if self.resumed_from else None,
            "time_total_s": round(self.time_total, 3),
            "env_steps_per_s": (
                round(self.session_steps / self.session_seconds, 1)
                if self.session_seconds > 0
                else None
            ),
            "wall_s": round(time.time() - self.started, 3),
            "started_at": self.started_iso,
            "finished_at": _now_iso(),
            "ray_nodes": len(nodes),
            "ray_node_ips": sorted({str(n.get("NodeManagerAddress")) for n in nodes}),
            "ray_node_hostnames": sorted({str(n.get("NodeManagerHostname")) for n in nodes}),
            "num_env_runners": self.num_env_runners,
            "env_runner_node_ips": sorted({ip for ip, _ in self.runner_nodes}),
            "env_runner_hostnames": sorted({host for _, host in self.runner_nodes}),
            "ray_gpus": self.ray_gpus,
            "learner_hostnames": [host for host, _ in self.learner_nodes],
            "learner_devices": [device for _, device in self.learner_nodes],
            "config": self.cfg.to_dict(),
            "effective_config": self.eff.to_dict()
            | {"num_env_runners": self.num_env_runners}
            | {k: v for k, v in self.learners.items() if k.startswith("num_")},
            "versions": _versions(),
            **extra,
        }

    def run(self) -> int:
        try:
            self.connect()
            self.plan_resources()
            self.build()
            self.resume()
            reason = self.train_loop()
        except ConfigProblem as exc:
            self.shutdown()
            return _config_error(self.run_dir, str(exc))
        except Exception as exc:
            traceback.print_exc()
            err = _describe(exc)
            interrupted = _Stop.signame is not None
            # A signal that tore down Ray mid-iteration is still an interruption.
            status = "interrupted" if interrupted else "failed"
            reason = f"signal:{_Stop.signame}" if interrupted else "error"
            code = EXIT_INTERRUPTED if interrupted else EXIT_FAILED
            _write_json_atomic(
                self.result_path, self.safe_result(status, reason, error=err, exit_code=code)
            )
            self.shutdown()
            return code

        if reason.startswith("signal:"):
            result = self.result("interrupted", reason, exit_code=EXIT_INTERRUPTED)
            _write_json_atomic(self.result_path, result)
            print(f"train: interrupted ({reason}) at iteration {self.iteration}", flush=True)
            self.shutdown()
            return EXIT_INTERRUPTED

        self.record_runner_nodes()
        evaluation = self.evaluate()
        result = self.result("succeeded", reason, exit_code=EXIT_OK, **evaluation)
        _write_json_atomic(self.result_path, result)
        print(
            f"train: done ({reason}): {self.iteration} iterations, {self.env_steps:,} env "
            f"steps, return {result['episode_return_mean']}, "
            f"eval {result['eval_return_mean']}; {self.checkpoint}",
            flush=True,
        )
        self.shutdown()
        if getattr(self.args, "export_model", False) and self.checkpoint is not None:
            # export_model.py reads result.json, so it is written (and final) first.
            _write_json_atomic(self.result_path, result | self.export_model())
        return EXIT_OK

    def export_model(self) -> dict[str, Any]:
        """The MLflow model, built in this process; never raises (the run succeeded)."""
        t0 = time.monotonic()
        try:
            here = str(Path(__file__).resolve().parent)
            if here not in sys.path:
                sys.path.insert(0, here)
            import export_model  # staged next to this file

            summary = export_model.export(self.run_dir)
            summary.update(export_model.verify_in_process(Path(summary["model_dir"])))
        except Exception as exc:
            err = _describe(exc)
            print(f"train: model export failed (the login node retries it): {err}", flush=True)
            return {"model_export_error": err}
        summary["export_s"] = round(time.monotonic() - t0, 2)
        print(f"train: model exported to {summary['model_dir']} in {summary['export_s']}s")
        return {"model_export": summary}

    def safe_result(self, status: str, reason: str, **extra: Any) -> dict[str, Any]:
        try:
            return self.result(status, reason, **extra)
        except Exception:  # Ray itself may be gone; write what we know
            return {"status": status, "stop_reason": reason, "config": self.cfg.to_dict(), **extra}

    def shutdown(self) -> None:
        import ray

        if self.algo is not None:
            with contextlib.suppress(Exception):
                self.algo.stop()
        with contextlib.suppress(Exception):
            ray.shutdown()
        if self.rllib_log_dir:
            shutil.rmtree(self.rllib_log_dir, ignore_errors=True)
        if self.local_temp_dir:  # --local only; a Slurm job's is the launcher's
            shutil.rmtree(self.local_temp_dir, ignore_errors=True)


def greedy_rollouts(module_path: Path, env_id: str, episodes: int, seed: int | None) -> list[float]:
    """Return per-episode returns of the greedy policy (argmax / mean action)."""
    import gymnasium as gym
    import numpy as np
    import torch
    from ray.rllib.core.rl_module.rl_module import RLModule

    module = RLModule.from_checkpoint(str(module_path))
    env = gym.make(env_id)
    # Environments without a TimeLimit must still end.
    max_steps = (env.spec.max_episode_steps if env.spec else None) or 100_000
    returns = []
    try:
        for ep in range(episodes):
            if _Stop.signame is not None:
                break  # the job is about to be killed; keep what we have
            obs, _ = env.reset(seed=None if seed is None else seed + 10_000 + ep)
            total, done, steps = 0.0, False, 0
            while not done and steps < max_steps:
                batch = {"obs": torch.as_tensor(np.asarray(obs, dtype=np.float32)[None])}
                with torch.no_grad():
                    out = module.forward_inference(batch)
                action = _greedy_action(out, env.action_space)
                obs, reward, terminated, truncated, _ = env.step(action)
                total += float(reward)
                done = bool(terminated or truncated)
                steps += 1
            returns.append(total)
    finally:
        env.close()
    return returns


def _greedy_action(out: dict[str, Any], space: Any) -> Any:
    import gymnasium as gym
    import numpy as np

    if "actions" in out:  # DQN's forward_inference already returns argmax_a Q(s, a)
        action = out["actions"][0].cpu().numpy()
        return int(action) if isinstance(space, gym.spaces.Discrete) else action
    logits = out["action_dist_inputs"][0].cpu().numpy()
    if isinstance(space, gym.spaces.Discrete):
        return int(np.argmax(logits))
    if isinstance(space, gym.spaces.Box):
        # Diagonal Gaussian inputs are [mean, log_std]: greedy = mean.
        mean = logits[: int(np.prod(space.shape))].reshape(space.shape)
        return np.clip(mean, space.low, space.high).astype(space.dtype)
    raise TypeError(f"greedy evaluation does not support {type(space).__name__} actions")


def _versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("ray", "torch", "gymnasium", "numpy"):
        module = sys.modules.get(name)
        versions[name] = getattr(module, "__version__", None) if module else None
    return versions


def _describe(exc: BaseException) -> str:
    """The exception chain, outermost first: RLlib re-raises env errors as a bare
    ``RuntimeError from e``, whose own message is empty."""
    parts: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        msg = " ".join(str(current).split())
        parts.append(f"{type(current).__name__}: {msg}" if msg else type(current).__name__)
        current = current.__cause__ or current.__context__
    return " <- ".join(parts)[:2000]


def _fsync_dir(path: Path) -> None:
    # Make the rename durable on a crash (local disks; no-op cost on NFS).
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _config_error(run_dir: Path | None, message: str) -> int:
    print(f"CONFIG_ERROR: {message}", file=sys.stderr, flush=True)
    if run_dir is not None and run_dir.is_dir():
        with contextlib.suppress(OSError):
            _write_json_atomic(
                run_dir / "result.json",
                {"status": "config_error", "error": message, "exit_code": EXIT_CONFIG},
            )
    return EXIT_CONFIG


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="RLlib training driver (see module docstring)")
    p.add_argument("--config", required=True, help="config.json (training_config schema)")
    p.add_argument("--run-dir", required=True, help="run directory (metrics, checkpoints)")
    p.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS"),
        help="Ray cluster address (default: $RAY_ADDRESS; 'auto' only if asked for)",
    )
    p.add_argument("--local", action="store_true", help="start a private local Ray")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the --local Ray")
    p.add_argument("--num-gpus", type=int, default=None, help="GPUs of the --local Ray")
    p.add_argument("--object-store-mb", type=int, default=512, help="for --local")
    p.add_argument(
        "--export-model",
        action="store_true",
        help="build DIR/mlflow_model after a successful run (export_model.py)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    _install_signal_handlers()  # a signal during startup must not kill us silently
    args = parse_args(argv)
    run_dir = Path(args.run_dir).resolve()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return _config_error(None, f"run dir {run_dir}: {exc}")
    # A previous attempt's result must not be mistaken for this one's.
    result_path = run_dir / "result.json"
    if result_path.exists():
        os.replace(result_path, run_dir / "result.previous.json")
    try:
        raw = json.loads(Path(args.config).read_text())
    except (OSError, ValueError) as exc:
        return _config_error(run_dir, f"config: cannot read {args.config}: {exc}")
    try:
        # The operator checked the module against the profile; the allowlist
        # travels in the job's environment so a config.json alone cannot widen it.
        modules = [m for m in os.environ.get("SLURM_RAY_ENV_MODULES", "").split(",") if m]
        cfg = tc.validate_config(raw, env_modules=modules)
        check_env_id(cfg.env_id)
    except tc.ConfigError as exc:
        return _config_error(run_dir, str(exc))
    if not args.local and not args.address:
        return _config_error(
            run_dir, "RAY_ADDRESS is not set: pass --address HOST:PORT (or 'auto'), or --local"
        )

    # Before ray is imported: a local Ray must neither join $RAY_ADDRESS nor create
    # ~/.ray/auth_token (which would switch token auth on for later clusters).
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if args.local:
        os.environ.pop("RAY_ADDRESS", None)
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    print(f"train: {json.dumps(cfg.to_dict(), sort_keys=True)}", flush=True)
    return Trainer(cfg, run_dir, args).run()


if __name__ == "__main__":
    sys.exit(main())
