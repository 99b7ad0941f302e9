"""A worker process for the multi-process store tests (run as a script).

    python sqlite_proc.py DB PID LOG [--slow]

Serves group ``procs`` on the SQLite store ``DB`` until SIGTERM (clean stop) or
SIGKILL. The workflow ``job`` runs one step that appends ``"{pid} start {id}"``
and ``"{pid} end {id}"`` to ``LOG``; with ``--slow`` the step hangs for ten
minutes in between (a process to kill mid-step). Prints ``ready`` once serving.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from datetime import timedelta
from pathlib import Path

from resonate.context import Context
from resonate.resonate import Resonate

from resonate_sqlite.connection import SqliteConnection


async def main(db: str, pid: str, log: Path, slow: bool) -> None:
    def note(line: str) -> None:
        with log.open("a") as f:
            f.write(f"{line}\n")

    async def work(ctx: Context, job_id: str) -> str:
        note(f"{pid} start {job_id}")
        await asyncio.sleep(600 if slow else 0.05)
        note(f"{pid} end {job_id}")
        return pid

    async def job(ctx: Context, job_id: str) -> str:
        return await ctx.run(work, job_id)

    conn = SqliteConnection(
        db,
        group="procs",
        pid=pid,
        max_inflight=2,
        poll_interval=0.01,
        timer_interval=0.05,
        process_heartbeat=0.2,
        process_timeout=1.0,
    )
    await conn.start()
    r = Resonate(network=conn, group="procs", pid=pid, ttl=timedelta(seconds=2))
    r.register(job)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    await stop.wait()
    await asyncio.wait_for(r.stop(), 10)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], Path(sys.argv[3]), "--slow" in sys.argv))
