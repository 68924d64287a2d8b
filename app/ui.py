"""The dashboard at ``/`` and the API docs at ``/docs`` and ``/redoc``, all from package files.

The dashboard (``app/dashboard/``: ``index.html``, ``app.js``, ``style.css``) is a single page over
the ``/v1`` API with no JavaScript library; Swagger UI and ReDoc are vendored in
``app/dashboard/vendor/`` (versions and licences in its README). Nothing is loaded from the
internet. These routes are outside ``/v1``, so they need no API key: the page asks for one and
sends it with its own ``/v1`` calls.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

DASHBOARD_DIR = Path(__file__).with_name("dashboard")
ASSETS = "/dashboard"


def install_ui(app: FastAPI) -> None:
    """Add ``/`` (the dashboard), ``/dashboard/*`` (its files), ``/docs`` and ``/redoc``.

    The app must be created with ``docs_url=None, redoc_url=None`` (FastAPI's own pages load
    their scripts from a CDN).
    """
    vendor = f"{ASSETS}/vendor"
    favicon = f"{vendor}/swagger-ui/favicon-32x32.png"

    def docs_page(render: Callable[..., HTMLResponse], **assets: Any) -> HTMLResponse:
        """``render`` (FastAPI's Swagger UI or ReDoc page) of the app's OpenAPI, with ``assets``."""
        openapi_url = app.openapi_url or "/openapi.json"
        return render(openapi_url=openapi_url, title=f"{app.title} API", **assets)

    @app.get("/", include_in_schema=False)
    def dashboard() -> FileResponse:
        return FileResponse(DASHBOARD_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/docs", include_in_schema=False)
    def swagger_ui() -> HTMLResponse:
        return docs_page(
            get_swagger_ui_html,
            swagger_js_url=f"{vendor}/swagger-ui/swagger-ui-bundle.js",
            swagger_css_url=f"{vendor}/swagger-ui/swagger-ui.css",
            swagger_favicon_url=favicon,
        )

    @app.get("/redoc", include_in_schema=False)
    def redoc() -> HTMLResponse:
        return docs_page(
            get_redoc_html,
            redoc_js_url=f"{vendor}/redoc/redoc.standalone.js",
            redoc_favicon_url=favicon,
            with_google_fonts=False,
        )

    app.mount(ASSETS, StaticFiles(directory=DASHBOARD_DIR), name="dashboard")
