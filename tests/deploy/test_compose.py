"""The docker-compose deployment and the images it runs, checked without a Docker engine.

Structure as written (PyYAML, BuildKit's Dockerfile parser) and as Docker Compose itself resolves
it (``docker-compose config``: schema validation, interpolation of ``.env``, override merging).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tomllib

import dockerfile
import pytest

from worker.settings import Settings

from .specs import (
    COMPOSE,
    COMPOSE_CPU,
    COMPOSE_FLOWER,
    COMPOSE_SHARED,
    DOCKERFILE,
    ENV_EXAMPLE,
    GPU_ENTRYPOINT,
    REPO,
    TEST_SECRETS,
    ComposeTag,
    compose_config,
    compose_project,
    container_command,
    dockerfile_stages,
    image_setting,
    load_yaml,
    resolved_compose,
    stage_chain,
)

# The commands the containers run, and the ones tests/deploy/test_topology.py starts.
API_COMMAND = ["kru", "api", "--host", "0.0.0.0", "--port", "8000"]
WORKER_COMMAND = ["kru", "worker"]
DATA_DIR = "/data"
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|API_KEYS")
PINNED_TAG = re.compile(r"^[a-z0-9./-]+:\d+\.\d+(\.\d+)?(-[a-z0-9.]+)*$")
INTERPOLATION = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)")
ALL_FILES = (COMPOSE, COMPOSE_CPU, COMPOSE_SHARED, COMPOSE_FLOWER)


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_yaml(COMPOSE)


@pytest.fixture(scope="module")
def services(compose: dict) -> dict:
    return compose["services"]


def _seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)([hms])", duration))


# --- services, healthchecks, order --------------------------------------------------------------


def test_services(services: dict) -> None:
    assert set(services) == {"redis", "postgres", "migrate", "api", "worker"}


def test_the_schema_is_upgraded_once_before_the_api_and_workers_start(services: dict) -> None:
    migrate = services["migrate"]
    assert migrate["command"] == ["kru", "db", "upgrade"]
    assert migrate["restart"] == "no", "a one-shot service"
    assert migrate["image"] == services["api"]["image"], "the schema of the code that runs"
    assert migrate["environment"] == services["api"]["environment"], "the same database"
    assert migrate["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    for name in ("api", "worker"):
        condition = services[name]["depends_on"]["migrate"]["condition"]
        assert condition == "service_completed_successfully", name


def test_redis_keeps_queued_jobs(services: dict) -> None:
    redis = services["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command, "queued jobs must survive a Redis restart"
    assert "--maxmemory-policy noeviction" in command, "Redis must never evict queued messages"
    assert "--requirepass" in command
    assert any(v.endswith(":/data") for v in redis["volumes"]), "the AOF must be on a volume"
    assert "ping" in " ".join(redis["healthcheck"]["test"])


def test_postgres_has_a_volume_and_a_healthcheck(services: dict) -> None:
    postgres = services["postgres"]
    assert "postgres-data:/var/lib/postgresql/data" in postgres["volumes"]
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])


def test_api_publishes_8000_and_checks_readyz(services: dict) -> None:
    api = services["api"]
    assert [p.rsplit(":", 1)[-1] for p in api["ports"]] == ["8000"]
    probe = " ".join(api["healthcheck"]["test"])
    assert "http://127.0.0.1:8000/readyz" in probe


@pytest.mark.parametrize(
    ("service", "needs"),
    [("api", {"redis", "postgres"}), ("worker", {"redis", "postgres", "api"})],
)
def test_starts_after_its_dependencies_are_healthy(
    services: dict, service: str, needs: set[str]
) -> None:
    depends_on = {k: v for k, v in services[service]["depends_on"].items() if k != "migrate"}
    assert set(depends_on) == needs
    for name, spec in depends_on.items():
        assert spec["condition"] == "service_healthy", f"{service} -> {name}"
        assert services[name].get("healthcheck"), f"{name} needs a healthcheck to be waited for"


def test_kru_processes_get_signals_and_time_to_stop(services: dict) -> None:
    for name in ("api", "worker"):
        assert services[name]["init"] is True, f"{name}: an init forwards SIGTERM and reaps"
        assert services[name]["restart"] == "unless-stopped"
    assert _seconds(services["api"]["stop_grace_period"]) >= 10
    assert _seconds(services["worker"]["stop_grace_period"]) >= 60, "time to checkpoint"


# --- GPU workers, scaling, shared volume --------------------------------------------------------


def test_worker_reserves_gpus_and_scales(services: dict) -> None:
    worker = services["worker"]
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia"
    assert "gpu" in device["capabilities"]
    # Every GPU of the node: the entrypoint gives each replica one of its own (count: 1 would
    # give every replica the same GPU).
    assert device["count"] == "all"
    for key in ("container_name", "hostname", "ports"):
        assert key not in worker, f"worker.{key} prevents `--scale worker=N`"
    assert "kru-gpu-locks:/run/kru-gpus" in worker["volumes"]
    assert "deploy" not in services["api"], "the API predicts on CPU and reserves no GPU"


def test_api_and_workers_share_the_data_volume_at_the_same_path(
    compose: dict, services: dict
) -> None:
    mounts = {name: services[name]["volumes"] for name in ("api", "worker")}
    assert f"kru-data:{DATA_DIR}" in mounts["api"]
    assert f"kru-data:{DATA_DIR}" in mounts["worker"]
    assert "kru-data" in compose["volumes"]
    for name in ("api", "worker"):
        assert services[name]["environment"]["KRU_DATA_DIR"] == DATA_DIR


def test_api_and_workers_have_one_environment(services: dict) -> None:
    # Same mapping (one YAML anchor): the visibility timeout, queue and limits cannot drift.
    assert services["api"]["environment"] == services["worker"]["environment"]


def test_every_setting_is_passed_from_env(services: dict) -> None:
    passed = set(services["api"]["environment"])
    settings = {f"KRU_{name.upper()}" for name in Settings.model_fields}
    assert passed == settings, "compose must pass exactly the KRU_ settings of worker/settings.py"


# --- secrets ------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ALL_FILES, ids=lambda p: p.name)
def test_no_secret_is_written_down(path) -> None:
    text = path.read_text()
    for match in re.finditer(r"\$\{([A-Za-z0-9_]+)(:?[-?])?", text):
        name, operator = match.groups()
        if SECRET_NAME.search(name):
            assert operator == ":?", f"{name} must be required (${{{name}:?...}}), never defaulted"
    for match in re.finditer(r"://[^:/@\s]*:([^@\s]+)@", text):
        assert match.group(1).startswith("${"), f"a password in a URL: {match.group(0)}"
    for service in load_yaml(path).get("services", {}).values():
        for key, value in (service.get("environment") or {}).items():
            if SECRET_NAME.search(key):
                assert re.fullmatch(rf"\$\{{{key}:\?[^}}]+\}}", str(value)), key


def test_api_keys_are_required(services: dict) -> None:
    value = services["api"]["environment"]["KRU_API_KEYS"]
    assert value == "${KRU_API_KEYS:?set KRU_API_KEYS in .env}"


# --- images: Dockerfile targets, user, commands -------------------------------------------------


def test_compose_builds_the_dockerfile_targets(services: dict) -> None:
    stages = dockerfile_stages()
    for name in ("api", "worker"):
        build = services[name]["build"]
        assert build["dockerfile"] == "docker/Dockerfile"
        assert build["context"] == "."
        assert build["target"] == name
        assert name in stages


def test_container_commands_are_the_kru_commands() -> None:
    assert container_command("api") == API_COMMAND
    assert container_command("worker") == WORKER_COMMAND
    assert image_setting("api", "ENTRYPOINT") is None
    entrypoint = image_setting("worker", "ENTRYPOINT")
    assert entrypoint.json and list(entrypoint.value) == ["/usr/local/bin/kru-gpu-entrypoint"]


def test_services_do_not_override_the_image_commands(services: dict) -> None:
    for name in ("api", "worker"):
        assert "command" not in services[name] and "entrypoint" not in services[name]


def test_the_worker_entrypoint_is_in_the_image_and_executable() -> None:
    copies = [
        i.value for stage in stage_chain("worker") for i in stage.instructions if i.cmd == "COPY"
    ]
    assert ("docker/gpu-entrypoint.sh", "/usr/local/bin/kru-gpu-entrypoint") in copies
    assert os.access(GPU_ENTRYPOINT, os.X_OK)
    mode = subprocess.run(
        ["git", "ls-files", "-s", str(GPU_ENTRYPOINT.relative_to(REPO))],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    if mode:  # tracked: git must keep the executable bit that COPY preserves
        assert mode[0] == "100755"


@pytest.mark.parametrize("target", ["api", "worker"])
def test_images_run_as_a_non_root_user(target: str) -> None:
    user = image_setting(target, "USER")
    assert user is not None, f"{target} runs as root"
    name = user.value[0].split(":")[0]
    assert name not in ("root", "0")


def test_cuda_images_have_the_c_compiler_triton_needs() -> None:
    """Triton compiles its CUDA launcher with gcc on first use: the runtime stage installs gcc
    (and libc headers) for CUDA variants only, as root, before switching to the kru user."""
    runtime = dockerfile_stages()["runtime"].instructions
    runs = [i for i in runtime if i.cmd == "RUN" and "gcc" in i.value[0]]
    assert len(runs) == 1, "one RUN in the runtime stage installs gcc"
    command = runs[0].value[0]
    assert '"${TORCH_VARIANT}" != "cpu"' in command and "libc6-dev" in command
    assert runtime.index(runs[0]) < runtime.index(next(i for i in runtime if i.cmd == "USER"))


def test_base_images_are_pinned(services: dict) -> None:
    stages = dockerfile_stages()
    args = {
        i.value[0].split("=", 1)[0]: i.value[0].split("=", 1)[1]
        for i in dockerfile.parse_file(str(DOCKERFILE))
        if i.cmd == "ARG" and "=" in i.value[0]
    }
    for stage in stages.values():
        base = stage.base
        if base in stages:
            continue
        base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
        assert PINNED_TAG.match(base), f"FROM {stage.base} -> {base}: pin a full version tag"
    for name in ("redis", "postgres"):
        assert PINNED_TAG.match(services[name]["image"]), services[name]["image"]


def test_torch_variant_selects_the_pytorch_index(services: dict) -> None:
    build = dockerfile_stages()["build"]
    args = dict(i.value[0].split("=", 1) for i in build.instructions if i.cmd == "ARG")
    assert args["TORCH_VARIANT"] == "cpu"
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/${TORCH_VARIANT}"
    assert services["worker"]["build"]["args"]["TORCH_VARIANT"] == "${TORCH_VARIANT:-cu130}"
    override = load_yaml(COMPOSE_CPU)["services"]
    for name in ("api", "worker"):
        assert override[name]["build"]["args"]["TORCH_VARIANT"] == "cpu"


def test_the_image_installs_the_pinned_dependencies(tmp_path) -> None:
    """Run the Dockerfile's own split of pyproject's pins: torch alone, then the rest."""
    run = next(
        i.value[0]
        for i in dockerfile_stages()["build"].instructions
        if i.cmd == "RUN" and "tomllib" in i.value[0]
    )
    program = shlex.split(run.split("&&")[0])[2]
    (tmp_path / "pyproject.toml").write_bytes((REPO / "pyproject.toml").read_bytes())
    fake_tmp = tmp_path / "out"
    fake_tmp.mkdir()
    program = program.replace("/tmp/", f"{fake_tmp}/")
    subprocess.run([sys.executable, "-c", program], cwd=tmp_path, check=True)
    torch = (fake_tmp / "torch.txt").read_text().split()
    rest = (fake_tmp / "rest.txt").read_text().split()
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert len(torch) == 1 and torch[0].startswith("torch==")
    assert sorted(torch + rest) == sorted(deps)
    assert all("==" in d for d in deps), "every runtime dependency is pinned"


def _lock() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_the_lock_agrees_with_pyproject_and_is_used_everywhere() -> None:
    """requirements.lock holds every runtime pin of pyproject.toml at the same version, and the
    image and scripts/setup install through it (regenerate it with scripts/lock)."""
    lock = _lock()
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        name, version = dep.split(";")[0].strip().split("==")
        key = re.sub(r"[-_.]+", "-", name.split("[")[0]).lower()
        assert lock.get(key) == version, f"{dep}: the lock has {lock.get(key)!r} (scripts/lock)"
    run = next(
        i.value[0]
        for i in dockerfile_stages()["build"].instructions
        if i.cmd == "RUN" and "tomllib" in i.value[0]
    )
    installs = [part for part in run.split("&&") if "pip install" in part]
    assert installs and all("-c requirements.lock" in part for part in installs)
    assert "-c requirements.lock" in (REPO / "scripts" / "setup").read_text()


def test_the_build_context_leaves_secrets_and_local_state_out() -> None:
    lines = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "allow-list: only what the image needs enters the context"
    assert "**/.env" in lines
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = {
        i.value[0]
        for stage in dockerfile_stages().values()
        for i in stage.instructions
        if i.cmd == "COPY" and not any(f.startswith("--from") for f in i.flags)
    }
    assert copied <= allowed, f"COPY sources missing from .dockerignore: {copied - allowed}"


# --- .env.example -------------------------------------------------------------------------------


def _env_example_names() -> set[str]:
    names = set()
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = re.match(r"^\s*#?\s*([A-Z][A-Z0-9_]*)=", line)
        if match:
            names.add(match.group(1))
    return names


def test_env_example_lists_every_variable_compose_reads(services: dict) -> None:
    read = set(services["api"]["environment"]) - {"KRU_DATA_DIR"}
    for path in ALL_FILES:
        read |= set(INTERPOLATION.findall(path.read_text()))
    missing = read - _env_example_names()
    assert not missing, f".env.example does not list {sorted(missing)}"


# --- Docker Compose itself ----------------------------------------------------------------------

FILE_SETS = {
    "gpu": (COMPOSE,),
    "cpu": (COMPOSE, COMPOSE_CPU),
    "gpu-shared": (COMPOSE, COMPOSE_SHARED),
    "cpu-shared": (COMPOSE, COMPOSE_CPU, COMPOSE_SHARED),
}


@pytest.mark.parametrize("files", FILE_SETS.values(), ids=FILE_SETS.keys())
def test_docker_compose_validates(tmp_path, files) -> None:
    config = resolved_compose(compose_project(tmp_path, TEST_SECRETS), *files)
    services = config["services"]
    assert services["api"]["environment"] == services["worker"]["environment"]
    env = services["worker"]["environment"]
    assert env["KRU_API_KEYS"] == TEST_SECRETS["KRU_API_KEYS"]
    assert env["KRU_DATABASE_URL"] == (
        "postgresql+psycopg://kru:test-postgres-password@postgres:5432/kru"
    )
    assert env["KRU_BROKER_URL"] == "redis://:test-redis-password@redis:6379/0"
    Settings(**{k[4:].lower(): v for k, v in env.items() if v is not None})  # valid settings
    devices = services["worker"].get("deploy", {}).get("resources", {}).get("reservations", {})
    gpus = devices.get("devices", [])
    if COMPOSE_CPU in files:
        assert gpus == []
        for name in ("api", "worker"):
            assert services[name]["build"]["args"]["TORCH_VARIANT"] == "cpu"
            assert services[name]["image"].endswith("-cpu")
    else:
        assert [(d["driver"], d["count"]) for d in gpus] == [("nvidia", -1)]
    if COMPOSE_SHARED in files:
        volume = config["volumes"]["kru-data"]
        assert volume["driver_opts"] == {"type": "none", "o": "bind", "device": "/srv/kru-shared"}
        for name, port in (("redis", "6379"), ("postgres", "5432")):
            (published,) = services[name]["ports"]
            assert (published["host_ip"], published["published"]) == ("127.0.0.1", port)
    else:
        assert "ports" not in services["redis"] and "ports" not in services["postgres"]


def _flower_config(project) -> subprocess.CompletedProcess[str]:
    return compose_config(project, COMPOSE, COMPOSE_FLOWER, profiles=("flower",))


def test_flower_is_an_optional_profile_behind_basic_auth(tmp_path) -> None:
    flower = load_yaml(COMPOSE_FLOWER)["services"]["flower"]
    assert flower["profiles"] == ["flower"]
    assert PINNED_TAG.match(flower["image"]), flower["image"]
    assert "flower" not in load_yaml(COMPOSE)["services"]
    # Without FLOWER_PASSWORD: refused with the file, and the deployment does not need it.
    project = compose_project(tmp_path, TEST_SECRETS)
    refused = _flower_config(project)
    assert refused.returncode != 0 and "set FLOWER_PASSWORD in .env" in refused.stderr
    (project / ".env").write_text(
        "".join(f"{k}={v}\n" for k, v in {**TEST_SECRETS, "FLOWER_PASSWORD": "pw"}.items())
    )
    resolved = _flower_config(project)
    assert resolved.returncode == 0, resolved.stderr
    services = json.loads(resolved.stdout)["services"]
    env = services["flower"]["environment"]
    assert env["FLOWER_BASIC_AUTH"] == "admin:pw"
    assert env["CELERY_BROKER_URL"] == services["worker"]["environment"]["KRU_BROKER_URL"]
    (port,) = services["flower"]["ports"]
    assert (port["host_ip"], port["published"], port["target"]) == ("127.0.0.1", "5555", 5555)
    assert services["flower"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "flower" not in resolved_compose(project, COMPOSE)["services"]


@pytest.mark.parametrize("secret", ["KRU_API_KEYS", "POSTGRES_PASSWORD", "REDIS_PASSWORD"])
def test_docker_compose_refuses_to_start_without_a_secret(tmp_path, secret: str) -> None:
    env = {k: v for k, v in TEST_SECRETS.items() if k != secret}
    result = compose_config(compose_project(tmp_path, env), COMPOSE)
    assert result.returncode != 0
    assert f"set {secret} in .env" in result.stderr


def test_env_example_is_a_working_env(tmp_path) -> None:
    """``cp .env.example .env``, fill in the secrets: the deployment resolves to its services."""
    example = ENV_EXAMPLE.read_text()
    project = compose_project(tmp_path, {})
    (project / ".env").write_text(
        example + "\n" + "".join(f"{k}={v}\n" for k, v in TEST_SECRETS.items())
    )
    config = resolved_compose(project, COMPOSE)
    env = config["services"]["worker"]["environment"]
    assert env["KRU_DATABASE_URL"].startswith("postgresql+psycopg://kru:"), (
        ".env.example must leave KRU_DATABASE_URL empty: compose points it at its PostgreSQL"
    )
    assert env["KRU_BROKER_URL"].startswith("redis://"), (
        ".env.example must leave KRU_BROKER_URL empty: compose points it at its Redis"
    )


def test_override_files_use_compose_tags(tmp_path) -> None:
    devices = load_yaml(COMPOSE_CPU)["services"]["worker"]["deploy"]["resources"]["reservations"]
    assert isinstance(devices["devices"], ComposeTag) and devices["devices"].tag == "!reset"
