"""docker-compose.yaml: valid without a Docker engine, and in step with the native setup.

No Docker engine runs on the build machines, so nothing here starts a
container. Debian's ``docker-compose`` (1.29.2; ``make test`` installs it)
validates the file offline: ``docker-compose config`` parses it, checks the
schema and refuses a ``build:`` context that does not exist. Its resolved
output (anchors merged, ``${VAR:-default}`` filled in with the defaults,
paths made absolute) is what the other tests read. Ports, Airflow settings,
the job user, the state directory and slurm.conf are compared with the values
the native scripts use, read from those scripts rather than written twice.
The two one-shot init scripts (keys, host key hand-off, the Airflow
connection) run here for real against temporary directories.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yaml"
DOCKER = ROOT / "docker"
SCRIPTS = ROOT / "scripts"
SLURM_CONF = DOCKER / "slurm" / "slurm.conf"
SLURM_ENTRYPOINT = DOCKER / "slurm" / "entrypoint.sh"
AIRFLOW_ENTRYPOINT = DOCKER / "airflow" / "entrypoint.sh"

AIRFLOW_SERVICES = (
    "airflow-init",
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
)
REQUIRED_SERVICES = {
    "postgres",
    *AIRFLOW_SERVICES,
    "mlflow",
    "slurm-init",
    "slurmctld",
    "c1",
    "c2",
}
BASE_IMAGES = {
    "docker/airflow/Dockerfile": "python:3.11-slim-bookworm",
    "docker/mlflow/Dockerfile": "python:3.11-slim-bookworm",
    "docker/slurm/Dockerfile": "debian:bookworm",
}
# Variables that pick the host ports, as in the native scripts.
PORT_VARS = ("SLURM_RAY_AIRFLOW_PORT", "SLURM_RAY_MLFLOW_PORT", "SLURM_RAY_DEV_SSH_PORT")


# --- what the native scripts say ---------------------------------------------


def script_text(name: str) -> str:
    return (SCRIPTS / name).read_text()


def script_default(name: str, var: str) -> str:
    """The default of ``${VAR:-default}`` in scripts/NAME (the first one)."""
    match = re.search(r"\$\{" + re.escape(var) + r":-([^}]*)\}", script_text(name))
    assert match, f"scripts/{name}: no ${{{var}:-...}}"
    return match.group(1)


def resolve_shell(value: str, known: dict[str, str]) -> str:
    """Fill in ``${X:-default}`` with its default and ``$X``/``${X}`` from ``known``."""
    value = value.strip().strip("'\"")
    previous = None
    while previous != value:
        previous = value
        value = re.sub(r"\$\{(\w+):-([^{}]*)\}", lambda m: m.group(2), value)
        value = re.sub(
            r"\$(?:\{(\w+)\}|(\w+))",
            lambda m: known.get(m.group(1) or m.group(2), m.group(0)),
            value,
        )
    return value


def script_assignments(name: str) -> dict[str, str]:
    """Top-level ``NAME=value`` lines of a script, defaults filled in."""
    known: dict[str, str] = {}
    for match in re.finditer(r"^([A-Z][A-Z0-9_]*)=(.*)$", script_text(name), re.M):
        known[match.group(1)] = resolve_shell(match.group(2), known)
    return known


def local_airflow_env() -> dict[str, str]:
    """What ``scripts/airflow_local.sh`` exports for Airflow, resolved."""
    text = script_text("airflow_local.sh")
    body = text.split("export_env() {", 1)[1].split("\n}\n", 1)[0]
    known = script_assignments("airflow_local.sh")
    return {
        m.group(1): resolve_shell(m.group(2), known)
        for m in re.finditer(r"^\s*export (\w+)=(.*)$", body, re.M)
    }


def native_slurm_conf() -> dict[str, str]:
    """The slurm.conf that ``scripts/devcluster.sh`` writes, variables filled in."""
    text = script_text("devcluster.sh")
    body = text.split("write_config() {", 1)[1].split("cfg=$(cat <<EOF\n", 1)[1]
    body = body.split("\nEOF\n", 1)[0]
    return parse_slurm_conf(resolve_shell(body, script_assignments("devcluster.sh")))


def parse_slurm_conf(text: str) -> dict[str, str]:
    """``Key=value`` settings; NodeName/PartitionName lines keyed ``NodeName=<name>``."""
    conf: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        key, _, value = line.partition("=")
        if key in ("NodeName", "PartitionName"):
            name, _, rest = value.partition(" ")
            conf[f"{key}={name}"] = rest.strip()
        else:
            conf[key] = value
    return conf


def words(spec: str) -> dict[str, str]:
    """``A=1 B=2`` -> ``{"A": "1", "B": "2"}``."""
    return dict(item.split("=", 1) for item in spec.split())


# --- what docker-compose says --------------------------------------------------


@pytest.fixture(scope="module")
def compose_bin() -> str:
    path = shutil.which("docker-compose")
    if path is None:
        pytest.fail(
            "docker-compose is not on PATH; `make test` installs it "
            "(apt-get install -y docker-compose)"
        )
    return path


def run_compose(
    compose_bin: str, tmp: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """docker-compose with a clean environment (so the defaults apply) and no .env file."""
    empty_env = tmp / "empty.env"
    empty_env.touch()
    return subprocess.run(
        [compose_bin, "--env-file", str(empty_env), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp), **(env or {})},
    )


def resolved_config(compose_bin: str, tmp: Path, env: dict[str, str] | None = None) -> Any:
    proc = run_compose(compose_bin, tmp, "-f", str(COMPOSE), "config", env=env)
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(proc.stdout)


@pytest.fixture(scope="module")
def config(compose_bin: str, tmp_path_factory: pytest.TempPathFactory) -> Any:
    return resolved_config(compose_bin, tmp_path_factory.mktemp("compose"))


@pytest.fixture(scope="module")
def services(config: Any) -> dict[str, dict[str, Any]]:
    return config["services"]


def mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of each volume entry; a bind's source is an absolute path."""
    out = []
    for entry in service.get("volumes", []):
        if isinstance(entry, dict):
            out.append((str(entry["source"]), str(entry["target"])))
        else:
            source, target = entry.split(":")[:2]
            out.append((source, target))
    return out


