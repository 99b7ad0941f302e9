"""The seam that picks the durable store from `TETHER_STORE`.

A store is two things living in one place: the Resonate connection the
workflow runs on (promises, tasks, the messages that move work between
processes) and the job index listing needs. See docs/architecture.md.

| `TETHER_STORE`            | promises and tasks            | job index               |
|---------------------------|-------------------------------|-------------------------|
| `sqlite:///PATH` (default)| embedded SQLite protocol      | table in the same file  |
| `memory://`               | embedded, on a temporary file | table in that file      |
| `postgresql://...`        | resonate-pg                   | table in the same DB    |

`memory://` (tests, demos) keeps nothing: its file is deleted when the store closes.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from core.errors import StoreUnavailable
from core.settings import Settings, describe
from core.store.jobs import JobIndex
from core.store.sql import INDEXES, SqlJobIndex


@dataclass
class Store:
    kind: str
    """`sqlite`, `memory` or `postgresql`."""
    connection: Any
    """The Resonate `Network` that is also the process's `Source`."""
    jobs: JobIndex
    callback_secret: str
    """The configured secret, or the one this store keeps (see Settings)."""
    scratch: Path | None = None
    """A directory deleted on close: where `memory://` keeps its file."""

    async def close(self) -> None:
        """Close the job index and the connection (resonate-pg's closes with its worker)."""
        await self.jobs.close()
        if self.kind in ("sqlite", "memory"):
            await self.connection.stop()
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)


class StoreConfigError(ValueError):
    """`TETHER_STORE` names a store Tether cannot open; the message says why."""


async def open_store(settings: Settings, pid: str) -> Store:
    url = settings.store
    scheme = urlsplit(url).scheme
    if scheme == "memory":
        # The embedded store on a file of its own, gone when the store closes:
        # nothing outlives the process, and it stays as fast as the embedded
        # store however many jobs it has seen (resonate's LocalConnection
        # scans every promise on each request).
        from core.store.embedded import open_embedded

        scratch = Path(tempfile.mkdtemp(prefix="tether-memory-"))
        try:
            store = await open_embedded(f"sqlite:///{scratch}/tether.db", settings, pid)
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
        store.kind, store.scratch = "memory", scratch
        return store
    if scheme == "sqlite":
        from core.store.embedded import open_embedded

        try:
            return await open_embedded(url, settings, pid)
        except ValueError as exc:
            raise StoreConfigError(str(exc)) from None
    if scheme in ("postgresql", "postgres"):
        if not settings.callback_secret:
            raise StoreConfigError(
                "TETHER_CALLBACK_SECRET must be set when TETHER_STORE is Postgres: every"
                " process sharing the database must sign callback URLs with the same secret"
            )
        from resonate_pg import PostgresConnection

        from core.store.postgres import TABLE, PostgresDriver

        driver = PostgresDriver(url)
        try:
            await driver.open((TABLE, *INDEXES))
        except Exception as exc:
            reason = exc.message if isinstance(exc, StoreUnavailable) else type(exc).__name__
            raise StoreConfigError(
                f"cannot open the Postgres store {describe(url)}: {reason}"
            ) from None
        return Store(
            kind="postgresql",
            connection=PostgresConnection(url, pid=pid, group=settings.group),
            jobs=SqlJobIndex(driver),
            callback_secret=settings.callback_secret,
        )
    raise StoreConfigError(
        f"TETHER_STORE={describe(url)!r} is not supported; use sqlite:///PATH, memory:// or"
        " postgresql://..."
    )
