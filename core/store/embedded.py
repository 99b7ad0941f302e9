"""`sqlite:///PATH`: the embedded store, Tether's default.

Promises and tasks live in SQLite through `resonate_sqlite.connection.SqliteConnection`
(the Resonate protocol, in process); the job index is the `tether_jobs` table
in the same file. Several processes on one host may share the file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import sqlite3
import stat
import tempfile
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgspec

from core.errors import StoreConfigError, StoreUnavailable
from core.scratch import Scratch
from core.settings import Settings, describe, listed
from core.store.base import (
    LAST_HOST,
    STORE_WAIT,
    Store,
    WorkflowIds,
    check_notify_secret,
    new_notify_secret,
    signing_secrets,
)
from core.store.jobs import now_ms
from core.store.migrations import migrate
from core.store.schema import SQLITE
from core.store.sql import Session, SqlJobIndex
from resonate_sqlite import (
    HOT_PATH_AUTOCHECKPOINT,
    BusyBackoff,
    SqliteConnection,
    SqliteStoreError,
    is_busy,
    retry_briefly,
)

BESIDE = (
    (
        "-wal",
        "write-ahead log",
        "a process started now would not see the jobs written since the last checkpoint",
    ),
    (
        "-shm",
        "write-ahead log's index",
        "a process started now would make another, and the two would write over each"
        " other's commits in the log",
    ),
)
"""The files SQLite keeps beside the store's while it is open, what each is,
and what is lost when one is deleted (a clean-up of "stray" files) or
replaced under a running service: this process goes on with the old one, a
process started since makes a new one (`check_writable` finds it). A deleted
`-shm` lost a third of the commits of two processes, measured: each wrote
its frames where the other's were, with `integrity_check` still ok."""


log = logging.getLogger("tether")

DAMAGE_CODES = (11, 26)
"""SQLite's result codes for a damaged file: `SQLITE_CORRUPT` ("database
disk image is malformed") and `SQLITE_NOTADB` ("file is not a database")."""


def damaged(exc: BaseException) -> bool:
    """Whether a store error (or one it was raised from, or wraps: the
    engine's `SqliteStoreError`) is SQLite finding the file damaged."""
    seen: set[int] = set()
    todo: list[Any] = [exc]
    while todo:
        err = todo.pop()
        if not isinstance(err, BaseException) or id(err) in seen:
            continue
        seen.add(id(err))
        if getattr(err, "sqlite_errorcode", None) in DAMAGE_CODES:
            return True
        # SQLite's words, as its errors and the engine's (which quote them)
        # say them: not any exception's, which might quote a request (a review)
        if isinstance(err, sqlite3.Error) or type(err).__module__.startswith("resonate_sqlite"):
            text = str(err)
            if "database disk image is malformed" in text or "file is not a database" in text:
                return True
        todo += [err.__cause__, err.__context__, *err.args]
    return False


def _identity(path: Path) -> tuple[int, int] | None:
    """The device and inode of the file at `path`; None if there is none."""
    try:
        found = os.stat(path)
    except (OSError, ValueError):
        return None
    return found.st_dev, found.st_ino


def _hosts_root(uid_map: str = "/proc/self/uid_map") -> bool:
    """Whether this process is root of the host's user namespace (its uid 0
    is the kernel's 0: `uid_map` maps 0 to 0)."""
    if os.geteuid() != 0:
        return False
    try:
        with open(uid_map) as mapped:
            return any(line.split()[:2] == ["0", "0"] for line in mapped)
    except OSError:
        return True  # no /proc: no namespaces to tell


DISK_LEFT_MIN = 1 << 20
"""Bytes free on the store's disk below which `/health` says the store is
unavailable: a write of a job and its history needs some tens of KB."""


def disk_left(path: Path) -> int | None:
    """Bytes this process may still write on the filesystem holding `path`
    (the file's own, links resolved); None when it cannot tell. Root may
    write into the blocks reserved for it (`f_bfree`), others not
    (`f_bavail`): a root service on a disk 95% full still writes. Only the
    host's root, not a container's mapped one (a user namespace), whose
    writes failed while this counted the reserve (found by a review). A
    filesystem reporting no blocks at all (some FUSE and network ones)
    tells nothing."""
    try:
        disk = os.statvfs(os.path.realpath(path))
    except (OSError, ValueError):
        return None  # the lock was taken: the file is there
    if disk.f_blocks == 0:
        return None
    free = disk.f_bfree if _hosts_root() else disk.f_bavail
    return free * disk.f_frsize


