"""The Resonate server protocol over one SQLite connection: a synchronous engine.

:class:`Engine` owns one ``sqlite3`` connection and answers the SDK's wire
requests, each inside its own ``BEGIN IMMEDIATE`` transaction. It never touches
the event loop: :class:`resonate_sqlite.connection.SqliteConnection` drives it (inline
or from a worker thread), delivers the messages it returns, and runs its timer
sweep and outbox claims on a tick.

Semantics follow resonate-pg's ``resonate.sql`` (the facts, not the code), with
the differences written down in ``docs/embedded-store.md``:

* a task is acquired at ``version + 1`` (``task.create`` acquires at 1), and an
  ``execute`` message carries the pending version the acquire must match;
* every pending promise has a timer at ``timeout_at`` (a ``resonate:timer``
  promise resolves, any other is ``rejected_timedout``);
* a pending task has a retry timer (re-push ``execute``), an acquired one a
  lease timer (back to pending, ``execute`` pushed again);
* ``preload`` is always empty, which the SDK accepts and which keeps every
  request independent of the store's size.

Every hot statement is a constant string on an index (the prepared-statement
cache of :mod:`sqlite3` then reuses it); ``tests/resonate_sqlite/test_plans.py``
asserts the plans.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Final

import msgspec

__all__ = [
    "DEFAULT_RETRY_MS",
    "SCHEMA_VERSION",
    "Engine",
    "StoreBusy",
    "StoreFailure",
]

#: Bumped when the table layout changes; a newer file is refused at open.
SCHEMA_VERSION: Final = 1

#: Pending tasks are re-pushed this often (resonate-pg's ``_retry_timeout``).
DEFAULT_RETRY_MS: Final = 5_000

#: WAL pages after which a committing request checkpoints by itself. Normally
#: the background checkpointer keeps the WAL far below this.
HOT_PATH_AUTOCHECKPOINT: Final = 4000

#: Lease used when a request carries none (the SDK always sends one).
DEFAULT_TTL_MS: Final = 60_000

I64_MAX: Final = (1 << 63) - 1

SETTLE_STATES: Final = frozenset({"resolved", "rejected", "rejected_canceled", "rejected_timedout"})


class StoreFailure(Exception):
    """The database failed (I/O, corruption, read-only...): becomes a ConnectorError."""


class StoreBusy(StoreFailure):
    """Another connection holds the write lock; the caller may retry."""


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# =============================================================================
# Schema
# =============================================================================
#
# One row per promise in ``r_promises``; the task that backs a promise (task id
# == promise id) lives in the same row (``t_*`` columns, NULL = no task), so a
# task transition and its promise read are one b-tree lookup and one write.
# Nothing is named ``jobs``: the service keeps its own table in the same file.

SCHEMA: Final = (
    """
    CREATE TABLE IF NOT EXISTS r_meta (
      key   TEXT PRIMARY KEY,
      value TEXT NOT NULL
    ) WITHOUT ROWID
    """,
    """
    CREATE TABLE IF NOT EXISTS r_promises (
      id         TEXT PRIMARY KEY,
      state      TEXT NOT NULL,      -- pending|resolved|rejected[_canceled|_timedout]
      param      TEXT NOT NULL,      -- JSON Value {headers?, data?}, verbatim from the SDK
      value      TEXT NOT NULL,      -- JSON Value, '{}' until settled
      tags       TEXT NOT NULL,      -- JSON object of string tags
      target     TEXT,               -- tags['resonate:target']
      is_timer   INTEGER NOT NULL,   -- tags['resonate:timer'] = 'true'
      origin     TEXT,               -- tags['resonate:origin'] (root of the lineage)
      timeout_at INTEGER NOT NULL,   -- ms epoch; the promise timer while pending
      created_at INTEGER NOT NULL,
      settled_at INTEGER,
      t_state    TEXT,               -- NULL (no task)|pending|acquired|suspended|halted|fulfilled
      t_version  INTEGER,
      t_pid      TEXT,
      t_ttl      INTEGER,
      t_due      INTEGER             -- retry (pending) or lease expiry (acquired), ms epoch
    )
    """,
    # promise timers: only pending rows are indexed
    """
    CREATE INDEX IF NOT EXISTS r_promises_due
      ON r_promises (timeout_at) WHERE state = 'pending'
    """,
    # task timers: only pending/acquired tasks are indexed
    """
    CREATE INDEX IF NOT EXISTS r_tasks_due
      ON r_promises (t_due) WHERE t_state IN ('pending', 'acquired')
    """,
    # retention: settled roots by settle time (only roots are indexed)
    """
    CREATE INDEX IF NOT EXISTS r_roots_settled
      ON r_promises (settled_at, id)
      WHERE state <> 'pending' AND (origin IS NULL OR origin = id)
    """,
    # suspended awaiters of a promise (resumed when it settles)
    """
    CREATE TABLE IF NOT EXISTS r_callbacks (
      awaited_id TEXT NOT NULL,
      awaiter_id TEXT NOT NULL,
      PRIMARY KEY (awaited_id, awaiter_id)
    ) WITHOUT ROWID
    """,
    "CREATE INDEX IF NOT EXISTS r_callbacks_awaiter ON r_callbacks (awaiter_id)",
    # addresses to push an `unblock` to when a promise settles
    """
    CREATE TABLE IF NOT EXISTS r_listeners (
      awaited_id TEXT NOT NULL,
      address    TEXT NOT NULL,
      PRIMARY KEY (awaited_id, address)
    ) WITHOUT ROWID
    """,
    "CREATE INDEX IF NOT EXISTS r_listeners_address ON r_listeners (address)",
    # messages for other processes; key dedups (x:<task> / u:<promise>\n<address>)
    """
    CREATE TABLE IF NOT EXISTS r_outbox (
      seq     INTEGER PRIMARY KEY,
      key     TEXT NOT NULL UNIQUE,
      address TEXT NOT NULL,
      body    TEXT NOT NULL
    )
    """,
    "CREATE INDEX IF NOT EXISTS r_outbox_address ON r_outbox (address, seq)",
    # live processes (liveness heartbeat)
    """
    CREATE TABLE IF NOT EXISTS r_processes (
      pid          TEXT PRIMARY KEY,
      grp          TEXT NOT NULL,
      unicast      TEXT NOT NULL,
      anycast      TEXT NOT NULL,
      started_at   INTEGER NOT NULL,
      heartbeat_at INTEGER NOT NULL
    ) WITHOUT ROWID
    """,
    "CREATE INDEX IF NOT EXISTS r_processes_heartbeat ON r_processes (heartbeat_at)",
)

# =============================================================================
# SQL (constant strings: the sqlite3 statement cache keeps them prepared)
# =============================================================================

_COLS = (
    "id, state, param, value, tags, target, is_timer, timeout_at, created_at, "
    "settled_at, t_state, t_version, t_pid, t_ttl, t_due"
)
# row indexes
ID, STATE, PARAM, VALUE, TAGS, TARGET, IS_TIMER, TIMEOUT_AT, CREATED_AT = range(9)
SETTLED_AT, T_STATE, T_VERSION, T_PID, T_TTL, T_DUE = range(9, 15)

SQL_GET = f"SELECT {_COLS} FROM r_promises WHERE id = ?"
SQL_INSERT = f"INSERT INTO r_promises ({_COLS}, origin) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
SQL_SETTLE = (
    "UPDATE r_promises SET state = ?, value = ?, settled_at = ?, "
    "t_state = CASE WHEN t_state IS NULL THEN NULL ELSE 'fulfilled' END, "
    "t_pid = NULL, t_ttl = NULL, t_due = NULL WHERE id = ?"
)
SQL_TASK_ACQUIRE = (
    "UPDATE r_promises SET t_state = 'acquired', t_version = ?, t_pid = ?, t_ttl = ?, "
    "t_due = ? WHERE id = ?"
)
SQL_TASK_PENDING = (
    "UPDATE r_promises SET t_state = 'pending', t_pid = NULL, t_ttl = NULL, t_due = ? WHERE id = ?"
)
SQL_TASK_RETRY = "UPDATE r_promises SET t_due = ? WHERE id = ?"
SQL_TASK_PARK = (  # suspended / halted: no lease, no timer
    "UPDATE r_promises SET t_state = ?, t_pid = NULL, t_ttl = NULL, t_due = NULL WHERE id = ?"
)
SQL_RESUME = (
    "UPDATE r_promises SET t_state = 'pending', t_due = ? "
    "WHERE id = ? AND t_state = 'suspended' RETURNING t_version, target"
)
SQL_HEARTBEAT = (
    "UPDATE r_promises SET t_due = ? + t_ttl WHERE id = ? AND t_state = 'acquired' "
    "AND t_pid = ? AND t_version = ? AND state = 'pending' AND timeout_at > ?"
)
SQL_HEARTBEAT_ANY_VERSION = (
    "UPDATE r_promises SET t_due = ? + t_ttl WHERE id = ? AND t_state = 'acquired' "
    "AND t_pid = ? AND state = 'pending' AND timeout_at > ?"
)
SQL_DUE_PROMISES = (
    "SELECT id FROM r_promises INDEXED BY r_promises_due "
    "WHERE state = 'pending' AND timeout_at <= ? "
    "ORDER BY timeout_at LIMIT ?"
)
SQL_DUE_TASKS = (
    "SELECT id FROM r_promises INDEXED BY r_tasks_due "
    "WHERE t_state IN ('pending', 'acquired') AND t_due <= ? "
    "ORDER BY t_due LIMIT ?"
)
SQL_LISTENER_ADD = "INSERT OR IGNORE INTO r_listeners (awaited_id, address) VALUES (?, ?)"
SQL_LISTENERS_OF = "SELECT address FROM r_listeners WHERE awaited_id = ?"
SQL_LISTENERS_DROP = "DELETE FROM r_listeners WHERE awaited_id = ?"
SQL_CALLBACK_ADD = "INSERT OR IGNORE INTO r_callbacks (awaited_id, awaiter_id) VALUES (?, ?)"
SQL_CALLBACKS_OF = "SELECT awaiter_id FROM r_callbacks WHERE awaited_id = ?"
SQL_CALLBACKS_DROP = "DELETE FROM r_callbacks WHERE awaited_id = ?"
SQL_CALLBACKS_SCRUB = "DELETE FROM r_callbacks INDEXED BY r_callbacks_awaiter WHERE awaiter_id = ?"
SQL_OUTBOX_PUT = (
    "INSERT INTO r_outbox (key, address, body) VALUES (?, ?, ?) "
    "ON CONFLICT (key) DO UPDATE SET address = excluded.address, body = excluded.body"
)
SQL_OUTBOX_DROP = "DELETE FROM r_outbox WHERE key = ?"
SQL_OUTBOX_PEEK = "SELECT 1 FROM r_outbox INDEXED BY r_outbox_address WHERE address = ? LIMIT 1"
SQL_OUTBOX_NEXT = (
    "SELECT seq, body FROM r_outbox INDEXED BY r_outbox_address "
    "WHERE address = ? ORDER BY seq LIMIT ?"
)
SQL_OUTBOX_TAKE = "DELETE FROM r_outbox WHERE seq = ?"
SQL_PROCESS_UPSERT = (
    "INSERT INTO r_processes (pid, grp, unicast, anycast, started_at, heartbeat_at) "
    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (pid) DO UPDATE SET grp = excluded.grp, "
    "unicast = excluded.unicast, anycast = excluded.anycast, "
    "heartbeat_at = excluded.heartbeat_at"
)
SQL_PROCESS_BEAT = "UPDATE r_processes SET heartbeat_at = ? WHERE pid = ?"
SQL_PROCESS_DEAD = (
    "SELECT pid, unicast FROM r_processes INDEXED BY r_processes_heartbeat "
    "WHERE heartbeat_at < ? LIMIT 100"
)
SQL_PROCESS_DELETE = "DELETE FROM r_processes WHERE pid = ?"
SQL_LISTENERS_DROP_ADDRESS = (
    "DELETE FROM r_listeners INDEXED BY r_listeners_address WHERE address = ?"
)
SQL_OUTBOX_DROP_ADDRESS = "DELETE FROM r_outbox INDEXED BY r_outbox_address WHERE address = ?"
SQL_GC_ROOTS = (
    "SELECT id, settled_at, origin FROM r_promises INDEXED BY r_roots_settled "
    "WHERE state <> 'pending' AND (origin IS NULL OR origin = id) "
    "AND (settled_at, id) > (?, ?) AND settled_at <= ? ORDER BY settled_at, id LIMIT ?"
)
# A lineage is the root and every id under "{root}:" -- a range on the primary key
# (resonate ids are "{origin}:{path}", and a root id never contains ":").
SQL_GC_LINEAGE = "SELECT id, state, t_state, origin FROM r_promises WHERE id >= ? AND id < ?"
SQL_GC_DELETE = "DELETE FROM r_promises WHERE id = ?"
SQL_GC_UNBLOCKS = "DELETE FROM r_outbox WHERE key >= ? AND key < ?"

#: The statements the request path runs, for the index-use test.
HOT_QUERIES: Final = {
    "get": SQL_GET,
    "settle": SQL_SETTLE,
    "task_acquire": SQL_TASK_ACQUIRE,
    "task_pending": SQL_TASK_PENDING,
    "task_retry": SQL_TASK_RETRY,
    "task_park": SQL_TASK_PARK,
    "resume": SQL_RESUME,
    "heartbeat": SQL_HEARTBEAT,
    "due_promises": SQL_DUE_PROMISES,
    "due_tasks": SQL_DUE_TASKS,
    "listeners_of": SQL_LISTENERS_OF,
    "listeners_drop": SQL_LISTENERS_DROP,
    "callbacks_of": SQL_CALLBACKS_OF,
    "callbacks_drop": SQL_CALLBACKS_DROP,
    "callbacks_scrub": SQL_CALLBACKS_SCRUB,
    "outbox_drop": SQL_OUTBOX_DROP,
    "outbox_peek": SQL_OUTBOX_PEEK,
    "outbox_next": SQL_OUTBOX_NEXT,
    "outbox_take": SQL_OUTBOX_TAKE,
    "listeners_drop_address": SQL_LISTENERS_DROP_ADDRESS,
    "outbox_drop_address": SQL_OUTBOX_DROP_ADDRESS,
    "process_dead": SQL_PROCESS_DEAD,
    "gc_roots": SQL_GC_ROOTS,
    "gc_lineage": SQL_GC_LINEAGE,
    "gc_unblocks": SQL_GC_UNBLOCKS,
}

# =============================================================================
# Wire shapes (requests are decoded straight into these; Raw keeps the SDK's
# Value JSON verbatim, so payloads are never decoded and re-encoded)
# =============================================================================

_EMPTY: Final = msgspec.Raw(b"{}")


class _Head(msgspec.Struct):
    corrId: Any = None
    version: str | None = None


class _Envelope(msgspec.Struct):
    kind: str = ""
    head: _Head = msgspec.field(default_factory=_Head)
    data: msgspec.Raw = _EMPTY


class _PromiseCreate(msgspec.Struct, kw_only=True):
    id: str
    timeoutAt: int = I64_MAX
    param: msgspec.Raw = _EMPTY
    tags: dict[str, str] | None = None


class _PromiseSettle(msgspec.Struct, kw_only=True):
    id: str
    state: str
    value: msgspec.Raw = _EMPTY


class _Id(msgspec.Struct, kw_only=True):
    id: str


class _RegisterListener(msgspec.Struct, kw_only=True):
    awaited: str
    address: str


class _RegisterCallback(msgspec.Struct, kw_only=True):
    awaited: str
    awaiter: str


class _CreateAction(msgspec.Struct, kw_only=True):
    kind: str = "promise.create"
    data: _PromiseCreate


class _SettleAction(msgspec.Struct, kw_only=True):
    kind: str = "promise.settle"
    data: _PromiseSettle


class _FenceAction(msgspec.Struct, kw_only=True):
    kind: str
    data: msgspec.Raw


class _CallbackAction(msgspec.Struct, kw_only=True):
    kind: str = "promise.register_callback"
    data: _RegisterCallback


class _TaskCreate(msgspec.Struct, kw_only=True):
    pid: str
    ttl: int = DEFAULT_TTL_MS
    action: _CreateAction


class _TaskAcquire(msgspec.Struct, kw_only=True):
    id: str
    version: int = 0
    pid: str = ""
    ttl: int = DEFAULT_TTL_MS


class _TaskVersioned(msgspec.Struct, kw_only=True):
    id: str
    version: int = 0


class _TaskFulfill(msgspec.Struct, kw_only=True):
    id: str
    version: int = 0
    action: _SettleAction


class _TaskFence(msgspec.Struct, kw_only=True):
    id: str
    version: int = 0
    action: _FenceAction


class _TaskSuspend(msgspec.Struct, kw_only=True):
    id: str
    version: int = 0
    actions: list[_CallbackAction] = msgspec.field(default_factory=list)


class _TaskRef(msgspec.Struct, kw_only=True):
    id: str
    version: int | None = None


class _TaskHeartbeat(msgspec.Struct, kw_only=True):
    pid: str
    tasks: list[_TaskRef] = msgspec.field(default_factory=list)


_dec_env = msgspec.json.Decoder(_Envelope)
_decoders: dict[type[Any], msgspec.json.Decoder[Any]] = {}
_encode = msgspec.json.Encoder().encode


def _decode[T](raw: msgspec.Raw, typ: type[T]) -> T:
    dec = _decoders.get(typ)
    if dec is None:
        dec = _decoders[typ] = msgspec.json.Decoder(typ)
    try:
        return dec.decode(raw)  # type: ignore[no-any-return]
    except msgspec.DecodeError as exc:
        raise _BadRequest(400, f"invalid request data: {exc}") from exc


def _value_text(raw: msgspec.Raw) -> str:
    """A Value as stored: the SDK's JSON verbatim, ``null`` collapsed to ``{}``."""
    text = bytes(raw).decode()
    return "{}" if text == "null" else text


