"""The seam that picks the durable store from `TETHER_STORE`.

A store is two things living in one place: the Resonate connection the
workflow runs on (promises, tasks, the messages that move work between
processes) and the job index listing needs. See docs/architecture.md.

| `TETHER_STORE`            | `Store` kind | promises and tasks            | job index         |
|---------------------------|--------------|-------------------------------|-------------------|
| `sqlite:///PATH` (default)| `sqlite`     | embedded SQLite protocol      | table in the file |
| `memory://`               | `memory`     | embedded, on a temporary file | table in the file |
| `postgresql://...`        | `postgresql` | resonate-pg                   | table in the DB   |

`memory://` (tests, demos) keeps nothing: its file is deleted when the store closes.
Opening a store brings its tables to this code's schema version
(`core.store.migrations`).
"""

from __future__ import annotations

from urllib.parse import urlsplit

from core.errors import StoreConfigError
from core.settings import Settings, describe
from core.store.base import STORE_CALL_TIMEOUT, STORE_WAIT, Store
from core.store.jobs import JobIndex

__all__ = [
    "STORE_CALL_TIMEOUT",
    "STORE_WAIT",
    "JobIndex",
    "Store",
    "StoreConfigError",
    "open_store",
]


async def open_store(settings: Settings, pid: str) -> Store:
    """Open the store `settings.store` names, its tables migrated. Raises
    `StoreConfigError` saying why when it cannot."""
    scheme = urlsplit(settings.store).scheme
    # Each kind is imported only when asked for: psycopg is slow to import.
    if scheme == "sqlite":
        from core.store.embedded import EmbeddedStore

        return await EmbeddedStore.open(settings, pid)
    if scheme == "memory":
        from core.store.embedded import MemoryStore

        return await MemoryStore.open(settings, pid)
    if scheme in ("postgresql", "postgres"):
        from core.store.postgres import PostgresStore

        return await PostgresStore.open(settings, pid)
    raise StoreConfigError(
        f"TETHER_STORE={describe(settings.store)!r} is not supported; use sqlite:///PATH,"
        " memory:// or postgresql://..."
    )
