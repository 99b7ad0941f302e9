"""How the Postgres store talks to Postgres: a statement on its own commits
by itself (autocommit, one round trip), a transaction's statements commit
together or not at all, and resonate-pg's message pump keeps its one
transaction a drain and its timers, and a refused connection is said. Run
with TETHER_TEST_PG_DSN (skipped without it, but for a connection nothing
listens for)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import psycopg
import pytest
from psycopg import pq
from resonate_base import ConnectorError

import core.store.postgres
from core.store.postgres import PgConnection, PgSession, PostgresDriver, refusal_of
from tests.conftest import free_port


def _request(kind: str, data: dict[str, Any]) -> str:
    return json.dumps({"kind": kind, "head": {"corrId": "1", "version": "v"}, "data": data})


def _ping() -> str:
    return _request("promise.get", {"id": "nowhere"})


def _work_for(conn: PgConnection, group: str, promise_id: str) -> str:
    """A workflow promise whose task is addressed to `group` (`conn`'s): an
    `execute` message in resonate-pg's outbox for its pump."""
    tags = {"resonate:target": conn.resolve_target(group)}
    timeout = int(time.time() * 1000) + 60_000
    return _request(
        "promise.create", {"id": promise_id, "timeoutAt": timeout, "param": {}, "tags": tags}
    )


async def _rows(url: str) -> list[str]:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as other:
        cur = await other.execute("SELECT x FROM t ORDER BY x")
        return [x for (x,) in await cur.fetchall()]


async def test_a_statement_on_its_own_commits_by_itself_and_a_transaction_all_or_nothing(
    fresh_pg_url: str,
) -> None:
    driver = PostgresDriver(fresh_pg_url)
    await driver.open()
    try:
        await driver.execute("CREATE TABLE t (x TEXT)", ())
        await driver.execute("INSERT INTO t VALUES (?)", ("alone",))
        async with driver.session() as session:
            await session.execute("INSERT INTO t VALUES (?)", ("in a session",))
            # nothing left open: another connection sees it before the block ends
            assert session.conn.info.transaction_status == pq.TransactionStatus.IDLE
            assert await _rows(fresh_pg_url) == ["alone", "in a session"]

        async def two_then_fail(tx: PgSession) -> None:
            await tx.execute("INSERT INTO t VALUES (?)", ("one",))
            await tx.execute("INSERT INTO t VALUES (?)", ("two",))
            raise RuntimeError("part way")

        with pytest.raises(RuntimeError, match="part way"):
            await driver.atomic(two_then_fail)
        with pytest.raises(RuntimeError, match="part way"):
            async with driver.transaction() as tx:
                await tx.execute("INSERT INTO t VALUES (?)", ("three",))
                assert tx.conn.info.transaction_status == pq.TransactionStatus.INTRANS
                assert await _rows(fresh_pg_url) == ["alone", "in a session"]  # not yet
                raise RuntimeError("part way")
        assert await _rows(fresh_pg_url) == ["alone", "in a session"]

        async def two(tx: PgSession) -> None:
            await tx.execute("INSERT INTO t VALUES (?)", ("one",))
            await tx.execute("INSERT INTO t VALUES (?)", ("two",))

        await driver.atomic(two)
        assert await _rows(fresh_pg_url) == ["alone", "in a session", "one", "two"]
    finally:
        await driver.close()


async def test_protocol_requests_go_alone(fresh_pg_url: str) -> None:
    conn = PgConnection(fresh_pg_url, pid="p1", group="g")
    try:
        answer = json.loads(await conn.send(_ping()))
        assert answer["head"]["status"] == 404
        sessions = conn._own
        async with sessions.autocommit() as c:
            await c.execute("SELECT 1")
            assert c.info.transaction_status == pq.TransactionStatus.IDLE
        async with sessions.session() as c:  # the message pump's, one a drain
            await c.execute("SELECT 1")
            assert c.info.transaction_status == pq.TransactionStatus.INTRANS
        # stopped (the SDK stops its connections before its steps end), it
        # still answers; closed with the store, it refuses
        await conn.stop()
        assert json.loads(await conn.send(_ping()))["head"]["status"] == 404
    finally:
        await conn.close()
    with pytest.raises(Exception, match="connection has been closed"):
        await conn.send(_ping())
    # a request that passed that check as the store closed opens no pool
    # again (one nothing would close)
    with pytest.raises(ConnectorError, match="closed"):
        async with conn._own.autocommit():
            pass
    assert conn._own._pool is None


async def test_the_pump_gives_up_the_timers_only_when_postgres_refuses_them(
    fresh_pg_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Each drain of resonate-pg's message pump drives the timers, then
    claims this node's messages and hands them to the SDK. A lost
    connection under the timers, or a timers' statement that fails every
    time (a `statement_timeout` over a long outage's backlog), skips the
    timers of that drain only, said once a minute at most; the messages are
    still claimed and handed on, and the next drain drives the timers again
    (resonate-pg gave them up for good on any error, and a failure here that
    stopped the drain would hold every message up while it lasts); a
    database that refuses the timers' function (a role not granted
    `resonate.process_timeouts`) is said once and left to pg_cron; the
    messages still flow."""
    async with await psycopg.AsyncConnection.connect(fresh_pg_url, autocommit=True) as other:
        await other.execute("CREATE TABLE ticks (at TIMESTAMPTZ)")
    # the timers' statement, seen from another connection once it has run
    tick = "INSERT INTO ticks VALUES (now())"
    monkeypatch.setattr(core.store.postgres, "PROCESS_TIMEOUTS_SQL", tick)
    conn = PgConnection(fresh_pg_url, pid="p1", group="g")
    got: list[str] = []
    conn.recv(got.append)

    async def ticks() -> int:
        async with await psycopg.AsyncConnection.connect(fresh_pg_url, autocommit=True) as other:
            row = await (await other.execute("SELECT count(*) FROM ticks")).fetchone()
            return int(row[0]) if row else 0

    try:
        assert json.loads(await conn.send(_work_for(conn, "g", "w1")))["head"]["status"] == 200
        await conn._drain()
        assert [json.loads(m)["data"]["task"]["id"] for m in got] == ["w1"]
        assert await ticks() == 1
        await conn._drain()  # nothing left to claim
        assert len(got) == 1

        # a connection lost under the timers' statement (Postgres restarting),
        # then a statement that fails each time: the messages still flow, each
        # failure is said (`tether serve`'s log filter thins them:
        # tests/api/test_json_logs.py), and the next drain drives the timers again
        failing = ("SELECT pg_terminate_backend(pg_backend_pid())", "SELECT 1/0", "SELECT 1/0")
        with caplog.at_level(logging.WARNING, logger="tether"):
            for n, statement in enumerate(failing, start=3):
                monkeypatch.setattr(core.store.postgres, "PROCESS_TIMEOUTS_SQL", statement)
                assert (
                    json.loads(await conn.send(_work_for(conn, "g", f"w{n}")))["head"]["status"]
                    == 200
                )
                await conn._drain()
        assert [json.loads(m)["data"]["task"]["id"] for m in got] == ["w1", "w3", "w4", "w5"]
        said = [r.getMessage() for r in caplog.records if "process_timeouts" in r.getMessage()]
        assert said == [
            f"resonate.process_timeouts() failed ({error}): task leases and promise"
            " timeouts wait for the next drain that runs it; messages are still delivered"
            for error in ("AdminShutdown", "DivisionByZero", "DivisionByZero")
        ]
        caplog.clear()
        monkeypatch.setattr(core.store.postgres, "PROCESS_TIMEOUTS_SQL", tick)
        await conn._drain()
        assert await ticks() == 3  # each drain, but the failed ones

        monkeypatch.setattr(
            core.store.postgres, "PROCESS_TIMEOUTS_SQL", "SELECT resonate.no_such_function()"
        )
        assert json.loads(await conn.send(_work_for(conn, "g", "w6")))["head"]["status"] == 200
        with caplog.at_level(logging.WARNING, logger="tether"):
            await conn._drain()
            await conn._drain()
        said = [r.getMessage() for r in caplog.records if "process_timeouts" in r.getMessage()]
        assert said == [
            "resonate.process_timeouts() unavailable (UndefinedFunction), leaving timers to pg_cron"
        ]
        assert [json.loads(m)["data"]["task"]["id"] for m in got] == ["w1", "w3", "w4", "w5", "w6"]
    finally:
        await conn.close()


async def _end_every_other_connection(url: str) -> int:
    """What a Postgres restart does to a pool's idle connections: each
    ended by the server (`AdminShutdown`, SQLSTATE 57P01)."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as admin:
        cur = await admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        row = await cur.fetchone()
        return int(row[0]) if row else 0


async def test_connections_a_restart_ended_fail_one_request_not_one_each(
    fresh_pg_url: str,
) -> None:
    """Each idle connection a Postgres restart ended failed a request of its
    own, seconds after Postgres was back: 4 to 7 of a host's first 8 were
    503 `AdminShutdown` (found by an exploratory QA pass). The first one
    lost has the pool's idle connections checked, each replaced if lost."""
    driver = PostgresDriver(fresh_pg_url, max_size=6)
    await driver.open()
    sessions = PgConnection(fresh_pg_url, pid="p", group="g")
    try:

        async def busy() -> None:  # six connections of each pool in use, then idle
            async def one() -> None:
                await driver.fetch("SELECT pg_sleep(0.2)", ())
                await sessions.send(_ping())

            await asyncio.gather(*(one() for _ in range(6)))

        await busy()
        assert await _end_every_other_connection(fresh_pg_url) >= 2
        failed = 0
        for _ in range(8):
            try:
                await driver.fetch("SELECT 1", ())
            except core.store.postgres.StoreUnavailable:
                failed += 1
            try:
                await sessions.send(_ping())
            except ConnectorError:
                failed += 1
            await asyncio.sleep(0.05)
        assert failed <= 2, failed  # the first of each pool at most
    finally:
        await sessions.close()
        await driver.close()


async def test_a_request_waits_for_a_sessions_connection_no_longer_than_store_wait(
    fresh_pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """resonate-pg's sessions' pool waits `STORE_WAIT` for a connection, as
    the index's does (`STORE_WAIT`'s word), not psycopg_pool's 30 s: a
    workflow's request waiting through a Postgres outage was held so."""
    monkeypatch.setattr(core.store.postgres, "STORE_WAIT", 0.5)
    monkeypatch.setattr(core.store.postgres, "DEFAULT_MAX_POOL_SIZE", 1)
    sessions = PgConnection(fresh_pg_url, pid="p", group="g")
    try:
        held = asyncio.Event()

        async def hold() -> None:  # the pool's one connection, for 10 s
            async with sessions._own.autocommit() as conn:
                held.set()
                await conn.execute("SELECT pg_sleep(10)")

        holder = asyncio.create_task(hold())
        await held.wait()
        began = time.monotonic()
        with pytest.raises(ConnectorError):
            async with asyncio.timeout(5):
                await sessions.send(_ping())
        assert time.monotonic() - began < 3
        holder.cancel()
        await asyncio.gather(holder, return_exceptions=True)
    finally:
        await sessions.close()


async def _refusal(dsn: str) -> tuple[str, str]:
    """What a connection to `dsn` is refused with: libpq's words, and Tether's."""
    with pytest.raises(psycopg.OperationalError) as refused:
        await psycopg.AsyncConnection.connect(dsn, connect_timeout=3)
    return str(refused.value), refusal_of(refused.value)


async def test_a_refused_connection_is_said_in_words_that_name_no_address_role_or_database(
    fresh_pg_url: str,
) -> None:
    from urllib.parse import urlsplit

    url = urlsplit(fresh_pg_url)
    for dsn, said in (
        (url._replace(path="/tether_no_such_db").geturl(), "the database does not exist"),
        (
            url._replace(netloc=f"tether_no_role@{url.hostname}:{url.port}").geturl(),
            "the role does not exist",
        ),
    ):
        libpq, words = await _refusal(dsn)
        assert words == said, (words, libpq)
        assert "tether_no_" in libpq and "tether_no_" not in words


async def test_a_connection_nothing_listens_for_is_said_so_without_its_address() -> None:
    """(Needs no Postgres: nothing listens at the port.)"""
    port = free_port()
    libpq, words = await _refusal(f"postgresql://tether_user@127.0.0.1:{port}/tether_db")
    assert words == "the connection was refused: is Postgres running there?", libpq
    assert str(port) in libpq and str(port) not in words


async def test_health_and_a_request_that_waited_say_why_connecting_failed(
    fresh_pg_url: str,
) -> None:
    """A refused password after start showed in `/health` as a timeout: the
    pool's attempts fail in the background while the request waits for a
    connection (found by an exploratory QA pass). Now the last attempt's
    failure is said, in words that name no address or credential."""
    from urllib.parse import urlsplit

    from core.health import store_answers
    from core.store.sql import SqlJobIndex

    name = urlsplit(fresh_pg_url).path.lstrip("/")
    admin = fresh_pg_url.rsplit("/", 1)[0] + "/postgres"
    driver = PostgresDriver(fresh_pg_url, max_size=2, timeout=3.0)  # past 2 s
    await driver.open()
    index = SqlJobIndex(driver)
    held = asyncio.Event()

    async def hold() -> None:  # the pool's one connection, so a request needs another
        async with driver.session() as session:
            held.set()
            await session.fetch("SELECT pg_sleep(30)", ())

    holder = asyncio.create_task(hold())
    await held.wait()
    async with await psycopg.AsyncConnection.connect(admin, autocommit=True) as other:
        await other.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
    try:
        assert driver.refused() is None
        with pytest.raises(core.store.postgres.StoreUnavailable) as health:
            await store_answers(index, "postgresql://db")
        said = str(health.value)
        assert said.startswith("the store (postgresql://db) did not answer within 2 s; ")
        assert "ago, failed: the database takes no connections now" in said, said
        with pytest.raises(core.store.postgres.StoreUnavailable) as waited:
            await driver.fetch("SELECT 1", ())
        assert "PoolTimeout; its last connection attempt" in str(waited.value)
        assert name not in said + str(waited.value)
    finally:
        async with await psycopg.AsyncConnection.connect(admin, autocommit=True) as other:
            await other.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        holder.cancel()
        await asyncio.gather(holder, return_exceptions=True)
        await driver.close()
