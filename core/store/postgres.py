"""`postgresql://...`: promises in resonate-pg, jobs in a table beside them.

The operator applies resonate-pg's `resonate.sql` to the database once; Tether
creates its own `tether_jobs` table on start.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import psycopg
from psycopg_pool import AsyncConnectionPool

from core.errors import StoreUnavailable

TABLE = """CREATE TABLE IF NOT EXISTS tether_jobs (
    seq BIGSERIAL PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    backend TEXT NOT NULL,
    state TEXT NOT NULL,
    params TEXT NOT NULL,
    metadata TEXT NOT NULL,
    timeout DOUBLE PRECISION NOT NULL,
    fingerprint TEXT NOT NULL,
    deadline BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    external TEXT,
    result TEXT,
    error TEXT,
    finished_at BIGINT,
    next_check_at BIGINT
)"""


class PostgresDriver:
    """Runs the job index's SQL on a psycopg pool."""

    def __init__(self, dsn: str, *, max_size: int = 8, timeout: float = 5.0) -> None:
        self._dsn = dsn
        self._pool = AsyncConnectionPool(
            dsn, min_size=1, max_size=max_size, timeout=timeout, open=False
        )

    async def open(self, statements: Sequence[str]) -> None:
        """Connect once to fail fast with the server's reason, then open the pool
        and create the table. Raises `StoreUnavailable` without the password."""
        try:
            conn = await psycopg.AsyncConnection.connect(self._dsn, connect_timeout=5)
            await conn.close()
        except psycopg.Error as exc:
            reason = " ".join(str(exc).split())
            password = urlsplit(self._dsn).password
            if password:
                reason = reason.replace(password, "***")
            raise StoreUnavailable(reason) from None
        await self._pool.open(wait=True, timeout=self._pool.timeout)
        for statement in statements:
            await self.execute(statement, ())

    async def fetch(self, sql: str, args: Sequence[Any]) -> list[tuple[Any, ...]]:
        try:
            async with self._pool.connection() as conn:
                cursor = await conn.execute(sql.replace("?", "%s"), args)
                return await cursor.fetchall()
        except psycopg.OperationalError as exc:  # server gone, pool timed out
            raise StoreUnavailable(f"Postgres did not answer: {type(exc).__name__}") from None

    async def execute(self, sql: str, args: Sequence[Any]) -> int:
        try:
            async with self._pool.connection() as conn:
                cursor = await conn.execute(sql.replace("?", "%s"), args)
                return cursor.rowcount
        except psycopg.OperationalError as exc:
            raise StoreUnavailable(f"Postgres did not answer: {type(exc).__name__}") from None

    async def close(self) -> None:
        await self._pool.close()
