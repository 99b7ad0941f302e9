"""`postgresql://...`: promises in resonate-pg, jobs in a table beside them.

The operator applies resonate-pg's `resonate.sql` to the database once; Tether
creates and migrates its own tables on start (`core.store.migrations`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from typing import Any, cast
from urllib.parse import parse_qsl, unquote

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from resonate_base import PROTOCOL_VERSION, ConnectorError
from resonate_pg import PostgresConnection
from resonate_pg.client import DEFAULT_MAX_POOL_SIZE, PgConn
from resonate_pg.connection import PROCESS_TIMEOUTS_SQL, RPC_SQL

from core.errors import InvalidRequest, StoreConfigError, StoreUnavailable
from core.redact import MIN_CUT, redact
from core.settings import Settings, describe, listed
from core.store.base import STORE_WAIT, Store, WorkflowIds, signing_secrets
from core.store.jobs import now_ms
from core.store.migrations import migrate
from core.store.schema import POSTGRES
from core.store.sql import SqlJobIndex

log = logging.getLogger("tether")

GC_BATCH = 10_000
"""Promises one call of `resonate.gc` deletes, at most."""
KEPT_BATCH = 1_000
"""Root promise ids one read of `kept_since` looks for."""
MIGRATION_LOCK = int.from_bytes(b"tetherdb")
"""The advisory lock key migrations take (any constant; this one reads "tetherdb")."""

ROLLED_BACK_TRIES = 3
"""Runs of a transaction Postgres rolled back on its own (a deadlock, a
serialization failure: `RolledBack`) before `PostgresDriver.atomic` says the
store is unavailable."""


class RolledBack(StoreUnavailable):
    """Postgres rolled the transaction back to break a deadlock or a
    serialization failure: nothing of it was committed, and running it again
    may well go through."""


TIMERS_REFUSED = (psycopg.errors.InsufficientPrivilege, psycopg.errors.UndefinedFunction)
"""What `resonate.process_timeouts()` answers a role that may not run it (or
a schema without it): the message pump leaves the timers to pg_cron."""

RESONATE_FUNCTIONS = ("resonate_rpc", "dequeue_execute", "dequeue_unblock")
"""resonate-pg's functions the store calls (`resonate_pg.connection`)."""


async def _missing_functions(driver: PostgresDriver, names: Sequence[str]) -> list[str]:
    """Which of resonate-pg's functions `names` the database lacks."""
    rows = await driver.fetch(
        "SELECT p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
        " WHERE n.nspname = 'resonate' AND p.proname = ANY(?)",
        (list(names),),
    )
    return sorted(set(names) - {name for (name,) in rows})


async def _check_resonate_schema(driver: PostgresDriver) -> None:
    """`StoreConfigError` when the database lacks resonate-pg's schema: every
    workflow request would fail (503) while `/health` said 200."""
    missing = await _missing_functions(driver, RESONATE_FUNCTIONS)
    if missing:
        raise StoreConfigError(
            f"the database lacks resonate-pg's schema (no resonate.{', resonate.'.join(missing)}):"
            ' apply resonate.sql to it first (docs/deploy.md, "The database")'
        )


