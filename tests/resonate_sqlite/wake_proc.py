"""A receiving process for ``test_wake.py`` (run as a script).

    python wake_proc.py DB PID LOG

A connection of group ``g`` that looks at the outbox by itself only every
30 s (so a prompt delivery proves the doorbell rang), appending
``"{PID}:{task id}"`` to ``LOG`` for each ``execute`` it receives. Prints
``ready`` once serving; runs until SIGTERM or SIGKILL.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

from resonate_sqlite.connection import SqliteConnection


async def main(db: str, pid: str, log: Path) -> None:
    def got(msg: str) -> None:
        body = json.loads(msg)
        if body["kind"] == "execute":
            with log.open("a") as f:
                f.write(f"{pid}:{body['data']['task']['id']}\n")

    conn = SqliteConnection(db, group="g", pid=pid, poll_interval=30, max_poll_interval=30)
    conn.recv(got)
    await conn.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    await stop.wait()
    await conn.stop()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], Path(sys.argv[3])))
