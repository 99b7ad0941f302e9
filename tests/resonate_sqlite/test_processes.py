"""Real OS processes sharing one database file."""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from resonate.resonate import Resonate

from resonate_sqlite.connection import SqliteConnection
from tests.resonate_sqlite.conformance.helpers import dispatch

HELPER = Path(__file__).with_name("sqlite_proc.py")
ROOT = Path(__file__).resolve().parents[2]


class Worker:
    def __init__(self, db: Path, pid: str, log: Path, *, slow: bool = False) -> None:
        self.pid = pid
        args = [sys.executable, str(HELPER), str(db), pid, str(log)] + (["--slow"] if slow else [])
        self.proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, text=True)

    async def ready(self) -> None:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), 30)
        assert line.strip() == "ready", f"worker {self.pid} did not start: {line!r}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Callable[..., Worker]]:
    workers: list[Worker] = []

    def spawn(pid: str, *, slow: bool = False) -> Worker:
        w = Worker(tmp_path / "shared.db", pid, tmp_path / "log.txt", slow=slow)
        workers.append(w)
        return w

    yield spawn
    for w in workers:
        w.stop()


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[Resonate]:
    """A send-only process: it dispatches, the workers run."""
    conn = SqliteConnection(tmp_path / "shared.db", group="procs", pid="client")
    await conn.start()
    r = Resonate(
        network=conn, sources=[], group="procs", pid="client", subscription_refresh_secs=0.1
    )
    yield r
    await asyncio.wait_for(r.stop(), 10)


def log_lines(tmp_path: Path) -> list[list[str]]:
    path = tmp_path / "log.txt"
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


async def test_two_processes_split_the_work_each_job_runs_once(
    tmp_path: Path, cluster: Callable[..., Worker], client: Resonate
) -> None:
    a, b = cluster("A"), cluster("B")
    await asyncio.gather(a.ready(), b.ready())
    jobs = [f"job{i}" for i in range(20)]
    handles = await asyncio.gather(*(dispatch(client, job, "job", job) for job in jobs))
    ran_on = await asyncio.wait_for(asyncio.gather(*(h.result() for h in handles)), 30)
    starts = collections.Counter(job for _, what, job in log_lines(tmp_path) if what == "start")
    assert starts == dict.fromkeys(jobs, 1), "a job ran twice, or not at all"
    assert set(ran_on) == {"A", "B"}, ran_on
    by_log = {job: who for who, what, job in log_lines(tmp_path) if what == "end"}
    assert [by_log[job] for job in jobs] == ran_on


async def test_sigkill_mid_step_another_process_finishes_after_the_lease(
    tmp_path: Path, cluster: Callable[..., Worker], client: Resonate
) -> None:
    doomed = cluster("A", slow=True)
    await doomed.ready()
    handle = await dispatch(client, "crash1", "job", "crash1")

    async def started() -> None:
        while ["A", "start", "crash1"] not in log_lines(tmp_path):
            await asyncio.sleep(0.02)

    await asyncio.wait_for(started(), 15)
    os.kill(doomed.proc.pid, signal.SIGKILL)
    doomed.proc.wait(5)

    survivor = cluster("B")
    await survivor.ready()
    assert await asyncio.wait_for(handle.result(), 20) == "B"
    assert log_lines(tmp_path) == [
        ["A", "start", "crash1"],
        ["B", "start", "crash1"],
        ["B", "end", "crash1"],
    ]

    async def reaped() -> None:  # the dead process leaves the process table
        db = sqlite3.connect(tmp_path / "shared.db")
        try:
            while {r[0] for r in db.execute("SELECT pid FROM r_processes")} != {"B"}:
                await asyncio.sleep(0.1)
        finally:
            db.close()

    await asyncio.wait_for(reaped(), 10)