def _json_str(s: str) -> str:
    return _encode(s).decode()


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def _timeout_state(row: list[Any]) -> str:
    return "resolved" if row[IS_TIMER] else "rejected_timedout"


def record(row: list[Any] | tuple[Any, ...]) -> dict[str, Any]:
    """The wire PromiseRecord of a row."""
    rec: dict[str, Any] = {
        "id": row[ID],
        "state": row[STATE],
        "param": msgspec.Raw(row[PARAM]),
        "value": msgspec.Raw(row[VALUE]),
        "tags": msgspec.Raw(row[TAGS]),
        "timeoutAt": row[TIMEOUT_AT],
        "createdAt": row[CREATED_AT],
    }
    if row[SETTLED_AT] is not None:
        rec["settledAt"] = row[SETTLED_AT]
    return rec


def projected(row: list[Any], now: int) -> list[Any]:
    """A read-only view: a pending promise past its deadline reads as timed out."""
    if row[STATE] == "pending" and row[TIMEOUT_AT] <= now:
        row = list(row)
        row[STATE] = _timeout_state(row)
        row[SETTLED_AT] = row[TIMEOUT_AT]
        if row[T_STATE] is not None:
            row[T_STATE] = "fulfilled"
            row[T_PID] = row[T_TTL] = None
    return row


