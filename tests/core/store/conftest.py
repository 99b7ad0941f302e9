"""A database of each kind for the store's own tests, raw access to it, and
the job index's layout as shipped before schema versioning.

`database` runs a test on SQLite (a file in the test's tmp dir) and on
Postgres (a fresh database copied from TETHER_TEST_PG_DSN; skipped without it).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from core.store.embedded import SqliteDriver
from core.store.postgres import PostgresDriver
from tests.core.store.v1_layout import V1_INDEXES, V1_ROWS, V1_TABLE
from tests.pg import drop_pg_database


class Database:
    """One empty database: drivers on it (closed after the test) and raw SQL."""

    def __init__(self, kind: str, url: str) -> None:
        self.kind = kind
        self.url = url
        self._drivers: list[SqliteDriver | PostgresDriver] = []
        self._raw: SqliteDriver | PostgresDriver | None = None

    async def driver(self) -> SqliteDriver | PostgresDriver:
        """A driver closed after the test."""
        driver = await self.open_driver()
        self._drivers.append(driver)
        return driver

    async def open_driver(self) -> SqliteDriver | PostgresDriver:
        """A driver the caller closes (on its own event loop)."""
        driver: SqliteDriver | PostgresDriver
        if self.kind == "sqlite":
            driver = SqliteDriver(Path(self.url.removeprefix("sqlite:///")))
            await driver.execute("PRAGMA journal_mode = WAL", ())  # as the store leaves it
        else:
            driver = PostgresDriver(self.url)
            await driver.open()
        return driver

    async def run(self, *statements: str) -> None:
        if self._raw is None:
            self._raw = await self.driver()
        for statement in statements:
            await self._raw.execute(statement, ())

    async def fetch(self, sql: str) -> list[tuple[Any, ...]]:
        if self._raw is None:
            self._raw = await self.driver()
        return await self._raw.fetch(sql, ())

    async def ship_v1(self) -> None:
        """Make what Tether wrote before schema versioning: the table, its
        indexes and a few rows."""
        await self.run(V1_TABLE[self.kind], *V1_INDEXES, *V1_ROWS)

    async def drop_tables(self) -> None:
        """Drop every table of Tether's, the version table too: an empty database again."""
        if self.kind == "sqlite":
            sql = "SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE 'tether%'"
        else:
            sql = (
                "SELECT table_name FROM information_schema.tables"
                " WHERE table_schema = current_schema() AND table_name LIKE 'tether%'"
            )
        await self.run(*(f"DROP TABLE {name}" for (name,) in await self.fetch(sql)))

    async def version(self) -> int | None:
        """The recorded schema version; None without one (or without the table)."""
        try:
            rows = await self.fetch("SELECT version FROM tether_schema WHERE name = 'tether'")
        except Exception:
            return None
        return rows[0][0] if rows else None

    async def objects(self) -> list[tuple[Any, ...]]:
        """Every schema object but the version table, as the database keeps it."""
        if self.kind == "sqlite":
            return await self.fetch(
                "SELECT type, name, tbl_name, sql FROM sqlite_master"
                " WHERE tbl_name != 'tether_schema' ORDER BY name"
            )
        sequence = await self.fetch("SELECT last_value, is_called FROM tether_jobs_seq_seq")
        return [*await self.layout(), *sequence]

    async def layout(self) -> list[tuple[Any, ...]]:
        """Tether's tables (but the version table) as columns, indexes and
        constraints: equal whether a table was made at once or altered."""
        if self.kind == "sqlite":
            out: list[tuple[Any, ...]] = []
            tables = await self.fetch(
                "SELECT name FROM sqlite_master WHERE type = 'table'"
                " AND name LIKE 'tether%' AND name != 'tether_schema' ORDER BY name"
            )
            for (table,) in tables:
                out += [(table, *c) for c in await self.fetch(f"PRAGMA table_info({table})")]
            return out + await self.fetch(
                "SELECT name, tbl_name, sql FROM sqlite_master WHERE type = 'index'"
                " AND tbl_name LIKE 'tether%' AND tbl_name != 'tether_schema' ORDER BY name"
            )
        mine = "table_schema = current_schema() AND table_name LIKE 'tether%'"
        mine += " AND table_name != 'tether_schema'"
        return [
            *await self.fetch(
                "SELECT table_name, ordinal_position, column_name, data_type, is_nullable,"
                f" column_default FROM information_schema.columns WHERE {mine}"
                " ORDER BY table_name, ordinal_position"
            ),
            *await self.fetch(
                "SELECT tablename, indexname, indexdef FROM pg_indexes WHERE"
                " schemaname = current_schema() AND tablename LIKE 'tether%'"
                " AND tablename != 'tether_schema' ORDER BY indexname"
            ),
            *await self.fetch(
                "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid)"
                " FROM pg_constraint WHERE conrelid::regclass::text LIKE 'tether%'"
                " AND conrelid::regclass::text != 'tether_schema' ORDER BY conname"
            ),
        ]

    async def close(self) -> None:
        for driver in self._drivers:
            await driver.close()


@pytest.fixture(params=["sqlite", "postgres"])
async def database(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/tether.db"
    else:
        url = request.getfixturevalue("fresh_pg_url")
    db = Database(request.param, url)
    try:
        yield db
    finally:
        await db.close()
        if request.param == "postgres":
            with contextlib.suppress(Exception):
                drop_pg_database(url, urlsplit(url).path.lstrip("/"))
