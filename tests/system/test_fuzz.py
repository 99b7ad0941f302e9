"""Property-based fuzzing of the whole HTTP API from its own OpenAPI document:
no 5xx, and no response the document does not describe."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import httpx
import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from api.app import create_app
from core.plugins import make_plugin_manager
from tests.conftest import test_settings, wait_until


@pytest.fixture(scope="module")
def live_url() -> Iterator[str]:
    config = test_settings(store="memory://")
    app = create_app(config, make_plugin_manager(entry_points=False))
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=config.port, log_level="warning")
    )
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    wait_until(lambda: server.started, timeout=20)
    # a job that exists, so generated requests also reach the paths past "404"
    httpx.post(
        f"{config.base_url}/jobs",
        json={"id": "known", "backend": "http_webhook", "params": {"url": "http://127.0.0.1:9/x"}},
        trust_env=False,
    )
    yield config.base_url
    server.should_exit = True
    thread.join(10)


def test_the_api_keeps_its_own_contract(live_url: str) -> None:
    """Every operation, 25 generated requests each (schemathesis' pytest plugin
    does not work with pytest 9 yet, so the operations are driven directly).

    Left out: "schema-valid data is accepted". The schema cannot say which
    cursors are real or which params a backend takes (plugins validate them), so
    a schema-valid request may rightly get 422."""
    api = schemathesis.openapi.from_url(f"{live_url}/schema/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) >= 6

    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=25,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case: schemathesis.Case) -> None:
            case.call_and_validate(excluded_checks=[positive_data_acceptance])

        check()