class PostgresStore(Store):
    kind = "postgresql"

    @classmethod
    async def open(cls, settings: Settings, pid: str) -> PostgresStore:
        url = settings.store
        if not settings.callback_secret:
            raise StoreConfigError(
                "TETHER_CALLBACK_SECRET must be set when TETHER_STORE is Postgres: every"
                " process sharing the database must sign callback URLs with the same secret"
            )
        driver = PostgresDriver(url)
        try:
            await driver.open()
            await _check_resonate_schema(driver)
            await migrate(driver)
        except Exception as exc:
            await driver.close()
            if isinstance(exc, StoreUnavailable):  # down for now, not a setting's fault
                raise StoreUnavailable(
                    f"cannot open the Postgres store {describe(url)}: {exc.message}"
                ) from None
            if isinstance(exc, StoreConfigError):
                reason = str(exc)
            elif isinstance(exc, psycopg.Error):  # e.g. no CREATE on the schema for its tables
                secrets = dsn_secrets(url)
                reason = f"{type(exc).__name__}: {redact(' '.join(str(exc).split()), secrets)}"
            else:
                reason = type(exc).__name__
            raise StoreConfigError(
                f"cannot open the Postgres store {describe(url)}: {reason}"
            ) from None
        connection = PgConnection(url, pid=pid, group=settings.group)
        previous = listed(settings.callback_secret_previous)
        # Without TETHER_NOTIFY_SECRET no secret is made: every host must sign
        # with the same one, so jobs asking for notifications are refused.
        notify = listed(settings.notify_secret_previous)
        return cls(
            connection,
            PostgresIndex(driver),
            settings.callback_secret,
            previous,
            signing_secrets(settings.notify_secret, notify),
        )

    def _driver(self) -> PostgresDriver:
        jobs = self.jobs
        assert isinstance(jobs, SqlJobIndex) and isinstance(jobs.db, PostgresDriver)
        return jobs.db

    async def delete_promises(self, older_than_ms: int, ids: WorkflowIds | None = None) -> int:
        """Delete promises settled more than `older_than_ms` ago, with
        resonate-pg's own `resonate.gc` (a settled promise goes only once the
        root of the workflow it belongs to is settled), `GC_BATCH` at a
        time. A schema without it (an older `resonate.sql`) is refused
        naming what to do. `resonate.gc` takes a time and nothing else, so
        `ids` changes nothing here: the caller keeps the promises of open
        jobs by asking `kept_since` first and reaching no further back."""
        driver = self._driver()
        if await _missing_functions(driver, ("gc",)):
            raise InvalidRequest(
                "retention on Postgres needs resonate-pg's resonate.gc, which this database"
                " lacks: apply a newer resonate.sql (see docs/deploy.md)"
            )
        before, deleted = now_ms() - older_than_ms, 0
        while True:
            try:
                rows = await driver.fetch("SELECT resonate.gc(?, ?)", (before, GC_BATCH))
            except psycopg.Error as exc:  # a user that may not delete resonate-pg's rows
                raise InvalidRequest(
                    f"resonate.gc failed: {' '.join(str(exc).split())}; run Tether as the"
                    ' role that owns resonate-pg\'s tables (docs/deploy.md, "The database")'
                ) from None
            count = int(rows[0][0])
            deleted += count
            if count < GC_BATCH:
                return deleted

    async def kept_since(self, ids: WorkflowIds, now: int) -> int | None:
        """When the earliest attempt began among the jobs the index holds open
        past their deadline whose workflow's root promise is still there.

        `resonate.gc` deletes each settled promise of a workflow whose root
        is settled, and a root the store timed out is (an outage from before
        the job's deadline until an hour past it), so a job open past its
        deadline may have every promise of its attempt within reach, all
        settled since that attempt began. Such a job is one the watchdog
        times out at its next look, so this holds retention back for as long
        as that takes. A job whose workflow is gone (never started, or
        deleted by an earlier release's retention) holds nothing back. Nor do
        a job's earlier attempts: nothing reads their promises once the job
        is at a later one (a callback of one is answered `gone`), and keeping
        them would hold retention back for as long as the job runs."""
        driver = self._driver()
        overdue = await driver.fetch(
            "SELECT id, attempt, deadline, timeout FROM tether_jobs"
            " WHERE finished_at IS NULL AND deadline <= ?",
            (now,),
        )
        began = {
            ids.root(job_id, attempt): deadline - int(timeout * 1000)
            for job_id, attempt, deadline, timeout in overdue
        }
        roots, there = list(began), []
        try:
            for i in range(0, len(roots), KEPT_BATCH):
                there += await driver.fetch(
                    "SELECT id FROM resonate.promises WHERE id = ANY(?)",
                    (roots[i : i + KEPT_BATCH],),
                )
        except psycopg.Error as exc:  # a user that may not read resonate-pg's rows
            raise InvalidRequest(
                f"reading resonate.promises failed: {' '.join(str(exc).split())}; run Tether"
                ' as the role that owns resonate-pg\'s tables (docs/deploy.md, "The database")'
            ) from None
        return min((began[root] for (root,) in there), default=None)

    async def close(self) -> None:
        """Close the job index and resonate-pg's connection's sessions."""
        await self.jobs.close()
        if isinstance(self.connection, PgConnection):
            await self.connection.close()


RECONNECT_SPAN = 10.0
"""Seconds a pool's connection attempt backs off for (psycopg_pool doubles
its wait from 1 s) before it gives up and the next request that waits for
a connection starts afresh (`reconnect_timeout`). psycopg_pool's 300 s
spaced its attempts 1, 3, 7, ... 127 s after the failure, so an outage of
a minute went unnoticed for another minute once Postgres was back (found
by an exploratory QA pass); while requests come, each attempt now comes
within about 4 s of the one before. (A request already waiting when an
attempt gives up waits out its own bound, `STORE_WAIT` in both pools, as
`STORE_WAIT` says; psycopg_pool's own 30 s held a workflow's request to
the sessions' pool that long.)
psycopg_pool's warning each attempt is thinned (`api.logs.Repeats`)."""

