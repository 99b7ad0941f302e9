"""`sqlite:///PATH`: the embedded store, Tether's default.

Promises and tasks live in SQLite through `resonate_sqlite.connection.SqliteConnection`
(the Resonate protocol, in process); the job index is the `tether_jobs` table
in the same file. Several processes on one host may share the file.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import sqlite3
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.errors import StoreUnavailable
from core.settings import Settings
from core.store.sql import INDEXES, SqlJobIndex
from resonate_sqlite import DEFAULT_LOCK_TIMEOUT, HOT_PATH_AUTOCHECKPOINT, BusyBackoff, is_busy

if TYPE_CHECKING:
    from core.store import Store

TABLE = """CREATE TABLE IF NOT EXISTS tether_jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    backend TEXT NOT NULL,
    state TEXT NOT NULL,
    params TEXT NOT NULL,
    metadata TEXT NOT NULL,
    timeout REAL NOT NULL,
    fingerprint TEXT NOT NULL,
    deadline INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    external TEXT,
    result TEXT,
    error TEXT,
    finished_at INTEGER,
    next_check_at INTEGER
)"""


class SqliteIndex(SqlJobIndex):
    """The job index on SQLite; its health check also needs the write lock, so
    a database another process holds locked reads as unavailable."""

    db: SqliteDriver

    async def ping(self) -> None:
        await self.db.check_writable()


class SqliteDriver:
    """Runs the job index's SQL on its own SQLite connection, on the event loop.

    Each statement is its own short transaction (autocommit; WAL with
    `synchronous = NORMAL`, so a commit does not wait on the disk), which costs
    less than handing it to a thread and back. Like the store engine, it never
    waits inside SQLite for a lock: a statement that finds the write lock taken
    is retried after a short sleep, for up to `DEFAULT_LOCK_TIMEOUT` (the store
    connection's own wait), so a locked file slows the index's writes without
    stopping the loop. Checkpoints are the store's checkpointer thread's work,
    not this connection's."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA busy_timeout = 0")
            conn.execute(f"PRAGMA wal_autocheckpoint = {HOT_PATH_AUTOCHECKPOINT}")
            conn.execute("PRAGMA synchronous = NORMAL")
            self._conn = conn
        return self._conn

    async def _run[T](self, fn: Callable[[sqlite3.Connection], T]) -> T:
        backoff = BusyBackoff(DEFAULT_LOCK_TIMEOUT)
        while True:
            try:
                return fn(self._connect())
            except sqlite3.OperationalError as exc:
                if not is_busy(exc):
                    raise StoreUnavailable(f"the embedded store failed: {exc}") from None
                delay = backoff.next_delay()
                if delay is None:
                    raise StoreUnavailable(
                        f"the embedded store failed: {exc} (gave up after "
                        f"{DEFAULT_LOCK_TIMEOUT:g} s)"
                    ) from None
            except sqlite3.Error as exc:
                raise StoreUnavailable(f"the embedded store failed: {exc}") from None
            await asyncio.sleep(delay)

    async def fetch(self, sql: str, args: Sequence[Any]) -> list[tuple[Any, ...]]:
        return await self._run(lambda c: c.execute(sql, args).fetchall())

    async def execute(self, sql: str, args: Sequence[Any]) -> int:
        return await self._run(lambda c: c.execute(sql, args).rowcount)

    async def check_writable(self) -> None:
        """Take the write lock and let it go."""

        def check(conn: sqlite3.Connection) -> None:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("ROLLBACK")

        await self._run(check)

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.close()


def sqlite_path(url: str) -> Path:
    """`sqlite:///relative/path` or `sqlite:////absolute/path` → the path."""
    if not url.startswith("sqlite:///") or len(url) == len("sqlite:///"):
        raise ValueError(
            f"TETHER_STORE={url!r}: write sqlite:///PATH (four slashes for an absolute path)"
        )
    return Path(url.removeprefix("sqlite:///"))


def callback_secret(db: Path) -> str:
    """The secret kept beside the database, made on first use. Two processes
    starting at once agree: the file appears atomically, first one wins."""
    path = db.with_name(db.name + ".secret")
    with contextlib.suppress(FileNotFoundError):
        return path.read_text().strip()
    fd, tmp = tempfile.mkstemp(dir=db.parent, prefix=".secret-")
    try:
        os.write(fd, secrets.token_urlsafe(32).encode())
        os.fchmod(fd, 0o600)
        os.close(fd)
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        os.unlink(tmp)
    return path.read_text().strip()


async def open_embedded(url: str, settings: Settings, pid: str) -> Store:
    from core.store import Store, StoreConfigError
    from resonate_sqlite import SqliteConnection

    path = sqlite_path(url)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        secret = settings.callback_secret or callback_secret(path)
    except OSError as exc:
        raise StoreConfigError(f"cannot use the embedded store at {path}: {exc.strerror}") from None
    connection = SqliteConnection(
        path, group=settings.group, pid=pid, max_inflight=settings.max_concurrent_tasks
    )
    try:
        await connection.start()
    except Exception as exc:
        raise StoreConfigError(f"cannot open the embedded store at {path}: {exc}") from None
    driver = SqliteDriver(path)
    try:
        for statement in (TABLE, *INDEXES):
            await driver.execute(statement, ())
    except StoreUnavailable as exc:
        await connection.stop()
        await driver.close()
        raise StoreConfigError(f"cannot open the embedded store at {path}: {exc.message}") from None
    return Store(
        kind="sqlite", connection=connection, jobs=SqliteIndex(driver), callback_secret=secret
    )
