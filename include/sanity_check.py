#!/usr/bin/env python3
"""Gym sanity check: step an environment with random actions (no training).

The NREL Eagle tutorial's first check, as a script that a pipeline can read:

    python sanity_check.py [--env-id CartPole-v1] [--episodes 1] [--max-steps 500] [--quiet]
                           [--record PATH --record-spec SHA256 --record-info JSON]

Uses gymnasium; falls back to the legacy ``gym`` package when gymnasium is not
installed. Prints one ``action obs reward done`` line per step (unless
``--quiet``), then exactly one line ``SANITY_SUMMARY {json}`` on stdout;
``step_values`` in it says which step API the package has (5: gymnasium and
gym >= 0.26, whose reset returns (obs, info); 4: older gym).

With ``--record``, a pass is also written to PATH (a JSON record the operator
may reuse instead of checking again), atomically and with mode 0600, and only
into a directory that belongs to this user and nobody else can write; one
``SANITY_RECORD ...`` line on stdout says whether it was written. Other
records of the same check (older spec hashes) in that directory are removed.

On failure it prints exactly one line ``SANITY_ERROR: <reason>`` on stderr and
exits non-zero:

    0  ok
    1  the environment crashed while stepping
    2  bad command line (argparse)
    3  neither gymnasium nor gym is importable
    4  the env id is unknown or the environment cannot be created
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import io
import json
import os
import platform
import stat
import sys
import tempfile
import time
import warnings
from typing import Any

EXIT_CRASH = 1
EXIT_NO_PACKAGE = 3
EXIT_BAD_ENV = 4


class SanityError(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


def _version(module: str) -> str | None:
    """The module's version if it imports, else None (not installed or broken)."""
    try:
        return str(getattr(importlib.import_module(module), "__version__", "unknown"))
    except Exception:
        return None


def _load_gym() -> tuple[Any, str]:
    try:
        import gymnasium

        return gymnasium, "gymnasium"
    except ImportError:
        pass
    try:
        # gym prints a multi-line "unmaintained" notice to stderr on import;
        # stderr is reserved for the one SANITY_ERROR line.
        with contextlib.redirect_stderr(io.StringIO()):
            import gym

        return gym, "gym"
    except ImportError as exc:
        raise SanityError(
            EXIT_NO_PACKAGE, f"neither gymnasium nor gym is importable ({exc})"
        ) from exc


def _make_env(gym: Any, api: str, env_id: str) -> Any:
    kwargs: dict[str, Any] = {}
    if api == "gym":
        import numpy as np

        # gym 0.26's env checker uses np.bool8, which numpy 2 removed.
        if int(np.__version__.split(".")[0]) >= 2:
            kwargs["disable_env_checker"] = True
    try:
        return gym.make(env_id, **kwargs)
    except Exception as exc:
        # gym(nasium) raises its own error classes for unknown ids and
        # ModuleNotFoundError for a bad "module:" prefix: all mean "bad env".
        msg = " ".join(str(exc).split())
        raise SanityError(
            EXIT_BAD_ENV, f"cannot make env {env_id!r}: {type(exc).__name__}: {msg}"
        ) from exc


def _reset(env: Any, seed: int | None) -> Any:
    # gymnasium and gym >= 0.26 return (obs, info); older gym returns obs only.
    out = env.reset(seed=seed) if seed is not None else env.reset()
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict):
        return out[0]
    return out


def _step(env: Any, action: Any) -> tuple[Any, float, bool, int]:
    """(obs, reward, done, how many values step() returned)."""
    out = env.step(action)
    if len(out) == 5:  # gymnasium, gym >= 0.26: obs, reward, terminated, truncated, info
        return out[0], float(out[1]), bool(out[2] or out[3]), 5
    obs, reward, done, _info = out  # gym < 0.26: 4 values
    return obs, float(reward), bool(done), 4


