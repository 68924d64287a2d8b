"""kru_client installs and runs on its own: ``pip install ./kru_client`` into a bare venv gives
httpx and pydantic and nothing of the server (no torch, no app, no worker), and that venv's
Python runs the README's five-line walk-through against the real API and worker."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from api_server import REPO, copy_sequence, running_api
from packaging.requirements import Requirement

pytestmark = pytest.mark.slow

CLIENT = REPO / "kru_client"
READMES_INPUT = copy_sequence([3, 1, 4, 1, 5, 2, 6, 5, 3, 5], 10)


def readme_python() -> str:
    """The README's Python walk-through (its one ``python`` block)."""
    text = (REPO / "README.md").read_text()
    (block,) = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    return block


def _pins(requirements: list[str]) -> dict[str, str]:
    return {(r := Requirement(line)).name: str(r.specifier) for line in requirements}


def test_the_client_pins_are_the_servers() -> None:
    root = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    server = _pins(root["dependencies"] + root["optional-dependencies"]["client"])
    client = tomllib.loads((CLIENT / "pyproject.toml").read_text())["project"]["dependencies"]
    for name, pin in _pins(client).items():
        assert server.get(name) == pin, (
            f"{name}: the client pins {pin}, the server {server.get(name)}"
        )


@pytest.fixture(scope="module")
def client_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Python of a venv made by ``pip install ./kru_client`` alone, kept per source state."""
    digest = hashlib.sha256()
    for path in sorted(CLIENT.glob("*.*")):
        if path.is_file():
            digest.update(path.name.encode() + path.read_bytes())
    venv = REPO / ".kru" / f"client-venv-{digest.hexdigest()[:16]}"
    if not (venv / ".complete").exists():
        for old in (REPO / ".kru").glob("client-venv-*"):
            shutil.rmtree(old, ignore_errors=True)
        source = tmp_path_factory.mktemp("client-src") / "kru_client"
        shutil.copytree(CLIENT, source, ignore=shutil.ignore_patterns("__pycache__", "build"))
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [venv / "bin" / "pip", "install", "-q", str(source)]
        subprocess.run(pip, cwd=source.parent, check=True)
        (venv / ".complete").touch()
    return venv / "bin" / "python"


def test_the_client_alone_takes_a_job_to_a_prediction(
    client_python: Path, sqlite_env: Any, worker_process: Any, tmp_path: Path
) -> None:
    server = ("torch", "app", "worker", "kru_core", "fastapi", "celery")
    absent = f"import importlib.util as u; print([m for m in {server!r} if u.find_spec(m)])"
    probe = subprocess.run(
        [client_python, "-c", absent], capture_output=True, text=True, cwd=tmp_path
    )
    assert probe.stdout.strip() == "[]", probe.stdout + probe.stderr

    worker_process(sqlite_env)
    with running_api(sqlite_env.settings, tmp_path / "api.log") as api:
        script = readme_python().replace("http://127.0.0.1:8000", api.base_url)
        script = script.replace('"steps": 500', '"steps": 30')  # the README's job, shortened
        run = subprocess.run(
            [client_python, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=180
        )
        assert run.returncode == 0, run.stderr
        predictions = json.loads(run.stdout)  # the README prints the predictions
        assert len(predictions) == 1 and len(predictions[0]) == len(READMES_INPUT)
