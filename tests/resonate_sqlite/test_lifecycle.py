"""Lifecycle of a SqliteConnection as the SDK and the service drive it."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
from pathlib import Path

from resonate.resonate import Resonate
from resonate.types import TaskData, Value

from resonate_sqlite.connection import SqliteConnection
from resonate_sqlite.engine import now_ms


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
    assert resp["head"]["status"] == 200
    assert resp["data"]["promise"]["state"] == "pending"
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


async def test_a_burst_of_work_waits_on_disk_beyond_max_inflight(tmp_path: Path) -> None:
    """Work created in this process goes straight to its SDK only while the
    connection has room (`max_inflight`); the rest waits in the outbox, not in
    memory, and runs as room frees up."""
    conn = SqliteConnection(tmp_path / "burst.db", group="g", pid="p", max_inflight=2)
    await conn.start()
    r = Resonate(network=conn, group="g", pid="p", max_concurrent_tasks=64)
    running: set[str] = set()
    peak, done = 0, 0
    release = asyncio.Event()

    async def held(ctx: object, name: str) -> str:
        nonlocal peak, done
        running.add(name)
        peak = max(peak, len(running))
        await release.wait()
        running.discard(name)
        done += 1
        return name

    r.register(held)
    target = conn.resolve_target("g")
    for i in range(10):  # as Tether starts a job: the root promise only, for the group
        await r.promises.create(
            f"burst-{i}",
            now_ms() + 60_000,
            Value(data=TaskData(func="held", args=(f"burst-{i}",), kwargs={}, version=1)),
            {
                "resonate:origin": f"burst-{i}",
                "resonate:branch": f"burst-{i}",
                "resonate:parent": f"burst-{i}",
                "resonate:scope": "global",
                "resonate:target": target,
            },
        )
    await asyncio.sleep(0.5)
    assert len(running) == 2 and peak == 2
    db = sqlite3.connect(tmp_path / "burst.db")
    assert db.execute("SELECT count(*) FROM r_outbox").fetchone()[0] == 8
    db.close()
    release.set()
    for _ in range(100):
        if done == 10:
            break
        await asyncio.sleep(0.1)
    assert done == 10 and peak == 2
    await r.stop()
