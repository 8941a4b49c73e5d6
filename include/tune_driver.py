#!/usr/bin/env python3
"""Ray Tune sweep driver: many RLlib trials in one Slurm job's Ray cluster.

    python -u tune_driver.py --config config.json --run-dir DIR [--local [--num-cpus N]]
                             [--export-model]

config.json is ``{"base": <training config>, "tune": <tune_space spec>}``, checked
(``training_config``, ``tune_space``, staged next to this file) before Ray starts.
Each trial is a ``train.Trainer`` (build / resume / metrics / checkpoints) in a
Tune function trainable taking 1 + num_env_runners CPUs (null means 0 here: the
allocation's CPUs go to concurrent trials).

Files in DIR (the run-directory contract, extended):

    trials/<trial_id>/metrics.jsonl   each trial's rows, written by the trial itself
                                      (train.py's rows plus trial_id, trial_config)
    trials/<trial_id>/checkpoints/    the trial's own checkpoints (train.py's layout)
    metrics.jsonl      every trial's rows as the driver receives them (one writer):
                       what the Airflow side tails live and routes by trial_id
    tune/              Ray Tune's experiment state: a retry restores it
                       (Tuner.restore), also from an earlier try's run directory
    result.json        train.py's result for the best trial (its checkpoint,
                       evaluation, model export) plus "tune": every trial's outcome

Exit codes as train.py: 0 done, 1 failed (no trial has a checkpoint), 2 bad
config, 75 interrupted (SIGUSR1 before the time limit, or scancel's SIGTERM:
Tune saves its state, each trial keeps its newest checkpoint; run again).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import sys
import tempfile
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
import train  # noqa: E402  (staged next to this file; loads training_config)


def _load_tune_space() -> Any:
    for candidate in (HERE, HERE.parent / "plugins" / "slurm_ray"):
        path = candidate / "tune_space.py"
        if path.is_file():
            spec = importlib.util.spec_from_file_location("tune_space", path)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
    raise ImportError(f"tune_space.py not found next to {__file__}")


ts = _load_tune_space()
EXPERIMENT, TRIALS = "tune", "trials"  # DIR/tune: Tune's experiment state
FINISHED = ("TERMINATED", "ERROR")
SCORE = "score"  # what schedulers and the best-trial choice compare: the newest return
STREAM_ENV = "SLURM_RAY_TUNE_STREAM"  # DIR/metrics.jsonl of this try


# --- one trial -----------------------------------------------------------------


def run_trial(config: dict[str, Any], *, base: dict[str, Any], run_dir: str) -> None:
    """Tune's function trainable: a train.Trainer driven by Tune.

    Restores from the checkpoint Tune hands over (a resumed trial, or PBT's
    exploit of a better trial), else from the trial's own newest checkpoint.
    """
    from ray import tune
    from ray.tune import Checkpoint

    trial_id = tune.get_context().get_trial_id()
    cfg = train.tc.validate_config({**base, **config})
    trial_dir = Path(run_dir) / TRIALS / trial_id
    trial_dir.mkdir(parents=True, exist_ok=True)
    trainer = train.Trainer(cfg, trial_dir, SimpleNamespace(local=False, export_model=False))
    trainer.num_env_runners = cfg.num_env_runners or 0
    try:
        trainer.build()
        given = tune.get_checkpoint()
        if given is not None:
            with given.as_directory() as path:
                _restore(trainer, Path(path))
        else:
            trainer.resume()
        extra = {"trial_id": trial_id, "trial_config": config}
        while trainer.stop_reason() is None:
            row = trainer.metrics_row(trainer.algo.train()) | extra
            train._append_jsonl(trainer.metrics_path, row)
            # The row travels whole (Tune fills in its own time keys at the top
            # level); schedulers compare SCORE, never missing.
            score = trainer.last_return if trainer.last_return is not None else -1e9
            report = {SCORE: score, "row": row}
            if trainer.stop_reason() is not None or trainer.iteration % cfg.checkpoint_every == 0:
                saved = trainer.save_checkpoint()
                tune.report(report, checkpoint=Checkpoint.from_directory(str(saved)))
            else:
                tune.report(report)
    finally:
        with contextlib.suppress(Exception):
            trainer.algo.stop()
        if trainer.rllib_log_dir:
            shutil.rmtree(trainer.rllib_log_dir, ignore_errors=True)


def _restore(trainer: Any, path: Path) -> None:
    trainer.algo.restore_from_path(str(path))
    state = trainer._read_driver_state(path)
    trainer.iteration = int(trainer.algo.iteration)
    trainer.env_steps = int(state.get("env_steps") or 0)
    trainer.time_total_base = trainer.time_total = float(state.get("time_total_s") or 0.0)
    trainer.last_return = train._num(state.get("episode_return_mean"))
    print(f"tune trial: restored from {path} (iteration {trainer.iteration})", flush=True)


# --- the driver's view: one stream of every trial's rows ---------------------------


def _stream_callback() -> Any:
    from ray.tune import Callback

    class TrialStream(Callback):
        """Appends each trial's row to DIR/metrics.jsonl (this process is its one writer);
        DIR from the environment: Tuner.restore brings back the earlier try's callback."""

        def on_step_begin(self, iteration: int, trials: Any, **info: Any) -> None:
            if iteration <= 1:  # Tune's signal handlers are in place by now
                _note_signals()

        def on_trial_result(
            self, iteration: int, trials: Any, trial: Any, result: dict, **info: Any
        ) -> None:
            row = result.get("row")
            if isinstance(row, dict):
                train._append_jsonl(Path(os.environ[STREAM_ENV]), row)
                ret = row.get("episode_return_mean")
                print(
                    f"trial {row.get('trial_id')} iter {row.get('iteration'):>4} | return "
                    f"{'-' if ret is None else f'{ret:.1f}'} | {row.get('trial_config')}",
                    flush=True,
                )

    return TrialStream()


