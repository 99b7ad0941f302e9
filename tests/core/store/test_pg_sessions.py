"""How the Postgres store talks to Postgres: a statement on its own commits
by itself (autocommit, one round trip), a transaction's statements commit
together or not at all, and resonate-pg's message pump keeps its one
transaction a drain. Run with TETHER_TEST_PG_DSN (skipped without it)."""

from __future__ import annotations

import json

import psycopg
import pytest
from psycopg import pq

from core.store.postgres import PgConnection, PgSession, PostgresDriver


def _ping() -> str:
    head = {"corrId": "1", "version": "v"}
    return json.dumps({"kind": "promise.get", "head": head, "data": {"id": "nowhere"}})


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


async def test_protocol_requests_go_alone_and_the_pump_drains_in_one_transaction(
    fresh_pg_url: str,
) -> None:
    conn = PgConnection(fresh_pg_url, pid="p1", group="g")
    try:
        answer = json.loads(await conn.send(_ping()))
        assert answer["head"]["status"] == 404
        sessions = conn._own
        async with sessions.autocommit() as c:
            await c.execute("SELECT 1")
            assert c.info.transaction_status == pq.TransactionStatus.IDLE
        async with sessions.session() as c:
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
