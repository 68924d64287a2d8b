"""Fixtures of the dashboard tests: headless Chromium (Debian's ``chromium``, driven by
Playwright's Python API) against a real API process and real worker processes.

The service fixtures (``sqlite_env``, ``worker_process``, ``wait_until``) are those of
``tests/service/conftest.py``, loaded from that file; the API runs as ``uvicorn`` in its own process
(``tests/service/api_server.py``). ``page`` fails the test on any console error or uncaught
exception, and on failure saves a screenshot and the console log under
``$KRU_TEST_ARTIFACTS`` (default: ``<tmp>/kru-test-artifacts``).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

TESTS = Path(__file__).resolve().parents[1]
SERVICE_TESTS = TESTS / "service"
sys.path.insert(0, str(SERVICE_TESTS))

_spec = importlib.util.spec_from_file_location("service_conftest", SERVICE_TESTS / "conftest.py")
assert _spec is not None and _spec.loader is not None
service_conftest = importlib.util.module_from_spec(_spec)
sys.modules["service_conftest"] = service_conftest  # dataclasses look their module up
_spec.loader.exec_module(service_conftest)
sqlite_env = service_conftest.sqlite_env
worker_process = service_conftest.worker_process
wait_until = service_conftest.wait_until

CHROMIUM = os.environ.get("KRU_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(
    os.environ.get("KRU_TEST_ARTIFACTS", Path(tempfile.gettempdir()) / "kru-test-artifacts")
)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"report_{report.when}", report)


@pytest.fixture(scope="module")  # the sync API runs an event loop: end it with the module
def browser() -> Iterator[Any]:
    """One headless Chromium for the module (skipped without it, except in CI)."""
    if not shutil.which(CHROMIUM):
        message = f"{CHROMIUM} not found: apt-get install chromium (scripts/setup does)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"]
        )
        yield browser
        browser.close()


class Console:
    """The page's console messages and uncaught errors; ``allowed`` substrings are not errors."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.errors: list[str] = []
        self.allowed: list[str] = []

    def on_message(self, message: Any) -> None:
        line = f"{message.type}: {message.text}"
        self.lines.append(line)
        if message.type == "error" and not any(a in message.text for a in self.allowed):
            self.errors.append(line)

    def on_error(self, error: Any) -> None:
        self.lines.append(f"pageerror: {error}")
        self.errors.append(f"pageerror: {error}")


@pytest.fixture
def console() -> Console:
    return Console()


@pytest.fixture
def page(browser: Any, console: Console, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A fresh browser context and page (its own sessionStorage), checked for console errors."""
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    context.set_default_timeout(20_000)
    page = context.new_page()
    page.on("console", console.on_message)
    page.on("pageerror", console.on_error)
    yield page
    report = getattr(request.node, "report_call", None)
    if report is None or report.failed:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        stem = ARTIFACTS / request.node.name.replace("/", "_")
        try:
            page.screenshot(path=f"{stem}.png", full_page=True)
        except Exception as exc:  # the page may be gone
            console.lines.append(f"(no screenshot: {exc})")
        Path(f"{stem}.console.log").write_text("\n".join(console.lines) + "\n")
        print(f"browser artifacts: {stem}.png, {stem}.console.log")
    context.close()
    assert not console.errors, f"console errors: {console.errors}"
