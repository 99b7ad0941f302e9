"""Small waiting helpers shared by the conformance tests."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable


async def within[T](aw: Awaitable[T], secs: float = 5.0) -> T:
    return await asyncio.wait_for(aw, secs)


async def until(cond: Callable[[], bool], secs: float = 5.0) -> None:
    async def poll() -> None:
        while not cond():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), secs)