def _note_signals() -> None:
    """Note the signal that stops the sweep, then let Tune's own handler save its state
    (after an interrupt, trial statuses do not tell it from a finished sweep)."""
    for sig in (signal.SIGUSR1, signal.SIGINT):
        inner = signal.getsignal(sig)
        if getattr(inner, "_noted", False):
            continue

        def handler(signum: int, frame: Any, _inner: Any = inner) -> None:
            if train._Stop.signame is None:
                train._Stop.signame = signal.Signals(signum).name
            if callable(_inner):
                _inner(signum, frame)

        handler._noted = True  # type: ignore[attr-defined]
        signal.signal(sig, handler)


def _on_sigterm(signum: int, frame: Any) -> None:
    # scancel: the same graceful path as Ctrl+C (Tune saves its state).
    if train._Stop.signame is None:
        train._Stop.signame = "SIGTERM"
    os.kill(os.getpid(), signal.SIGINT)


# --- the experiment ---------------------------------------------------------------


def param_space(spec: dict[str, Any]) -> dict[str, Any]:
    from ray import tune

    make = {"grid": tune.grid_search, "choice": tune.choice, "loguniform": tune.loguniform}
    out = {}
    for key, dim in spec["search"].items():
        ((kind, values),) = dim.items()
        out[key] = make[kind](*values) if kind == "loguniform" else make[kind](values)
    return out


