"""Lifecycle of a SqliteConnection as the SDK and the service drive it."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
from pathlib import Path

import pytest
from resonate.resonate import Resonate
from resonate.types import TaskData, Value

from resonate_sqlite.connection import SqliteConnection, SqliteStoreError
from resonate_sqlite.engine import now_ms
from tests.resonate_sqlite.conformance.helpers import stays, until


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
    """A request after ``stop`` reopens the file for itself (no checkpointer
    thread), and the file is closed again once nothing more is sent."""
    path = tmp_path / "late2.db"
    wal = path.with_name(f"{path.name}-wal")  # the last handle to close removes it
    conn = SqliteConnection(path)
    await conn.start()
    await conn.stop()
    assert conn._engine.db is None and not wal.exists()
    threads = threading.active_count()
    for i in range(2):  # and again after it was closed
        resp = json.loads(await conn.send(create(i)))
        assert resp["head"]["status"] == 200
        assert conn._engine.db is not None and wal.exists()  # reopened for it
        assert threading.active_count() == threads  # no checkpointer for a send-only reopen
        await until(lambda: conn._engine.db is None and not wal.exists(), 5)
    db = sqlite3.connect(path)
    assert [r[0] for r in db.execute("SELECT id FROM r_promises ORDER BY id")] == ["p0", "p1"]
    db.close()


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
    memory, and runs as room frees up: one more, oldest first, for each that
    finishes."""
    conn = SqliteConnection(tmp_path / "burst.db", group="g", pid="p", max_inflight=2)
    await conn.start()
    r = Resonate(network=conn, group="g", pid="p", max_concurrent_tasks=64)
    names = [f"burst-{i}" for i in range(10)]
    gates = {name: asyncio.Event() for name in names}
    running: set[str] = set()
    started: list[str] = []
    finished: list[str] = []
    peak = 0

    async def held(ctx: object, name: str) -> str:
        nonlocal peak
        running.add(name)
        started.append(name)
        peak = max(peak, len(running))
        await gates[name].wait()
        running.discard(name)
        finished.append(name)
        return name

    r.register(held)
    target = conn.resolve_target("g")
    for name in names:  # as Tether starts a job: the root promise only, for the group
        await r.promises.create(
            name,
            now_ms() + 60_000,
            Value(data=TaskData(func="held", args=(name,), kwargs={}, version=1)),
            {
                "resonate:origin": name,
                "resonate:branch": name,
                "resonate:parent": name,
                "resonate:scope": "global",
                "resonate:target": target,
            },
        )
    db = sqlite3.connect(tmp_path / "burst.db")

    def waiting() -> int:
        return int(db.execute("SELECT count(*) FROM r_outbox").fetchone()[0])

    def two_run_eight_wait() -> bool:
        return len(running) == 2 and conn.inflight == 2 and waiting() == 8

    try:
        await until(two_run_eight_wait)
        await stays(two_run_eight_wait, 0.5, "work beyond max_inflight left the outbox")
        assert sorted(started) == names[:2]
        for k in range(10):  # let one finish at a time: exactly one more starts
            gates[min(running)].set()
            left = 10 - (k + 1)

            def moved_on(k: int = k, left: int = left) -> bool:
                return (
                    len(finished) == k + 1
                    and len(running) == min(2, left)
                    and waiting() == max(left - 2, 0)
                )

            await until(moved_on)
        assert peak == 2
        assert started[2:] == names[2:]  # the outbox is served oldest first
        assert sorted(finished) == names
    finally:
        db.close()
        for gate in gates.values():  # so a failing run does not hang in stop()
            gate.set()
        await asyncio.wait_for(r.stop(), 10)


async def test_the_engines_own_failures_are_told_to_its_owner(tmp_path: Path) -> None:
    """A request the engine fails (here: its file damaged under it) is told
    to `on_failure`, as the pump's own failures are, so that Tether's
    driver sees damage only the engine's reads found (it did not: found by
    a review). What `on_failure` raises is dropped."""
    from resonate_sqlite.engine import StoreFailure

    conn = SqliteConnection(tmp_path / "told.db")
    await conn.start()
    told: list[BaseException] = []

    def on_failure(exc: BaseException) -> None:
        told.append(exc)
        raise RuntimeError("the owner's own bug")

    conn.on_failure = on_failure

    def damaged(*_: object) -> object:
        raise StoreFailure("sqlite store told.db: database disk image is malformed")

    conn._engine.run_batch = damaged  # type: ignore[method-assign]
    with pytest.raises(SqliteStoreError):
        await conn.send(create(0))
    [exc] = told
    assert str(exc).endswith("sqlite store told.db: database disk image is malformed")
    await conn.stop()
    conn.close()
