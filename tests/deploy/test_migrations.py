"""Schema migrations (worker/migrations, ``kru db``) on SQLite and on PostgreSQL.

* The migrations make exactly the schema of worker/models.py (Alembic's autogenerate compare
  finds no difference), so a model change without its migration fails here.
* A database made by the previous release's code (commit 120f745, before migrations: its
  ``create_all``) and filled through that code is recognised as 0001, upgraded by
  ``kru db upgrade``, and every row is found, also through the new code's service functions.
* ``kru api`` and ``kru worker`` refuse an older schema with a message naming ``kru db upgrade``;
  ``kru serve`` upgrades by itself.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import textwrap
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, select

from worker import schema, service
from worker.db import Store
from worker.models import Base
from worker.settings import Settings

from .processes import (
    KRU,
    clean_env,
    free_port,
    fresh_postgres_database,
    started,
    wait_ready,
)

REPO = Path(__file__).resolve().parents[2]
#: The last release before migrations: its worker/models.py is revision 0001.
PREVIOUS_RELEASE = "120f745"

#: Run by the previous release's code (cwd and sys.path: its tree): create the tables with its
#: create_all and write rows of every kind through its functions; print every row as JSON.
FILL_WITH_OLD_CODE = textwrap.dedent(
    """
    import json, sys
    from datetime import datetime, timedelta
    from sqlalchemy import select
    from kru_core.config import JobConfig
    from worker import jobs
    from worker.db import Store
    from worker.models import Base, Dataset, Model, utcnow
    from pathlib import Path
    assert Path(jobs.__file__).resolve().is_relative_to(Path.cwd().resolve()), jobs.__file__

    store = Store(sys.argv[1])
    store.create_all()
    config = JobConfig.from_dict(
        {"task": {"kind": "copy", "delay": 5}, "train": {"steps": 10}}
    ).to_dict()
    done, waiting = "a" * 32, "b" * 32
    jobs.create(store, job_id=done, name="finished", config=config)
    claim = jobs.claim(
        store, done, worker="w@old", max_attempts=3, stale_before=utcnow() - timedelta(60)
    )
    for step, phase in ((5, "train"), (10, "eval")):
        jobs.report_progress(
            store, claim, step=step, total_steps=10, metrics={"loss": 1.0 / step},
            phase=phase, point={"loss": 1.0 / step}, event={"step": step},
        )
    model = Model(
        id="m" * 32, job_id=done, name="finished", config=config, task={"kind": "copy"},
        metrics={"eval_accuracy": 0.5}, parameter_counts={"total": 10},
        checkpoint=f"jobs/{done}/step-000000010", created_at=utcnow(),
    )
    assert jobs.finish(store, claim, "succeeded", model=model, step=10, metrics={"loss": 0.1})
    jobs.create(store, job_id=waiting, name="queued", config=config)
    with store.writing() as db:
        db.add(Dataset(
            id="d" * 32, filename="data.jsonl", kind="jsonl", size_bytes=3, sha256="0" * 64,
            summary={"examples": 1}, created_at=utcnow(),
        ))

    def plain(value):
        return value.isoformat() if isinstance(value, datetime) else value

    with store.reading() as db:
        print(json.dumps({
            t.name: [{k: plain(v) for k, v in r.items()} for r in db.execute(
                select(t).order_by(*t.primary_key.columns)).mappings()]
            for t in Base.metadata.sorted_tables
        }))
    """
)


def _plain(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database: a SQLite file, or a fresh database on the shared PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'kru.db'}"
        return
    with fresh_postgres_database() as url:
        yield url


@pytest.fixture(scope="module")
def previous_release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The previous release's code (worker, kru_core) from git, unpacked in a temp dir."""
    root = tmp_path_factory.mktemp("previous-release")
    archive = root / "code.tar"
    subprocess.run(
        ["git", "archive", "-o", str(archive), PREVIOUS_RELEASE, "worker", "kru_core"],
        cwd=REPO,
        check=True,
    )
    with tarfile.open(archive) as tar:
        tar.extractall(root / "code", filter="data")
    return root / "code"