_purging: dict[int, asyncio.Task[None]] = {}
"""The pool drains under way, by `id` of their pool: one at a time each."""


@asynccontextmanager
async def purged_when_lost(pool: AsyncConnectionPool) -> AsyncIterator[None]:
    """Once a request finds its connection lost (a Postgres restart ended
    every one, `AdminShutdown`), replace the pool's idle connections in the
    background (`AsyncConnectionPool.drain`; one in use is replaced when
    it comes back): each would otherwise fail a request of its own, seconds
    after Postgres was back (found by an exploratory QA pass). Closed, not
    tested one by one (`check`, whose test of a connection the network
    silently dropped waits for TCP to give up, minutes, holding the rest).
    Costs nothing while connections work."""
    try:
        yield
    except psycopg.OperationalError as exc:
        if _lost(exc) and id(pool) not in _purging:
            task = asyncio.get_running_loop().create_task(pool.drain())
            _purging[id(pool)] = task
            task.add_done_callback(lambda done: _purged(id(pool), done))
        raise


def _purged(key: int, task: asyncio.Task[None]) -> None:
    """A pool's drain ended: its failure (the pool closed meanwhile) is the
    next request's to find, not an unretrieved error."""
    _purging.pop(key, None)
    if not task.cancelled() and task.exception() is not None:
        log.debug("replacing a Postgres pool's connections failed", exc_info=task.exception())


def _lost(exc: psycopg.OperationalError) -> bool:
    """Whether `exc` says the connection itself is gone: the server ended
    it (SQLSTATE class 57P, an operator's or a crash's shutdown) or it broke
    (no SQLSTATE); not a pool timeout."""
    state = exc.sqlstate or ""
    return state.startswith("57P") or (not state and not isinstance(exc, PoolTimeout))


class _Sessions:
    """resonate-pg's sessions (`resonate_pg.client.PgSessions`) on a pool of
    autocommit connections, opened on first use (a database down at start
    heals, as with resonate-pg's own). Its message pump gets one transaction
    a session (`session`), as from resonate-pg's; a protocol request runs as
    one statement on its own (`autocommit`, `PgConnection.send`): one round
    trip to Postgres, where a session's is three (`BEGIN`, the call,
    `COMMIT`). `close` waits for `shut` (`PgConnection.close`), after which
    no pool opens again: a request that raced the close fails, rather than
    leave a pool nothing closes."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._pool: AsyncConnectionPool | None = None
        self._lock = asyncio.Lock()
        self._shut = False

    async def _opened(self) -> AsyncConnectionPool:
        if self._pool is not None:
            return self._pool
        async with self._lock:  # two first calls at once make one pool
            if self._shut:
                raise ConnectorError(RuntimeError("connection has been closed"))
            if self._pool is None:
                pool = AsyncConnectionPool(
                    self._url,
                    min_size=1,
                    max_size=DEFAULT_MAX_POOL_SIZE,
                    open=False,
                    kwargs={"autocommit": True},
                    timeout=STORE_WAIT,
                    reconnect_timeout=RECONNECT_SPAN,
                )
                await pool.open()
                self._pool = pool
            return self._pool

    @asynccontextmanager
    async def autocommit(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A pooled connection; each statement commits on its own."""
        pool = await self._opened()
        async with purged_when_lost(pool), pool.connection() as conn:
            yield conn

    @asynccontextmanager
    async def session(self) -> AsyncIterator[PgConn]:
        """A pooled connection in one transaction, committed when the block
        ends (rolled back if it raises)."""
        async with self.autocommit() as conn, conn.transaction():
            yield cast(PgConn, conn)

    async def dedicated(self) -> PgConn:
        """A connection of its own, for `LISTEN`."""
        return cast(PgConn, await psycopg.AsyncConnection.connect(self._url, autocommit=True))

    async def close(self) -> None:
        pass

    async def shut(self) -> None:
        self._shut = True
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()


