"""The Resonate server protocol over one SQLite connection: a synchronous engine.

:class:`Engine` owns one ``sqlite3`` connection and answers wire requests,
each inside a ``BEGIN IMMEDIATE`` transaction (a batch of them shares one:
group commit). It never touches the event loop:
:class:`resonate_sqlite.connection.SqliteConnection` drives it (inline),
delivers the messages it returns, and runs its timer sweep and outbox claims
on a tick.

What each request does is in :mod:`resonate_sqlite.transitions` (resonate-pg's
``resonate.sql`` semantics); how requests and fields are read and answered in
:mod:`resonate_sqlite.wire`; the tables and statements in
:mod:`resonate_sqlite.schema`. This module runs them: the file, transactions
and group commit, the timers, the outbox, the process table, retention.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Final, NamedTuple, NoReturn

import msgspec

from resonate_sqlite.busy import retry_briefly
from resonate_sqlite.schema import (
    SCHEMA,
    SCHEMA_VERSION,
    SQL_CALLBACKS_DROP,
    SQL_CALLBACKS_SCRUB,
    SQL_DUE_PROMISES,
    SQL_DUE_SCHEDULES,
    SQL_DUE_TASKS,
    SQL_GC_DELETE,
    SQL_GC_LINEAGE,
    SQL_GC_ROOTS,
    SQL_GC_UNBLOCKS,
    SQL_LISTENERS_DROP,
    SQL_LISTENERS_DROP_ADDRESS,
    SQL_OUTBOX_DROP,
    SQL_OUTBOX_DROP_ADDRESS,
    SQL_OUTBOX_NEXT,
    SQL_OUTBOX_PEEK,
    SQL_OUTBOX_TAKE,
    SQL_PROCESS_BEAT,
    SQL_PROCESS_DEAD,
    SQL_PROCESS_DELETE,
    SQL_PROCESS_UPSERT,
    TABLES,
    migrate,
)
from resonate_sqlite.transitions import HANDLERS, Handler, Transitions
from resonate_sqlite.wire import DEFAULT_VERSION, Refusal, decode, error_data, obj, response, text

__all__ = [
    "DEFAULT_RETRY_MS",
    "HOT_PATH_AUTOCHECKPOINT",
    "Answer",
    "Engine",
    "StoreBusy",
    "StoreFailure",
    "is_busy",
    "now_ms",
]

#: Pending tasks are re-pushed this often (resonate-pg's ``_retry_timeout``).
DEFAULT_RETRY_MS: Final = 5_000

#: WAL pages after which a committing request checkpoints by itself. Normally
#: the background checkpointer keeps the WAL far below this.
HOT_PATH_AUTOCHECKPOINT: Final = 4000


class StoreFailure(Exception):
    """The database failed (I/O, corruption, read-only...): becomes a ConnectorError."""


class StoreBusy(StoreFailure):
    """Another connection holds the write lock; the caller may retry."""


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def is_busy(exc: sqlite3.OperationalError) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    text = str(exc)
    return "locked" in text or "busy" in text


def _lock_taken(exc: Exception) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and is_busy(exc)


class _Request(NamedTuple):
    """A decoded request, ready to run."""

    kind: str | None
    corr: str | None
    version: str
    data: Any
    handler: Handler


#: (response JSON, messages for in-process delivery, task id the caller let go of)
type Answer = tuple[bytes, list[str], str | None]


#: an extra's outcome: (True, what it returned) or (False, what it raised)
type Done = tuple[bool, Any]


def _extra(db: sqlite3.Connection, fn: Callable[[sqlite3.Connection], Any]) -> Done:
    """Run one of a batch's ``extras`` under a savepoint of its own: what it
    returned, or the exception it raised with its writes rolled back. Should
    the rollback itself fail, the transaction is in trouble: that fails the
    batch."""
    db.execute("SAVEPOINT x")
    try:
        result = fn(db)
    except BaseException as exc:  # a CancelledError too: it must not escape the batch
        try:
            db.execute("ROLLBACK TO x")
            db.execute("RELEASE x")
        except sqlite3.Error as lost:  # SQLite rolled the whole transaction back (FULL, IOERR)
            raise sqlite3.OperationalError(f"{exc} ({lost})") from exc
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        return False, exc
    db.execute("RELEASE x")
    return True, result


def _decode_request(req: str | bytes) -> bytes | _Request:
    """Read the envelope; a request that cannot run is answered at once."""
    try:
        env = decode(req)
    except msgspec.DecodeError as exc:
        return response("", None, DEFAULT_VERSION, 400, error_data(400, f"invalid JSON: {exc}"))
    head = obj(obj(env).get("head"))
    kind, corr, version = text(env, "kind"), text(head, "corrId"), text(head, "version")
    version = DEFAULT_VERSION if version is None else version
    handler = HANDLERS.get(kind) if kind is not None else None
    if handler is None:
        return response(kind, corr, version, 501, error_data(501, f"unknown request kind {kind!r}"))
    data = obj(env).get("data")
    return _Request(kind, corr, version, {} if data is None else data, handler)


class Engine(Transitions):
    """One SQLite connection speaking the Resonate protocol. Not thread-safe:
    exactly one thread uses an engine at a time (the caller serializes).

    ``local_addresses`` is the set of addresses this process receives on;
    messages to them are returned to the caller for in-process delivery
    instead of being written to the outbox (the fast path). The caller mutates
    the set as its receivers come and go.
    """

    def __init__(
        self,
        path: Path,
        *,
        clock: Callable[[], int] = now_ms,
        retry_ms: int = DEFAULT_RETRY_MS,
        local_addresses: set[str] | None = None,
    ) -> None:
        self.path = path
        self.clock = clock
        self.retry_ms = retry_ms
        self.local_addresses = local_addresses if local_addresses is not None else set()
        self.db: sqlite3.Connection | None = None
        self._out = []  # messages for in-process delivery (current request)
        #: Executes that may still go to this process directly; the connection
        #: sets it from its free room before each call. Past it they go to the
        #: outbox, which the connection claims as room frees up: a burst of new
        #: jobs then waits on disk, not in the SDK's memory.
        self.local_room = 1 << 30
        self._released = None  # see handle()
        self._data_version: int | None = None
        #: Write transactions committed (the checkpointer watches it).
        self.commits = 0
        #: (n, callback): called after every n commits (the checkpointer's kick).
        self.on_commits: tuple[int, Callable[[], None]] | None = None

    # -- lifecycle ------------------------------------------------------------

    def open(self, *, timeout: float) -> None:
        """Open the file, switch it to WAL, create or check the schema.

        Raises :class:`StoreFailure` with a message naming the file and the
        problem; waits at most ``timeout`` seconds for another connection's
        lock.
        """
        where = str(self.path)
        try:
            if self.path.exists() and self.path.is_dir():
                raise StoreFailure(f"sqlite store {where}: is a directory, not a database file")
            parent = self.path.parent
            if not parent.exists():
                raise StoreFailure(f"sqlite store {where}: directory {parent} does not exist")
            db = sqlite3.connect(
                where,
                timeout=timeout,
                isolation_level=None,
                check_same_thread=False,
                cached_statements=512,  # the job index shares it (SqliteConnection.shared_db)
            )
        except sqlite3.Error as exc:
            raise StoreFailure(f"sqlite store {where}: cannot open: {exc}") from exc
        try:
            self._init(db, timeout)
        except sqlite3.OperationalError as exc:
            db.close()
            text = str(exc)
            if "locked" in text or "busy" in text:
                msg = (
                    f"sqlite store {where}: database is locked by another connection "
                    f"(gave up after {timeout:g} s)"
                )
            elif "readonly" in text or "read-only" in text or "unable to open" in text:
                msg = f"sqlite store {where}: database is not writable ({text})"
            else:
                msg = f"sqlite store {where}: {text}"
            raise StoreFailure(msg) from exc
        except sqlite3.DatabaseError as exc:
            db.close()
            raise StoreFailure(
                f"sqlite store {where}: not a usable SQLite database (damaged?): {exc}"
            ) from exc
        except StoreFailure:
            db.close()
            raise
        # Requests never wait inside SQLite for a lock: the caller retries
        # without blocking its event loop (see SqliteConnection._call).
        db.execute("PRAGMA busy_timeout = 0")
        # Checkpoints normally run on a background thread (the connection's
        # _Checkpointer);
        # this is only the safety net if that thread falls behind.
        db.execute(f"PRAGMA wal_autocheckpoint = {HOT_PATH_AUTOCHECKPOINT}")
        self.db = db

    def _init(self, db: sqlite3.Connection, timeout: float) -> None:
        where = str(self.path)
        # Any read of a file that is not a database fails here ("file is not a
        # database"); a header that is fine but damaged pages fail later.
        db.execute("PRAGMA schema_version").fetchone()
        mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreFailure(f"sqlite store {where}: cannot switch to WAL (journal_mode={mode})")
        db.execute("PRAGMA synchronous = NORMAL")
        db.execute("PRAGMA foreign_keys = OFF")
        db.execute("PRAGMA temp_store = MEMORY")
        db.execute("PRAGMA cache_size = -32768")  # 32 MiB page cache
        db.execute("PRAGMA secure_delete = OFF")
        db.execute("PRAGMA journal_size_limit = 67108864")
        db.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
        db.execute("BEGIN IMMEDIATE")
        try:
            row = None
            has_meta = db.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'r_meta'"
            ).fetchone()
            if has_meta:
                row = db.execute("SELECT value FROM r_meta WHERE key = 'schema_version'").fetchone()
            if row is not None and int(row[0]) > SCHEMA_VERSION:
                raise StoreFailure(
                    f"sqlite store {where}: schema version {row[0]} is newer than this "
                    f"code ({SCHEMA_VERSION}); upgrade resonate-sqlite"
                )
            if row is not None and int(row[0]) < SCHEMA_VERSION:
                migrate(db, int(row[0]))
            for stmt in SCHEMA:
                db.execute(stmt)
            db.execute(
                "INSERT OR REPLACE INTO r_meta (key, value) VALUES ('schema_version', ?)",
                (str(SCHEMA_VERSION),),
            )
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
        # Touch every table once so a damaged b-tree root fails now, not mid-run.
        for table in TABLES:
            db.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchall()

    def verify(self) -> None:
        """``PRAGMA quick_check``: reads the whole file (O(size)); opt-in."""
        db = self._db()
        rows = db.execute("PRAGMA quick_check").fetchall()
        if rows != [("ok",)]:
            detail = "; ".join(str(r[0]) for r in rows[:5])
            raise StoreFailure(f"sqlite store {self.path}: integrity check failed: {detail}")

    def close(self) -> None:
        db, self.db = self.db, None
        if db is not None:
            with contextlib.suppress(sqlite3.Error):
                db.close()

    def _db(self) -> sqlite3.Connection:
        if self.db is None:
            raise StoreFailure(f"sqlite store {self.path}: not open")
        return self.db

    # -- transactions -----------------------------------------------------------

    def _begin(self, db: sqlite3.Connection) -> None:
        """BEGIN IMMEDIATE, tried again for a fraction of a millisecond while
        another connection holds the write lock (`retry_briefly`: it is
        usually free again by then, where a wait on the caller's event loop
        lasts a whole turn of it); still taken, `StoreBusy`; anything else
        `StoreFailure`. A transaction already open on this connection (a
        caller that shares it, `SqliteConnection.shared_db`) counts as a
        taken lock: its owner ends it on the loop."""
        if db.in_transaction:
            raise StoreBusy(f"sqlite store {self.path}: a transaction of this connection is open")
        try:
            retry_briefly(lambda: db.execute("BEGIN IMMEDIATE"), _lock_taken)
        except sqlite3.OperationalError as exc:
            if is_busy(exc):
                raise StoreBusy(f"sqlite store {self.path}: database is locked") from exc
            raise StoreFailure(f"sqlite store {self.path}: {exc}") from exc
        except sqlite3.Error as exc:
            raise StoreFailure(f"sqlite store {self.path}: {exc}") from exc

    def _write[T](self, fn: Callable[[sqlite3.Connection, int], T]) -> tuple[T, list[str]]:
        """Run ``fn`` in one BEGIN IMMEDIATE transaction; return its result and
        the in-process messages it produced (only once committed)."""
        db = self._db()
        self._begin(db)
        self._out = []
        try:
            result = fn(db, self.clock())
            db.execute("COMMIT")
        except BaseException as exc:
            self._abort(db, exc)
        out, self._out = self._out, []
        self._committed()
        return result, out

    def _abort(self, db: sqlite3.Connection, exc: BaseException) -> NoReturn:
        """Roll back the open transaction and drop its messages; a SQLite
        error is re-raised as `StoreFailure`, anything else as it is."""
        self._out = []
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
        if isinstance(exc, sqlite3.Error):
            raise StoreFailure(f"sqlite store {self.path}: {exc}") from exc
        raise exc

    def _committed(self) -> None:
        self.commits += 1
        hook = self.on_commits
        if hook is not None and self.commits % hook[0] == 0:
            hook[1]()

    def _read[T](self, fn: Callable[[sqlite3.Connection, int], T]) -> T:
        db = self._db()
        try:
            return fn(db, self.clock())
        except sqlite3.Error as exc:
            raise StoreFailure(f"sqlite store {self.path}: {exc}") from exc

    # -- requests ---------------------------------------------------------------

    def handle(self, req: str | bytes) -> Answer:
        """Answer one wire request in its own transaction.

        Returns the response JSON, the messages to deliver in process, and
        the id of a task this request ended the caller's hold on (suspend,
        fulfill, release, a refused acquire, or an acquired timer the SDK
        drops) -- the connection's in-flight count. Raises :class:`StoreBusy`
        / :class:`StoreFailure` on storage trouble (nothing was applied)."""
        return self.handle_batch([req])[0]  # type: ignore[return-value]

    def handle_batch(self, reqs: list[str | bytes]) -> list[Answer | Exception]:
        """Answer requests in order, in one ``BEGIN IMMEDIATE`` transaction
        (group commit): :meth:`run_batch` without extras."""
        return self.run_batch(reqs, ())[0]

    def run_batch(
        self, reqs: list[str | bytes], extras: Sequence[Callable[[sqlite3.Connection], Any]]
    ) -> tuple[list[Answer | Exception], list[Done]]:
        """Answer requests in order, in one ``BEGIN IMMEDIATE`` transaction
        (group commit); then run ``extras``, the host's own writes to its own
        tables, in the same transaction, each under a savepoint of its own.
        Returns the answers, and each extra's outcome: ``(True, result)``, or
        ``(False, exception)`` with its writes rolled back alone.

        Each request is atomic on its own: a request that is refused
        (:class:`~resonate_sqlite.wire.Refusal`) or fails (a bug, say) is
        rolled back -- the first is answered, the second returned as its
        exception -- and the others commit. Nothing is answered before the
        COMMIT. A storage failure fails the whole batch (:class:`StoreBusy`
        when the write lock is taken: nothing was applied, retry).

        Requests are almost never refused, so a batch first runs them one
        after another under a single savepoint; only when one is refused or
        fails does the batch go back to that savepoint and run them again,
        each under a savepoint of its own (:meth:`_run_apart`). Two statements
        per batch instead of two per request; the answers are the same."""
        prepared = [_decode_request(req) for req in reqs]
        if not extras and all(isinstance(p, bytes) for p in prepared):
            return [(p, [], None) for p in prepared], []  # type: ignore[misc]
        db = self._db()
        self._begin(db)
        room = self.local_room
        end = "COMMIT"
        try:
            if not prepared:
                answers: list[Answer | Exception] = []
            elif len(prepared) == 1 and not extras:
                p = prepared[0]
                assert not isinstance(p, bytes)
                self._out, self._released = [], None
                answer, refused = self._run(db, p)
                end = "ROLLBACK" if refused else end
                answers = [answer]
            else:
                db.execute("SAVEPOINT b")
                together = self._run_together(db, prepared)
                if together is None:  # one was refused or failed: each on its own
                    db.execute("ROLLBACK TO b")
                    self.local_room = room
                    together = self._run_apart(db, prepared)
                answers = together
            done = [_extra(db, fn) for fn in extras]
            db.execute(end)  # (a COMMIT ends the savepoints too)
        except BaseException as exc:
            self._abort(db, exc)
        self._out = []
        if end == "COMMIT":
            self._committed()
        return answers, done

    def _run_together(
        self, db: sqlite3.Connection, prepared: list[bytes | _Request]
    ) -> list[Answer | Exception] | None:
        """Run every request with no savepoint of its own; None as soon as one
        is refused or fails (the caller rolls all of them back)."""
        answers: list[Answer | Exception] = []
        for p in prepared:
            if isinstance(p, bytes):
                answers.append((p, [], None))
                continue
            self._out, self._released = [], None
            try:
                answer, refused = self._run(db, p)
            except sqlite3.Error:
                raise  # the transaction itself is in trouble: fail the batch
            except Exception:
                return None
            if refused:
                return None
            answers.append(answer)
        return answers

    def _run_apart(
        self, db: sqlite3.Connection, prepared: list[bytes | _Request]
    ) -> list[Answer | Exception]:
        """Run every request under a savepoint of its own: a refused or failed
        one is rolled back alone."""
        answers: list[Answer | Exception] = []
        for p in prepared:
            if isinstance(p, bytes):
                answers.append((p, [], None))
                continue
            self._out, self._released = [], None
            db.execute("SAVEPOINT r")
            try:
                answer, refused = self._run(db, p)
            except sqlite3.Error:
                raise  # the transaction itself is in trouble: fail the batch
            except Exception as exc:
                db.execute("ROLLBACK TO r")
                db.execute("RELEASE r")
                answers.append(exc)
                continue
            if refused:
                db.execute("ROLLBACK TO r")
            db.execute("RELEASE r")
            answers.append(answer)
        return answers

    def request_in(
        self, db: sqlite3.Connection, kind: str, data: dict[str, Any]
    ) -> tuple[int, Any, list[str]]:
        """Answer one protocol request inside a transaction already open on
        ``db``: a batch's extra (:meth:`run_batch`), so that the host's own
        writes and protocol requests commit together, or not at all (the
        extra raises: its savepoint takes both back). Returns the status, the
        answer's data (the reason for a status >= 400, as a refusal's) and
        the messages it made for in-process delivery, which the caller hands
        on only once the transaction committed. A refused request is rolled
        back alone, as in a batch."""
        handler = HANDLERS.get(kind)
        if handler is None:
            return 501, f"unknown request kind {kind!r}", []
        saved, self._out = self._out, []
        db.execute("SAVEPOINT q")
        try:
            status, answer = handler(self, db, self.clock(), data)
        except Refusal as exc:
            status, answer = exc.status, exc.reason
            self._out = []
            db.execute("ROLLBACK TO q")
        except BaseException:  # a failure part way: none of it stays, whoever catches it
            db.execute("ROLLBACK TO q")
            raise
        finally:
            msgs, self._out = self._out, saved
            db.execute("RELEASE q")
        return status, answer, msgs

    def _run(self, db: sqlite3.Connection, req: _Request) -> tuple[Answer, bool]:
        """Run one request; also whether it was refused (to be rolled back)."""
        refused = False
        try:
            status, data = req.handler(self, db, self.clock(), req.data)
        except Refusal as exc:
            status, data, refused = exc.status, exc.reason, True
            self._out = []
        if status >= 400:
            data = error_data(status, data)
        elif req.kind == "task.fence":  # the inner answer's head, as resonate.sql's
            data["action"]["head"].update(corrId=req.corr, version=req.version)
        resp = response(req.kind, req.corr, req.version, status, data)
        return (resp, self._out, self._released), refused

    # -- timers -------------------------------------------------------------------------

    def due(self, limit: int) -> tuple[list[str], list[str], list[str]]:
        """Ids of promises, tasks and schedules whose timer has passed (a
        read; no lock), oldest first, at most ``limit`` of each."""

        def q(db: sqlite3.Connection, now: int) -> tuple[list[str], list[str], list[str]]:
            ps = [r[0] for r in db.execute(SQL_DUE_PROMISES, (now, limit))]
            ts = [r[0] for r in db.execute(SQL_DUE_TASKS, (now, limit))]
            ss = [r[0] for r in db.execute(SQL_DUE_SCHEDULES, (now, limit))]
            return ps, ts, ss

        return self._read(q)

    def fire(
        self,
        promise_ids: Iterable[str],
        task_ids: Iterable[str],
        schedule_ids: Iterable[str] = (),
    ) -> tuple[int, list[str]]:
        """Apply the due transitions, each rechecked under the write lock (so
        it happens once however many processes fire it), in resonate.sql's
        order: promise timeouts, then task retries and lease expiries, then
        schedule runs. Returns (transitions applied, in-process messages)."""

        def fn(db: sqlite3.Connection, now: int) -> int:
            n = 0
            for pid in promise_ids:
                row = self._row(db, pid)
                n += row is not None and self._promise_timer(db, now, row)
            for tid in task_ids:
                row = self._row(db, tid)
                n += row is not None and self._task_timer(db, now, row)
            for sid in schedule_ids:
                n += self._schedule_timer(db, now, sid)
            return n

        return self._write(fn)

    # -- outbox ---------------------------------------------------------------------------

    def data_version(self) -> int:
        """Changes whenever another connection commits to the file."""
        return int(self._read(lambda db, now: db.execute("PRAGMA data_version").fetchone()[0]))

    def changed(self) -> bool:
        """True when another connection committed since the last call."""
        v = self.data_version()
        changed = v != self._data_version
        self._data_version = v
        return changed

    def peek(self, addresses: Iterable[str]) -> bool:
        def q(db: sqlite3.Connection, now: int) -> bool:
            return any(db.execute(SQL_OUTBOX_PEEK, (a,)).fetchone() for a in addresses)

        return self._read(q)

    def claim(self, claims: Iterable[tuple[str, int]]) -> list[str]:
        """Atomically take (delete) messages, oldest first: up to ``limit`` for
        each ``(address, limit)``. A row is claimed by exactly one connection."""

        def fn(db: sqlite3.Connection, now: int) -> list[str]:
            rows: list[tuple[int, str]] = []
            for address, limit in claims:
                if limit > 0:
                    taken = db.execute(SQL_OUTBOX_NEXT, (address, limit)).fetchall()
                    db.executemany(SQL_OUTBOX_TAKE, [(seq,) for seq, _ in taken])
                    rows += taken
            rows.sort()
            return [body for _, body in rows]

        msgs, _ = self._write(fn)
        return msgs

    # -- processes ------------------------------------------------------------------------

    def register_process(self, pid: str, group: str, unicast: str, anycast: str) -> None:
        def fn(db: sqlite3.Connection, now: int) -> None:
            db.execute(SQL_PROCESS_UPSERT, (pid, group, unicast, anycast, now, now))

        self._write(fn)

    def beat_process(self, pid: str, group: str, unicast: str, anycast: str) -> None:
        def fn(db: sqlite3.Connection, now: int) -> None:
            if db.execute(SQL_PROCESS_BEAT, (now, pid)).rowcount == 0:
                # reaped while we were stalled: come back
                db.execute(SQL_PROCESS_UPSERT, (pid, group, unicast, anycast, now, now))

        self._write(fn)

    def unregister_process(self, pid: str, unicast: str) -> None:
        def fn(db: sqlite3.Connection, now: int) -> None:
            db.execute(SQL_PROCESS_DELETE, (pid,))
            db.execute(SQL_LISTENERS_DROP_ADDRESS, (unicast,))
            db.execute(SQL_OUTBOX_DROP_ADDRESS, (unicast,))

        self._write(fn)

    def reap_processes(self, dead_after_ms: int) -> list[str]:
        """Forget processes whose heartbeat is older than ``dead_after_ms``:
        their listeners and the messages addressed to them alone."""

        def fn(db: sqlite3.Connection, now: int) -> list[str]:
            dead = db.execute(SQL_PROCESS_DEAD, (now - dead_after_ms,)).fetchall()
            for pid, unicast in dead:
                db.execute(SQL_PROCESS_DELETE, (pid,))
                db.execute(SQL_LISTENERS_DROP_ADDRESS, (unicast,))
                db.execute(SQL_OUTBOX_DROP_ADDRESS, (unicast,))
            return [pid for pid, _ in dead]

        def any_dead(db: sqlite3.Connection, now: int) -> bool:
            return db.execute(SQL_PROCESS_DEAD, (now - dead_after_ms,)).fetchone() is not None

        if not self._read(any_dead):
            return []
        reaped, _ = self._write(fn)
        return reaped

    # -- retention --------------------------------------------------------------------------

    def gc_batch(
        self,
        cutoff: int,
        after: tuple[int, str],
        limit: int,
        keep: Callable[[sqlite3.Connection, str], bool] | None = None,
    ) -> tuple[int, tuple[int, str] | None]:
        """Collect up to ``limit`` finished lineages whose root settled at or
        before ``cutoff``, but those ``keep(db, root_id)`` is true of (asked
        in the same transaction). Returns (promises deleted, cursor for the
        next batch)."""

        def fn(db: sqlite3.Connection, now: int) -> tuple[int, tuple[int, str] | None]:
            roots = db.execute(SQL_GC_ROOTS, (after[0], after[1], cutoff, limit)).fetchall()
            deleted = 0
            for root_id, _settled_at, origin in roots:
                if keep is not None and keep(db, root_id):
                    continue  # the application still needs it
                members: list[tuple[str, str | None]] = [(root_id, "fulfilled")]
                if origin is not None:
                    lineage = db.execute(SQL_GC_LINEAGE, (root_id + ":", root_id + ";")).fetchall()
                    lineage = [r for r in lineage if r[3] == root_id]
                    if any(r[1] == "pending" for r in lineage):
                        continue  # something in the lineage still runs: keep all of it
                    members += [(r[0], r[2]) for r in lineage]
                for mid, t_state in members:
                    db.execute(SQL_GC_DELETE, (mid,))
                    db.execute(SQL_LISTENERS_DROP, (mid,))
                    db.execute(SQL_CALLBACKS_DROP, (mid,))
                    if t_state is not None:
                        db.execute(SQL_CALLBACKS_SCRUB, (mid,))
                        db.execute(SQL_OUTBOX_DROP, ("x:" + mid,))
                    db.execute(SQL_GC_UNBLOCKS, (f"u:{mid}\n", f"u:{mid}\x0b"))
                    deleted += 1
            cursor = (roots[-1][1], roots[-1][0]) if len(roots) == limit else None
            return deleted, cursor

        result, _ = self._write(fn)
        return result

    # -- introspection (tests, bench) --------------------------------------------------------

    def explain(self, sql: str, params: tuple[Any, ...]) -> list[str]:
        db = self._db()
        return [r[3] for r in db.execute("EXPLAIN QUERY PLAN " + sql, params)]