class EmbeddedStore(Store):
    """`sqlite:///PATH`: the Resonate protocol and the job index in one file."""

    kind = "sqlite"
    connection: SqliteConnection

    @classmethod
    async def open(cls, settings: Settings, pid: str) -> EmbeddedStore:
        try:
            path = sqlite_path(settings.store)
        except ValueError as exc:
            raise StoreConfigError(str(exc)) from None
        return cls(*await _open(path, settings, pid))

    async def delete_promises(self, older_than_ms: int, ids: WorkflowIds | None = None) -> int:
        """The engine's `gc`: whole lineages whose root settled `older_than_ms`
        ago. With `ids`, a lineage whose job the index holds open is kept,
        read in the transaction that would delete it (`gc`'s `keep`): one
        that the store timed out, a job the watchdog has yet to time out;
        and those of its earlier attempts with it."""
        if ids is None:
            return await self.connection.gc(older_than_ms)

        def open_job(db: sqlite3.Connection, root_id: str) -> bool:
            return db.execute(OPEN_JOB, (ids.job(root_id),)).fetchone() is not None

        return await self.connection.gc(older_than_ms, keep=open_job)

    async def close(self) -> None:
        await self.jobs.close()
        await self.connection.stop()


OPEN_JOB = "SELECT 1 FROM tether_jobs WHERE id = ? AND finished_at IS NULL"
"""A row if the index holds job `?` open (a primary-key read)."""


class MemoryStore(EmbeddedStore):
    """`memory://`: the embedded store on a file of its own, deleted on close
    (or by the next `memory://` process once this one is gone: `core.scratch`).

    Nothing outlives the process, and it stays as fast as the embedded store
    however many jobs it has seen (resonate's LocalConnection scans every
    promise on each request)."""

    kind = "memory"

    def __init__(
        self,
        connection: SqliteConnection,
        jobs: SqliteIndex,
        callback_secret: str,
        callback_secret_previous: tuple[str, ...],
        notify_secrets: tuple[str, ...],
        scratch: Scratch,
    ) -> None:
        super().__init__(
            connection, jobs, callback_secret, callback_secret_previous, notify_secrets
        )
        self.scratch = scratch

    @classmethod
    async def open(cls, settings: Settings, pid: str) -> MemoryStore:
        scratch = Scratch(SCRATCH_PREFIX)
        try:
            opened = await _open(scratch.path / "tether.db", settings, pid)
            return cls(*opened, scratch=scratch)
        except BaseException:
            scratch.remove()
            raise

    async def close(self) -> None:
        try:
            await super().close()
        finally:
            self.scratch.remove()


SCRATCH_PREFIX = "tether-memory-"


class SqliteIndex(SqlJobIndex):
    """The job index on SQLite; its health check also needs the write lock, so
    a database another process holds locked reads as unavailable."""

    db: SqliteDriver

    @property
    def settles_together(self) -> bool:  # type: ignore[override]
        """On the store engine's own connection (the service's), the
        index's writes run in the engine's transactions."""
        return self.db.shared

    async def ping(self) -> None:
        await self.db.check_writable()

    async def change_mark(self) -> object:
        return await self.db.change_mark()