class PgConnection(PostgresConnection):
    """resonate-pg's connection, answering requests during and after `stop`
    as the embedded store's does, until `close`: the SDK stops its
    connections before it waits for the steps still running, and a step may
    need the store to end (a trigger that failed settles its job); refused,
    the SDK retried the step for ever and `tether serve` never stopped. Its
    sessions close with the store. (resonate-pg's own `send` refuses once
    its `stop` begins, `_stopped`: a workflow a stop hands back, whose
    release went while the stop ran, was refused and held until its lease
    ran out, found by a QA pass; `tests/system` stop services on Postgres,
    which hang without it.)"""

    def __init__(self, url: str, *, pid: str, group: str) -> None:
        self._own = _Sessions(url)
        self._closed = False
        super().__init__(sessions=self._own, pid=pid, group=group)

    async def send(self, req: str, headers: dict[str, str] | None = None) -> str:
        """resonate-pg's `send` (`resonate.resonate_rpc`, the request bound
        as one parameter), in autocommit: the call is its own transaction
        either way, and so costs one round trip instead of three."""
        if self._closed:
            raise ConnectorError(RuntimeError("connection has been closed"))
        try:
            async with self._own.autocommit() as conn:
                row = await (await conn.execute(RPC_SQL, (req,))).fetchone()
        except Exception as exc:
            raise ConnectorError(exc) from exc
        if row is None or row[0] is None:
            raise ConnectorError(RuntimeError("resonate.resonate_rpc returned no row"))
        return str(row[0])

    async def _fire_timers(self) -> None:
        """resonate-pg's first step of each drain of its message pump
        (`PostgresConnection._fire_timers`): `resonate.process_timeouts()`
        in a session of its own. A role that may not run it (resonate-pg's
        `resonate_worker`) leaves the timers to pg_cron from then on, as
        resonate-pg does; but where resonate-pg gives them up on any error,
        here any other failure (a lost connection, a restarting database, a
        `statement_timeout` the backlog of a long outage outlasts) skips
        the timers of this drain only, logged each time (`tether serve`'s
        log filter `api.logs.Repeats` shows one line a minute, with a
        count): given up for good, this process would never
        again expire the leases of a dead host's workflows. It never
        raises: the drain goes on to claim and hand on its messages, which a
        timers' statement that fails every time would otherwise hold up for
        good. (Relies on resonate-pg 0.8's `_drain` calling this first, and
        its `_drive_timers`; `tests/core/store/test_pg_sessions.py`.)"""
        if not self._drive_timers:
            return
        try:
            async with self._own.session() as conn:
                await conn.execute(PROCESS_TIMEOUTS_SQL)
        except TIMERS_REFUSED as exc:
            self._drive_timers = False
            log.warning(
                "resonate.process_timeouts() unavailable (%s), leaving timers to pg_cron",
                type(exc).__name__,
            )
        except Exception as exc:
            log.warning(
                "resonate.process_timeouts() failed (%s): task leases and promise timeouts"
                " wait for the next drain that runs it; messages are still delivered",
                type(exc).__name__,
            )

    async def close(self) -> None:
        self._closed = True
        await super().stop()
        await self._own.shut()


class PostgresIndex(SqlJobIndex):
    """The job index in resonate-pg's own database: a settle that wins
    settles its promises and ends the job in one transaction (`end`'s
    `together`, `PgSession.request`), as on the embedded store."""

    settles_together = True
    root_settled_first = False
    """resonate-pg's settle of a promise locks it, then each promise awaiting
    it (its root): a transaction that settled the root first took those
    locks the other way round, and deadlocked with a plain settle of the
    same promise (a cancel racing a callback: found in an audit,
    2026-12-04). The promise goes first; the root's settle then drops the
    resume that pushed (its outbox message is never delivered)."""