def scheduler(spec: dict[str, Any], cfg: Any) -> Any:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    if spec["scheduler"] == "asha":
        max_t = int(cfg.stop.iterations)
        return ASHAScheduler(max_t=max_t, grace_period=max(1, max_t // 4), reduction_factor=2)
    if spec["scheduler"] == "pbt":
        mutations: dict[str, Any] = {}
        for key, dim in spec["search"].items():
            ((kind, values),) = dim.items()
            mutations[key] = tune.loguniform(*values) if kind == "loguniform" else list(values)
        return PopulationBasedTraining(
            time_attr="training_iteration",
            perturbation_interval=cfg.checkpoint_every,
            hyperparam_mutations=mutations,
        )
    return FIFOScheduler()


def _find_restorable(run_dir: Path) -> Path | None:
    """DIR/tune, else the newest earlier try's (copied here: this try owns its dir)."""
    from ray.tune import Tuner

    mine = run_dir / EXPERIMENT
    if Tuner.can_restore(str(mine)):
        return mine
    task_dir = run_dir.parent
    tries = sorted(
        (p for p in task_dir.glob("try_*") if p != run_dir and p.name[4:].isdigit()),
        key=lambda p: int(p.name[4:]),
        reverse=True,
    )
    for earlier in tries:
        if Tuner.can_restore(str(earlier / EXPERIMENT)):
            shutil.rmtree(mine, ignore_errors=True)
            shutil.copytree(earlier / EXPERIMENT, mine, symlinks=True)
            if (earlier / TRIALS).is_dir() and not (run_dir / TRIALS).exists():
                shutil.copytree(earlier / TRIALS, run_dir / TRIALS, symlinks=True)
            print(f"tune: continuing the experiment of {earlier}", flush=True)
            return mine
    return None


def build_tuner(cfg: Any, spec: dict[str, Any], base: dict[str, Any], run_dir: Path) -> Any:
    from ray import tune

    trainable = tune.with_parameters(run_trial, base=base, run_dir=str(run_dir))
    runners = cfg.num_env_runners or 0
    # One bundle per actor: the trial's driver (it learns too) and its env runners.
    bundles = [{"CPU": 1}] + [{"CPU": 1}] * runners
    trainable = tune.with_resources(trainable, tune.PlacementGroupFactory(bundles))
    restorable = _find_restorable(run_dir)
    if restorable is not None:
        print(f"tune: restoring {restorable}", flush=True)
        return tune.Tuner.restore(
            str(restorable),
            trainable,
            resume_unfinished=True,
            resume_errored=True,
            param_space=param_space(spec),
        )
    return tune.Tuner(
        trainable,
        param_space=param_space(spec),
        tune_config=tune.TuneConfig(
            metric=SCORE,
            mode="max",
            num_samples=spec["num_samples"],
            scheduler=scheduler(spec, cfg),
            max_concurrent_trials=spec["max_concurrent_trials"] or None,
        ),
        run_config=tune.RunConfig(
            name=EXPERIMENT,
            storage_path=str(run_dir),
            callbacks=[_stream_callback()],
            checkpoint_config=tune.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            verbose=0,  # one line per result from TrialStream instead
        ),
    )


def trial_outcomes(grid: Any) -> list[dict[str, Any]]:
    out = []
    for trial in grid._experiment_analysis.trials:  # statuses are not in Result
        last = trial.last_result or {}
        out.append(
            {
                "trial_id": trial.trial_id,
                "status": trial.status,
                "config": trial.config,
                "iterations": (last.get("row") or {}).get("iteration"),
                ts.METRIC: train._num(last.get(SCORE)),
                "error": str(trial.error_file) if getattr(trial, "error_file", None) else None,
            }
        )
    return out


def interrupted(trainer: Any, tune_info: dict[str, Any] | None = None) -> int:
    reason = f"signal:{train._Stop.signame or 'unknown'}"
    result = trainer.result(
        "interrupted", reason, exit_code=train.EXIT_INTERRUPTED, tune=tune_info or {}
    )
    train._write_json_atomic(trainer.result_path, result)
    print(f"tune: interrupted ({reason}); the state is saved, run again to continue", flush=True)
    return train.EXIT_INTERRUPTED


def finish(trainer: Any, grid: Any, spec: dict[str, Any]) -> int:
    """Pick the best trial, evaluate and export it, write result.json; the exit code."""
    trials = trial_outcomes(grid)
    tune_info: dict[str, Any] = {
        "scheduler": spec["scheduler"],
        "num_trials": len(trials),
        "trials": trials,
    }
    if train._Stop.signame is not None or any(t["status"] not in FINISHED for t in trials):
        return interrupted(trainer, tune_info)
    best = grid.get_best_result(metric=SCORE, mode="max", scope="last")
    if best is None or best.checkpoint is None:
        errors = "; ".join(str(e) for e in grid.errors)[:2000]
        error = errors or "no trial has a checkpoint"
        result = trainer.result("failed", "error", exit_code=1, tune=tune_info, error=error)
        train._write_json_atomic(trainer.result_path, result)
        return train.EXIT_FAILED
    m = best.metrics.get("row") or {}
    trainer.cfg = train.tc.validate_config({**trainer.cfg.to_dict(), **best.config})
    trainer.eff = trainer.cfg.resolved()
    trainer.checkpoint = Path(best.checkpoint.path)
    trainer.iteration = int(m.get("iteration") or 0)
    trainer.env_steps = int(m.get("env_steps") or 0)
    trainer.last_return = train._num(best.metrics.get(SCORE))
    trainer.time_total = float(m.get("time_total_s") or 0.0)
    tune_info.update(best_trial_id=m.get("trial_id"), best_config=best.config)
    reason = trainer.stop_reason() or "scheduler"  # ASHA/PBT may end a trial early
    result = trainer.result(
        "succeeded", reason, exit_code=train.EXIT_OK, tune=tune_info, **trainer.evaluate()
    )
    train._write_json_atomic(trainer.result_path, result)
    print(f"tune: best trial {m.get('trial_id')} {best.config}: {result['eval_return_mean']=}")
    if trainer.args.export_model:
        train._write_json_atomic(trainer.result_path, result | trainer.export_model())
    return train.EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = train.parse_args(argv)
    run_dir = Path(args.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    result_path = run_dir / "result.json"
    if result_path.exists():
        os.replace(result_path, run_dir / "result.previous.json")
    try:
        raw = json.loads(Path(args.config).read_text())
        base = raw["base"]
        modules = [m for m in os.environ.get("SLURM_RAY_ENV_MODULES", "").split(",") if m]
        cfg = train.tc.validate_config(base, env_modules=modules)
        train.check_env_id(cfg.env_id)
        spec = ts.validate_tune(raw["tune"], cfg.to_dict())
    except (OSError, ValueError, KeyError, TypeError) as exc:
        # ConfigError and TuneSpecError are ValueErrors and name their field.
        return train._config_error(
            run_dir, f"config: {exc}" if isinstance(exc, KeyError | OSError) else str(exc)
        )
    if not args.local and not args.address:
        return train._config_error(
            run_dir, "RAY_ADDRESS is not set: pass --address HOST:PORT, or --local"
        )
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_INIT", "1")
    # Tune's locks go to $RAY_TMPDIR/_ray_lockfiles (default: a name in /tmp any user
    # can take first); a local Ray's trials keep RLlib's dir in SLURM_RAY_TMPDIR
    # (a trial Tune kills never reaches its cleanup). Both private, removed at exit.
    private_tmp = tempfile.mkdtemp(prefix="rs-tune-", dir=os.environ.get("SLURM_RAY_TMPDIR"))
    os.environ["RAY_TMPDIR"] = os.environ["SLURM_RAY_TMPDIR"] = private_tmp
    os.environ[STREAM_ENV] = str(run_dir / "metrics.jsonl")
    if args.local:
        os.environ.pop("RAY_ADDRESS", None)
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    print(f"tune: {spec['trials']} trial(s), {spec['scheduler']}, {json.dumps(spec['search'])}")
    trainer = train.Trainer(cfg, run_dir, args)
    try:
        trainer.connect()
        signal.signal(signal.SIGTERM, _on_sigterm)
        if train._Stop.signame is not None:  # a signal while Ray was starting
            return interrupted(trainer)
        grid = build_tuner(cfg, spec, cfg.to_dict(), run_dir).fit()
        return finish(trainer, grid, spec)
    except Exception as exc:
        traceback.print_exc()
        train._write_json_atomic(
            result_path,
            trainer.safe_result(
                "failed", "error", error=train._describe(exc), exit_code=train.EXIT_FAILED
            ),
        )
        return train.EXIT_FAILED
    finally:
        trainer.shutdown()
        shutil.rmtree(private_tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
