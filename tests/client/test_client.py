"""kru_client against the real service: a uvicorn API process and a real worker (SQLite).

One trained copy model serves every model call; each typed error is provoked for real; the
event stream is cut mid-way and resumed with Last-Event-ID; 32 concurrent async predictions; the
remote ``kru jobs``/``kru models`` commands as subprocesses; the schemas against the app's
OpenAPI.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from api_server import REPO, copy_sequence, running_api

import kru_client
from kru_client import AsyncClient, Client, JobSpec, ModelSpec, TaskSpec, TrainSpec

pytestmark = pytest.mark.slow

SPEC = JobSpec(
    name="client-copy",
    task=TaskSpec(kind="copy", delay=5, eval_size=64),
    model=ModelSpec(cell="kru", hidden_size=16),
    train=TrainSpec(steps=120, batch_size=16, lr=0.01, eval_every=40, device="cpu", seed=0),
)
INPUT = copy_sequence([3, 1, 4, 1, 5, 2, 6, 5, 3, 5], 5)


def kru(
    *argv: str, url: str, input: str | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run the ``kru`` CLI in a subprocess (``input``: its standard input)."""
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *argv],
        cwd=REPO,
        env={**os.environ, "KRU_URL": url, **env},
        input=input,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_client_against_the_service(sqlite_env: Any, worker_process: Any, tmp_path: Path) -> None:
    worker_process(sqlite_env)
    factory = "api_server:fast_sse_app"
    with running_api(sqlite_env.settings, tmp_path / "api.log", factory=factory) as api:
        client = Client(api.base_url, timeout=30)
        job = client.submit_job(SPEC)
        assert job.status == "queued" and job.name == "client-copy"
        assert job.config["train"]["steps"] == 120

        # a stream cut after three events, resumed with Last-Event-ID, against a whole stream
        stream = client.events(job.id)
        first = [next(stream) for _ in range(3)]
        stream.close()  # closes the HTTP response: the connection is gone
        rest = list(client.events(job.id, last_event_id=first[-1].id or 0))
        whole = list(client.events(job.id))
        resumed = [e.id for e in first + rest]
        assert resumed == [e.id for e in whole]
        ids = [i for i in resumed if i is not None]
        assert ids == sorted(set(ids)) and len(ids) >= 4
        assert rest[-1].event == "end" and rest[-1].job is not None
        assert {e.event for e in whole} >= {"status", "progress", "end"}

        done = client.wait(job.id, timeout=60)
        assert done.status == "succeeded" and done.model_id
        assert client.get_job(job.id).model_id == done.model_id
        assert [j.id for j in client.list_jobs()] == [job.id]
        assert [j.id for j in client.list_jobs(status="succeeded")] == [job.id]
        assert list(client.list_jobs(status="queued")) == []
        points = client.metrics(job.id)
        rows = client.metrics(job.id, rows=True)
        assert points and len(points) == len(rows) and isinstance(rows[0], dict)
        assert any(p.phase == "eval" for p in points)

        model = client.get_model(done.model_id)
        assert model.job_id == job.id and [m.id for m in client.list_models()] == [model.id]
        result = client.predict(model.id, [INPUT], probabilities=True)
        assert len(result.predictions[0]) == len(INPUT) and result.probabilities

        dataset = client.upload_dataset(b'{"input": [1, 2], "target": 1}\n' * 4, kind="jsonl")
        assert client.get_dataset(dataset.id).sha256 == dataset.sha256
        assert [d.id for d in client.list_datasets()] == [dataset.id]
        path = tmp_path / "corpus.txt"
        path.write_text("hello kru " * 20)
        assert client.upload_dataset(path).kind == "text"

        # every typed error, for real
        with pytest.raises(kru_client.NotFound) as caught:
            client.get_job("0" * 32)
        assert caught.value.status == 404 and caught.value.detail
        with pytest.raises(kru_client.InvalidInput) as invalid:
            client.submit_job({"train": {"lr": -1}})
        assert invalid.value.field == "train.lr"
        with pytest.raises(kru_client.InvalidInput) as token:
            client.predict(model.id, [[1, 2, 12]])
        assert token.value.field == "inputs.0.2"
        with pytest.raises(kru_client.InvalidInput):
            client.generate(model.id, "hi")  # a copy model does not generate
        with pytest.raises(kru_client.Conflict):
            client.cancel(job.id)
        with pytest.raises(kru_client.PayloadTooLarge):
            client.predict(model.id, [[1] * 9000] * 60)
        with pytest.raises(kru_client.ServiceUnavailable):
            Client("http://127.0.0.1:1", retries=1, backoff=0.01).get_job(job.id)

        # a long job, cancelled (queued: at once; running: at its next step)
        second = client.submit_job({"task": {"kind": "copy"}, "train": {"steps": 100000}})
        assert client.cancel(second.id).id == second.id
        assert client.wait(second.id, timeout=30).status == "cancelled"

        async def concurrent() -> list[Any]:
            async with AsyncClient(api.base_url) as aclient:
                assert (await aclient.get_job(job.id)).status == "succeeded"
                assert [m.id async for m in aclient.list_models()] == [model.id]
                events = [e async for e in aclient.events(job.id)]
                assert [e.id for e in events] == [e.id for e in whole]
                return await asyncio.gather(
                    *(aclient.predict(model.id, [INPUT]) for _ in range(32))
                )

        answers = asyncio.run(concurrent())
        assert len(answers) == 32
        assert all(a.predictions == result.predictions for a in answers)

        # the remote CLI, end to end
        config = tmp_path / "job.json"
        config.write_text(json.dumps({"task": {"kind": "copy"}, "train": {"steps": 5}}))
        submitted = kru("jobs", "submit", str(config), "--name", "cli", url=api.base_url)
        assert submitted.returncode == 0, submitted.stderr
        cli_job = json.loads(submitted.stdout)["id"]
        watched = kru("jobs", "watch", cli_job, url=api.base_url)
        assert watched.returncode == 0, watched.stderr
        assert "step 5/5" in watched.stderr and json.loads(watched.stdout)["status"] == "succeeded"
        listed = kru("jobs", "list", url=api.base_url)
        assert cli_job in listed.stdout and job.id in listed.stdout
        cancelled = kru("jobs", "cancel", cli_job, url=api.base_url)
        assert cancelled.returncode == 1 and "409" in cancelled.stderr
        assert model.id in kru("models", "list", url=api.base_url).stdout
        inputs = tmp_path / "in.json"
        inputs.write_text(json.dumps({"inputs": [INPUT]}))
        predicted = kru("models", "predict", model.id, "--input", str(inputs), url=api.base_url)
        assert json.loads(predicted.stdout)["predictions"] == result.predictions
        generated = kru("models", "generate", model.id, "--prompt", "x", url=api.base_url)
        assert generated.returncode == 1 and "422" in generated.stderr

        # a session streamed from the CLI, in two runs: the first keeps the session open, the
        # second continues it; the chunks' predictions are those of one predict
        cut = [0, 3, 7, len(INPUT) // 2, len(INPUT)]
        lines = [json.dumps(INPUT[a:b]) for a, b in itertools.pairwise(cut)]
        first_half = tmp_path / "chunks-1.jsonl"
        first_half.write_text("\n".join(lines[:2]) + "\n")
        opened = kru("sessions", "stream", model.id, "--input", str(first_half), "--keep",
                     url=api.base_url)  # fmt: skip
        assert opened.returncode == 0, opened.stderr
        out = [json.loads(line) for line in opened.stdout.splitlines()]
        session_id = out[0]["session_id"]
        assert out[0]["position"] == 0 and [o["position"] for o in out[1:]] == cut[1:3]
        shown = json.loads(kru("sessions", "show", session_id, url=api.base_url).stdout)
        assert shown["position"] == cut[2] and shown["model_id"] == model.id
        rest = kru("sessions", "stream", model.id, "--session", session_id, url=api.base_url,
                   input="\n".join(lines[2:]) + "\n")  # fmt: skip
        assert rest.returncode == 0, rest.stderr
        out += [json.loads(line) for line in rest.stdout.splitlines()[1:]]
        streamed = [label for o in out[1:] for label in o["predictions"]]
        assert streamed == result.predictions[0]
        assert kru("sessions", "show", session_id, url=api.base_url).returncode == 1  # deleted
        broken = kru("sessions", "stream", model.id, url=api.base_url, input="[1, 2]\n[1, 99]\n")
        assert broken.returncode == 1 and "422" in broken.stderr and "left open" in broken.stderr
        left = broken.stderr.split("--session ")[1].split()[0]
        assert kru("sessions", "delete", left, url=api.base_url).returncode == 0
        client.close()


def test_auth_errors(sqlite_env: Any, tmp_path: Path) -> None:
    settings = sqlite_env.with_overrides(api_keys=["k1"])
    with running_api(settings, tmp_path / "api.log") as api:
        with pytest.raises(kru_client.Unauthorized):
            next(Client(api.base_url).list_jobs())
        with pytest.raises(kru_client.Forbidden):
            Client(api.base_url, api_key="nope").get_model("x")
        assert list(Client(api.base_url, api_key="k1").list_jobs()) == []
        listed = kru("jobs", "list", url=api.base_url, KRU_API_KEY="k1")
        assert listed.returncode == 0, listed.stderr
        refused = kru("jobs", "list", "--api-key", "nope", url=api.base_url)
        assert refused.returncode == 1 and "403" in refused.stderr


def test_client_imports_no_server_code() -> None:
    code = (
        "import sys, kru_client; "
        "bad = [m for m in ('app', 'worker', 'torch', 'kru_core') if m in sys.modules]; "
        "print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.stdout.strip() == "[]", out.stderr


def test_schemas_match_the_openapi() -> None:
    from app.main import create_app

    schemas = create_app().openapi()["components"]["schemas"]
    for name, model in kru_client.models.MIRRORS.items():
        api_fields = set(schemas[name]["properties"])
        assert set(model.model_fields) == api_fields, name
        required = set(schemas[name].get("required", []))
        client_required = {n for n, f in model.model_fields.items() if f.is_required()}
        assert client_required == required, name