def run(env_id: str, episodes: int, max_steps: int, quiet: bool, seed: int | None) -> dict:
    gym, api = _load_gym()
    env = _make_env(gym, api, env_id)
    started = time.perf_counter()
    steps = 0
    step_values = 0
    returns: list[float] = []
    try:
        for ep in range(episodes):
            _reset(env, None if seed is None else seed + ep)
            if seed is not None:
                env.action_space.seed(seed + ep)
            done, total, n = False, 0.0, 0
            while not done and n < max_steps:
                action = env.action_space.sample()
                obs, reward, done, step_values = _step(env, action)
                total += reward
                n += 1
                if not quiet:
                    print(action, obs, reward, done)
            steps += n
            returns.append(total)
    except Exception as exc:
        msg = " ".join(str(exc).split())
        raise SanityError(
            EXIT_CRASH, f"env {env_id!r} crashed: {type(exc).__name__}: {msg}"
        ) from exc
    finally:
        env.close()
    elapsed = time.perf_counter() - started
    versions = {"python": platform.python_version(), api: _version(api)}
    # Imported, not just looked up: a broken torch or ray install shows up as null.
    for module in ("numpy", "ray", "torch"):
        versions[module] = _version(module)
    return {
        "ok": True,
        # Which node ran it: the compute-node check (srun) must show a compute node.
        "host": platform.node(),
        "env_id": env_id,
        "api": api,
        "episodes": episodes,
        "steps": steps,
        "step_values": step_values,
        "returns": returns,
        "elapsed_s": round(elapsed, 4),
        "steps_per_s": round(steps / elapsed, 1) if elapsed > 0 else None,
        "versions": versions,
    }


def _private_dir(path: str) -> str | None:
    """Why ``path`` is no place for a record (None: it is this user's, writable by no one else)."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        return f"cannot stat {path}: {exc.strerror}"
    if not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a directory"
    if st.st_uid != os.getuid():
        return f"{path} belongs to uid {st.st_uid}, not to this user"
    if st.st_mode & 0o022:
        return f"{path} is writable by others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def write_record(path: str, spec_sha256: str, info: dict, summary: dict) -> str:
    """Record a pass at ``path`` (temp file, then rename); returns the SANITY_RECORD line."""
    folder = os.path.dirname(path)
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
    except OSError as exc:
        return f"SANITY_RECORD not written: cannot create {folder}: {exc.strerror}"
    for where in (os.path.dirname(folder), folder):
        why = _private_dir(where)
        if why is not None:
            return f"SANITY_RECORD not written: {why}"
    # timezone.utc, not UTC (3.11+): the cluster-side interpreter may be older.
    now = datetime.datetime.now(datetime.timezone.utc)  # noqa: UP017
    record = {
        **info,
        "version": 1,
        "spec_sha256": spec_sha256,
        "passed_at": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "summary": summary,
    }
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".record-", suffix=".tmp")  # mode 0600
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        return f"SANITY_RECORD not written: {path}: {exc.strerror}"
    # One record per check: those of earlier spec hashes only take space.
    stem = os.path.basename(path).rsplit("-", 1)[0] + "-"
    for name in os.listdir(folder):
        if name.startswith(stem) and name.endswith(".json") and name != os.path.basename(path):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(folder, name))
    return f"SANITY_RECORD written: {path}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--env-id", default="CartPole-v1")
    parser.add_argument("--episodes", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=500, help="per episode")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--quiet", action="store_true", help="only the summary line")
    parser.add_argument("--record", default=None, help="write a record of a pass here")
    parser.add_argument("--record-spec", default="", help="the environment's spec sha256")
    parser.add_argument("--record-info", default="{}", help="JSON object to put in the record")
    args = parser.parse_args(argv)
    if args.episodes < 1 or args.max_steps < 1:
        parser.error("--episodes and --max-steps must be >= 1")
    try:
        info = json.loads(args.record_info)
    except json.JSONDecodeError:
        info = None
    if not isinstance(info, dict):
        parser.error("--record-info must be a JSON object")
    # Legacy gym on numpy 2 warns on every step; keep stderr for the error line.
    warnings.simplefilter("ignore", DeprecationWarning)
    try:
        summary = run(args.env_id, args.episodes, args.max_steps, args.quiet, args.seed)
    except SanityError as exc:
        print(f"SANITY_ERROR: {exc}", file=sys.stderr, flush=True)
        return exc.code
    except Exception as exc:  # anything unforeseen still gives one parsable line
        msg = " ".join(str(exc).split())
        print(f"SANITY_ERROR: {type(exc).__name__}: {msg}", file=sys.stderr, flush=True)
        return EXIT_CRASH
    print("SANITY_SUMMARY " + json.dumps(summary, sort_keys=True), flush=True)
    if args.record:
        print(write_record(args.record, args.record_spec, info, summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
