"""What a Tether workflow needs from a durable store, checked on every store.

Written once against resonate-sdk's public API; ``conftest.py`` supplies the
stores. A store-specific gap would be an ``xfail(strict=True, raises=...)``
carrying its reason, never a skip; there is none today.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import pytest
from resonate.context import Context
from resonate.error import ServerError
from resonate.heartbeat import NoopHeartbeat
from resonate.types import Value

from tests.resonate_sqlite.conformance.conftest import Factory, Store
from tests.resonate_sqlite.conformance.helpers import (
    dispatch,
    stays,
    task_state,
    until,
    within,
)


async def test_workflow_with_steps(resonates: Factory, uid: Callable[[str], str]) -> None:
    r, _ = await resonates("a")

    async def add(ctx: Context, a: int, b: int) -> int:
        return a + b

    async def steps(ctx: Context, x: int) -> list[int]:
        a = await ctx.run(add, x, 1)
        b = await ctx.run(add, a, 10)
        c = await ctx.run(add, b, 100)
        return [a, b, c]

    r.register(steps)
    assert await within(r.run(uid("steps"), steps, 1).result()) == [2, 12, 112]


async def test_unknown_promise_is_404(resonates: Factory, uid: Callable[[str], str]) -> None:
    r, _ = await resonates("a")
    with pytest.raises(ServerError) as err:
        await r.get(uid("nothing-here"))
    assert err.value.code == 404


def waiting_workflow(started: asyncio.Event, log: list[str] | None = None) -> Any:
    """``ctx.promise`` + a step that reports it ran, then waits on the promise.
    Appends ``"run"`` to ``log`` each time the workflow function is entered and
    ``"report"`` each time its step runs."""
    seen = log if log is not None else []

    async def report(ctx: Context, promise_id: str) -> str:
        seen.append("report")
        started.set()
        return promise_id

    async def waiting(ctx: Context) -> Any:
        seen.append("run")
        p = ctx.promise(timeout=timedelta(seconds=60))
        await ctx.run(report, await p.id())
        return await p

    return waiting


def is_suspended(conn: Any, job: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await task_state(conn, job) == "suspended"

    check.__name__ = f"task {job} is suspended"
    return check


async def test_external_promise_settled_after_suspend(
    resonates: Factory, uid: Callable[[str], str]
) -> None:
    """The workflow suspends on its promise; the store keeps it suspended (it
    does not run it again) until the promise settles, then resumes it at once."""
    r, conn = await resonates("a")
    started = asyncio.Event()
    log: list[str] = []
    wf = r.register(waiting_workflow(started, log), name="waiting")
    job = uid("after")
    h = r.run(job, wf)
    await within(started.wait())
    await until(is_suspended(conn, job))
    assert log == ["run", "report"]

    async def still_waiting() -> bool:
        return await is_suspended(conn, job)() and log == ["run", "report"] and not h.done()

    await stays(still_waiting, 1.0, "the workflow ran again before its promise settled")
    record = await r.promises.resolve(f"{job}:1", Value(data={"rows": 42}))
    assert record.state == "resolved"
    # resumed by the settlement itself, not seconds later by a retry timer
    assert await within(h.result(), 2) == {"rows": 42}
    assert log == ["run", "report", "run"]
    assert await task_state(conn, job) == "fulfilled"


async def test_external_promise_settled_before_suspend(
    resonates: Factory, uid: Callable[[str], str]
) -> None:
    """The outside world answers while the step that called it still runs."""
    r, _ = await resonates("a")

    async def trigger(ctx: Context, promise_id: str) -> str:
        await r.promises.resolve(promise_id, Value(data="early"))
        return "sent"

    async def early(ctx: Context) -> list[Any]:
        p = ctx.promise(timeout=timedelta(seconds=60))
        sent = await ctx.run(trigger, await p.id())
        return [sent, await p]

    r.register(early)
    assert await within(r.run(uid("before"), early).result()) == ["sent", "early"]


async def test_promise_timeout_fires_with_nobody_touching_it(
    resonates: Factory, uid: Callable[[str], str]
) -> None:
    r, _ = await resonates("a")

    async def impatient(ctx: Context) -> str:
        p = ctx.promise(timeout=timedelta(seconds=1))
        try:
            await p
        except Exception as exc:
            return f"timed out: {type(exc).__name__}"
        return "settled"

    r.register(impatient)
    job = uid("timeout")
    result = await within(r.run(job, impatient).result(), 6)
    assert result.startswith("timed out")
    assert (await r.promises.get(f"{job}:1")).state == "rejected_timedout"


async def test_sleep(resonates: Factory, uid: Callable[[str], str]) -> None:
    r, _ = await resonates("a")

    async def nap(ctx: Context) -> str:
        await ctx.sleep(timedelta(seconds=1))
        return "rested"

    r.register(nap)
    t0 = time.monotonic()
    assert await within(r.run(uid("sleep"), nap).result(), 8) == "rested"
    assert 0.9 <= time.monotonic() - t0 < 6


async def test_duplicate_start_reattaches(resonates: Factory, uid: Callable[[str], str]) -> None:
    r, _ = await resonates("a")
    runs: list[int] = []

    async def once(ctx: Context, x: int) -> int:
        runs.append(x)
        return x * 2

    async def doubled(ctx: Context, x: int) -> int:
        return await ctx.run(once, x)

    r.register(doubled)
    job = uid("dup")
    h1, h2 = r.run(job, doubled, 21), r.run(job, doubled, 21)
    assert await within(h1.result()) == 42
    assert await within(h2.result()) == 42
    assert await within(r.run(job, doubled, 21).result()) == 42  # after it finished
    assert runs == [21]


async def test_duplicate_start_from_another_process_reattaches(
    resonates: Factory, uid: Callable[[str], str]
) -> None:
    started = asyncio.Event()
    log_a: list[str] = []
    log_b: list[str] = []
    ra, _ = await resonates("a")
    rb, _ = await resonates("b")
    ra.register(waiting_workflow(started, log_a), name="waiting")
    wf_b = rb.register(waiting_workflow(asyncio.Event(), log_b), name="waiting")
    job = uid("dup2")
    ha = ra.run(job, "waiting")
    await within(started.wait())
    hb = rb.run(job, wf_b)  # b reattaches: nothing runs twice
    assert await within(hb.id()) == job  # b's start went through, on the same promise
    assert not hb.done()
    await rb.promises.resolve(f"{job}:1", Value(data="one"))
    assert await within(ha.result()) == "one"
    assert await within(hb.result()) == "one"
    assert (log_a + log_b).count("report") == 1, (log_a, log_b)


async def test_settle_twice_first_wins(resonates: Factory, uid: Callable[[str], str]) -> None:
    r, _ = await resonates("a")
    started = asyncio.Event()
    wf = r.register(waiting_workflow(started), name="waiting")
    job = uid("twice")
    h = r.run(job, wf)
    await within(started.wait())
    first = await r.promises.resolve(f"{job}:1", Value(data="first"))
    second = await r.promises.resolve(f"{job}:1", Value(data="second"))
    third = await r.promises.cancel(f"{job}:1", Value(data="third"))
    assert first.state == second.state == third.state == "resolved"
    assert second.value.data == third.value.data == "first"
    assert await within(h.result()) == "first"


async def test_restart_a_waiting_workflow_completes(
    resonates: Factory, uid: Callable[[str], str]
) -> None:
    started = asyncio.Event()
    r1, conn1 = await resonates("first")
    r1.register(waiting_workflow(started), name="waiting")
    job = uid("restart")
    r1.run(job, "waiting")
    await within(started.wait())
    await until(is_suspended(conn1, job))
    await within(r1.stop(), 10)  # the Resonate instance and its connection

    r2, conn2 = await resonates("second")  # a new connection on the same store
    log: list[str] = []
    r2.register(waiting_workflow(asyncio.Event(), log), name="waiting")
    h = await r2.get(job)
    assert not h.done()
    assert await task_state(conn2, job) == "suspended"  # the restart kept it waiting
    await r2.promises.resolve(f"{job}:1", Value(data="after restart"))
    assert await within(h.result(), 8) == "after restart"
    assert log == ["run"]  # resumed on the new process, its step not run again


async def test_lease_expiry_redispatches_to_another_process(
    resonates: Factory, uid: Callable[[str], str]
) -> None:
    """Process a acquires the workflow and goes silent mid-step (no heartbeat,
    no pump); once its lease lapses, process b runs the workflow."""
    gate = asyncio.Event()
    ran: list[str] = []

    async def stuck(ctx: Context) -> str:
        ran.append("a")
        await gate.wait()
        return "a"

    async def on_a(ctx: Context) -> str:
        return await ctx.run(stuck)

    async def quick(ctx: Context) -> str:
        ran.append("b")
        return "b"

    async def on_b(ctx: Context) -> str:
        return await ctx.run(quick)

    ra, conn_a = await resonates("a", ttl=timedelta(seconds=1), heartbeat=NoopHeartbeat())
    ra.register(on_a, name="leased")
    job = uid("lease")
    ra.run(job, on_a)
    try:
        await until(lambda: ran == ["a"])
        await conn_a.stop()  # a is gone as far as the store can tell

        rb, _ = await resonates("b")
        rb.register(on_b, name="leased")
        hb = await rb.get(job)
        assert await within(hb.result(), 10) == "b"
        assert ran == ["a", "b"]
    finally:
        gate.set()


async def test_two_processes_split_the_work_and_each_execute_is_claimed_once(
    store: Store, resonates: Factory, uid: Callable[[str], str]
) -> None:
    """A send-only client dispatches; two workers of the group run everything
    exactly once between them."""
    seen: collections.Counter[str] = collections.Counter()
    by: dict[str, list[str]] = {"a": [], "b": []}

    def worker(pid: str) -> Any:
        async def work(ctx: Context, n: str) -> str:
            seen[n] += 1
            by[pid].append(n)
            await asyncio.sleep(0.05)
            return n

        async def split(ctx: Context, n: str) -> str:
            return await ctx.run(work, n)

        return split

    # sqlite: hold two executes at a time, so neither worker can take it all
    ra, _ = await resonates("a", sqlite={"max_inflight": 2})
    rb, _ = await resonates("b", sqlite={"max_inflight": 2})
    ra.register(worker("a"), name="split")
    rb.register(worker("b"), name="split")
    client, _ = await resonates("client", sources=[], subscription_refresh_secs=0.1)
    jobs = [uid(f"split{i}") for i in range(16)]
    handles = await asyncio.gather(*(dispatch(client, job, "split", job) for job in jobs))
    results = await within(asyncio.gather(*(h.result() for h in handles)), 15)
    assert results == jobs
    assert sorted(seen) == sorted(jobs)
    assert set(seen.values()) == {1}, "an execute was run twice"
    if store.name.startswith("sqlite"):  # the others balance (or not) as they please
        assert by["a"] and by["b"], by


async def test_heartbeat_keeps_a_step_longer_than_the_ttl(
    resonates: Factory, uid: Callable[[str], str]
) -> None:
    r, _ = await resonates("a", ttl=timedelta(seconds=1))
    runs: list[float] = []

    async def slow(ctx: Context) -> str:
        runs.append(time.monotonic())
        await asyncio.sleep(2.5)
        return "done"

    async def long_step(ctx: Context) -> str:
        return await ctx.run(slow)

    r.register(long_step)
    assert await within(r.run(uid("long"), long_step).result(), 10) == "done"
    assert len(runs) == 1, f"the step ran {len(runs)} times"
