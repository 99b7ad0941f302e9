"""Work on what a party outside sent, off the event loop when it is large.

A callback's body, a heartbeat's progress, a status check's answer: each is
decoded, checked for its depth (`core.bounds`), masked of the job's tokens
(`core.redact`) and bounded before anything keeps it. That is Python walking
every value: on this project's 2-core VM, a megabyte of small strings that
quotes the token took about a second, and 16 KiB of them 0.2 s (a review,
2026-12-07). On the event loop it held every other request of the worker:
other jobs' callbacks, `GET /jobs`, `/health`.

What is larger than `ASIDE_BYTES` is worked on one thread of the process's
own. The loop goes on meanwhile, taking the interpreter's lock back each
time it wakes, after at most its switch interval (5 ms). One thread, not a
pool: each more would take another turn from the loop; large work waits
its turn instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgspec

ASIDE_BYTES = 4096
"""Work on more bytes than this goes on the thread. At most this much,
made to be slow (every string a head of the token), costs about 12 ms
where it stands; the hop to the thread and back about 0.1 ms."""

_THREAD = ThreadPoolExecutor(1, thread_name_prefix="tether-aside")


def json_bytes(value: Any) -> int:
    """How many bytes `value`'s JSON takes: the size `aside` is told of the
    work on it. Past `ASIDE_BYTES` for a value JSON cannot write out (nested
    past msgspec's depth: the work on it is its refusal, a long walk)."""
    try:
        return len(msgspec.json.encode(value))
    except (TypeError, ValueError, OverflowError, RecursionError):
        return ASIDE_BYTES + 1


async def aside[T](size: int, work: Callable[..., T], *args: Any) -> T:
    """`work(*args)`, here when `size` (the bytes it works on) is at most
    `ASIDE_BYTES`, else on the thread. `work` must touch nothing the loop
    changes meanwhile: it gets a value and gives one back."""
    if size <= ASIDE_BYTES:
        return work(*args)
    return await asyncio.get_running_loop().run_in_executor(_THREAD, work, *args)