class SqliteDriver:
    """Runs the job index's SQL on a SQLite connection, on the event loop.

    In the service that connection is the store engine's own (`shared`): one
    connection per process keeps its page cache across the index's and the
    engine's commits, where SQLite empties a connection's whole cache at the
    start of each read after *another* connection wrote, so two connections
    to one file in one process kept emptying each other's (a job's index reads
    cost 3-4 times as much). Neither side leaves a transaction open across a
    turn of the loop (the engine's batches run in one call; see `transaction`
    for the index's), and the engine treats the index's open transaction as a
    taken lock. Without `shared` (the Resonate-server store's index, tests) the
    driver opens a connection of its own.

    A statement on its own (a read, a single-row write) is its own short
    transaction (autocommit; WAL with `synchronous = NORMAL`, so a commit does
    not wait on the disk), which costs less than handing it to a thread and
    back. The index's write transactions (`atomic`) run inside the engine's
    next group commit on the shared connection. Like the store engine, it never
    waits inside SQLite for a lock: a statement that finds the write lock taken
    is tried again at once for up to half a millisecond (`retry_briefly`),
    then after a short sleep on the loop, for up to `STORE_WAIT` (the store
    connection's own wait), so a locked file slows the index's writes without
    stopping the loop. Checkpoints are the store's checkpointer thread's work,
    not this connection's."""

    dialect = SQLITE

    def __init__(self, path: Path, shared: SqliteConnection | None = None) -> None:
        self.path = path
        self._shared = shared
        self._conn: sqlite3.Connection | None = None
        # `fetch_aside`'s connection (used on threads, one at a time) and the
        # answers it keeps, by statement, with the `data_version` read at.
        self._aside: sqlite3.Connection | None = None
        self._aside_pool: ThreadPoolExecutor | None = None  # its one thread
        self._aside_closed = False
        self._aside_lock = threading.Lock()
        self._aside_kept: dict[tuple[str, tuple[Any, ...]], tuple[int, list[tuple[Any, ...]]]] = {}
        self._marker: sqlite3.Connection | None = None  # `change_mark`'s, used on the loop
        self._markers = 0  # its connections opened so far: which one a mark is of
        self._file = _identity(path)
        """The file's device and inode as opened (`check_writable` compares)."""
        if shared is not None:  # the engine's own reads find damage too (found by a review)
            shared.on_failure = self._failed
        self._damage: str | None = None
        """What SQLite said when it first found the file damaged (`_failed`):
        every later `check_writable` fails with it."""
        self._beside: dict[str, tuple[int, int] | None] = {}
        """Its `-wal` and `-shm` files' (the write-ahead log and its index), as
        `check_writable` first found them."""

    @property
    def shared(self) -> bool:
        """Whether it runs on the store engine's connection."""
        return self._shared is not None

    def _connected(self) -> sqlite3.Connection:
        conn = self._connect()
        if conn is None:  # closed again since `_run` looked
            raise StoreUnavailable(f"the embedded store at {self.path} is closed")
        return conn

    def _connect(self) -> sqlite3.Connection | None:
        """The connection to run on; None when the shared one is closed
        (`_run` has it opened again)."""
        if self._shared is not None:
            return self._shared.shared_db()
        if self._conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA busy_timeout = 0")
            conn.execute(f"PRAGMA wal_autocheckpoint = {HOT_PATH_AUTOCHECKPOINT}")
            conn.execute("PRAGMA synchronous = NORMAL")
            self._conn = conn
        return self._conn

    async def _run[T](self, fn: Callable[[sqlite3.Connection], T]) -> T:
        backoff = BusyBackoff(STORE_WAIT)
        while True:
            if self._shared is not None and self._shared.shared_db() is None:
                await self._reopen()
            try:
                # The other process's lock is usually free again within a
                # fraction of a millisecond; a sleep on a loaded loop lasts a
                # whole turn of it (resonate_sqlite/busy.py).
                return retry_briefly(lambda: fn(self._connected()), _lock_taken)
            except sqlite3.OperationalError as exc:
                if not is_busy(exc):
                    raise self._failed(exc) from None
                delay = backoff.next_delay()
                if delay is None:
                    raise StoreUnavailable(
                        f"the embedded store failed: {exc} (gave up after {STORE_WAIT:g} s)"
                    ) from None
            except sqlite3.Error as exc:
                raise self._failed(exc) from None
            await asyncio.sleep(delay)

    def _failed(self, exc: BaseException) -> StoreUnavailable:
        """The error to raise for SQLite's `exc`. A damaged file (`damaged`)
        is logged once, as an ERROR saying what to do, and from then on
        `/health` answers 503 with it (`check_writable`): it went unseen,
        each request that read a damaged page answering 503 while `/health`
        said ok, and nothing in the log. Not found at start: checking the
        whole file takes minutes at a million jobs."""
        if not damaged(exc):
            return StoreUnavailable(f"the embedded store failed: {exc}")
        if self._damage is None:
            self._damage = str(exc)
            log.error(
                "the embedded store %s is damaged (%s): the jobs on its damaged pages cannot"
                " be read, and writing on may spread the damage; stop every service on it,"
                " then restore the latest backup (tether restore) or recover what can be read"
                ' (docs/operations.md, "A damaged store")',
                self.path,
                exc,
            )
        return self._damaged(str(exc))

    def _damaged(self, said: str, found: str = "") -> StoreUnavailable:
        """What a request (or `/health`, `found` saying when) answers about
        a file SQLite `said` is damaged."""
        return StoreUnavailable(
            f"the embedded store {self.path} is damaged ({said}){found}; stop every service"
            ' on it and restore a backup (docs/operations.md, "A damaged store")'
        )

    async def _reopen(self) -> None:
        """The shared connection, after `stop` closed it: a step still
        running at shutdown writes to the index late, as it sends its
        protocol requests late (`SqliteConnection.reopen_db`)."""
        assert self._shared is not None
        try:
            await self._shared.reopen_db()
        except SqliteStoreError as exc:
            raise self._failed(exc) from None

    async def fetch(self, sql: str, args: Sequence[Any]) -> list[tuple[Any, ...]]:
        return await self._run(lambda c: c.execute(sql, args).fetchall())

    async def execute(self, sql: str, args: Sequence[Any]) -> int:
        return await self._run(lambda c: c.execute(sql, args).rowcount)

    async def fetch_aside(
        self, sql: str, args: Sequence[Any], *, keep: bool = True
    ) -> list[tuple[Any, ...]]:
        """A read that may be long (one that reads a whole index, a page
        whose filters rarely meet) on a connection of its own that only
        reads, on a thread of its own: the sqlite3 module lets go of the GIL
        while SQLite reads, so the event loop goes on serving requests
        meanwhile. WAL readers take no lock a writer waits on. The thread
        reads one statement at a time, so however many such reads are asked
        at once, a process spends at most one thread's worth of CPU on them,
        and those waiting hold no thread of the loop's default executor
        (which resolves the triggers' host names). It sees every commit made
        before the read began, this process's and others'.

        With `keep`, the answer is kept, and given again while nothing was
        committed to the file since it was read: `PRAGMA data_version` on
        that connection changes with every commit of any other connection
        (this process's or another's), and the connection itself never
        writes. So a count read at each `/metrics` scrape of an idle store
        with a million jobs costs one pragma, and an answer is never older
        than the last commit. Without it (a page of jobs: many different
        statements), nothing is kept."""

        def read(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
            if not keep:
                return conn.execute(sql, args).fetchall()
            version = conn.execute("PRAGMA data_version").fetchone()[0]
            key = (sql, tuple(args))
            kept = self._aside_kept.get(key)
            if kept is not None and kept[0] == version:
                return kept[1]
            rows = conn.execute(sql, args).fetchall()
            self._aside_kept[key] = (version, rows)
            return rows

        return list(await self._aside_run(read))

    async def change_mark(self) -> tuple[int, int]:
        """A value that differs once anything was committed to the file since
        it was read (by this process or another): `PRAGMA data_version` on a
        connection of its own that nothing else uses (so every commit is
        another connection's), and which connection that was. Read on the
        loop: it reads the WAL's index and waits on no lock, some
        microseconds. (On `fetch_aside`'s thread it waited behind any slow
        read there, and streams learnt of other processes' events late;
        found by a review.)"""
        if self._aside_closed:
            raise StoreUnavailable(f"the embedded store at {self.path} is closed")
        try:
            if self._marker is None:
                # not `mode=ro`, for the reason `_aside_run` gives
                uri = f"{self.path.resolve().as_uri()}?mode=rw"
                self._marker = sqlite3.connect(uri, uri=True)
                self._markers += 1
            return self._markers, self._marker.execute("PRAGMA data_version").fetchone()[0]
        except sqlite3.Error as exc:
            self._close_marker()  # the next look opens a new one
            raise self._failed(exc) from None

    def _close_marker(self) -> None:
        conn, self._marker = self._marker, None
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    async def _aside_run[T](self, work: Callable[[sqlite3.Connection], T]) -> T:
        """`work` on `fetch_aside`'s connection (opened if need be), on its
        thread; a connection that failed is closed, the next call opening
        another."""

        def run() -> T:
            try:
                with self._aside_lock:
                    if self._aside_closed:
                        raise sqlite3.ProgrammingError("closed")
                    conn = self._aside
                    if conn is None:
                        # Never writes, but not `mode=ro`: at shutdown the engine's
                        # connection closes first (`Resonate.stop`), and the last
                        # to close checkpoints the WAL and removes it, which a
                        # read-only one cannot (it left the WAL behind).
                        uri = f"{self.path.resolve().as_uri()}?mode=rw"
                        conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
                        self._aside = conn
                    return work(conn)
            except sqlite3.Error:
                self._close_aside()  # the next read opens a new one
                raise

        pool = self._aside_pool
        if pool is None:
            pool = self._aside_pool = ThreadPoolExecutor(1, thread_name_prefix="tether-aside")
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, run)
        except sqlite3.Error as exc:
            raise self._failed(exc) from None

    def _close_aside(self, *, for_good: bool = False) -> None:
        """Close `fetch_aside`'s connection and forget its answers (`for_good`:
        and open none again). Waits for a read in progress on another thread
        (at most one)."""
        with self._aside_lock:
            self._aside_closed = self._aside_closed or for_good
            conn, self._aside = self._aside, None
            self._aside_kept.clear()
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    async def check_writable(self) -> None:
        """Take the write lock and let it go; `StoreUnavailable` when the
        disk holding the file has less than `DISK_LEFT_MIN` bytes free. (A
        full disk failed every write with 503 while `/health` said ok: the
        lock needs no space; found by a QA pass.)"""

        def check(conn: sqlite3.Connection) -> None:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("ROLLBACK")

        await self._run(check)
        if self._damage is not None:
            raise self._damaged(self._damage, ", found by a read since this process started")
        if self._file is not None and _identity(self.path) != self._file:
            # Replaced (`mv` of a copy over it) or deleted while open: this
            # process writes on to the old file, one started now opens
            # another: jobs answered by one and not the other, lost at the
            # next start (found by a QA pass).
            raise StoreUnavailable(
                f"the embedded store's file {self.path} was replaced or deleted while this"
                " process had it open, and it still uses the old one: stop every service on"
                " it; to put a copy in place, use `tether restore` (docs/operations.md)"
            )
        # next to the file itself (SQLite resolves links); there while any
        # connection is open
        real = os.path.realpath(self.path)
        for end, what, lost in BESIDE:
            found = _identity(Path(f"{real}{end}"))
            if end not in self._beside:
                self._beside[end] = found
            elif found != self._beside[end]:
                raise StoreUnavailable(
                    f"the embedded store's {what} {self.path}{end} was replaced or deleted"
                    f" while this process had it open: {lost}; stop every service on it,"
                    " then check its jobs (restore a backup if some are missing;"
                    " docs/operations.md)"
                )
        if str(self.path) != ":memory:":
            left = disk_left(self.path)
            if left is not None and left < DISK_LEFT_MIN:
                raise StoreUnavailable(
                    f"the disk holding the embedded store ({self.path.parent}) is full:"
                    f" {left} bytes free; writes fail until space is freed"
                )

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[SqliteDriver]:
        """`BEGIN IMMEDIATE` (waiting for the write lock as every statement
        does), the block's statements in that transaction, then `COMMIT`.
        Holding the write lock from the start, the block's statements never
        find it taken, so they run without yielding to the loop: no other
        statement of this connection lands in the transaction.

        Nothing is held while the write lock is awaited: each waiting block
        retries on its own, so one block's wait never queues the others behind
        it (a process-wide turn did, and tripled `POST /jobs` latency under
        load). Should a block ever yield inside its transaction, another
        block's `BEGIN` sees the connection's open transaction and waits as it
        would for the lock."""
        await self._run(_begin)
        try:
            yield self
            await self._run(lambda c: c.execute("COMMIT"))
        except BaseException:
            conn = self._connect()
            if conn is not None and conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            raise

    migration_lock = transaction
    """Migrations run in one transaction, which the write lock serialises."""

    async def atomic[T](
        self,
        body: Callable[[Session], Coroutine[Any, Any, T]],
        after: Callable[[T], None] | None = None,
    ) -> T:
        """`body(tx)` in one transaction (`Driver.atomic`). On the store
        engine's connection that is a part of the engine's next group commit
        (`SqliteConnection.atomic`): the job index's writes share the batch's
        write lock and its one `COMMIT` (each `COMMIT` writes the pages it
        changed to the WAL, and a batch's jobs share the B-trees' last pages)
        and need no lock of their own, which the other worker may hold. The
        body runs inside that transaction on the loop; its statements never
        wait (the lock is held), so it is run to its end in one go."""
        if self._shared is None:
            async with self.transaction() as tx:
                result = await body(tx)
            if after is not None:
                after(result)
            return result
        shared = self._shared
        sessions: list[_Inline] = []

        def run(db: sqlite3.Connection) -> T:
            sessions.append(inline := _Inline(db, shared, self._failed))
            return _to_the_end(body(inline))

        def committed(result: T) -> None:
            shared.deliver(sessions[-1].msgs)  # an `_Inline.request`'s messages
            if after is not None:
                after(result)

        try:
            return await shared.atomic(run, committed)
        except SqliteStoreError as exc:
            raise self._failed(exc) from None

    def refused(self) -> str | None:
        """A file is opened, not connected to: nothing refuses."""
        return None

    async def close(self) -> None:
        """Close the driver's own connections (a shared one is the engine's to
        close). A read aside asked later fails as the store's error."""
        self._close_aside(for_good=True)
        self._close_marker()
        pool, self._aside_pool = self._aside_pool, None
        if pool is not None:
            pool.shutdown(wait=False)  # reads still queued find it closed
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.close()


