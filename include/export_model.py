#!/usr/bin/env python3
"""Build an MLflow pyfunc model from a finished run's RLModule checkpoint.

    python export_model.py --run-dir DIR [--no-verify]

Runs on the cluster side, in the training environment (ray[rllib], torch,
mlflow), after the driver wrote ``DIR/result.json``. It writes
``DIR/mlflow_model/``: a self-contained MLflow model directory (MLmodel,
signature, input example, explicit pip requirements, the RLModule checkpoint
copied in as the artifact ``rl_module``). The Airflow side then uploads that
directory as the run's ``model`` artifact and registers it; nothing on the
Airflow side ever imports ray or torch.

The model is saved as *models-from-code*: this very file is the model's code
(MLflow copies it into the model directory and executes it on load; the
``set_model`` call at the bottom names the model), so loading needs neither
this project nor pickled classes, only the pip requirements.

``predict`` takes a batch of observations as a numpy ``float32`` array of shape
``(n, *obs_shape)`` (the signature is enforced: ``np.asarray([obs],
dtype=np.float32)``; a REST client sends ``{"inputs": [[...]]}``) and returns the
policy's deterministic actions (``argmax`` of the logits for discrete action
spaces) as a numpy array.
Only the RLModule is used: env-to-module connectors (observation filters and
the like) are not applied, which is right for RLlib's default pipelines.

Prints one JSON line (``{"model_dir": ..., "obs_shape": ..., ...}``) on
success. Exit codes: 0 ok, 1 export or verification failed, 2 bad input
(no result.json, or no RLModule checkpoint in it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import mlflow
import mlflow.models
import mlflow.pyfunc

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
MODEL_DIRNAME = "mlflow_model"
ARTIFACT_KEY = "rl_module"


class RLModulePolicy(mlflow.pyfunc.PythonModel):
    """Pyfunc wrapper: observations in, deterministic RLModule actions out."""

    def load_context(self, context: Any) -> None:
        """Restore the RLModule from the ``rl_module`` artifact (CPU, inference only)."""
        from ray.rllib.core.rl_module.rl_module import RLModule

        self.module = RLModule.from_checkpoint(context.artifacts[ARTIFACT_KEY])
        space = self.module.observation_space
        self.obs_shape = tuple(space.shape) if space is not None and space.shape else None

    # ``model_input`` is deliberately unannotated: MLflow reads the annotation
    # as a type-hint signature and warns about (or coerces) anything but list[...].
    # (MLflow then prints a harmless "Add type hints" UserWarning; the model is
    # typed by its explicit tensor signature instead.)
    def predict(self, context: Any, model_input, params: dict[str, Any] | None = None) -> Any:
        """Actions for a batch of observations (a bare observation, if called directly)."""
        import numpy as np
        import torch

        obs = np.asarray(model_input, dtype=np.float32)
        if self.obs_shape is not None and obs.shape == self.obs_shape:
            obs = obs[None, ...]  # one observation: make it a batch of one
        with torch.no_grad():
            out = self.module.forward_inference({"obs": torch.from_numpy(obs)})
            inputs = out["action_dist_inputs"]
            try:
                # Generic: the module's own distribution, made deterministic
                # (argmax for Categorical, the mean for Gaussians).
                dist_cls = self.module.get_inference_action_dist_cls()
                actions = dist_cls.from_logits(inputs).to_deterministic().sample()
            except Exception:  # a custom module without a distribution class
                actions = torch.argmax(inputs, dim=-1)
        return actions.cpu().numpy()


def _pip_requirements() -> list[str]:
    """Exact versions of what the model needs at load time (never inferred: slow and lossy)."""
    import gymnasium
    import numpy
    import ray
    import torch

    def base(version: str) -> str:
        # Local build tags such as "+cpu" are not installable from an index.
        return version.split("+", 1)[0]

    return [
        f"mlflow=={mlflow.__version__}",
        f"ray[rllib]=={ray.__version__}",
        f"torch=={base(torch.__version__)}",
        f"gymnasium=={gymnasium.__version__}",
        f"numpy=={numpy.__version__}",
    ]


def _example_observation(space: Any) -> Any:
    """A deterministic, valid observation batch of one (zeros clipped into the space)."""
    import numpy as np

    zeros = np.zeros(space.shape, dtype=np.float32)
    low = np.asarray(space.low, dtype=np.float32)
    high = np.asarray(space.high, dtype=np.float32)
    return np.clip(zeros, low, high)[None, ...]


def export(run_dir: Path) -> dict[str, Any]:
    """Write ``run_dir/mlflow_model`` from ``run_dir/result.json``; returns a summary."""
    import numpy as np
    from mlflow.models import infer_signature
    from ray.rllib.core.rl_module.rl_module import RLModule

    result_path = run_dir / "result.json"
    try:
        result = json.loads(result_path.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read {result_path}: {exc}") from exc
    ckpt = result.get("rl_module_checkpoint")
    if not ckpt or not Path(ckpt).is_dir():
        raise UsageError(f"result.json has no existing rl_module_checkpoint (got {ckpt!r})")

    module = RLModule.from_checkpoint(ckpt)
    obs_space, act_space = module.observation_space, module.action_space
    if obs_space is None or not getattr(obs_space, "shape", None):
        raise UsageError(f"only flat Box observation spaces are supported, got {obs_space!r}")
    example = _example_observation(obs_space)
    policy = RLModulePolicy()
    policy.module = module
    policy.obs_shape = tuple(obs_space.shape)
    actions = policy.predict(None, example)
    signature = infer_signature(example, np.asarray(actions))

    target = run_dir / MODEL_DIRNAME
    # Build next to the target and swap it in: a re-run (task retry) replaces
    # the directory instead of failing on "already exists", and a crash never
    # leaves a half-written model where the Airflow side looks for one.
    tmp = run_dir / f".{MODEL_DIRNAME}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    mlflow.pyfunc.save_model(
        path=str(tmp),
        python_model=str(Path(__file__).resolve()),  # models-from-code: this file
        artifacts={ARTIFACT_KEY: str(ckpt)},
        signature=signature,
        input_example=example,
        pip_requirements=_pip_requirements(),
        metadata={
            "slurm_ray": {
                "observation_space": repr(obs_space),
                "action_space": repr(act_space),
                "rl_module_checkpoint": str(ckpt),
                "env": (result.get("config") or {}).get("env"),
                "iterations": result.get("iterations"),
                "env_steps": result.get("env_steps"),
                "eval_return_mean": result.get("eval_return_mean"),
            }
        },
    )
    # save_model executed the code file once (to validate the input example).
    shutil.rmtree(tmp / "__pycache__", ignore_errors=True)
    old = run_dir / f".{MODEL_DIRNAME}.old-{os.getpid()}"
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)
    return {
        "model_dir": str(target),
        "rl_module_checkpoint": str(ckpt),
        "obs_shape": list(obs_space.shape),
        "action_space": repr(act_space),
        "example_action": np.asarray(actions).tolist(),
    }


def verify(model_dir: Path, timeout: float = 300.0) -> dict[str, Any]:
    """Load the saved model in a fresh interpreter (as a consumer would) and act once."""
    code = (
        "import json, sys, mlflow.pyfunc\n"
        "m = mlflow.pyfunc.load_model(sys.argv[1])\n"
        "ex = m.input_example\n"
        "a = m.predict(ex)\n"
        "print(json.dumps({'verified_action': a.tolist()}))\n"
    )
    env = dict(
        os.environ,
        MLFLOW_DISABLE_TELEMETRY="true",
        RAY_USAGE_STATS_ENABLED="0",
        PYTHONDONTWRITEBYTECODE="1",  # no __pycache__ inside the model directory
    )
    with tempfile.TemporaryDirectory(prefix="export-verify-") as cwd:
        proc = subprocess.run(
            [sys.executable, "-c", code, str(model_dir)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            cwd=cwd,  # stray files (mlruns, ray_results) land in a throwaway dir
        )
    if proc.returncode != 0:
        raise RuntimeError(f"the saved model does not load/act:\n{proc.stderr[-3000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def verify_in_process(model_dir: Path) -> dict[str, Any]:
    """Load the saved model here (the driver: ray and torch already imported) and act once."""
    import numpy as np

    # Loading executes the model's code file; keep __pycache__ out of the model.
    saved, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    try:
        model = mlflow.pyfunc.load_model(str(model_dir))
        actions = model.predict(model.input_example)
    finally:
        sys.dont_write_bytecode = saved
    return {"verified_action": np.asarray(actions).tolist()}


class UsageError(Exception):
    """Bad input: nothing was exported."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument(
        "--no-verify", action="store_true", help="skip loading the model in a fresh process"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    started = time.monotonic()
    try:
        summary = export(args.run_dir.resolve())
        if not args.no_verify:
            summary.update(verify(Path(summary["model_dir"])))
    except UsageError as exc:
        print(f"export_model: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:
        print(f"export_model: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    summary["export_s"] = round(time.monotonic() - started, 2)
    print(json.dumps(summary), flush=True)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
else:
    # Executed by MLflow as the model's code file (models-from-code): name the
    # model. Importing this module elsewhere only sets an unused global.
    mlflow.models.set_model(RLModulePolicy())
