"""Fixtures for the `databricks_sql` backend: a fake Statement Execution API on
127.0.0.1 that the real databricks-sdk `WorkspaceClient` talks to, and a Tether
service offering the backend."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

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


class Logs(logging.Handler):
    """Every record of Tether's and the SDK's loggers, formatted. (Litestar
    reconfigures the root logger when the app starts, so pytest's `caplog`
    misses them.)"""

    LOGGERS = ("tether", "databricks", "urllib3")

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


@pytest.fixture
def logs() -> Iterator[Logs]:
    handler = Logs()
    levels = {}
    for name in Logs.LOGGERS:
        logger = logging.getLogger(name)
        levels[name] = logger.level
        logger.setLevel(logging.DEBUG)
        logger.addHandler(handler)
    yield handler
    for name in Logs.LOGGERS:
        logging.getLogger(name).removeHandler(handler)
        logging.getLogger(name).setLevel(levels[name])
