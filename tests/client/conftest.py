"""The client tests reuse the service fixtures (tests/service/conftest.py, api_server.py)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SERVICE = Path(__file__).resolve().parents[1] / "service"
if str(SERVICE) not in sys.path:
    sys.path.insert(0, str(SERVICE))

_spec = importlib.util.spec_from_file_location("service_fixtures", SERVICE / "conftest.py")
assert _spec is not None and _spec.loader is not None
service_fixtures = importlib.util.module_from_spec(_spec)
sys.modules["service_fixtures"] = service_fixtures
_spec.loader.exec_module(service_fixtures)

sqlite_env = service_fixtures.sqlite_env
worker_process = service_fixtures.worker_process
wait_until = service_fixtures.wait_until
