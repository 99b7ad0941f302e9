"""Lifecycle of a SqliteConnection as the SDK and the service drive it."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
from pathlib import Path

from resonate.resonate import Resonate

from core.store.sqlite import SqliteConnection


def create(i: int) -> str:
    return json.dumps(
        {
            "kind": "promise.create",
            "head": {"corrId": f"c{i}"},
            "data": {"id": f"p{i}", "timeoutAt": 2**60},
        }
    )


async def test_send_after_stop_still_answers(tmp_path: Path) -> None:
    """The SDK stops its connections before joining in-flight work, whose
    last requests (fulfill, release) must still land."""
    conn = SqliteConnection(tmp_path / "late.db")
    await conn.start()
    await conn.stop()
    resp = json.loads(await conn.send(create(0)))
    assert resp["head"]["status"] == 201
    conn.close()


async def test_a_late_send_after_stop_closes_the_file_again(tmp_path: Path) -> None:
    conn = SqliteConnection(tmp_path / "late2.db")
    await conn.start()
    await conn.stop()
    threads = threading.active_count()
    await conn.send(create(0))
    assert threading.active_count() == threads  # no checkpointer for a send-only reopen
    await asyncio.sleep(1.3)
    assert conn._engine.db is None


async def test_started_before_the_sdk_wires_its_receivers(tmp_path: Path) -> None:
    """The service awaits start() first (to fail fast), then builds Resonate."""
    conn = SqliteConnection(tmp_path / "early.db", group="g", pid="early")
    await conn.start()
    r = Resonate(network=conn, group="g", pid="early")

    async def hello(ctx: object, name: str) -> str:
        return f"hello {name}"

    r.register(hello)
    assert await asyncio.wait_for(r.run("greet", hello, "you").result(), 5) == "hello you"
    db = sqlite3.connect(tmp_path / "early.db")
    assert [row[0] for row in db.execute("SELECT pid FROM r_processes")] == ["early"]
    db.close()
    await r.stop()
