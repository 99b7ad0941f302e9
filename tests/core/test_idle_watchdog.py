"""The watchdog sleeps until the next thing due (`core.watchdog`): with a nap
of an hour, a deadline this process writes still fires on time (its job
history wakes it), one already in the store fires on time (the index's
`next_due`), and one another process writes is found within the nap. Rows due
that the watchdog cannot settle do not make it spin; resume and retention keep
their own times. Real parts: the embedded store, the settler, the job index."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

import core.watchdog
from core.events import JobHistory
from core.store.jobs import JobRecord, NewEvent, now_ms
from core.watchdog import MIN_RETENTION, Watchdog
from tests.core.parts import Parts, open_parts
from tests.core.test_watchdog import make_rig

HOUR = 3600.0
ON_TIME_MS = 1000
"""How late past its deadline a job may end and still count as found on time,
not after the hour-long nap: usually 6-15 ms; one loaded CI run saw 310."""


async def accept(parts: Parts, job_id: str, timeout: float) -> JobRecord:
    """A new job as `Tether.create_job` writes it (its `accepted` event
    told to the job history's listeners), with its callback promise."""
    now = now_ms()
    rec = JobRecord(
        id=job_id,
        backend="checked",
        state="pending",
        params={},
        metadata={},
        timeout=timeout,
        fingerprint="f",
        deadline=now + int(timeout * 1000),
        created_at=now,
        updated_at=now,
    )
    stored, created = await parts.jobs.insert(rec, [NewEvent("accepted", {})])
    assert created
    await parts.add_promise(job_id)
    return stored


async def ended_at(parts: Parts, job_id: str, within: float) -> float:
    """The monotonic time the job was seen timed out (polled every 10 ms)."""
    stop = time.monotonic() + within
    while time.monotonic() < stop:
        if (await parts.row(job_id)).state == "timed_out":
            return time.monotonic()
        await asyncio.sleep(0.01)
    raise AssertionError(f"job {job_id} not timed out within {within}s")


@asynccontextmanager
async def watching(parts: Parts, *, told: bool = True) -> AsyncIterator[tuple[Watchdog, list[int]]]:
    """The rig's watchdog running; `told`: it hears of this process's job
    writes, as `Tether` wires it. Yields it and the `now` of each sweep."""
    watchdog = make_rig(parts).watchdog
    if told:
        JobHistory(parts.jobs).listeners.append(watchdog.on_event)
    swept: list[int] = []
    sweep = watchdog.sweep

    async def counted(now: int) -> int:
        swept.append(now)
        return await sweep(now)

    watchdog.sweep = counted  # type: ignore[method-assign]  # counts the sweeps
    watchdog.start()
    try:
        while not swept:  # the first look, at start
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        yield watchdog, swept
    finally:
        await watchdog.stop()


async def test_a_deadline_this_process_writes_wakes_a_long_nap():
    async with open_parts(watchdog_interval=HOUR) as parts, watching(parts) as (_, swept):
        for i in range(20):  # due long after the planned look: no sweep for them
            await accept(parts, f"later{i}", 2 * HOUR)
        await asyncio.sleep(0.1)
        assert len(swept) == 1
        job = await accept(parts, "soon", 0.3)
        await ended_at(parts, "soon", 3)
        assert now_ms() - job.deadline < ON_TIME_MS
        assert len(swept) <= 3


async def test_a_deadline_already_in_the_store_fires_on_time_with_a_long_nap():
    async with open_parts(watchdog_interval=HOUR) as parts:
        job = await accept(parts, "stored", 0.5)  # before the watchdog: nothing told it
        async with watching(parts, told=False):
            await ended_at(parts, "stored", 3)
            assert now_ms() - job.deadline < ON_TIME_MS


async def test_a_deadline_another_process_writes_is_found_within_the_nap():
    nap = 0.5
    async with open_parts(watchdog_interval=nap) as parts, watching(parts, told=False):
        written = time.monotonic()
        await accept(parts, "elsewhere", 0.05)
        assert await ended_at(parts, "elsewhere", 3) - written < nap + 0.3


async def test_rows_due_that_stay_due_do_not_make_it_spin():
    """A running job of a backend no plugin offers keeps its past check time
    (nothing can check it): the watchdog looks at it once a nap, not in a loop."""
    async with open_parts(watchdog_interval=HOUR) as parts:
        rig = make_rig(parts)
        await rig.running("orphan", backend="gone", next_check_at=now_ms() - 1000)
        async with watching(parts) as (_, swept):
            await asyncio.sleep(0.3)
            assert len(swept) == 1
            assert (await parts.row("orphan")).state == "running"


@pytest.mark.parametrize("what", ["resume", "retention"])
async def test_resume_and_retention_keep_their_times_with_a_long_nap(monkeypatch, what: str):
    monkeypatch.setattr(core.watchdog, "RESUME_EVERY" if what == "resume" else "GC_EVERY", 0.1)
    runs: list[float] = []

    async def resume() -> int:
        runs.append(time.monotonic())
        return 0

    async def collect(store: Any, older_than: float) -> tuple[int, int]:
        runs.append(time.monotonic())
        return 0, 0

    monkeypatch.setattr(core.watchdog, "collect_garbage", collect)
    async with open_parts(watchdog_interval=HOUR, retention=MIN_RETENTION) as parts:
        watchdog = make_rig(parts).watchdog
        watchdog.resume = resume
        watchdog.start()
        try:
            await asyncio.sleep(0.55)
        finally:
            await watchdog.stop()
    assert len(runs) >= 3, runs
