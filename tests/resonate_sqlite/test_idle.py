"""An idle connection polls less and less (its naps double up to
``max_poll_interval``), and a local request brings it back to ``poll_interval``
at once: wake-ups follow the work."""

from __future__ import annotations

import asyncio
from pathlib import Path

from resonate_sqlite.connection import SqliteConnection
from tests.resonate_sqlite.test_errors import create


async def test_an_idle_connection_naps_longer_and_a_request_wakes_it(tmp_path: Path) -> None:
    conn = SqliteConnection(tmp_path / "idle.db", poll_interval=0.01, max_poll_interval=0.08)
    naps: list[float] = []
    nap = conn._nap

    async def counted() -> None:
        naps.append(conn._nap_for)
        await nap()

    conn._nap = counted  # type: ignore[method-assign]
    await conn.start()
    try:
        await asyncio.sleep(0.6)
        assert naps[:4] == [0.01, 0.02, 0.04, 0.08]
        assert set(naps[4:]) == {0.08}  # idle: at most one look per 80 ms
        assert len(naps) <= 12  # a 10 ms poll would have looked about 60 times
        before = len(naps)
        await conn.send(create(1))
        await asyncio.sleep(0.05)
        assert naps[before] == 0.01  # the request ended the long nap at once
    finally:
        await conn.stop()
