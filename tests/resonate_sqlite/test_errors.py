"""A bad file fails loudly and fast: at ``start()``, or as a ConnectorError from
``send``; never a hang, never a crash of the SDK's worker."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from resonate_base import ConnectorError

from resonate_sqlite.connection import SqliteConnection, SqliteStoreError


def create(i: int) -> str:
    return json.dumps(
        {
            "kind": "promise.create",
            "head": {"corrId": f"c{i}"},
            "data": {"id": f"p{i}", "timeoutAt": 2**60},
        }
    )


async def start_fails(conn: SqliteConnection) -> str:
    with pytest.raises(SqliteStoreError) as err:
        await conn.start()
    assert isinstance(err.value, ConnectorError)
    message = str(err.value)
    assert str(conn.path) in message
    return message


async def test_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "garbage.db"
    path.write_bytes(b"this is not sqlite" * 500)
    assert "not a usable SQLite database" in await start_fails(SqliteConnection(path))


async def test_damaged_pages_are_found_at_start(tmp_path: Path) -> None:
    path = tmp_path / "damaged.db"
    conn = SqliteConnection(path)
    for i in range(2000):
        await conn.send(create(i))
    await conn.stop()
    data = bytearray(path.read_bytes())
    for offset in range(2 * 4096, len(data), 4096):  # keep the header page
        data[offset : offset + 64] = b"\xff" * 64
    path.write_bytes(bytes(data))
    message = await start_fails(SqliteConnection(path))
    assert "malformed" in message or "not a usable" in message


async def test_missing_directory_and_directory_paths(tmp_path: Path) -> None:
    assert "does not exist" in await start_fails(SqliteConnection(tmp_path / "nope" / "x.db"))
    assert "is a directory" in await start_fails(SqliteConnection(tmp_path))
    assert "cannot open" in await start_fails(SqliteConnection("/proc/tether-test.db"))


@pytest.fixture
def immutable_file(tmp_path: Path) -> Iterator[Path]:
    """A database file nobody, root included, may write (``chattr +i``)."""
    path = tmp_path / "readonly.db"
    sqlite3.connect(path).execute("CREATE TABLE t (x)").connection.close()
    if os.geteuid() != 0:
        path.chmod(0o444)
        yield path
        path.chmod(0o644)
        return
    chattr = shutil.which("chattr")
    if chattr is None or subprocess.run([chattr, "+i", str(path)]).returncode != 0:
        pytest.skip("running as root without chattr: cannot make a file unwritable")
    yield path
    subprocess.run([chattr, "-i", str(path)])


async def test_unwritable_file(immutable_file: Path) -> None:
    message = await start_fails(SqliteConnection(immutable_file))
    assert "not writable" in message or "readonly" in message


async def test_locked_database_fails_after_the_lock_timeout(tmp_path: Path) -> None:
    path = tmp_path / "locked.db"
    conn = SqliteConnection(path)
    await conn.start()
    await conn.stop()
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        t0 = time.monotonic()
        message = await start_fails(SqliteConnection(path, lock_timeout=0.5))
        assert "locked" in message
        assert time.monotonic() - t0 < 3
    finally:
        holder.execute("ROLLBACK")
        holder.close()


async def test_send_raises_connector_error_when_the_lock_is_held_too_long(
    tmp_path: Path,
) -> None:
    path = tmp_path / "busy.db"
    conn = SqliteConnection(path, lock_timeout=0.5)
    await conn.start()
    await conn.send(create(0))
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    ticks = 0

    async def heartbeat() -> None:  # the event loop must stay free meanwhile
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    beat = asyncio.create_task(heartbeat())
    try:
        t0 = time.monotonic()
        with pytest.raises(ConnectorError, match="locked"):
            await conn.send(create(1))
        assert 0.4 < time.monotonic() - t0 < 3
        # a wait that held the loop would let it tick once at most; free, it
        # ticks ~50 times (18 on a machine loaded 4 times over its cores)
        assert ticks >= 5
    finally:
        beat.cancel()
        holder.execute("ROLLBACK")
        holder.close()
    # and it recovers as soon as the lock is gone
    resp = json.loads(await conn.send(create(1)))
    assert resp["head"]["status"] == 200
    assert resp["data"]["promise"]["state"] == "pending"
    await conn.stop()


async def test_a_brief_lock_is_waited_out(tmp_path: Path) -> None:
    path = tmp_path / "brief.db"
    conn = SqliteConnection(path, lock_timeout=5)
    await conn.start()
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    asyncio.get_running_loop().call_later(0.2, holder.execute, "COMMIT")
    resp = json.loads(await conn.send(create(0)))
    assert resp["head"]["status"] == 200
    assert resp["data"]["promise"]["state"] == "pending"
    holder.close()
    await conn.stop()
