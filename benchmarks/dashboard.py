"""The dashboard on ``kru serve``: screenshots of each page, its weight and its time to first chart.

Starts ``kru serve`` (the embedded default: SQLite, one worker) on a fresh data directory, trains
a few small copy-task jobs (a unitary-penalty sweep for the compare page, one cancelled), uploads
a dataset and a bad one, then drives headless Chromium (Debian's ``chromium``, Playwright):

* **screenshots** of every page into ``docs/img/`` (``--out``), 1100x760, PNG;
* **page weight**: the bytes of the dashboard's own HTML, JS and CSS as served (no library);
* **time to first chart**: from navigation to the job page of a finished job (about 250 training
  points) until its loss chart is drawn with points, median of ``--trials`` fresh page loads,
  beside the time to ``DOMContentLoaded`` of the same loads (the browser's part).

Usage::

    scripts/screenshots                     # this script with the defaults
    python benchmarks/dashboard.py --no-screenshots --trials 20
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("KRU_CHROMIUM", "/usr/bin/chromium")
ASSETS = ("/", "/dashboard/app.js", "/dashboard/style.css")


def call(base: str, path: str, body: Any = None, method: str | None = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        base + path, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def upload(base: str, name: str, content: bytes) -> None:
    boundary = "kru-benchmark-boundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + content
        + f"\r\n--{boundary}--\r\n".encode()
    )
    request = urllib.request.Request(
        base + "/v1/datasets",
        data=body,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    try:
        urllib.request.urlopen(request, timeout=30).read()
    except urllib.error.HTTPError as exc:  # the bad one: 422
        exc.read()


def copy_job(name: str, steps: int, penalty: float) -> dict[str, Any]:
    return {
        "name": name,
        "task": {"kind": "copy", "delay": 10, "eval_size": 128},
        "model": {"cell": "kru", "hidden_size": 32},
        "train": {"steps": steps, "batch_size": 32, "lr": 0.01, "eval_every": 50,
                  "unitary_penalty": penalty, "device": "cpu"},
    }  # fmt: skip


def wait_for(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise SystemExit(f"timed out waiting for {what}")


def start_serve(data_dir: Path, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "KRU_DATA_DIR": str(data_dir), "KRU_PROGRESS_INTERVAL": "0.5",
           "OMP_NUM_THREADS": "1", "KRU_LOG_LEVEL": "WARNING"}  # fmt: skip
    log = (data_dir.parent / "serve.log").open("wb")
    return subprocess.Popen(
        [str(REPO / ".venv/bin/kru"), "serve", "--port", str(port)],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs/img")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--no-screenshots", action="store_true")
    args = parser.parse_args()

    from playwright.sync_api import sync_playwright

    base = f"http://127.0.0.1:{args.port}"
    tmp = Path(tempfile.mkdtemp(prefix="kru-dashboard-"))
    (tmp / "data").mkdir()
    serve = start_serve(tmp / "data", args.port)
    try:
        wait_for(lambda: _up(base), 60, "kru serve")
        sweep = [call(base, "/v1/jobs", copy_job(f"copy-penalty-{p:g}", 500, p))
                 for p in (0.0, 0.01, 0.1)]  # fmt: skip
        doomed = call(base, "/v1/jobs", copy_job("copy-long-run", 100_000, 0.01))
        upload(base, "pairs.jsonl", b"".join(
            json.dumps({"input": [i % 7 + 1, i % 5 + 1], "target": i % 2}).encode() + b"\n"
            for i in range(200)))  # fmt: skip
        upload(base, "broken.jsonl", b'{"input": [1], "target": 0}\n{bad\n[1, 2]\n')
        for job in sweep:
            wait_for(lambda job=job: call(base, f"/v1/jobs/{job['id']}")["status"] == "succeeded",
                     600, f"job {job['name']}")  # fmt: skip
        wait_for(lambda: call(base, f"/v1/jobs/{doomed['id']}")["status"] == "running", 60, "x")
        time.sleep(3)
        first = sweep[1]["id"]
        model_id = call(base, f"/v1/jobs/{first}")["model_id"]
        weight = {path: len(urllib.request.urlopen(base + path).read()) for path in ASSETS}

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1100, "height": 760})
            if not args.no_screenshots:
                args.out.mkdir(parents=True, exist_ok=True)
                running = f"#/jobs/{doomed['id']}"
                ids = ",".join(j["id"] for j in sweep)
                shots = [("jobs", "#/jobs", "#jobs-table"), ("job", f"#/jobs/{first}", "svg path"),
                         ("job-running", running, "svg path"),
                         ("compare", f"#/compare?ids={ids}", "svg path"),
                         ("models", "#/models", "#models-table"),
                         ("model", f"#/models/{model_id}", "#try-it"),
                         ("new-job", "#/new", "#config-json"), ("datasets", "#/datasets", "#drop"),
                         ("workers", "#/workers", "#workers-table")]  # fmt: skip
                for name, path, ready in shots:
                    page.goto(f"{base}/{path}")
                    page.wait_for_selector(ready)
                    if name == "model":
                        page.click("#try-it button")
                        page.wait_for_selector("#answer")
                    if name == "datasets":
                        page.set_input_files("#file", files=[{"name": "broken.jsonl",
                            "mimeType": "application/json",
                            "buffer": b'{"input": [1], "target": 0}\n{bad\n[1, 2]\n'}])  # fmt: skip
                        page.wait_for_selector("#bad-lines")
                    time.sleep(0.8)
                    page.screenshot(path=str(args.out / f"{name}.png"))
                    print(f"{args.out / (name + '.png')}")
                call(base, f"/v1/jobs/{doomed['id']}/cancel", method="POST")
            first_chart, dom = [], []
            for _ in range(args.trials):
                fresh = browser.new_page(viewport={"width": 1100, "height": 760})
                start = time.perf_counter()
                fresh.goto(f"{base}/#/jobs/{first}", wait_until="domcontentloaded")
                dom.append(time.perf_counter() - start)
                fresh.wait_for_function(
                    "() => Number(document.querySelector('[data-chart=\"loss\"]')"
                    "?.dataset.points || 0) > 0"
                )
                first_chart.append(time.perf_counter() - start)
                points = fresh.locator('[data-chart="loss"]').get_attribute("data-points")
                fresh.close()
            browser.close()
        total = sum(weight.values())
        print(f"page weight: {total} bytes ({', '.join(f'{p} {n}' for p, n in weight.items())})")
        print(f"time to first chart ({points} points, {args.trials} loads): median "
              f"{statistics.median(first_chart) * 1000:.0f} ms, max {max(first_chart) * 1000:.0f} "
              f"ms; DOMContentLoaded median {statistics.median(dom) * 1000:.0f} ms")  # fmt: skip
    finally:
        serve.terminate()
        try:
            serve.wait(90)
        except subprocess.TimeoutExpired:
            serve.kill()


def _up(base: str) -> bool:
    try:
        return urllib.request.urlopen(base + "/readyz", timeout=2).status == 200
    except OSError:
        return False


if __name__ == "__main__":
    sys.exit(main())
