"""The service processes run from a production install: a virtualenv made by ``pip install .``
with the lock as constraints and no extras, exactly as docker/Dockerfile installs the project.

A test dependency can hide a missing runtime one (kombu's Redis transport imports ``packaging``,
which only pytest brought in: every worker died at start on Redis while the suite passed). So
``kru api`` and ``kru worker`` from that virtualenv take a job through to a prediction on Redis
and PostgreSQL, and ``kru serve`` does the same on the embedded default.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from testkit import copy_job

from .processes import (
    Process,
    clean_env,
    free_port,
    kru_argv,
    redis_and_postgres,
    started,
    started_api,
    wait_ready,
    wait_until,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
#: What the image's build context holds (.dockerignore), copied so the build leaves no trace here.
SOURCES = ("pyproject.toml", "requirements.lock", "README.md", "kru_core", "worker", "app")
DELAY = 5


def _sources_digest() -> str:
    digest = hashlib.sha256()
    for name in SOURCES:
        root = REPO / name
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            if "__pycache__" in path.parts:
                continue
            digest.update(str(path.relative_to(REPO)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


@pytest.fixture(scope="module")
def production_kru(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``kru`` of a fresh ``pip install -c requirements.lock .`` (no extras), built once per
    state of the sources and kept under ``.kru/prod-venv-<digest>`` (gitignored)."""
    venv = REPO / ".kru" / f"prod-venv-{_sources_digest()}"
    kru = venv / "bin" / "kru"
    if not (venv / ".complete").exists():
        for old in (REPO / ".kru").glob("prod-venv-*"):
            shutil.rmtree(old, ignore_errors=True)
        context = tmp_path_factory.mktemp("build-context")
        for name in SOURCES:
            src = REPO / name
            if src.is_dir():
                shutil.copytree(src, context / name, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(src, context / name)
        # Built where it will live (a venv's scripts name their interpreter by absolute path);
        # the marker says the install finished.
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [venv / "bin" / "pip", "install", "-q", "-c", "requirements.lock", "."],
            cwd=context,
            check=True,
        )
        (venv / ".complete").touch()
    python = venv / "bin" / "python"
    # No test extra crept in: the runtime set stands alone.
    for module in ("pytest", "httpx", "hypothesis"):
        probe = subprocess.run([python, "-c", f"import {module}"], capture_output=True)
        assert probe.returncode != 0, f"{module} is importable in the production install"
    return kru


def _job(client: httpx.Client, name: str) -> dict:
    body = copy_job(name, steps=40, delay=DELAY, eval_size=32, eval_every=20)
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    return response.json()


def _succeeds_and_predicts(client: httpx.Client, job_id: str, *processes: Process) -> None:
    def logs() -> str:
        return "\n".join(f"--- {p.name}\n{p.output()[-4000:]}" for p in processes)

    def finished() -> dict | None:
        for process in processes:
            if process.proc.poll() is not None:
                pytest.fail(f"{process.name} exited with {process.proc.returncode}\n{logs()}")
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("failed", "cancelled"):
            pytest.fail(f"job {job['status']}: {job.get('error')}\n{logs()}")
        return job if job["status"] == "succeeded" else None

    job = wait_until(finished, timeout=240, what=f"job {job_id} to succeed")
    sequence = [3, 1, 4, 1, 5, 2, 6, 5, 3, 5] + [0] * (DELAY - 1) + [9] + [0] * 10
    predicted = client.post(f"/v1/models/{job['model_id']}/predict", json={"inputs": [sequence]})
    assert predicted.status_code == 200, predicted.text
    assert len(predicted.json()["predictions"][0]) == len(sequence)


def test_api_and_worker_from_the_production_install_on_redis_and_postgres(
    production_kru: Path, tmp_path: Path
) -> None:
    logs = tmp_path / "logs"
    with redis_and_postgres(
        tmp_path, tmp_path / "data", KRU_PROGRESS_INTERVAL="0.2", OMP_NUM_THREADS="1"
    ) as env:
        # As compose's one-shot migrate service does, from the installed package's migrations.
        migrate = subprocess.run(
            [str(production_kru), "db", "upgrade"], env=env, capture_output=True, text=True
        )
        assert migrate.returncode == 0, migrate.stderr
        assert migrate.stdout.startswith("schema upgraded: empty -> "), migrate.stdout
        worker_argv = kru_argv("worker", kru=production_kru)
        with (
            started_api(env, cwd=tmp_path, logs=logs, kru=production_kru) as (api, base_url),
            started("worker", worker_argv, env=env, cwd=tmp_path, logs=logs) as worker,
        ):
            with httpx.Client(base_url=base_url, timeout=30) as client:
                job = _job(client, "production-redis")
                _succeeds_and_predicts(client, job["id"], worker, api)
            assert "ModuleNotFoundError" not in worker.output()


def test_serve_from_the_production_install(production_kru: Path, tmp_path: Path) -> None:
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    env = clean_env(KRU_DATA_DIR=str(tmp_path / "data"), OMP_NUM_THREADS="1")
    env.pop("VIRTUAL_ENV", None)
    env["PATH"] = os.pathsep.join([str(production_kru.parent), env.get("PATH", "")])
    argv = [str(production_kru), "serve", "--host", "127.0.0.1", "--port", str(port)]
    with started("serve", argv, env=env, cwd=tmp_path, logs=tmp_path / "logs") as serve:
        wait_ready(serve, base_url)
        with httpx.Client(base_url=base_url, timeout=30) as client:
            job = _job(client, "production-serve")
            _succeeds_and_predicts(client, job["id"], serve)
        assert "ModuleNotFoundError" not in serve.output()