class PgSession:
    """Runs `?`-placeholder SQL on one psycopg connection. SQL without
    arguments goes as written (a `%` in it is no placeholder)."""

    def __init__(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self.conn = conn

    async def request(self, kind: str, data: dict[str, Any]) -> tuple[int, Any]:
        """One protocol request made in this session's transaction
        (`core.store.jobs.Requests`), by `resonate.resonate_rpc` as the SDK's
        are: it commits with the transaction or not at all, and so do the
        messages it leaves in resonate-pg's outbox (their `NOTIFY` is sent on
        commit). resonate-pg's locks on the promises it touches are held
        until then."""
        head = {"corrId": f"tether-{uuid.uuid4().hex}", "version": PROTOCOL_VERSION}
        envelope = json.dumps({"kind": kind, "head": head, "data": data})
        row = await (await self.conn.execute(RPC_SQL, (envelope,))).fetchone()
        if row is None or row[0] is None:
            raise StoreUnavailable("resonate.resonate_rpc returned no row")
        answer = json.loads(row[0])
        return int(answer["head"]["status"]), answer.get("data")

    async def fetch(self, sql: str, args: Sequence[Any]) -> list[tuple[Any, ...]]:
        return await (await self._run(sql, args)).fetchall()

    async def execute(self, sql: str, args: Sequence[Any]) -> int:
        return (await self._run(sql, args)).rowcount

    async def _run(self, sql: str, args: Sequence[Any]) -> psycopg.AsyncCursor[Any]:
        if not args:
            return await self.conn.execute(sql)
        return await self.conn.execute(sql.replace("?", "%s"), args)


def dsn_secrets(dsn: str) -> list[str]:
    """What a libpq error about `dsn` may quote of its secrets: the password
    of `user:password@` (all between the first `:` and the last `@`, as
    `describe` masks it) and of each `?password=`, as written and decoded,
    and with its runs of spaces squeezed (as the error is shown). A password
    with an `@` not percent-encoded is also each of its parts of at least
    `MIN_CUT` characters: libpq ends the password at the first `@` and
    quotes the rest as the host's name (found in an audit, 2026-12-04)."""
    rest = dsn.partition("://")[2]
    userinfo, at, host = rest.rpartition("@")
    found = [userinfo.partition(":")[2]] if at else []
    found += [part for part in found[0].split("@") if len(part) >= MIN_CUT] if found else []
    query = (host if at else rest).partition("#")[0].partition("?")[2]
    found += [v for k, v in parse_qsl(query) if "password" in k.lower()]
    found += [unquote(f) for f in found]
    found += [" ".join(f.split()) for f in found]
    return list(dict.fromkeys(f for f in found if f))


REFUSALS = tuple(
    (re.compile(pattern), said)
    for pattern, said in (
        (r"password authentication failed", "Postgres refused the password"),
        (r"no password supplied", "Postgres asked for a password and none was given"),
        (r"no pg_hba\.conf entry", "Postgres's pg_hba.conf admits no such connection"),
        (r"fatal: +database \".*\" does not exist", "the database does not exist"),
        (r"fatal: +role \".*\" does not exist", "the role does not exist"),
        (r"not currently accepting connections", "the database takes no connections now"),
        (r"the database system is", "Postgres is starting up, shutting down or recovering"),
        (r"connection slots|too many connections", "Postgres has no connection slot left"),
        (r"connection refused", "the connection was refused: is Postgres running there?"),
        (r"resolve host|translate host name", "the host name does not resolve"),
        (r"timeout expired", "connecting timed out"),
        (r"ssl|certificate", "the TLS (SSL) negotiation failed"),
    )
)
"""What a failed connection attempt is said to be, by what libpq's message
(in lower case) holds. The message itself names the server's address, the
role and the database: it goes to the log alone, never into an answer
(`/health` takes no token)."""


def refusal_of(exc: psycopg.OperationalError) -> str:
    """Why a connection attempt failed, in words that name no address, role
    or database (`REFUSALS`)."""
    text = str(exc).lower()
    for pattern, said in REFUSALS:
        if pattern.search(text):
            return said
    return f"connecting failed ({type(exc).__name__})"


class Attempts:
    """The last failure of a pool's connection attempts (`refusal_of`),
    cleared by one that succeeds: what `/health` and a request that waited
    out its bound say, where psycopg_pool says only that it timed out."""

    def __init__(self) -> None:
        self._why: str | None = None
        self._at = 0.0

    def refused(self) -> str | None:
        """The last attempt's failure and how long ago, if it failed."""
        if self._why is None:
            return None
        ago = time.monotonic() - self._at
        return f"its last connection attempt, {ago:.0f} s ago, failed: {self._why}"

    def connection_class(self) -> type[psycopg.AsyncConnection[Any]]:
        """A connection class for the pool whose `connect` keeps score."""
        attempts = self

        class Watched(psycopg.AsyncConnection[Any]):
            @classmethod
            async def connect(cls, conninfo: str = "", **kwargs: Any) -> Any:
                try:
                    conn = await super().connect(conninfo, **kwargs)
                except psycopg.OperationalError as exc:
                    attempts._why, attempts._at = refusal_of(exc), time.monotonic()
                    raise
                attempts._why = None
                return conn

        return Watched


class PostgresDriver:
    """Runs the job index's SQL on a psycopg pool of autocommit connections:
    a statement on its own (`fetch`, `execute`) commits by itself, in one
    round trip; `transaction` and `atomic` wrap theirs in `BEGIN` and
    `COMMIT`."""

    dialect = POSTGRES

    def __init__(self, dsn: str, *, max_size: int = 8, timeout: float = STORE_WAIT) -> None:
        self._dsn = dsn
        # Never prepared: after five runs psycopg prepares a query, and
        # Postgres then may switch to a generic plan that ignores the values;
        # a list page with a time window went from 1 ms to ~450 ms so.
        self.attempts = Attempts()
        self._pool = AsyncConnectionPool(
            dsn,
            min_size=1,
            max_size=max_size,
            timeout=timeout,
            open=False,
            kwargs={"prepare_threshold": None, "autocommit": True},
            reconnect_timeout=RECONNECT_SPAN,
            connection_class=self.attempts.connection_class(),
        )

    def refused(self) -> str | None:
        """Why the pool's last connection attempt failed, if it did
        (`Attempts`)."""
        return self.attempts.refused()

    async def open(self) -> None:
        """Connect once to fail fast with the server's reason, then open the
        pool. Raises `StoreUnavailable` without the password."""
        try:
            conn = await psycopg.AsyncConnection.connect(self._dsn, connect_timeout=5)
            await conn.close()
        except psycopg.Error as exc:
            secrets = dsn_secrets(self._dsn)
            reason = redact(" ".join(redact(str(exc), secrets).split()), secrets)
            raise StoreUnavailable(reason) from None
        await self._pool.open(wait=True, timeout=self._pool.timeout)

    @asynccontextmanager
    async def session(self) -> AsyncIterator[PgSession]:
        """A pooled connection; each statement the block runs commits on
        its own."""
        try:
            async with purged_when_lost(self._pool), self._pool.connection() as conn:
                yield PgSession(conn)
        except psycopg.errors.TransactionRollback as exc:
            name = type(exc).__name__
            raise RolledBack(f"Postgres rolled the transaction back: {name}") from None
        except psycopg.OperationalError as exc:  # server gone, pool timed out
            refused = self.refused() if isinstance(exc, PoolTimeout) else None
            said = f"; {refused}" if refused else ""
            raise StoreUnavailable(f"Postgres did not answer: {type(exc).__name__}{said}") from None

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[PgSession]:
        """A pooled connection in one transaction: what the block ran
        commits together when it ends (rolled back if it raises)."""
        async with self.session() as session, session.conn.transaction():
            yield session

    async def atomic[T](
        self,
        body: Callable[[PgSession], Coroutine[Any, Any, T]],
        after: Callable[[T], None] | None = None,
    ) -> T:
        """`body`'s statements in one transaction (`Driver.atomic`), run
        again at once when Postgres rolled it back (`RolledBack`), up to
        `ROLLED_BACK_TRIES` runs: `body` only makes statements, so a run
        again is the whole of it again."""
        for tried in range(1, ROLLED_BACK_TRIES + 1):
            try:
                async with self.transaction() as session:
                    result = await body(session)
                break
            except RolledBack as exc:
                if tried == ROLLED_BACK_TRIES:
                    raise
                log.warning("%s; running it again (%d of %d)", exc, tried + 1, ROLLED_BACK_TRIES)
        if after is not None:
            after(result)
        return result

    @asynccontextmanager
    async def migration_lock(self) -> AsyncIterator[PgSession]:
        """A transaction holding the advisory lock migrations take."""
        async with self.transaction() as session:
            await session.execute("SELECT pg_advisory_xact_lock(?)", (MIGRATION_LOCK,))
            yield session

    async def fetch(self, sql: str, args: Sequence[Any]) -> list[tuple[Any, ...]]:
        async with self.session() as session:
            return await session.fetch(sql, args)

    async def fetch_aside(
        self, sql: str, args: Sequence[Any], *, keep: bool = True
    ) -> list[tuple[Any, ...]]:
        """As `fetch`: Postgres reads on its server while the loop goes on
        (`keep` is the embedded store's)."""
        return await self.fetch(sql, args)

    async def execute(self, sql: str, args: Sequence[Any]) -> int:
        async with self.session() as session:
            return await session.execute(sql, args)

    async def close(self) -> None:
        await self._pool.close()
