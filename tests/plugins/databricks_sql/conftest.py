"""Fixtures for the `databricks_sql` backend: a fake Statement Execution API on
127.0.0.1 that the real databricks-sdk `WorkspaceClient` talks to, and a Tether
service offering the backend."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.plugins.databricks import conftest as databricks_conftest
from tests.plugins.databricks_sql.fake_sql import FakeSqlApi


@pytest.fixture
def sql_api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeSqlApi]:
    """A running fake API, and an environment in which the SDK finds it (and
    nothing of the machine's own Databricks configuration)."""
    api = FakeSqlApi().start()
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("DATABRICKS_HOST", api.url)
    monkeypatch.setenv("DATABRICKS_TOKEN", api.token)
    monkeypatch.setenv("TETHER_DATABRICKS_RETRY_TIMEOUT", "5")
    monkeypatch.setenv("TETHER_DATABRICKS_HTTP_TIMEOUT", "5")
    yield api
    api.stop()


@pytest.fixture
def start_sql(start_service: Callable[..., Any], sql_api: FakeSqlApi) -> Callable[..., Any]:
    """`await start_sql(**settings)` → a running `Service` offering
    `databricks_sql` (set `TETHER_DATABRICKS_SQL_*` before: the backend reads
    them when the service starts)."""

    async def start(**settings: Any) -> Any:
        return await start_service(**settings)  # a built-in plugin

    return start


# The same log capture as the databricks plugin's tests (the same loggers).
logs = databricks_conftest.logs
