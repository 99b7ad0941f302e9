"""The job index's writes, in process: per job its three hot writes
(`insert`, `set_external` with an event, `end`) and a promise create beside
them, 32 jobs at a time, on a fresh embedded store. Prints the process's CPU
per job. Run from a checkout's root, with that checkout's code (before/after):

    cd CHECKOUT && python /path/to/bench/_index_writes.py [JOBS]
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import time
import uuid

sys.path.insert(0, os.getcwd())  # the checkout run from: its code

from core.models import Outcome
from core.settings import Settings
from core.store.embedded import EmbeddedStore
from core.store.jobs import JobRecord, NewEvent

AT_ONCE = 32
WARMUP = 200


def _create(i: int, now: int) -> str:
    head = {"corrId": f"c{i}", "version": "2025-01-15"}
    data = {"id": f"p{i}", "timeoutAt": now + 60_000, "param": {}, "tags": {}}
    return json.dumps({"kind": "promise.create", "head": head, "data": data})


async def main(jobs_n: int) -> None:
    url = f"sqlite:///{tempfile.mkdtemp()}/t.db"
    settings = Settings.from_env({}, store=url, public_url="http://x", callback_secret="s")
    store = await EmbeddedStore.open(settings, uuid.uuid4().hex)
    jobs, now = store.jobs, int(time.time() * 1000)

    async def one(i: int) -> None:
        rec = JobRecord(
            id=f"j{i}",
            backend="http_webhook",
            state="pending",
            params={"url": "http://x/y"},
            metadata={},
            timeout=60,
            fingerprint="f",
            deadline=now + 60_000,
            created_at=now,
            updated_at=now,
        )
        await jobs.insert(rec, [NewEvent("accepted", {})])
        await store.connection.send(_create(i, now))
        triggered = NewEvent("triggered", {"run": i})
        await jobs.set_external(f"j{i}", {"run": i}, now, None, event=triggered)
        await jobs.end(f"j{i}", Outcome(status="succeeded", result={"ok": 1}), now)

    async def run(first: int, last: int) -> None:
        for lo in range(first, last, AT_ONCE):
            await asyncio.gather(*(one(i) for i in range(lo, min(lo + AT_ONCE, last))))

    await run(0, WARMUP)
    cpu, wall = time.process_time(), time.monotonic()
    await run(WARMUP, WARMUP + jobs_n)
    cpu, wall = time.process_time() - cpu, time.monotonic() - wall
    print(f"{os.getcwd()}: {cpu / jobs_n * 1e6:.0f} us CPU/job, {jobs_n / wall:.0f} jobs/s")
    await store.close()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 3000))