class _Inline:
    """The statements of a body `SqliteDriver.atomic` runs inside the store
    engine's transaction: run at once (the write lock is held). Protocol
    requests too (`request`: `core.store.jobs.Requests`), which commit with
    them or not at all."""

    def __init__(
        self,
        db: sqlite3.Connection,
        shared: SqliteConnection,
        failed: Callable[[BaseException], StoreUnavailable],
    ) -> None:
        self._db = db
        self._shared = shared
        self._failed = failed
        self.msgs: list[str] = []
        """What its requests have for this process's receivers, handed on
        once committed."""

    async def request(self, kind: str, data: dict[str, Any]) -> tuple[int, Any]:
        try:
            status, answer, msgs = self._shared.request_in(self._db, kind, data)
        except sqlite3.Error as exc:
            raise self._failed(exc) from None
        self.msgs += msgs
        return status, answer

    async def fetch(self, sql: str, args: Sequence[Any]) -> list[tuple[Any, ...]]:
        try:
            return self._db.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise self._failed(exc) from None

    async def execute(self, sql: str, args: Sequence[Any]) -> int:
        try:
            return self._db.execute(sql, args).rowcount
        except sqlite3.Error as exc:
            raise self._failed(exc) from None


def _to_the_end[T](coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that awaits nothing that waits (`_Inline`'s
    statements) to its end, here and now."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    coro.close()
    raise RuntimeError("a job index transaction waited on something inside the store's batch")


OWN_TRANSACTION = "database is locked (a transaction of this connection)"


def _begin(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:  # another block of this connection has it: wait as for the lock
        raise sqlite3.OperationalError(OWN_TRANSACTION)
    conn.execute("BEGIN IMMEDIATE")


def _lock_taken(exc: Exception) -> bool:
    """Another connection holds the write lock: worth trying again at once.
    Not this connection's own open transaction, which only the loop can end."""
    return (
        isinstance(exc, sqlite3.OperationalError) and is_busy(exc) and str(exc) != OWN_TRANSACTION
    )


def sqlite_path(url: str) -> Path:
    """`sqlite:///relative/path` or `sqlite:////absolute/path` → the path."""
    if not url.startswith("sqlite:///") or len(url) == len("sqlite:///"):
        raise ValueError(
            f"TETHER_STORE={describe(url)!r}: write sqlite:///PATH (four slashes for an"
            " absolute path)"
        )
    return Path(url.removeprefix("sqlite:///"))


def secret_path(db: Path) -> Path:
    """The file beside the database that keeps its callback secrets: one a
    line, the current one first, then the previous ones still accepted."""
    return db.with_name(db.name + ".secret")


def read_secrets(path: Path) -> list[str]:
    """The secrets in a secret file, current first (blank lines skipped);
    `StoreConfigError` when it holds none."""
    kept = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not kept:
        raise StoreConfigError(f"the callback secret file {path} is empty")
    return kept


def write_secrets(path: Path, kept: Sequence[str]) -> None:
    """Replace the secret file at once (readers see the old or the new one,
    never a part), private to its owner."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".secret-")
    try:
        with os.fdopen(fd, "w") as out:
            os.fchmod(out.fileno(), 0o600)
            out.write("".join(f"{secret}\n" for secret in kept))
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def private_database(path: Path) -> None:
    """Make the database file `path`, empty and private to its owner (0600),
    unless it exists: SQLite then opens it as a new database, and makes its
    `-wal` and `-shm` files with the same mode. (Made by SQLite, all three
    took the umask's mode, 0644 as a rule: a job's params, results and
    history readable by every user of the host.) An existing file keeps its
    mode: the operator's to choose."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def open_to_all(db: Path) -> list[Path]:
    """The store's files (the database, its `-wal` and `-shm`, its secret
    files) that every user of the host may read: a store made before its
    files were made private (0600) keeps the umask's mode (0644 as a rule)
    through an upgrade (found by an exploratory QA pass)."""
    names = (db, *(db.with_name(db.name + end) for end in ("-wal", "-shm")))
    found = []
    for path in (*names, secret_path(db), notify_secret_path(db)):
        with contextlib.suppress(OSError):
            if path.stat().st_mode & stat.S_IROTH:
                found.append(path)
    return found


def _write_once(path: Path, text: str) -> None:
    """Make `path` (mode 0600) holding `text` unless it exists. Two processes
    starting at once agree: the file appears atomically, whole, and the first
    one wins."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".secret-")
    try:
        os.write(fd, text.encode())
        os.fchmod(fd, 0o600)
        os.close(fd)
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        os.unlink(tmp)


def callback_secrets(db: Path) -> list[str]:
    """The secrets kept beside the database, current first; made on first use
    (first one wins)."""
    path = secret_path(db)
    if not path.exists():
        _write_once(path, secrets.token_urlsafe(32))
    return read_secrets(path)


def notify_secret_path(db: Path) -> Path:
    """The file beside the database that keeps its notification secrets: one
    a line, the current one first, then the previous ones each message is
    also signed with during a rotation (`rotate_notify_secret`)."""
    return db.with_name(db.name + ".notify-secret")


def read_notify_secrets(path: Path) -> list[str]:
    """The notification secrets in their file, current first (blank lines
    skipped), each checked; `StoreConfigError` naming the file (and the line,
    when it has several), never its content, when a line is not a secret or
    there is none."""
    lines = [line.strip() for line in path.read_text().splitlines()]
    kept = [(number, line) for number, line in enumerate(lines, 1) if line]
    if not kept:
        raise StoreConfigError(f"the notification secret file {path} is empty")
    source = f"the notification secret file {path}"
    if len(kept) == 1:
        return [check_notify_secret(kept[0][1], source)]
    return [check_notify_secret(line, f"{source} (line {number})") for number, line in kept]


def read_notify_secret(path: Path) -> str:
    """The current notification secret in its file (the one receivers are
    given), the whole file checked as `read_notify_secrets` does."""
    return read_notify_secrets(path)[0]


def notify_secrets(db: Path) -> list[str]:
    """The notification secrets kept beside the database (`whsec_...`),
    current first; the file is made on first use (first one wins), mode 0600,
    holding one new secret."""
    path = notify_secret_path(db)
    if not path.exists():
        _write_once(path, new_notify_secret() + "\n")
    return read_notify_secrets(path)


def rotate_notify_secret(db: Path) -> int:
    """Make a new current notification secret, keeping the current and
    previous ones as previous (messages are signed with all of them); return
    how many are previous now. Running services read the file when they start."""
    path = notify_secret_path(db)
    kept = read_notify_secrets(path)
    write_secrets(path, [new_notify_secret(), *kept])
    return len(kept)


def drop_previous_notify_secrets(db: Path) -> int:
    """Forget the previous notification secrets (messages are then signed with
    the current one only); how many went."""
    path = notify_secret_path(db)
    current, *previous = read_notify_secrets(path)
    write_secrets(path, [current])
    return len(previous)


def rotate_secret(db: Path) -> int:
    """Make a new current secret, keeping the current and previous ones as
    previous; return how many are previous now. Running services read the file
    when they start."""
    path = secret_path(db)
    kept = read_secrets(path)
    write_secrets(path, [secrets.token_urlsafe(32), *kept])
    return len(kept)


def read_only(db: Path) -> contextlib.closing[sqlite3.Connection]:
    """A read-only connection to the store's database, beside a running
    service (WAL: its writes do not block this)."""
    return contextlib.closing(
        sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=5)
    )


def last_start(conn: sqlite3.Connection) -> Any:
    """The store's record of its last start (`LAST_HOST`, as
    `Tether.compare_with_last_host` writes it), decoded; None when there is
    none. Raises `msgspec.DecodeError` for a damaged one."""
    row = conn.execute("SELECT value FROM tether_meta WHERE name = ?", (LAST_HOST,)).fetchone()
    return msgspec.json.decode(row[0]) if row else None


def waiting_on_previous_secrets(db: Path) -> tuple[bool, int, int]:
    """Before the previous callback secrets are dropped: whether the store's
    last start signed with the current one (else the service has not started
    since the rotation, and every URL it handed out is signed with one about
    to go), how many jobs wait (`pending` or `running`) that were created
    before that start, whose URLs may be signed with a previous secret (more
    than are: a retry since gets a new URL; never fewer), and when that start
    was (ms; 0 when the record does not say, and every waiting job is
    counted). Read only, beside a running service; a store not made yet has
    none. The last start is the store's: with two `tether serve` on one
    file (docs/embedded-store.md advises against it), jobs the one not
    restarted signs with the old secret are not counted."""
    from core.tokens import fingerprint

    if not db.exists():
        return True, 0, 0
    signs = fingerprint(read_secrets(secret_path(db))[0])
    with read_only(db) as conn:
        try:
            last = last_start(conn) or {}
            restarted, since = last.get("signs") == signs, int(last.get("at") or 0)
        except (msgspec.DecodeError, AttributeError, TypeError, ValueError, OverflowError):
            restarted, since = False, 0
        if not 0 < since <= now_ms():  # a damaged record: every waiting job counts
            since = 0
        query = "SELECT count(*) FROM tether_jobs WHERE state IN ('pending', 'running')"
        if restarted and since:
            (waiting,) = conn.execute(query + " AND created_at < ?", (since,)).fetchone()
        else:
            (waiting,) = conn.execute(query).fetchone()
    return restarted, int(waiting), since


def drop_previous_secrets(db: Path) -> int:
    """Forget the previous secrets (their URLs then answer 401); how many went."""
    path = secret_path(db)
    current, *previous = read_secrets(path)
    write_secrets(path, [current])
    return len(previous)


async def _open(
    path: Path, settings: Settings, pid: str
) -> tuple[SqliteConnection, SqliteIndex, str, tuple[str, ...], tuple[str, ...]]:
    """The engine's connection, the job index, the callback secret and the
    previous ones (the configured ones, else those kept beside the file), and
    the notification secrets, current first (the configured
    ones, else those kept beside it, with the configured previous ones)."""
    secret, previous = settings.callback_secret, listed(settings.callback_secret_previous)
    notify, notify_previous = settings.notify_secret, listed(settings.notify_secret_previous)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        private_database(path)
        if not secret:
            secret, *kept = callback_secrets(path)
            previous = (*kept, *previous)
        if not notify:
            notify, *notify_kept = notify_secrets(path)
            notify_previous = (*notify_kept, *notify_previous)
    except OSError as exc:
        raise StoreConfigError(f"cannot use the embedded store at {path}: {exc.strerror}") from None
    connection = SqliteConnection(
        path, group=settings.group, pid=pid, max_inflight=settings.max_concurrent_tasks
    )
    try:
        await connection.start()
    except Exception as exc:
        raise StoreConfigError(f"cannot open the embedded store at {path}: {exc}") from None
    driver = SqliteDriver(path, shared=connection)
    try:
        await migrate(driver)
    except BaseException as exc:
        await driver.close()
        await connection.stop()
        if isinstance(exc, StoreUnavailable):  # locked for longer than a start waits
            raise StoreUnavailable(
                f"cannot open the embedded store at {path}: {exc.message}"
            ) from None
        if isinstance(exc, StoreConfigError):
            raise StoreConfigError(f"cannot open the embedded store at {path}: {exc}") from None
        raise
    return (
        connection,
        SqliteIndex(driver),
        secret,
        previous,
        signing_secrets(notify, notify_previous),
    )
