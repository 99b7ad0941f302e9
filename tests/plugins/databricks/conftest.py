"""Fixtures for the Databricks backend (a built-in plugin): a fake workspace on
127.0.0.1 that the real databricks-sdk `WorkspaceClient` talks to, and a Tether
service that reads its settings."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from core.plugin import hookimpl
from tests.plugins.databricks.workspace import FakeWorkspace


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeWorkspace]:
    """A running fake workspace, and an environment in which the SDK finds it
    (and nothing of the machine's own Databricks configuration)."""
    ws = FakeWorkspace().start()
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("DATABRICKS_HOST", ws.url)
    monkeypatch.setenv("DATABRICKS_TOKEN", ws.token)
    monkeypatch.setenv("TETHER_DATABRICKS_RETRY_TIMEOUT", "5")
    monkeypatch.setenv("TETHER_DATABRICKS_HTTP_TIMEOUT", "5")
    yield ws
    ws.stop()


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


@dataclass(eq=False)  # a plugin is hashed by identity (pluggy keeps sets of them)
class Finished:
    """Records `tether_job_finished`, to prove a job ends exactly once."""

    seen: list[tuple[str, str]] = field(default_factory=list)

    @hookimpl
    def tether_job_finished(self, job: Any) -> None:
        self.seen.append((job.id, job.state))

    def of(self, job_id: str) -> list[str]:
        return [state for seen_id, state in self.seen if seen_id == job_id]


@pytest.fixture
def finished() -> Finished:
    return Finished()


@pytest.fixture
def start_databricks(
    start_service: Callable[..., Any], workspace: FakeWorkspace, finished: Finished
) -> Callable[..., Any]:
    """`await start_databricks(**settings)` → a running `Service`, its
    `tether_job_finished` calls recorded in `finished` (set `TETHER_DATABRICKS_*`
    before: the backend reads them when the service starts)."""

    async def start(**settings: Any) -> Any:
        return await start_service(plugins=[finished], **settings)

    return start