def _kru(*args: str, url: str, data_dir: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = clean_env(KRU_DATABASE_URL=url, KRU_DATA_DIR=str(data_dir))
    proc = subprocess.run(
        [str(KRU), *args], env=env, cwd=data_dir.parent, capture_output=True, text=True, timeout=120
    )
    if check:
        assert proc.returncode == 0, f"kru {' '.join(args)}: {proc.returncode}\n{proc.stderr}"
    return proc


def test_migrations_make_the_models_schema(database_url: str) -> None:
    store = Store(database_url)
    try:
        before, after = schema.upgrade(store)
        assert before.empty and after.revision == schema.head() == schema.revisions()[-1]
        assert schema.revisions()[0] == schema.FIRST_REVISION
        with store.engine.connect() as conn:
            differences = compare_metadata(
                MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata
            )
        assert differences == [], "worker/models.py and the migrations disagree: add a migration"
        # Idempotent, and the check of kru api / kru worker passes.
        assert schema.upgrade(store)[0].up_to_date
        assert schema.prepare(store, upgrade_schema=False).up_to_date
    finally:
        store.dispose()


def test_a_database_of_the_previous_release_is_upgraded_and_every_row_kept(
    database_url: str, previous_release: Path, tmp_path: Path
) -> None:
    filled = subprocess.run(
        [sys.executable, "-c", FILL_WITH_OLD_CODE, database_url],
        cwd=previous_release,
        env=clean_env(PYTHONPATH=str(previous_release)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert filled.returncode == 0, filled.stderr
    old_rows: dict[str, list[dict[str, Any]]] = json.loads(filled.stdout)
    assert {t: len(r) for t, r in old_rows.items()} == {
        "datasets": 1, "jobs": 2, "job_events": 6, "metric_points": 2, "models": 1,
    }  # fmt: skip

    data_dir = tmp_path / "kru"
    current = _kru("db", "current", url=database_url, data_dir=data_dir).stdout
    assert current.startswith(f"{schema.FIRST_REVISION} (created before migrations")
    upgraded = _kru("db", "upgrade", url=database_url, data_dir=data_dir).stdout
    assert f"-> {schema.head()}" in upgraded and "stamped" in upgraded
    assert _kru("db", "current", "--check", url=database_url, data_dir=data_dir).stdout.strip() == (
        f"{schema.head()} (head)"
    )

    store = Store(database_url)
    try:
        assert "alembic_version" in inspect(store.engine).get_table_names()
        with store.reading() as db:
            for name, rows in old_rows.items():
                table = Base.metadata.tables[name]
                new = db.execute(select(table).order_by(*table.primary_key.columns)).mappings()
                assert [{k: _plain(r[k]) for k in rows[0]} for r in new] == rows, name
    finally:
        store.dispose()

    # The new code reads them: the finished job, its history and model, the queued job.
    service.init(Settings(data_dir=data_dir, database_url=database_url))
    try:
        job = service.get_job("a" * 32)
        assert (job.status, job.attempts, job.model_id) == ("succeeded", 1, "m" * 32)
        assert [p["step"] for p in service.job_metrics(job.id)] == [5, 10]
        assert len(service.job_events(job.id)) == 5
        assert service.get_model("m" * 32).name == "finished"
        assert service.get_dataset("d" * 32).filename == "data.jsonl"
        assert service.get_job("b" * 32).status == "queued"
    finally:
        service.shutdown()


def _older_revision(store: Store) -> str:
    revisions = schema.revisions()
    assert len(revisions) >= 2, "one migration only: no older schema to refuse"
    schema.upgrade(store, revisions[-2])
    return revisions[-2]


def test_api_and_worker_refuse_an_older_schema(database_url: str, tmp_path: Path) -> None:
    store = Store(database_url)
    try:
        older = _older_revision(store)
    finally:
        store.dispose()
    data_dir = tmp_path / "kru"
    for command in (["worker"], ["api", "--port", str(free_port())]):
        proc = _kru(*command, url=database_url, data_dir=data_dir, check=False)
        assert proc.returncode == 1, proc.stderr
        assert f"schema is at revision {older}, older than the code's" in proc.stderr
        assert "run `kru db upgrade`" in proc.stderr
    assert (
        "run `kru db upgrade`" in _kru("db", "current", url=database_url, data_dir=data_dir).stdout
    )
    assert (
        _kru(
            "db", "current", "--check", url=database_url, data_dir=data_dir, check=False
        ).returncode
        == 1
    )
    _kru("db", "upgrade", url=database_url, data_dir=data_dir)
    assert _kru("db", "current", "--check", url=database_url, data_dir=data_dir).returncode == 0


def test_serve_upgrades_by_itself(tmp_path: Path) -> None:
    data_dir = tmp_path / "kru"
    url = f"sqlite:///{data_dir / 'kru.db'}"
    store = Store(url)
    try:
        _older_revision(store)
    finally:
        store.dispose()
    port = free_port()
    env = clean_env(KRU_DATA_DIR=str(data_dir), KRU_LOG_LEVEL="INFO")
    argv = [str(KRU), "serve", "--port", str(port)]
    with started("serve", argv, env=env, cwd=tmp_path, logs=tmp_path / "logs") as serve:
        wait_ready(serve, f"http://127.0.0.1:{port}")
        assert httpx.get(f"http://127.0.0.1:{port}/v1/jobs", timeout=5).status_code == 200
    store = Store(url)
    try:
        assert schema.current(store).up_to_date
    finally:
        store.dispose()
