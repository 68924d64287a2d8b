"""The dashboard in headless Chromium against a real API process and a real worker process:
a job submitted from the form, listed, its loss chart growing over SSE (and after a dropped
connection, without gaps or duplicates), another job cancelled, the try-it forms of a copy and a
text model, a bad dataset's line numbers, the workers, a phone's width, /docs and /redoc with no
request outside the server, and the API-key prompt."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from api_server import running_api
from playwright.sync_api import expect

if TYPE_CHECKING:
    from service_conftest import ServiceEnv

FAST_SSE = "api_server:fast_sse_app"


def chart_points(page: Any, title: str) -> int:
    return int(page.locator(f'[data-chart="{title}"]').get_attribute("data-points") or 0)


def test_train_watch_cancel_predict_and_upload_in_the_browser(
    sqlite_env: ServiceEnv,
    worker_process: Callable[..., Any],
    wait_until: Callable[..., Any],
    page: Any,
    console: Any,
    tmp_path: Path,
) -> None:
    # Chromium logs every 4xx answer; the form's bad value and the bad upload are meant to get one.
    console.allowed.append("status of 422")
    outside: list[str] = []  # requests to anywhere but the API: none (no CDN, works offline)
    page.on("request", lambda r: outside.append(r.url) if "127.0.0.1" not in r.url else None)
    worker_process(sqlite_env)
    with running_api(sqlite_env.settings, tmp_path / "api.log", factory=FAST_SSE) as api:
        # --- submit a job from the form; the API's 422 comes back on its field first
        page.goto(f"{api.base_url}/#/new")
        form = page.locator("#job-form")
        form.locator('[name="train.lr"]').fill("-1")
        expect(page.locator("#config-json")).to_contain_text('"lr": -1')
        page.click("#submit-job")
        error = page.locator("#form-error")
        expect(error).to_contain_text("train.lr: Input should be greater than 0")
        expect(page.locator('label.bad[data-field="train.lr"]')).to_be_visible()
        for name, value in {
            "name": "browser-copy",
            "task.delay": "5",
            "model.hidden_size": "16",
            "train.steps": "240",
            "train.batch_size": "16",
            "train.lr": "0.01",
            "train.eval_every": "60",
            "train.log_every": "2",
        }.items():
            form.locator(f'[name="{name}"]').fill(value)
        expect(page.locator("#config-json")).to_contain_text('"log_every": 2')
        page.click("#submit-job")
        page.wait_for_url(re.compile(r"#/jobs/[0-9a-f]{32}$"))
        job_id = page.url.rsplit("/", 1)[1]

        # --- its loss chart gains points while it trains; a dropped stream resumes
        wait_until(lambda: chart_points(page, "loss") > 0, timeout=60, what="a first point")
        first = chart_points(page, "loss")
        page.evaluate("window.kruStream.drop()")
        wait_until(lambda: chart_points(page, "loss") > first, timeout=60, what="more points")
        expect(page.locator(".status").first).to_have_text("succeeded", timeout=60_000)
        history = api.client().get(f"/v1/jobs/{job_id}/metrics").json()
        train_steps = [p["step"] for p in history if p["phase"] == "train"]
        eval_steps = [p["step"] for p in history if p["phase"] == "eval"]
        assert len(train_steps) >= 100  # every log_every=2 steps
        legend = page.locator('[data-chart="loss"] .legend').inner_text()
        assert f"train loss ({len(train_steps)})" in legend  # no gap, no duplicate
        assert f"eval loss ({len(eval_steps)})" in legend
        expect(page.locator("#history")).to_contain_text("running")

        # --- the list shows it, with its fields; the status filter works
        page.goto(f"{api.base_url}/#/jobs")
        row = page.locator(f'tr[data-job="{job_id}"]')
        expect(row).to_contain_text("browser-copy")
        expect(row).to_contain_text("succeeded")
        expect(row).to_contain_text("240 / 240")
        page.select_option("#status-filter", "failed")
        expect(page.locator("#main")).to_contain_text("No jobs yet.")

        # --- cancel another job (queued behind nothing: the worker is free, so it runs)
        other = api.client().post(
            "/v1/jobs",
            json={"name": "to-cancel", "task": {"kind": "copy", "delay": 5},
                  "model": {"cell": "kru", "hidden_size": 16},
                  "train": {"steps": 100000, "batch_size": 16, "device": "cpu"}},
        ).json()  # fmt: skip
        page.goto(f"{api.base_url}/#/jobs/{other['id']}")
        page.click("#cancel")
        expect(page.locator(".status").first).to_have_text("cancelled", timeout=60_000)

        # --- the model page and its try-it form
        page.goto(f"{api.base_url}/#/jobs/{job_id}")
        page.click("#model-link")
        expect(page.locator("#param-counts")).to_contain_text("recurrent")
        expect(page.locator("#main")).to_contain_text("256 recurrent (N² = 16²)")
        expect(page.locator("#final-metrics")).to_contain_text("eval_accuracy")
        prefilled = page.locator("#inputs").input_value()
        assert prefilled.count(",") + 1 == 10 + 4 + 1 + 10  # 10 symbols, delay-1 blanks, 9, 10
        page.click("#try-it button")
        expect(page.locator("#answer")).to_contain_text(re.compile(r"\d+ of 10 symbols recalled"))

        # --- a bad dataset dropped on the drop zone: its bad lines by number
        page.goto(f"{api.base_url}/#/datasets")
        page.evaluate(
            """() => {
              const text = ['{"input": [1, 2], "target": 1}', '{bad',
                            '{"input": [3], "target": 0}', '[1]', ''].join('\\n');
              const dt = new DataTransfer();
              dt.items.add(new File([text], "bad.jsonl"));
              document.getElementById("drop").dispatchEvent(
                new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true}));
            }"""
        )
        bad = page.locator("#bad-lines tbody tr")
        expect(bad).to_have_count(2)
        expect(bad.nth(0)).to_contain_text("2")
        expect(bad.nth(1)).to_contain_text("4")
        page.set_input_files("#file", files=[{"name": "good.jsonl", "mimeType": "application/json",
                             "buffer": b'{"input": [1, 2], "target": 1}\n'}])  # fmt: skip
        expect(page.locator("#upload-result")).to_contain_text("Stored good.jsonl")
        expect(page.locator("#datasets-table")).to_contain_text("good.jsonl")

        # --- a text model's try-it form generates text from a prefilled prompt
        with api.client() as client:
            corpus = ("The cat sat on the mat. The dog ate the hat. " * 40).encode()
            text = client.post("/v1/datasets", files={"file": ("corpus.txt", corpus)}).json()
            text_job = client.post(
                "/v1/jobs",
                json={"task": {"kind": "text", "dataset_id": text["id"], "seq_len": 16,
                               "eval_size": 8},
                      "model": {"cell": "kru", "hidden_size": 8},
                      "train": {"steps": 20, "batch_size": 4, "eval_every": 20, "device": "cpu"}},
            ).json()  # fmt: skip
            text_model = wait_until(
                lambda: client.get(f"/v1/jobs/{text_job['id']}").json()["model_id"],
                timeout=60,
                what="the text model",
            )
        page.goto(f"{api.base_url}/#/models/{text_model}")
        assert page.locator("#prompt").input_value() == "The "
        page.click("#try-it button")
        expect(page.locator("#answer")).to_contain_text(re.compile(r"^The .{20,}", re.S))

        # --- the workers page shows the live worker
        page.goto(f"{api.base_url}/#/workers")
        expect(page.locator("#workers-table")).to_contain_text("cpu")

        # --- every page fits a phone's width; /docs and /redoc come from the server
        page.set_viewport_size({"width": 375, "height": 740})
        for path in ("#/jobs", f"#/jobs/{job_id}", "#/new", "#/datasets", "#/models",
                     f"#/models/{text_model}", "#/workers", f"#/compare?ids={job_id}"):  # fmt: skip
            page.goto(f"{api.base_url}/{path}")
            expect(page.locator("h1")).to_be_visible()
            width = page.evaluate("document.documentElement.scrollWidth")
            assert width <= 375, (path, width)  # nothing wider than the phone
        page.set_viewport_size({"width": 1200, "height": 900})
        page.goto(f"{api.base_url}/docs")
        expect(page.locator(".swagger-ui .info .title")).to_contain_text("kru")
        page.goto(f"{api.base_url}/redoc")
        expect(page.locator("h1").first).to_contain_text("kru")
    assert [u for u in outside if not u.startswith(("data:", "about:"))] == []


def test_the_page_asks_for_a_key_once_and_says_when_it_is_wrong(
    sqlite_env: ServiceEnv, page: Any, console: Any, tmp_path: Path
) -> None:
    # The refused requests are logged by Chromium itself ("Failed to load resource").
    console.allowed.append("status of 401")
    console.allowed.append("status of 403")
    settings = sqlite_env.with_overrides(api_keys=["right-key"])
    requests: list[Any] = []
    page.on("request", lambda request: requests.append(request))
    with running_api(settings, tmp_path / "api.log") as api:
        page.goto(f"{api.base_url}/")
        expect(page.locator("#keybox")).to_be_visible()
        expect(page.locator("#keymsg")).to_contain_text("needs an API key")
        page.fill("#keyinput", "wrong-key")
        page.click("#keyform button")
        expect(page.locator("#keymsg")).to_contain_text("invalid API key")
        page.fill("#keyinput", "right-key")
        page.click("#keyform button")
        expect(page.locator("#keybox")).to_be_hidden()
        expect(page.locator("#main")).to_contain_text("No jobs yet.")
        page.goto(f"{api.base_url}/#/models")  # the key is kept for the tab: no second prompt
        expect(page.locator("#main")).to_contain_text("No models yet")
        expect(page.locator("#keybox")).to_be_hidden()
        assert page.evaluate("sessionStorage.getItem('kru-api-key')") == "right-key"
    api_calls = [r for r in requests if "/v1/" in r.url]
    assert api_calls and all("key" not in r.url for r in api_calls)  # never in a URL
    sent = [r.headers.get("authorization") for r in api_calls]
    assert "Bearer right-key" in sent and "Bearer wrong-key" in sent
