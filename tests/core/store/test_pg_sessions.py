"""How the Postgres store talks to Postgres: a statement on its own commits
by itself (autocommit, one round trip), a transaction's statements commit
together or not at all, and resonate-pg's message pump keeps its one
transaction a drain and its timers. Run with TETHER_TEST_PG_DSN (skipped
without it)."""

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
from core.store.postgres import PgConnection, PgSession, PostgresDriver


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
    with pytest.raises(Exception, match="stopped"):
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
