"""The env prefix of every operator is resolved by one function (identity.resolve_remote_paths)."""

from __future__ import annotations

from slurm_ray.hooks.slurm import CommandResult
from slurm_ray.operators.identity import resolve_remote_paths
from slurm_ray.slurm.commands import IDENTITY_COMMAND
from slurm_ray.utils.environment import EnvironmentSpec


class IdentityHook:
    def __init__(self) -> None:
        self.commands: list[str] = []

    def run(self, command: str, *, check: bool = False) -> CommandResult:
        self.commands.append(command)
        return CommandResult(0, "alice\n/home/alice\n", "")


def test_prefix_placeholders_cost_one_command_and_only_when_used() -> None:
    hook = IdentityHook()
    env = EnvironmentSpec(kind="venv", prefix="/scratch/{user}/envs/x")
    base, resolved = resolve_remote_paths(hook, "", env)  # type: ignore[arg-type]
    assert (base, resolved.prefix) == ("", "/scratch/alice/envs/x")
    assert hook.commands == [IDENTITY_COMMAND]
    plain = EnvironmentSpec(kind="venv", prefix="/opt/envs/x")
    assert resolve_remote_paths(hook, "/runs", plain) == ("/runs", plain)  # type: ignore[arg-type]
    assert len(hook.commands) == 1
