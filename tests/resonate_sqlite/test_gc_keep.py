"""`SqliteConnection.gc`'s `keep`: an application sharing the file keeps the
lineages it still needs, read in the transaction that would delete them."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from resonate_sqlite.connection import SqliteConnection


async def send(conn: SqliteConnection, kind: str, **data: object) -> None:
    await conn.send(json.dumps({"kind": kind, "head": {"corrId": "c"}, "data": data}))


async def test_keep_keeps_whole_lineages_and_reads_the_applications_table(tmp_path: Path) -> None:
    """Two finished lineages, `a` and `b` (a root and its child each), and a
    lone settled promise `c`: the application's table names `b` as needed.
    `keep` is asked about each root due, on the store's connection inside
    the deleting transaction (it sees the application's row); `b` stays
    whole, the rest goes. Once the application no longer needs `b`, it goes."""
    conn = SqliteConnection(tmp_path / "keep.db")
    for root in ("a", "b"):
        for pid in (root, f"{root}:1"):
            await send(
                conn, "promise.create", id=pid, timeoutAt=2**60, tags={"resonate:origin": root}
            )
            await send(conn, "promise.settle", id=pid, state="resolved", value={})
    await send(conn, "promise.create", id="c", timeoutAt=2**60)
    await send(conn, "promise.settle", id="c", state="resolved", value={})
    await conn.atomic(lambda db: db.execute("CREATE TABLE app_needs (root TEXT PRIMARY KEY)"))
    await conn.atomic(lambda db: db.execute("INSERT INTO app_needs VALUES ('b')"))

    asked: list[str] = []

    def needed(db: sqlite3.Connection, root: str) -> bool:
        assert db.in_transaction  # the deleting one
        asked.append(root)
        return db.execute("SELECT 1 FROM app_needs WHERE root = ?", (root,)).fetchone() is not None

    assert await conn.gc(0, keep=needed) == 3  # a, a:1, c
    assert sorted(asked) == ["a", "b", "c"]  # roots only, each once
    ids = await conn.atomic(lambda db: {r[0] for r in db.execute("SELECT id FROM r_promises")})
    assert ids == {"b", "b:1"}

    await conn.atomic(lambda db: db.execute("DELETE FROM app_needs"))
    assert await conn.gc(0, keep=needed) == 2
    await conn.stop()