def task_record(row: list[Any]) -> dict[str, Any]:
    rec: dict[str, Any] = {"id": row[ID], "state": row[T_STATE], "version": row[T_VERSION]}
    if row[T_PID] is not None:
        rec["pid"] = row[T_PID]
    if row[T_TTL] is not None:
        rec["ttl"] = row[T_TTL]
    return rec


def execute_body(task_id: str, version: int) -> str:
    return (
        '{"kind":"execute","head":{},"data":{"task":{"id":'
        f'{_json_str(task_id)},"version":{int(version)}}}}}}}'
    )


# =============================================================================
# Engine
# =============================================================================


class Engine:
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
        self.local_addresses: set[str] = local_addresses if local_addresses is not None else set()
        self.db: sqlite3.Connection | None = None
        self._out: list[str] = []  # messages for in-process delivery (current txn)
        #: Executes that may still go to this process directly; the connection
        #: sets it from its free room before each call. Past it they go to the
        #: outbox, which the connection claims as room frees up: a burst of new
        #: jobs then waits on disk, not in the SDK's memory.
        self.local_room = 1 << 30
        self._released: str | None = None  # see handle()
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
                cached_statements=256,
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
                    f"code ({SCHEMA_VERSION}); upgrade tether"
                )
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
        for table in ("r_promises", "r_callbacks", "r_listeners", "r_outbox", "r_processes"):
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
        """BEGIN IMMEDIATE; a taken write lock is `StoreBusy`, anything else `StoreFailure`."""
        try:
            db.execute("BEGIN IMMEDIATE")
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
            self._out = []
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise StoreFailure(f"sqlite store {self.path}: {exc}") from exc
            raise
        out, self._out = self._out, []
        self._committed()
        return result, out

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
        with one SAVEPOINT per request (group commit).

        Each request is atomic on its own: a request that fails (a bug, say)
        is rolled back to its savepoint and answered with its exception,
        the others commit. Nothing is answered before the COMMIT. A storage
        failure fails the whole batch (:class:`StoreBusy` when the write lock
        is taken: nothing was applied, retry)."""
        prepared = [self._prepare(req) for req in reqs]
        if all(isinstance(p, bytes) for p in prepared):
            return [(p, [], None) for p in prepared]  # type: ignore[misc]
        db = self._db()
        self._begin(db)
        answers: list[Answer | Exception] = []
        single = len(prepared) == 1
        try:
            for p in prepared:
                if isinstance(p, bytes):
                    answers.append((p, [], None))
                    continue
                self._out = []
                self._released = None
                if single:
                    answers.append(self._run(db, p))
                    continue
                db.execute("SAVEPOINT r")
                try:
                    answer = self._run(db, p)
                except sqlite3.Error:
                    raise  # the transaction itself is in trouble: fail the batch
                except Exception as exc:
                    db.execute("ROLLBACK TO r")
                    db.execute("RELEASE r")
                    answers.append(exc)
                    continue
                db.execute("RELEASE r")
                answers.append(answer)
            db.execute("COMMIT")
        except BaseException as exc:
            self._out = []
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise StoreFailure(f"sqlite store {self.path}: {exc}") from exc
            raise
        self._out = []
        self._committed()
        return answers

    def _prepare(self, req: str | bytes) -> bytes | _Prepared:
        """Decode a request; a request that cannot run is answered at once."""
        try:
            env = _dec_env.decode(req)
        except msgspec.DecodeError as exc:
            return _response("", None, None, 400, {"error": f"invalid request: {exc}"})
        handler = _HANDLERS.get(env.kind)
        if handler is None:
            head = env.head
            return _response(
                env.kind, head.corrId, head.version, 400, {"error": _unsupported(env.kind)}
            )
        return env, handler

    def _run(self, db: sqlite3.Connection, prepared: _Prepared) -> Answer:
        env, method = prepared
        try:
            status, data = method(self, db, self.clock(), env.data)
        except _BadRequest as exc:
            # A rejection is an answer, not a failure: whatever the request
            # already did (e.g. timing out an expired promise it read) commits.
            status, data = exc.status, {"error": exc.message}
        head = env.head
        return (
            _response(env.kind, head.corrId, head.version, status, data),
            self._out,
            self._released,
        )

    # promise.get ------------------------------------------------------------------

    def _promise_get(self, db: sqlite3.Connection, now: int, raw: msgspec.Raw) -> _Result:
        req = _decode(raw, _Id)
        row = db.execute(SQL_GET, (req.id,)).fetchone()
        if row is None:
            return 404, {"error": f"promise {req.id} not found"}
        return 200, {"promise": record(projected(list(row), now))}

    def _task_get(self, db: sqlite3.Connection, now: int, raw: msgspec.Raw) -> _Result:
        req = _decode(raw, _Id)
        row = db.execute(SQL_GET, (req.id,)).fetchone()
        if row is None or row[T_STATE] is None:
            return 404, {"error": f"task {req.id} not found"}
        return 200, {"task": task_record(projected(list(row), now))}

    # promise.create -----------------------------------------------------------------

    def _promise_create(self, db: sqlite3.Connection, now: int, raw: msgspec.Raw) -> _Result:
        return self._create(db, now, _decode(raw, _PromiseCreate))

    def _create(self, db: sqlite3.Connection, now: int, req: _PromiseCreate) -> _Result:
        row = self._get(db, now, req.id)
        if row is not None:
            return 200, {"promise": record(row)}
        tags = req.tags or {}
        target = tags.get("resonate:target")
        timer = tags.get("resonate:timer") == "true"
        tags_text = _encode(tags).decode() if tags else "{}"
        param = _value_text(req.param)
        timeout_at = req.timeoutAt
        if timeout_at <= now:
            # created already past its deadline: settled at once (as resonate-pg)
            row = [
                req.id,
                "resolved" if timer else "rejected_timedout",
                param,
                "{}",
                tags_text,
                target,
                int(timer),
                timeout_at,
                timeout_at,
                timeout_at,
                "fulfilled" if target is not None else None,
                0 if target is not None else None,
                None,
                None,
                None,
            ]
            db.execute(SQL_INSERT, (*row, tags.get("resonate:origin")))
            return 200, {"promise": record(row)}
        t_state = t_version = t_due = None
        dispatch = False
        if target is not None:
            t_state, t_version = "pending", 0
            delay = _parse_int(tags.get("resonate:delay"))
            if delay is not None and delay > now:
                t_due = delay
            else:
                t_due = now + self.retry_ms
                dispatch = True
        row = [
            req.id,
            "pending",
            param,
            "{}",
            tags_text,
            target,
            int(timer),
            timeout_at,
            now,
            None,
            t_state,
            t_version,
            None,
            None,
            t_due,
        ]
        db.execute(SQL_INSERT, (*row, tags.get("resonate:origin")))
        if dispatch:
            self._emit_execute(db, target, req.id, 0)
        return 201, {"promise": record(row)}

    # promise.settle -----------------------------------------------------------------

    def _promise_settle(self, db: sqlite3.Connection, now: int, raw: msgspec.Raw) -> _Result:
        return self._settle_req(db, now, _decode(raw, _PromiseSettle))

    def _settle_req(self, db: sqlite3.Connection, now: int, req: _PromiseSettle) -> _Result:
        if req.state not in SETTLE_STATES:
            raise _BadRequest(400, f"invalid settle state: {req.state!r}")
        row = self._get(db, now, req.id)
        if row is None:
            return 404, {"error": f"promise {req.id} not found"}
        if row[STATE] == "pending":
            row = self._settle(db, now, row, req.state, _value_text(req.value), now)
        return 200, {"promise": record(row)}

    # promise.register_listener / register_callback ------------------------------------

    def _register_listener(self, db: sqlite3.Connection, now: int, raw: msgspec.Raw) -> _Result:
        req = _decode(raw, _RegisterListener)
        row = self._get(db, now, req.awaited)
        if row is None:
            return 404, {"error": f"promise {req.awaited} not found"}
        if row[STATE] == "pending":
            db.execute(SQL_LISTENER_ADD, (req.awaited, req.address))
        return 200, {"promise": record(row)}

    def _register_callback(self, db: sqlite3.Connection, now: int, raw: msgspec.Raw) -> _Result:
        req = _decode(raw, _RegisterCallback)
        if req.awaited == req.awaiter:
            raise _BadRequest(400, f"{req.awaiter} cannot await itself")
        awaited = self._get(db, now, req.awaited)
        if awaited is None:
            return 404, {"error": f"promise {req.awaited} not found"}
        awaiter = self._get(db, now, req.awaiter)
        if awaiter is None or awaiter[T_STATE] is None:
            return 422, {"error": f"awaiter {req.awaiter} is not a task"}
        if awaited[STATE] == "pending" and awaiter[STATE] == "pending":
            db.execute(SQL_CALLBACK_ADD, (req.awaited, req.awaiter))
        return 200, {"promise": record(awaited)}

    # task.create ----------------------------------------------------------------------

    def _task_create(self, db: sqlite3.Connection, now: int, raw: msgspec.Raw) -> _Result:
        req = _decode(raw, _TaskCreate)
        create = req.action.data
        ttl = max(req.ttl, 1)
        row = self._get(db, now, create.id)
        if row is None:
            if create.timeoutAt <= now:
                _, data = self._create(db, now, create)
                row = self._get(db, now, create.id)
                assert row is not None
                if row[T_STATE] is None:  # no target: still report a fulfilled task
                    row[T_STATE], row[T_VERSION] = "fulfilled", 0
                return 200, {"task": task_record(row), "promise": data["promise"], "preload": []}
            tags = create.tags or {}
            timer = tags.get("resonate:timer") == "true"
            row = [
                create.id,
                "pending",
                _value_text(create.param),
                "{}",
                _encode(tags).decode() if tags else "{}",
                tags.get("resonate:target"),
                int(timer),
                create.timeoutAt,
                now,
                None,
                "acquired",
                1,
                req.pid,
                ttl,
                now + ttl,
            ]
            db.execute(SQL_INSERT, (*row, tags.get("resonate:origin")))
            return 201, {"task": task_record(row), "promise": record(row), "preload": []}
        if row[T_STATE] is None:
            return 422, {"error": f"promise {create.id} exists and is not a task (no target)"}
        if row[T_STATE] == "fulfilled":
            return 200, {"task": task_record(row), "promise": record(row), "preload": []}
        if row[T_STATE] == "pending" and row[STATE] == "pending":
            self._acquire(db, now, row, req.pid, ttl)
            return 200, {"task": task_record(row), "promise": record(row), "preload": []}
        return 409, {"error": f"task {create.id} already exists (state {row[T_STATE]})"}

    def _acquire(
        self, db: sqlite3.Connection, now: int, row: list[Any], pid: str, ttl: int
    ) -> None:
        version = row[T_VERSION] + 1
        db.execute(SQL_TASK_ACQUIRE, (version, pid, ttl, now + ttl, row[ID]))
        row[T_STATE], row[T_VERSION], row[T_PID], row[T_TTL] = "acquired", version, pid, ttl
        row[T_DUE] = now + ttl

    # task.acquire -------------------------------------------------------------------

    def _task_acquire(self, db: sqlite3.Connection, now: int, raw: msgspec.Raw) -> _Result:
        req = _decode(raw, _TaskAcquire)
        self._released = req.id  # unless acquired below (and not a timer)
        row = self._get(db, now, req.id)
        if row is None or row[T_STATE] is None:
            return 404, {"error": f"task {req.id} not found"}
        if row[T_STATE] != "pending" or row[STATE] != "pending":
            return 409, {"error": f"task {req.id} is {row[T_STATE]}, not pending"}
        if row[T_VERSION] != req.version:
            return 409, {
                "error": f"task {req.id} is at version {row[T_VERSION]}, not {req.version}"
            }
        self._acquire(db, now, row, req.pid, max(req.ttl, 1))
        if not row[IS_TIMER]:  # the SDK drops a not-yet-due timer without a word
            self._released = None
        return 200, {"task": task_record(row), "promise": record(row), "preload": []}

    def _held(self, db: sqlite3.Connection, now: int, task_id: str, version: int) -> list[Any]:
        """The row of a task acquired at ``version`` whose promise is pending."""
        row = self._get(db, now, task_id)
        if row is None or row[T_STATE] is None:
            raise _BadRequest(404, f"task {task_id} not found")
        if row[T_STATE] != "acquired" or row[STATE] != "pending":
            raise _BadRequest(409, f"task {task_id} is {row[T_STATE]}, not acquired")
        if row[T_VERSION] != version:
            raise _BadRequest(409, f"task {task_id} is at version {row[T_VERSION]}, not {version}")
        return row

    # task.release -------------------------------------------------------------------

    def _task_release(self, db: sqlite3.Connection, now: int, raw: msgspec.Raw) -> _Result:
        req = _decode(raw, _TaskVersioned)
        self._released = req.id
        row = self._held(db, now, req.id, req.version)
        db.execute(SQL_TASK_PENDING, (now + self.retry_ms, req.id))
        self._emit_execute(db, row[TARGET], req.id, row[T_VERSION])
        return 200, {}

    # task.fulfill -------------------------------------------------------------------

    def _task_fulfill(self, db: sqlite3.Connection, now: int, raw: msgspec.Raw) -> _Result:
        req = _decode(raw, _TaskFulfill)
        self._released = req.id
        settle = req.action.data
        if settle.state not in SETTLE_STATES:
            raise _BadRequest(400, f"invalid settle state: {settle.state!r}")
        row = self._held(db, now, req.id, req.version)
        row = self._settle(db, now, row, settle.state, _value_text(settle.value), now)
        return 200, {"promise": record(row)}

    # task.fence ---------------------------------------------------------------------

    def _task_fence(self, db: sqlite3.Connection, now: int, raw: msgspec.Raw) -> _Result:
        req = _decode(raw, _TaskFence)
        self._held(db, now, req.id, req.version)
        kind = req.action.kind
        if kind == "promise.create":
            status, data = self._create(db, now, _decode(req.action.data, _PromiseCreate))
        elif kind == "promise.settle":
            status, data = self._settle_req(db, now, _decode(req.action.data, _PromiseSettle))
        else:
            raise _BadRequest(400, f"unknown task.fence action kind: {kind!r}")
        if status >= 400:
            return status, data
        inner = {"kind": kind, "head": {"status": status}, "data": data}
        return 200, {"action": inner, "preload": []}

    # task.suspend -------------------------------------------------------------------

    def _task_suspend(self, db: sqlite3.Connection, now: int, raw: msgspec.Raw) -> _Result:
        req = _decode(raw, _TaskSuspend)
        self._held(db, now, req.id, req.version)
        awaited = list(dict.fromkeys(a.data.awaited for a in req.actions))
        if req.id in awaited:
            raise _BadRequest(400, f"{req.id} cannot await itself")
        redirect = False
        for aid in awaited:
            arow = self._get(db, now, aid)
            if arow is None:
                return 422, {"error": f"awaited promise {aid} not found"}
            if arow[STATE] != "pending":
                redirect = True
        if redirect:
            return 300, {"preload": []}
        for aid in awaited:
            db.execute(SQL_CALLBACK_ADD, (aid, req.id))
        db.execute(SQL_TASK_PARK, ("suspended", req.id))
        self._released = req.id  # (a 300 leaves the task with its holder)
        return 200, {}

    # task.heartbeat -----------------------------------------------------------------

    def _task_heartbeat(self, db: sqlite3.Connection, now: int, raw: msgspec.Raw) -> _Result:
        req = _decode(raw, _TaskHeartbeat)
        for ref in req.tasks:
            if ref.version is None:
                db.execute(SQL_HEARTBEAT_ANY_VERSION, (now, ref.id, req.pid, now))
            else:
                db.execute(SQL_HEARTBEAT, (now, ref.id, req.pid, ref.version, now))
        return 200, {}

    # task.halt / task.continue ------------------------------------------------------

    def _task_halt(self, db: sqlite3.Connection, now: int, raw: msgspec.Raw) -> _Result:
        req = _decode(raw, _Id)
        row = self._get(db, now, req.id)
        if row is None or row[T_STATE] is None:
            return 404, {"error": f"task {req.id} not found"}
        if row[T_STATE] == "fulfilled":
            return 409, {"error": f"task {req.id} is fulfilled"}
        if row[T_STATE] != "halted":
            db.execute(SQL_TASK_PARK, ("halted", req.id))
        return 200, {}

    def _task_continue(self, db: sqlite3.Connection, now: int, raw: msgspec.Raw) -> _Result:
        req = _decode(raw, _Id)
        row = self._get(db, now, req.id)
        if row is None or row[T_STATE] is None:
            return 404, {"error": f"task {req.id} not found"}
        if row[T_STATE] != "halted":
            return 409, {"error": f"task {req.id} is {row[T_STATE]}, not halted"}
        db.execute(SQL_TASK_PENDING, (now + self.retry_ms, req.id))
        self._emit_execute(db, row[TARGET], req.id, row[T_VERSION])
        return 200, {}

    # -- transitions ------------------------------------------------------------------

    def _get(self, db: sqlite3.Connection, now: int, pid: str) -> list[Any] | None:
        """Read a promise for update; a pending promise past its deadline is
        timed out first (a real transition, like the timer would do)."""
        row = db.execute(SQL_GET, (pid,)).fetchone()
        if row is None:
            return None
        row = list(row)
        if row[STATE] == "pending" and row[TIMEOUT_AT] <= now:
            row = self._settle(db, now, row, _timeout_state(row), "{}", row[TIMEOUT_AT])
        return row

    def _settle(
        self,
        db: sqlite3.Connection,
        now: int,
        row: list[Any],
        state: str,
        value: str,
        settled_at: int,
    ) -> list[Any]:
        """Settle a pending promise and cascade: fulfil its task, notify its
        listeners, resume its awaiters. Returns the updated row."""
        pid = row[ID]
        db.execute(SQL_SETTLE, (state, value, settled_at, pid))
        row[STATE], row[VALUE], row[SETTLED_AT] = state, value, settled_at
        if row[T_STATE] is not None:
            row[T_STATE] = "fulfilled"
            row[T_PID] = row[T_TTL] = row[T_DUE] = None
            # its execute is dead, and a settled task never resumes: drop both
            db.execute(SQL_OUTBOX_DROP, ("x:" + pid,))
            db.execute(SQL_CALLBACKS_SCRUB, (pid,))
        listeners = db.execute(SQL_LISTENERS_OF, (pid,)).fetchall()
        if listeners:
            db.execute(SQL_LISTENERS_DROP, (pid,))
            body = (
                '{"kind":"unblock","head":{},"data":{"promise":'
                + _encode(record(row)).decode()
                + "}}"
            )
            for (address,) in sorted(listeners):
                if address in self.local_addresses:
                    self._out.append(body)
                else:
                    db.execute(SQL_OUTBOX_PUT, (f"u:{pid}\n{address}", address, body))
        awaiters = db.execute(SQL_CALLBACKS_OF, (pid,)).fetchall()
        if awaiters:
            db.execute(SQL_CALLBACKS_DROP, (pid,))
        for (awaiter,) in sorted(awaiters):
            resumed = db.execute(SQL_RESUME, (now + self.retry_ms, awaiter)).fetchone()
            if resumed is not None:
                self._emit_execute(db, resumed[1], awaiter, resumed[0])
        return row

    def _emit_execute(
        self, db: sqlite3.Connection, target: str | None, task_id: str, version: int
    ) -> None:
        if not target:
            return  # nowhere to send it; the task waits for its promise timeout
        body = execute_body(task_id, version)
        if target in self.local_addresses and self.local_room > 0:
            self.local_room -= 1
            db.execute(SQL_OUTBOX_DROP, ("x:" + task_id,))
            self._out.append(body)
        else:
            db.execute(SQL_OUTBOX_PUT, ("x:" + task_id, target, body))

    # -- timers -------------------------------------------------------------------------

    def due(self, limit: int) -> tuple[list[str], list[str]]:
        """Ids of promises and tasks whose timer has passed (a read; no lock)."""

        def q(db: sqlite3.Connection, now: int) -> tuple[list[str], list[str]]:
            ps = [r[0] for r in db.execute(SQL_DUE_PROMISES, (now, limit))]
            ts = [r[0] for r in db.execute(SQL_DUE_TASKS, (now, limit))]
            return ps, ts

        return self._read(q)

    def fire(self, promise_ids: Iterable[str], task_ids: Iterable[str]) -> tuple[int, list[str]]:
        """Apply the due transitions (rechecked under the write lock): promise
        timeouts first, then task retries and lease expiries."""

        def fn(db: sqlite3.Connection, now: int) -> int:
            n = 0
            for pid in promise_ids:
                row = db.execute(SQL_GET, (pid,)).fetchone()
                if row is not None and row[STATE] == "pending" and row[TIMEOUT_AT] <= now:
                    row = list(row)
                    self._settle(db, now, row, _timeout_state(row), "{}", row[TIMEOUT_AT])
                    n += 1
            for tid in task_ids:
                row = db.execute(SQL_GET, (tid,)).fetchone()
                if row is None or row[T_DUE] is None or row[T_DUE] > now:
                    continue
                if row[STATE] == "pending" and row[TIMEOUT_AT] <= now:
                    row = list(row)
                    self._settle(db, now, row, _timeout_state(row), "{}", row[TIMEOUT_AT])
                elif row[T_STATE] == "pending":  # retry
                    db.execute(SQL_TASK_RETRY, (now + self.retry_ms, tid))
                    self._emit_execute(db, row[TARGET], tid, row[T_VERSION])
                elif row[T_STATE] == "acquired":  # lease expired
                    db.execute(SQL_TASK_PENDING, (now + self.retry_ms, tid))
                    self._emit_execute(db, row[TARGET], tid, row[T_VERSION])
                else:
                    continue
                n += 1
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
        self, cutoff: int, after: tuple[int, str], limit: int
    ) -> tuple[int, tuple[int, str] | None]:
        """Collect up to ``limit`` finished lineages whose root settled at or
        before ``cutoff``. Returns (promises deleted, cursor for the next batch)."""

        def fn(db: sqlite3.Connection, now: int) -> tuple[int, tuple[int, str] | None]:
            roots = db.execute(SQL_GC_ROOTS, (after[0], after[1], cutoff, limit)).fetchall()
            deleted = 0
            for root_id, _settled_at, origin in roots:
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


type _Result = tuple[int, dict[str, Any]]
type _Method = Callable[[Engine, sqlite3.Connection, int, msgspec.Raw], _Result]
type _Prepared = tuple[_Envelope, _Method]
#: (response JSON, messages for in-process delivery, task id the caller let go of)
type Answer = tuple[bytes, list[str], str | None]


def is_busy(exc: sqlite3.OperationalError) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    text = str(exc)
    return "locked" in text or "busy" in text


def _parse_int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return None


def _unsupported(kind: str) -> str:
    if kind.startswith("schedule."):
        return (
            f"{kind}: schedules are not supported by the embedded SQLite store "
            "(use resonate-pg or a Resonate server for cron schedules)"
        )
    if kind in ("promise.search", "task.search"):
        return f"{kind} is not supported by the embedded SQLite store; keep your own index"
    return f"unknown request kind: {kind!r}"


def _response(kind: str, corr: Any, version: str | None, status: int, data: Any) -> bytes:
    return _encode(
        {
            "kind": kind,
            "head": {"corrId": corr, "status": status, "version": version or PROTOCOL},
            "data": data,
        }
    )


PROTOCOL: Final = "2026-04-01"

_HANDLERS: dict[str, _Method] = {
    "promise.get": Engine._promise_get,
    "promise.create": Engine._promise_create,
    "promise.settle": Engine._promise_settle,
    "promise.register_listener": Engine._register_listener,
    "promise.register_callback": Engine._register_callback,
    "task.get": Engine._task_get,
    "task.create": Engine._task_create,
    "task.acquire": Engine._task_acquire,
    "task.release": Engine._task_release,
    "task.fulfill": Engine._task_fulfill,
    "task.fence": Engine._task_fence,
    "task.suspend": Engine._task_suspend,
    "task.heartbeat": Engine._task_heartbeat,
    "task.halt": Engine._task_halt,
    "task.continue": Engine._task_continue,
}