def published(service: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(host ip, host port, container port) of each published port."""
    out = []
    for entry in service.get("ports", []):
        if isinstance(entry, dict):
            out.append((entry.get("host_ip", ""), str(entry["published"]), str(entry["target"])))
        else:
            ip, host, target = str(entry).split("/")[0].rsplit(":", 2)
            out.append((ip, host, target))
    return out


def by_role(services: dict[str, dict[str, Any]], role: str) -> list[str]:
    return sorted(n for n, s in services.items() if s.get("environment", {}).get("ROLE") == role)


def dockerfile_of(service: dict[str, Any]) -> Path:
    build = service["build"]
    return Path(build["context"]) / build.get("dockerfile", "Dockerfile")


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines = [
        line for line in dockerfile.read_text().splitlines() if not line.lstrip().startswith("#")
    ]
    text = "\n".join(lines).replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        if line.strip():
            op, _, args = line.strip().partition(" ")
            out.append((op.upper(), args.strip()))
    return out


def copies(dockerfile: Path) -> list[tuple[list[str], str]]:
    """(sources, destination) of each COPY/ADD that reads the build context."""
    out = []
    for op, args in instructions(dockerfile):
        if op in ("COPY", "ADD"):
            parts = [p for p in args.split() if not p.startswith("--")]
            if "--from=" not in args:
                out.append((parts[:-1], parts[-1]))
    return out


def entrypoint(dockerfile: Path) -> list[str]:
    found = [json.loads(args) for op, args in instructions(dockerfile) if op == "ENTRYPOINT"]
    assert found, f"{dockerfile}: no ENTRYPOINT"
    return found[-1]


# --- the file is valid ---------------------------------------------------------


def test_compose_file_validates(compose_bin: str, tmp_path: Path) -> None:
    proc = run_compose(compose_bin, tmp_path, "-f", str(COMPOSE), "config", "-q")
    assert proc.returncode == 0, proc.stderr


def test_validation_refuses_a_missing_build_context(compose_bin: str, tmp_path: Path) -> None:
    # The check above has teeth: the same file with one context renamed fails.
    text = COMPOSE.read_text()
    assert "context: ./docker/mlflow" in text
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("context: ./docker/mlflow", "context: ./docker/no-such-dir"))
    args = ("--project-directory", str(ROOT), "-f", str(bad), "config", "-q")
    proc = run_compose(compose_bin, tmp_path, *args)
    assert proc.returncode != 0
    assert "no-such-dir" in proc.stderr


def test_services_present(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) >= REQUIRED_SERVICES, sorted(REQUIRED_SERVICES - set(services))
    assert by_role(services, "compute") == ["c1", "c2"]
    assert by_role(services, "controller") == ["slurmctld"]
    assert by_role(services, "init") == ["slurm-init"]


# --- everything the file points at exists ------------------------------------


def test_build_contexts_dockerfiles_and_copied_files_exist(
    services: dict[str, dict[str, Any]],
) -> None:
    seen = set()
    for name, service in services.items():
        if "build" not in service:
            continue
        context = Path(service["build"]["context"])
        assert context.is_dir(), f"{name}: build context {context} missing"
        dockerfile = dockerfile_of(service)
        assert dockerfile.is_file(), f"{name}: {dockerfile} missing"
        rel = dockerfile.relative_to(ROOT).as_posix()
        seen.add(rel)
        froms = [args for op, args in instructions(dockerfile) if op == "FROM"]
        assert froms == [BASE_IMAGES[rel]], f"{rel}: FROM {froms}"
        for sources, _ in copies(dockerfile):
            for source in sources:
                assert (context / source).exists(), f"{rel}: COPY source {source} missing"
    assert seen == set(BASE_IMAGES)


def test_airflow_dockerignore_lets_the_copied_files_through() -> None:
    dockerfile = DOCKER / "airflow" / "Dockerfile"
    ignore = (DOCKER / "airflow" / "Dockerfile.dockerignore").read_text().splitlines()
    assert "*" in ignore  # an allow-list: .venv, .dev and .git stay out of the context
    for sources, _ in copies(dockerfile):
        for source in sources:
            if source not in (".", "./"):
                assert f"!{source.rstrip('/')}" in ignore, f"{source} is not let through"


def test_bind_mounts_exist_and_named_volumes_are_declared(config: Any) -> None:
    declared = set(config.get("volumes") or {})
    for name, service in config["services"].items():
        for source, target in mounts(service):
            if source.startswith("/"):
                assert Path(source).exists(), f"{name}: bind source {source} missing"
                assert Path(source).resolve().is_relative_to(ROOT), f"{name}: {source}"
            else:
                assert source in declared, f"{name}: volume {source} not declared"
            assert target.startswith("/"), f"{name}: {target}"


def test_plugin_dags_and_include_are_mounted_like_a_checkout(
    services: dict[str, dict[str, Any]],
) -> None:
    # The package is installed editable from one directory laid out like the
    # repository; slurm_ray finds include/ next to plugins/ (operators/remote_env.py).
    want = {ROOT / "dags": "dags", ROOT / "plugins": "plugins", ROOT / "include": "include"}
    dockerfile = (DOCKER / "airflow" / "Dockerfile").read_text()
    for name in AIRFLOW_SERVICES:
        service = services[name]
        binds = {Path(s): t for s, t in mounts(service) if s.startswith("/")}
        assert set(want) <= set(binds), f"{name}: {binds}"
        parents = {str(Path(binds[src]).parent) for src in want}
        assert len(parents) == 1, f"{name}: {binds}"
        base = parents.pop()
        for src, leaf in want.items():
            assert binds[src] == f"{base}/{leaf}"
        assert service["environment"]["AIRFLOW__CORE__DAGS_FOLDER"] == f"{base}/dags"
        assert f"WORKDIR {base}\n" in dockerfile
    assert "pip install --no-deps -e ." in dockerfile
    assert "pip install -r requirements.txt -c constraints.txt" in dockerfile


# --- ports and settings agree with the native scripts --------------------------


def native_ports() -> dict[str, str]:
    airflow = script_default("airflow_local.sh", "SLURM_RAY_AIRFLOW_PORT")
    mlflow = script_default("mlflow_server.sh", "MLFLOW_PORT")
    assert script_default("airflow_local.sh", "SLURM_RAY_MLFLOW_PORT") == mlflow
    ssh = script_default("devcluster.sh", "SLURM_RAY_DEV_SSH_PORT")
    return {"airflow-apiserver": airflow, "mlflow": mlflow, "slurmctld": ssh}


def test_published_ports_agree_with_the_local_scripts(
    services: dict[str, dict[str, Any]],
) -> None:
    ports = native_ports()
    assert set(ports.values()) == {"8080", "5055", "22022"}  # what the README promises
    for name, service in services.items():
        if name in ports:
            # Loopback only, like the native services; container port = host port.
            assert published(service) == [("127.0.0.1", ports[name], ports[name])], name
        else:
            assert not published(service), f"{name} publishes {published(service)}"
    env = services["airflow-apiserver"]["environment"]
    assert env["AIRFLOW__API__PORT"] == ports["airflow-apiserver"]
    command = services["mlflow"]["command"]
    assert command[command.index("--port") + 1] == ports["mlflow"]
    allowed = command[command.index("--allowed-hosts") + 1].split(",")
    assert f"mlflow:{ports['mlflow']}" in allowed
    assert f"localhost:{ports['mlflow']}" in allowed
    for name in ("slurm-init", "slurmctld", "airflow-init"):
        assert services[name]["environment"]["SLURM_RAY_LOGIN_PORT"] == ports["slurmctld"], name
    health = " ".join(services["slurmctld"]["healthcheck"]["test"])
    assert "scontrol ping" in health and "/run/sshd.pid" in health


def test_host_ports_follow_the_scripts_variables(compose_bin: str, tmp_path: Path) -> None:
    # The same variables move the host side as natively; the containers stay put.
    overrides = {var: str(18000 + i) for i, var in enumerate(PORT_VARS)}
    services = resolved_config(compose_bin, tmp_path, env=overrides)["services"]
    ports = native_ports()
    for var, name in zip(PORT_VARS, ("airflow-apiserver", "mlflow", "slurmctld"), strict=True):
        assert published(services[name]) == [("127.0.0.1", overrides[var], ports[name])]
    base_url = services["airflow-apiserver"]["environment"]["AIRFLOW__API__BASE_URL"]
    assert base_url == f"http://127.0.0.1:{overrides['SLURM_RAY_AIRFLOW_PORT']}"
    command = services["mlflow"]["command"]
    allowed = command[command.index("--allowed-hosts") + 1].split(",")
    assert f"localhost:{overrides['SLURM_RAY_MLFLOW_PORT']}" in allowed


def test_airflow_env_agrees_with_airflow_local(services: dict[str, dict[str, Any]]) -> None:
    local = local_airflow_env()
    env = services["airflow-apiserver"]["environment"]
    mlflow_uri = f"http://mlflow:{native_ports()['mlflow']}"
    dags_target = dict((t, s) for s, t in mounts(services["airflow-apiserver"]))
    state_volume = {t for s, t in mounts(services["airflow-apiserver"]) if s == "airflow-state"}
    # Differences the containers impose, each with its reason.
    differs = {
        # 127.0.0.1 inside a container is unreachable through the published port.
        "AIRFLOW__API__HOST": lambda v: v == "0.0.0.0",
        # The repository's dags/ as mounted.
        "AIRFLOW__CORE__DAGS_FOLDER": lambda v: dags_target.get(v) == str(ROOT / "dags"),
        # Written by airflow-init into the volume the api-server reads.
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": lambda v: (
            str(Path(v).parent) in state_volume
        ),
        # MLflow is reached by its service name.
        "SLURM_RAY_MLFLOW_URI": lambda v: v == mlflow_uri,
        "MLFLOW_TRACKING_URI": lambda v: v == mlflow_uri,
    }
    ignored = {"AIRFLOW_HOME", "PATH"}  # host paths of the native install
    assert set(differs) <= set(local), "airflow_local.sh no longer sets some of these"
    for key, value in local.items():
        if key in ignored:
            continue
        assert key in env, f"{key} (set by airflow_local.sh) is missing from the compose env"
        if key in differs:
            assert differs[key](env[key]), f"{key}={env[key]!r}"
        else:
            assert "$" not in value, f"airflow_local.sh {key}={value!r}: unresolved"
            assert env[key] == value, f"{key}: compose {env[key]!r} != airflow_local.sh {value!r}"
    # The ones the provider depends on, spelled out.
    assert env["AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE"] == "True"
    assert env["AIRFLOW__CORE__LOAD_EXAMPLES"] == "False"
    assert env["AIRFLOW__CORE__PARALLELISM"] == script_default(
        "airflow_local.sh", "SLURM_RAY_AIRFLOW_PARALLELISM"
    )
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg2://")
    assert "@postgres:5432/" in env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == (
        "http://airflow-apiserver:8080/execution/"
    )
    # The shared secrets, written once by airflow-init, where every component reads.
    assert str(Path(env["AIRFLOW_CONFIG"]).parent) in state_volume
    # The Airflow side uses the local profile's default paths (the slurm volume's).
    assert "SLURM_RAY_DEV_STATE" not in env


def test_every_airflow_component_shares_one_config(services: dict[str, dict[str, Any]]) -> None:
    reference = services["airflow-apiserver"]
    init_only = {"SLURM_RAY_LOGIN_HOST", "SLURM_RAY_LOGIN_PORT", "SLURM_RAY_LOGIN_USER"}
    from airflow.cli.cli_config import core_commands

    airflow_commands = {command.name for command in core_commands}
    for name in AIRFLOW_SERVICES:
        service = services[name]
        env = {k: v for k, v in service["environment"].items() if k not in init_only}
        assert env == reference["environment"], name
        assert service["image"] == reference["image"]
        assert dockerfile_of(service) == dockerfile_of(reference)
        assert sorted(mounts(service)) == sorted(mounts(reference)), name
        (command,) = service["command"]
        assert command == "init" or command in airflow_commands, f"{name}: {command}"
    # slurm-init hands the SSH client key to the uid the Airflow image runs as.
    uid = re.search(
        r"^ARG AIRFLOW_UID=(\d+)$", (DOCKER / "airflow" / "Dockerfile").read_text(), re.M
    )
    assert uid and services["slurm-init"]["environment"]["AIRFLOW_UID"] == uid.group(1)
    assert [services[n]["command"] for n in AIRFLOW_SERVICES[1:]] == [
        ["api-server"],
        ["scheduler"],
        ["dag-processor"],
        ["triggerer"],
    ]


def test_mlflow_server_matches_mlflow_server_sh(services: dict[str, dict[str, Any]]) -> None:
    pin = re.search(
        r"^mlflow==(\S+)$", (ROOT / "include" / "requirements-cluster.txt").read_text(), re.M
    )
    assert pin
    dockerfile = DOCKER / "mlflow" / "Dockerfile"
    assert f"pip install mlflow=={pin.group(1)}" in dockerfile.read_text()
    assert entrypoint(dockerfile) == ["mlflow", "server"]
    command = services["mlflow"]["command"]
    assert "--serve-artifacts" in command
    assert command[command.index("--backend-store-uri") + 1].startswith("sqlite:///")
    assert command[command.index("--workers") + 1] == "1"
    assert "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false" in dockerfile.read_text()


# --- the cluster -----------------------------------------------------------------


def test_slurm_conf_nodes_are_the_compose_services(services: dict[str, dict[str, Any]]) -> None:
    conf = parse_slurm_conf(SLURM_CONF.read_text())
    nodes = sorted(k.split("=", 1)[1] for k in conf if k.startswith("NodeName="))
    nodes.remove("DEFAULT")
    compute = by_role(services, "compute")
    assert nodes == compute
    for name in compute:
        assert services[name]["hostname"] == name  # slurmd's node name is the hostname
    (controller,) = by_role(services, "controller")
    assert conf["SlurmctldHost"] == services[controller]["hostname"] == controller
    assert services["airflow-init"]["environment"]["SLURM_RAY_LOGIN_HOST"] == controller
    partitions = [k for k in conf if k.startswith("PartitionName=")]
    assert len(partitions) == 1
    assert words(conf[partitions[0]])["Nodes"] == ",".join(compute)
    for name in (controller, *compute):
        binds = {t: s for s, t in mounts(services[name])}
        assert binds.get("/etc/slurm/slurm.conf") == str(SLURM_CONF), name


def test_slurm_conf_has_the_native_settings() -> None:
    from slurm_ray.profiles import get_profile

    conf = parse_slurm_conf(SLURM_CONF.read_text())
    native = native_slurm_conf()
    # Hosts and paths are the containers' own; everything else is the same.
    local_only = {
        "SlurmctldHost",
        "AuthInfo",
        "StateSaveLocation",
        "SlurmdSpoolDir",
        "SlurmctldPidFile",
        "SlurmdPidFile",
        "SlurmctldLogFile",
        "SlurmdLogFile",
        "JobCompLoc",
    }
    # The compose stack has no slurmdbd/MariaDB and no GPU node: accounting and
    # GRES are the native dev cluster's alone (and the compose one says so below).
    native_only = {
        "AccountingStorageType",
        "AccountingStorageHost",
        "AccountingStoragePort",
        "AccountingStoragePass",
        "AccountingStorageTRES",
        "JobAcctGatherType",
        "JobAcctGatherFrequency",
        "GresTypes",
    }
    settings = {k for k in native if "=" not in k}
    assert {k for k in conf if "=" not in k} <= settings, "a setting the native cluster lacks"
    assert native["AccountingStorageType"] == "accounting_storage/slurmdbd"
    for key in sorted(settings - local_only - native_only):
        assert key in conf, f"{key} missing from docker/slurm/slurm.conf"
        assert "$" not in native[key], f"devcluster.sh {key}={native[key]!r}: unresolved"
        assert conf[key] == native[key], f"{key}: {conf[key]!r} != native {native[key]!r}"
    for key, value in {
        "ProctrackType": "proctrack/linuxproc",
        "TaskPlugin": "task/none",
        "SelectType": "select/cons_tres",
        "SchedulerParameters": "batch_sched_delay=0",
        "AccountingStorageType": "accounting_storage/none",
        "JobAcctGatherType": "jobacct_gather/none",
        "SlurmdParameters": "config_overrides",
    }.items():
        assert conf[key] == value
    node_defaults = words(conf["NodeName=DEFAULT"])
    assert node_defaults == words(native["NodeName=DEFAULT"])
    local = get_profile("local")
    assert int(node_defaults["CPUs"]) == local.cores_per_node
    assert "GresTypes" not in conf and "gpu" not in [
        k.split("=", 1)[1] for k in conf if k.startswith("PartitionName=")
    ]
    (partition,) = [k.split("=", 1)[1] for k in conf if k.startswith("PartitionName=")]
    assert partition == local.partition
    assert words(conf[f"PartitionName={partition}"])["Default"] == "YES"


def test_state_volume_is_where_the_local_profile_looks(config: Any) -> None:
    services = config["services"]
    state = script_default("devcluster.sh", "SLURM_RAY_DEV_STATE")
    profiles_src = (ROOT / "plugins" / "slurm_ray" / "profiles.py").read_text()
    assert f'os.environ.get("SLURM_RAY_DEV_STATE", "{state}")' in profiles_src
    sources = set()
    for name in ("slurm-init", "slurmctld", "c1", "c2"):
        volume = {t: s for s, t in mounts(services[name])}.get(state)
        assert volume in (config.get("volumes") or {}), f"{name}: no named volume at {state}"
        sources.add(volume)
    assert len(sources) == 1, "the nodes must share one state volume (run dirs, venv)"
    from slurm_ray import profiles

    local = profiles.get_profile("local")
    prefix = profiles._LOCAL_STATE
    assert local.environment.prefix == f"{prefix}/venv"
    assert local.remote_base_dir.startswith(f"{prefix}/scratch/")
    assert local.ssh_conn_id == "slurm_dev"
    conf = parse_slurm_conf(SLURM_CONF.read_text())
    for key in ("SlurmctldLogFile", "SlurmdLogFile", "JobCompLoc"):
        assert conf[key].startswith(f"{state}/log/"), key
    job_user = script_default("devcluster.sh", "SLURM_RAY_DEV_USER")
    assert services["airflow-init"]["environment"]["SLURM_RAY_LOGIN_USER"] == job_user
    runs = [args for op, args in instructions(DOCKER / "slurm" / "Dockerfile") if op == "RUN"]
    assert any(re.search(rf"useradd .* {job_user} ", run) for run in runs), runs
    for name in ("c1", "c2"):
        assert services[name].get("shm_size"), f"{name}: Ray needs a real /dev/shm"


def test_entrypoints_exist_and_parse(services: dict[str, dict[str, Any]]) -> None:
    checked = set()
    for name, service in services.items():
        if "build" not in service:
            continue
        dockerfile = dockerfile_of(service)
        context = Path(service["build"]["context"])
        program = entrypoint(dockerfile)[0]
        copied = {dest: sources for sources, dest in copies(dockerfile)}
        if program in copied:
            (source,) = copied[program]
            script = context / source
            assert script.is_file(), f"{name}: {script}"
            checked.add(script)
        else:
            assert "/" not in program, f"{name}: entrypoint {program} comes from nowhere"
    assert checked == {SLURM_ENTRYPOINT, AIRFLOW_ENTRYPOINT}
    for script in sorted(DOCKER.rglob("*.sh")):
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{script}: {proc.stderr}"
    handled = set(re.findall(r"^\s*(\w+)\) cmd_\w+ ;;$", SLURM_ENTRYPOINT.read_text(), re.M))
    roles = {
        s["environment"]["ROLE"] for s in services.values() if "ROLE" in s.get("environment", {})
    }
    assert roles == handled == {"init", "controller", "compute"}


def test_host_key_checking_stays_on() -> None:
    banned = (
        "no_host_key_check",
        "allow_host_key_change",
        "stricthostkeychecking no",
        "stricthostkeychecking=no",
        "autoaddpolicy",
        "userknownhostsfile /dev/null",
    )
    for path in [COMPOSE, *sorted(p for p in DOCKER.rglob("*") if p.is_file())]:
        text = path.read_text().lower()
        for word in banned:
            assert word not in text, f"{path.relative_to(ROOT)}: {word}"


# --- the init scripts, run for real --------------------------------------------


def _stub_airflow(bin_dir: Path, calls: Path) -> None:
    """An `airflow` that records its arguments and AIRFLOW_CONFIG (JSON, one call a line)."""
    bin_dir.mkdir()
    stub = bin_dir / "airflow"
    stub.write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        "call = {'argv': sys.argv[1:], 'config': os.environ.get('AIRFLOW_CONFIG')}\n"
        f"open({str(calls)!r}, 'a').write(json.dumps(call) + '\\n')\n"
    )
    stub.chmod(0o755)


def test_init_scripts_hand_the_host_key_to_the_airflow_connection(tmp_path: Path) -> None:
    if shutil.which("ssh-keygen") is None:
        pytest.fail("ssh-keygen missing (openssh-client; make cluster-up installs it)")
    import pwd

    user = pwd.getpwuid(os.getuid()).pw_name
    state, airflow_ssh, airflow_state = tmp_path / "state", tmp_path / "ssh", tmp_path / "af"
    base_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)}
    slurm_env = {
        **base_env,
        "ROLE": "init",
        "SLURM_RAY_DEV_STATE": str(state),
        "SLURM_RAY_DEV_USER": user,
        "SLURM_RAY_AIRFLOW_SSH_DIR": str(airflow_ssh),
        "AIRFLOW_UID": str(os.getuid()),
        "SLURM_RAY_LOGIN_HOST": "slurmctld",
        "SLURM_RAY_LOGIN_PORT": "22022",
    }

    def slurm_init() -> None:
        proc = subprocess.run(
            ["bash", str(SLURM_ENTRYPOINT)],
            env=slurm_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr

    slurm_init()
    host_pub = (state / "ssh" / "ssh_host_ed25519_key.pub").read_text().split()[:2]
    client = (state / "ssh" / "id_ed25519").read_bytes()
    assert (state / "munge" / "munge.key").stat().st_size == 1024
    assert stat.S_IMODE((state / "munge").stat().st_mode) == 0o700
    assert (state / "authorized_keys" / user).read_text() == (
        state / "ssh" / "id_ed25519.pub"
    ).read_text()
    assert (airflow_ssh / "id_ed25519").read_bytes() == client
    assert stat.S_IMODE((airflow_ssh / "id_ed25519").stat().st_mode) == 0o600
    assert (airflow_ssh / "known_hosts").read_text() == f"[slurmctld]:22022 {' '.join(host_pub)}\n"
    assert (state / "scratch").is_dir()
    slurm_init()  # a second start keeps every key
    assert (state / "ssh" / "ssh_host_ed25519_key.pub").read_text().split()[:2] == host_pub
    assert (state / "ssh" / "id_ed25519").read_bytes() == client

    calls = tmp_path / "calls.jsonl"
    _stub_airflow(tmp_path / "bin", calls)
    python_dir = str(Path(sys.executable).parent)  # `python` with cryptography
    airflow_env = {
        **base_env,
        "PATH": f"{tmp_path / 'bin'}:{python_dir}:{base_env['PATH']}",
        "SLURM_RAY_AIRFLOW_STATE": str(airflow_state),
        "SLURM_RAY_AIRFLOW_SSH_DIR": str(airflow_ssh),
        "AIRFLOW_CONFIG": str(airflow_state / "airflow.cfg"),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(airflow_state / "passwords.json"),
        "SLURM_RAY_LOGIN_HOST": "slurmctld",
        "SLURM_RAY_LOGIN_PORT": "22022",
        "SLURM_RAY_LOGIN_USER": "slurmray",
    }

    def airflow_init() -> list[list[str]]:
        calls.write_text("")
        proc = subprocess.run(
            ["bash", str(AIRFLOW_ENTRYPOINT), "init"],
            env=airflow_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        return [json.loads(line) for line in calls.read_text().splitlines()]

    called = airflow_init()
    argvs = [call["argv"] for call in called]
    assert argvs[0] == ["db", "migrate"]
    assert argvs[-1][:4] == ["connections", "add", "slurm_dev", "--conn-json"]
    conn = json.loads(argvs[-1][4])
    assert conn == {
        "conn_type": "ssh",
        "host": "slurmctld",
        "port": 22022,
        "login": "slurmray",
        "extra": {
            "key_file": f"{airflow_ssh}/id_ed25519",
            "host_key": " ".join(host_pub),
            "conn_timeout": 10,
        },
    }
    config = airflow_state / "airflow.cfg"
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert {call["config"] for call in called} == {str(config)}
    secrets = config.read_text()
    # Airflow itself reads the generated secrets from that file.
    read_back = subprocess.run(
        [
            sys.executable,
            "-c",
            "from airflow.configuration import conf; "
            "print(conf.get('api_auth', 'jwt_secret')); print(conf.get('core', 'fernet_key')); "
            "print(conf.get('api', 'secret_key'))",
        ],
        env={**base_env, "AIRFLOW_CONFIG": str(config), "AIRFLOW_HOME": str(tmp_path / "home")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert read_back.returncode == 0, read_back.stderr
    jwt, fernet, secret_key = read_back.stdout.split()
    assert f"jwt_secret = {jwt}\n" in secrets and len(jwt) == 64
    assert f"fernet_key = {fernet}\n" in secrets
    assert f"secret_key = {secret_key}\n" in secrets and secret_key != jwt
    passwords = json.loads((airflow_state / "passwords.json").read_text())
    assert set(passwords) == {"admin"} and len(passwords["admin"]) >= 16
    airflow_init()  # a second run keeps the secrets and the password
    assert config.read_text() == secrets
    assert json.loads((airflow_state / "passwords.json").read_text()) == passwords


def test_airflow_entrypoint_passes_other_commands_to_airflow(tmp_path: Path) -> None:
    calls = tmp_path / "calls.jsonl"
    _stub_airflow(tmp_path / "bin", calls)
    env = {
        "PATH": f"{tmp_path / 'bin'}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "AIRFLOW_CONFIG": "/opt/airflow/state/airflow.cfg",
    }
    proc = subprocess.run(
        ["bash", str(AIRFLOW_ENTRYPOINT), "scheduler", "--help"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(calls.read_text()) == {
        "argv": ["scheduler", "--help"],
        "config": "/opt/airflow/state/airflow.cfg",
    }
