"""Store factories for the conformance suite.

Every test in this directory runs once per durable store, through the SDK's
public API only (``Resonate(...)``, ``register``, ``run``/``rpc``, ``ctx.*``,
``r.promises``, ``r.get``, handles):

* ``sqlite``   -- the embedded store (:class:`resonate_sqlite.connection.SqliteConnection`)
  on a file in the test's tmp dir; every connection of a test opens that file.
  ``sqlite-1tx`` is the same with ``group_commit=False`` (one transaction per
  request instead of one per batch).
* ``postgres`` -- ``resonate_pg.PostgresConnection`` when ``TETHER_TEST_PG_DSN``
  names a template database with resonate-pg's ``resonate.sql`` applied, whose
  role may ``CREATE DATABASE`` and run ``process_timeouts()``: each test gets a
  fresh copy of it, dropped afterwards. Skipped otherwise.

Both are shared (several connections, as several processes, see one state) and
durable (it survives stopping every connection), and every test here relies on
that. resonate-sdk's in-memory ``LocalConnection`` is neither, and Tether does
not use it (its ``memory://`` store is this engine on a temporary file), so it
is not a store of this suite.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from resonate.resonate import Resonate

from resonate_sqlite.connection import SqliteConnection
from tests.pg import drop_pg_database, fresh_pg_database, pg_dsn


@dataclass
class Store:
    """One kind of durable store, and how to open connections to it."""

    name: str
    connect: Callable[..., Any]
    """``connect(pid, group, **sqlite_options)`` -> a Network that is also a Source."""


STORES = ["sqlite", "sqlite-1tx", "postgres"]


@pytest.fixture(params=STORES)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    kind = request.param
    if kind.startswith("sqlite"):
        db = tmp_path / "conformance.db"

        def sqlite(pid: str, group: str, **options: Any) -> SqliteConnection:
            options.setdefault("group_commit", kind == "sqlite")
            options.setdefault("poll_interval", 0.01)
            options.setdefault("timer_interval", 0.05)
            options.setdefault("process_heartbeat", 0.2)
            options.setdefault("process_timeout", 2.0)
            return SqliteConnection(db, group=group, pid=pid, **options)

        yield Store(kind, connect=sqlite)
        return
    template = pg_dsn(request.config)
    if not template:
        pytest.skip(
            "postgres store: set TETHER_TEST_PG_DSN to a database with resonate-pg's "
            "resonate.sql applied (its role needs CREATEDB) to run this suite on resonate-pg"
        )
    from resonate_pg import PostgresConnection

    name = f"conformance_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    dsn = fresh_pg_database(template, name)

    def postgres(pid: str, group: str, **_: Any) -> PostgresConnection:
        return PostgresConnection(dsn, pid=pid, group=group)

    yield Store("postgres", connect=postgres)
    drop_pg_database(template, name)


@pytest.fixture
def uid() -> Callable[[str], str]:
    """Unique ids (and the test's group) so a shared database is never reset."""
    tag = uuid.uuid4().hex[:10]
    return lambda name: f"{name}-{tag}"


@pytest.fixture
def group(uid: Callable[[str], str]) -> str:
    return uid("g")


Factory = Callable[..., Awaitable[tuple[Resonate, Any]]]


@pytest.fixture
async def resonates(store: Store, group: str) -> AsyncIterator[Factory]:
    """``await resonates(pid, ttl=..., sources=..., sqlite={...}, **resonate_kw)``
    -> ``(Resonate, connection)``; all are stopped at teardown. The same ``pid``
    and ``group`` go to the connection and to ``Resonate``."""
    made: list[Resonate] = []

    async def make(
        pid: str,
        *,
        ttl: timedelta | None = None,
        sqlite: dict[str, Any] | None = None,
        **kw: Any,
    ) -> tuple[Resonate, Any]:
        conn = store.connect(pid, group, **(sqlite or {}))
        if isinstance(conn, SqliteConnection):
            await conn.start()  # fail fast on a bad file
        kw.setdefault("subscription_refresh_secs", 1.0)
        r = Resonate(network=conn, group=group, pid=pid, ttl=ttl, **kw)
        made.append(r)
        return r, conn

    yield make
    for r in reversed(made):
        with contextlib.suppress(Exception):
            await asyncio.wait_for(r.stop(), 10)
