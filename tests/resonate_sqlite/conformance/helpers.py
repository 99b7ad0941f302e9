"""Small waiting helpers shared by the conformance tests."""

from __future__ import annotations

import asyncio
import inspect
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from resonate.handle import ResonateHandle
from resonate.resonate import Resonate
from resonate_base import PROTOCOL_VERSION


async def within[T](aw: Awaitable[T], secs: float = 5.0) -> T:
    return await asyncio.wait_for(aw, secs)


async def until(cond: Callable[[], bool | Awaitable[bool]], secs: float = 5.0) -> None:
    """Wait until ``cond()`` (a bool, or an awaitable of one) holds; fail after ``secs``."""

    async def holds() -> bool:
        ok = cond()
        return bool(await ok) if inspect.isawaitable(ok) else bool(ok)

    async def poll() -> None:
        while not await holds():
            await asyncio.sleep(0.01)

    try:
        await asyncio.wait_for(poll(), secs)
    except TimeoutError:
        name = getattr(cond, "__name__", repr(cond))
        raise AssertionError(f"{name} did not hold within {secs:g} s") from None


async def stays(cond: Callable[[], bool | Awaitable[bool]], secs: float, what: str) -> None:
    """Check ``cond`` again and again for ``secs``: it must hold every time
    (after an ``until``, this is how "exactly once" is checked)."""
    deadline = time.monotonic() + secs
    while time.monotonic() < deadline:
        ok = cond()
        if inspect.isawaitable(ok):
            ok = await ok
        assert ok, what
        await asyncio.sleep(0.02)


async def task_state(conn: Any, task_id: str) -> str | None:
    """The state of task ``task_id`` as the store reports it (``task.get``,
    a request of the protocol every store speaks); None when it has none."""
    corr = uuid.uuid4().hex
    req = {
        "kind": "task.get",
        "head": {"corrId": corr, "version": PROTOCOL_VERSION},
        "data": {"id": task_id},
    }
    resp = json.loads(await conn.send(json.dumps(req)))
    assert resp["head"]["corrId"] == corr
    if resp["head"]["status"] == 404:
        return None
    assert resp["head"]["status"] == 200, resp
    state: str = resp["data"]["task"]["state"]
    return state


async def dispatch(client: Resonate, id: str, func: str, *args: Any) -> ResonateHandle[Any]:
    """``client.rpc(id, func, *args)`` from a send-only client, and a handle to
    await that cannot have been settled by the SDK's polling race: with no
    source, its refresh loop reads each handle's promise, and one read landing
    between ``rpc()`` and the commit of the create gets a 404, which settles
    the handle as gone ("not found: promise ... not found"). So: wait for the
    create to be confirmed, then ask again with ``get``."""
    await within(client.rpc(id, func, *args).id())
    return await client.get(id)
