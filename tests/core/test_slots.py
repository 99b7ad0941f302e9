"""`core.steps.Slots`: a trigger waiting between tries lends its workflow
task slot back (the SDK's semaphore, and the embedded store's room), and the
count is the same after, however the wait ends."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest
from resonate.resonate import Resonate

from core.steps import Slots
from resonate_sqlite import SqliteConnection


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_lent_slot_serves_another_task_and_is_taken_back_after():
    sema = asyncio.Semaphore(1)
    await sema.acquire()  # the SDK's, for the running task
    slots = Slots(sema)
    other_ran = asyncio.Event()

    async def other() -> None:
        async with sema:
            other_ran.set()
            await asyncio.sleep(0.05)

    async with slots.lent():
        task = asyncio.ensure_future(other())
        await asyncio.wait_for(other_ran.wait(), 1)  # it ran during the wait
    assert task.done()  # taken back only once the other let it go
    assert sema.locked()  # held again, by the running task
    sema.release()  # the SDK's own release as the task ends
    assert sema._value == 1


@pytest.mark.parametrize("where", ["in the block", "taking it back"])
async def test_a_lent_slot_cancelled_leaves_the_count_as_it_was(where: str):
    """The service stops while the trigger waits (or waits for its slot
    back): the SDK releases the task's slot as it ends, and the slot was
    lent, so a take of its own makes up for it."""
    sema = asyncio.Semaphore(1)
    await sema.acquire()  # the SDK's, for the running task
    slots = Slots(sema)
    holder_in, holder_out = asyncio.Event(), asyncio.Event()

    async def holder() -> None:
        async with sema:
            holder_in.set()
            await holder_out.wait()

    async def waiting() -> None:
        try:
            async with slots.lent():
                if where == "in the block":
                    await asyncio.sleep(10)
        finally:
            sema.release()  # `_bounded_execute`'s, as the task ends

    held = asyncio.ensure_future(holder())
    if where == "in the block":
        task = asyncio.ensure_future(waiting())
        await holder_in.wait()
    else:
        task = asyncio.ensure_future(waiting())
        await holder_in.wait()
        await settle()  # the block is over: it waits to take the slot back
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    holder_out.set()
    await held
    await settle()
    assert sema._value == 1 and not sema._waiters


async def test_no_more_tasks_lend_their_slots_than_there_are_slots():
    """A lent task is still in memory (a slow call holds a connection too):
    at most `size` lend at once, so a process holds at most twice its slots
    in tasks, as the slots bound a burst's memory; the next keeps its own."""
    sema = asyncio.Semaphore(2)
    await sema.acquire()
    await sema.acquire()  # two tasks, each waiting
    slots = Slots(sema, size=1)
    async with slots.lent():
        assert (slots.lending, sema._value) == (1, 1)  # the first lends its slot
        async with slots.lent():
            assert (slots.lending, sema._value) == (1, 1)  # the second keeps its own
    assert (slots.lending, sema._value) == (0, 0)


async def test_the_sdks_slots_and_the_embedded_stores_room_are_found(tmp_path: Path):
    """Where resonate-sdk keeps its slots is its own: an upgrade that moves
    them fails here, not silently in the service (the waits would hold
    their slots again, with a warning at start)."""
    conn = SqliteConnection(tmp_path / "s.db", group="g", pid="p", max_inflight=3)
    await conn.start()
    try:
        r = Resonate(network=conn, group="g", pid="p", max_concurrent_tasks=3)
        slots = Slots.of(r, conn, 3)
        assert isinstance(slots.held, asyncio.Semaphore) and slots.held._value == 3
        assert slots.room is not None
        room = conn._room()
        with slots.room():
            assert conn._room() == room + 1
        assert conn._room() == room
    finally:
        await conn.stop()


def test_no_slots_found_is_a_warning_and_lends_nothing(caplog: pytest.LogCaptureFixture):
    caplog.set_level("WARNING", logger="tether")
    slots = Slots.of(object(), object(), 1)
    assert slots.held is None
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [
        "resonate-sdk keeps its task slots where Tether does not look"
    ]


async def test_a_process_holds_at_most_twice_its_slots_in_tasks():
    """A task waiting to take its slot back is still in memory: it counts
    against the lenders' bound until it has its slot, so tasks the freed
    slots let in never make more than twice the slots (12 of 2 slots did,
    before: found by a review)."""
    sema = asyncio.Semaphore(2)
    slots = Slots(sema, size=2)
    live = peak = 0

    async def task() -> None:
        nonlocal live, peak
        async with sema:  # the SDK's `_bounded_execute`
            live += 1
            peak = max(peak, live)
            await asyncio.sleep(0.03)  # a call's first `TRIGGER_SLOW`
            async with slots.lent():
                await asyncio.sleep(0.04)  # the call goes on, its slot lent
            await asyncio.sleep(0.001)
            live -= 1

    await asyncio.gather(*(task() for _ in range(20)))
    assert peak == 4 and slots.lending == 0 and sema._value == 2
