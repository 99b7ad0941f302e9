"""An idle connection sleeps: it is woken by another process's doorbell when
that process wrote it work, and by its next timer when one is due, not by a
poll; the doorbell is only ever a shortcut (a missing or stale socket costs
latency, never work); liveness beats do not make the checkpointer run."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from resonate_sqlite.connection import SqliteConnection
from resonate_sqlite.wake import SQL_NEXT_DUE, Doorbell, wake_dir

HELPER = Path(__file__).with_name("wake_proc.py")
ROOT = Path(__file__).resolve().parents[2]


def req(kind: str, corr: str, **data: Any) -> str:
    return json.dumps({"kind": kind, "head": {"corrId": corr}, "data": data})


def work_for(group: str, pid: str) -> str:
    """A promise with a task for ``group``: an ``execute`` for one of its processes."""
    tags = {"resonate:target": f"poll://any@{group}"}
    return req("promise.create", pid, id=pid, timeoutAt=2**60, tags=tags)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Inbox:
    """A receiver that records each message with when it came."""

    def __init__(self) -> None:
        self.got: list[tuple[float, dict[str, Any]]] = []
        self.came = asyncio.Event()

    def __call__(self, msg: str) -> None:
        self.got.append((time.monotonic(), json.loads(msg)))
        self.came.set()

    async def first(self, within: float) -> tuple[float, dict[str, Any]]:
        await asyncio.wait_for(self.came.wait(), within)
        return self.got[0]


async def receiver(db: Path, group: str, **kw: Any) -> tuple[SqliteConnection, Inbox]:
    conn = SqliteConnection(db, group=group, pid=f"{group}-proc", **kw)
    inbox = Inbox()
    conn.recv(inbox)
    await conn.start()
    await asyncio.sleep(0.1)  # its first rounds are over: it naps
    return conn, inbox


@pytest.fixture
async def sender(tmp_path: Path) -> AsyncIterator[SqliteConnection]:
    """A send-only connection of another group: its work goes to the outbox."""
    conn = SqliteConnection(tmp_path / "w.db", group="senders", pid="sender")
    await conn.start()
    yield conn
    await conn.stop()


async def test_an_idle_process_is_rung_awake_for_work_another_wrote(
    tmp_path: Path, sender: SqliteConnection
) -> None:
    # the receiver would not look at the outbox by itself for 30 s
    conn, inbox = await receiver(tmp_path / "w.db", "g", poll_interval=30, max_poll_interval=30)
    try:
        assert len(list(wake_dir(tmp_path / "w.db").glob("*.sock"))) == 1
        sent = time.monotonic()
        await sender.send(work_for("g", "p1"))
        came, msg = await inbox.first(within=5)
        assert msg["kind"] == "execute"
        assert msg["data"]["task"]["id"] == "p1"
        assert came - sent < 0.5, f"took {came - sent:.3f} s"
    finally:
        await conn.stop()
    assert list(wake_dir(tmp_path / "w.db").glob("*.sock")) == []  # stop unbinds


async def test_a_missing_or_stale_socket_never_loses_work(
    tmp_path: Path, sender: SqliteConnection
) -> None:
    db = tmp_path / "w.db"
    conn, inbox = await receiver(db, "g", max_poll_interval=0.3)
    try:
        # the receiver's socket is gone (as if its directory had been wiped),
        # and a dead process left a stale one behind
        for sock in wake_dir(db).glob("*.sock"):
            sock.unlink()
        dead = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        dead.bind(str(wake_dir(db) / "dead.sock"))
        dead.close()
        sent = time.monotonic()
        await sender.send(work_for("g", "p1"))
        came, msg = await inbox.first(within=5)  # the safety-net look found it
        assert msg["data"]["task"]["id"] == "p1"
        assert came - sent < 2.0
        assert not (wake_dir(db) / "dead.sock").exists()  # the ring removed it
    finally:
        await conn.stop()


async def test_without_the_doorbell_it_polls(tmp_path: Path, sender: SqliteConnection) -> None:
    conn, inbox = await receiver(tmp_path / "w.db", "g", wake=False)
    try:
        assert not wake_dir(tmp_path / "w.db").exists()
        await sender.send(work_for("g", "p1"))
        _, msg = await inbox.first(within=5)
        assert msg["data"]["task"]["id"] == "p1"
    finally:
        await conn.stop()


async def test_a_timer_far_off_fires_on_time_and_nothing_polls_meanwhile(tmp_path: Path) -> None:
    # naps of 1 s: a sweep riding on them would fire up to 1 s late
    conn, inbox = await receiver(tmp_path / "t.db", "g", poll_interval=1.0, max_poll_interval=1.0)
    rounds = count_rounds(conn)
    try:
        deadlines = {}
        for i, after in enumerate((700, 1100, 1500)):
            pid = f"t{i}"
            deadlines[pid] = now_ms() + after
            await conn.send(req("promise.create", pid, id=pid, timeoutAt=deadlines[pid]))
            await conn.send(
                req("promise.register_listener", f"l{i}", awaited=pid, address=conn.unicast())
            )
        start = rounds()
        await asyncio.sleep(1.8)
        fired = {m["data"]["promise"]["id"]: (came, m) for came, m in inbox.got}
        assert set(fired) == set(deadlines)
        for pid, (came, msg) in fired.items():
            assert msg["data"]["promise"]["state"] == "rejected_timedout"
            late = time.time() - (time.monotonic() - came) - deadlines[pid] / 1000
            # (0.5: a prompt timer was once 0.26 s late in a loaded CI run, 2026-12-05;
            # one riding on the naps fires t1 0.9 s late)
            assert -0.01 < late < 0.5, f"{pid} fired {late:+.3f} s from its deadline"
        # one round per deadline, and the looks of a 1 s nap
        assert rounds() - start <= 6, rounds() - start
    finally:
        await conn.stop()


async def test_a_timer_set_after_a_quiet_spell_fires_on_time(tmp_path: Path) -> None:
    # The lone request's own wake-up runs a sweep before the request commits:
    # the commit must make the pump read the next due time again, or the timer
    # waits for the next one it knew of (none: a minute).
    db = tmp_path / "t.db"
    conn, _ = await receiver(db, "g")
    try:
        await asyncio.sleep(0.5)  # idle: napping past timer_interval
        deadline = now_ms() + 300
        await conn.send(req("promise.create", "q", id="q", timeoutAt=deadline))
        await asyncio.sleep(0.8)
        with contextlib.closing(sqlite3.connect(db)) as peek:
            (state,) = peek.execute("SELECT state FROM r_promises WHERE id = 'q'").fetchone()
        assert state == "rejected_timedout", "the timer did not fire within 0.5 s of its deadline"
    finally:
        await conn.stop()


async def test_a_timer_another_process_set_fires_after_it_left(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    conn, inbox = await receiver(db, "g", max_poll_interval=0.3)
    try:
        other = SqliteConnection(db, group="other", pid="other")
        await other.start()
        due = now_ms() + 600
        await other.send(req("promise.create", "c", id="p", timeoutAt=due))
        await other.send(req("promise.register_listener", "l", awaited="p", address=conn.unicast()))
        await other.stop()  # it will not fire its own timer
        came, msg = await inbox.first(within=5)
        assert msg["kind"] == "unblock"
        late = time.time() - (time.monotonic() - came) - due / 1000
        assert late < 0.5, f"fired {late:.3f} s late"  # within a safety-net look
    finally:
        await conn.stop()


def count_rounds(conn: SqliteConnection) -> Callable[[], int]:
    """Count the pump's naps (one per round that found nothing to do at once)."""
    rounds = 0
    nap = conn._nap

    async def counted() -> None:
        nonlocal rounds
        rounds += 1
        await nap()

    conn._nap = counted  # type: ignore[method-assign]
    return lambda: rounds


async def test_an_idle_connection_does_not_poll(tmp_path: Path) -> None:
    conn, _ = await receiver(tmp_path / "i.db", "g")
    rounds = count_rounds(conn)
    try:
        await asyncio.sleep(2.5)  # the naps after start have grown to 2 s
        before = rounds()
        await asyncio.sleep(2.1)
        # a safety-net look every 2 s (the beat is every 10 s); 200 ms naps: 10
        assert rounds() - before <= 2, rounds() - before
    finally:
        await conn.stop()


async def test_liveness_beats_alone_cause_no_checkpoint(tmp_path: Path) -> None:
    conn, _ = await receiver(tmp_path / "i.db", "g", process_heartbeat=0.1)
    try:
        await asyncio.sleep(1.2)  # start-up's commits are checkpointed
        ckpt = conn._checkpointer
        assert ckpt is not None
        checkpoints = ckpt.checkpoints
        await asyncio.sleep(1.0)  # 10 beats, each a commit
        assert ckpt.checkpoints == checkpoints
        await conn.send(req("promise.create", "c", id="p", timeoutAt=2**60))
        for _ in range(100):  # about a second; longer on a loaded machine
            await asyncio.sleep(0.05)
            if ckpt.checkpoints > checkpoints:
                break
        await asyncio.sleep(0.5)  # and no other: the beats since add none
        assert ckpt.checkpoints == checkpoints + 1  # a commit with data is worth one
    finally:
        await conn.stop()


def test_the_next_due_timer_is_read_from_the_timer_indexes(tmp_path: Path) -> None:
    from resonate_sqlite.engine import Engine

    engine = Engine(tmp_path / "plan.db")
    engine.open(timeout=1)
    try:
        plan = engine.explain(SQL_NEXT_DUE, ())
        for index in ("r_promises_due", "r_tasks_due", "r_schedules_due"):
            assert any(index in step for step in plan), plan
        assert not any(step.startswith("SCAN r_promises") and "INDEX" not in step for step in plan)
    finally:
        engine.close()


def test_ring_removes_stale_sockets_and_skips_its_own(tmp_path: Path) -> None:
    db = tmp_path / ("x" * 120) / "deep.db"  # longer than a socket path may be
    db.parent.mkdir()
    a, b = Doorbell(db), Doorbell(db)
    assert a.open() and b.open()
    try:
        dead = Doorbell(db)
        assert dead.open()
        assert dead._sock is not None and dead._name is not None
        dead._sock.close()  # dies without unbinding
        a.ring()
        assert (a.rings, a.removed) == (1, 1)
        assert not (wake_dir(db) / dead._name).exists()
        b.drain()
        a.ring()  # b's queue takes it; a never rings itself
        assert a.rings == 2
    finally:
        a.close()
        b.close()
    assert not wake_dir(db).exists()  # the last one out removes the directory


def test_a_closed_doorbell_rings_nobody_and_holds_no_socket(tmp_path: Path) -> None:
    # after stop(), a late request's commit may still ring: no socket is made
    db = tmp_path / "t.db"
    a, b = Doorbell(db), Doorbell(db)
    assert a.open() and b.open()
    try:
        a.close()
        a.ring()
        assert (a.rings, a._out) == (0, None)
    finally:
        b.close()


# -- real processes -------------------------------------------------------------


class Proc:
    def __init__(self, db: Path, pid: str, log: Path) -> None:
        args = [sys.executable, str(HELPER), str(db), pid, str(log)]
        self.proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, text=True)

    async def ready(self) -> None:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), 30)
        assert line.strip() == "ready", line

    def end(self, how: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(how)
            self.proc.wait(15)


@pytest.fixture
async def procs(tmp_path: Path) -> AsyncIterator[Callable[[str], Proc]]:
    made: list[Proc] = []

    def spawn(pid: str) -> Proc:
        made.append(p := Proc(tmp_path / "w.db", pid, tmp_path / "log.txt"))
        return p

    yield spawn
    for p in made:
        p.end(signal.SIGKILL)


async def test_processes_ring_each_other_and_a_killed_ones_socket_is_cleaned(
    tmp_path: Path, procs: Callable[[str], Proc], sender: SqliteConnection
) -> None:
    log = tmp_path / "log.txt"

    def seen() -> list[str]:
        return log.read_text().split() if log.exists() else []

    async def delivered(task: str) -> float:
        while task not in seen():
            await asyncio.sleep(0.005)
        return time.monotonic()

    doomed = procs("A")
    await doomed.ready()
    await asyncio.sleep(0.3)
    sent = time.monotonic()
    await sender.send(work_for("g", "p1"))
    came = await asyncio.wait_for(delivered("A:p1"), 10)
    assert came - sent < 1.0  # the process polls every 30 s: the ring woke it
    socks = list(wake_dir(tmp_path / "w.db").glob("*.sock"))
    assert len(socks) == 1
    doomed.end(signal.SIGKILL)  # its socket stays behind, stale
    survivor = procs("B")
    await survivor.ready()
    await asyncio.sleep(0.3)
    sent = time.monotonic()
    await sender.send(work_for("g", "p2"))
    came = await asyncio.wait_for(delivered("B:p2"), 10)
    assert came - sent < 1.0
    assert not socks[0].exists()  # the ring found it dead and removed it
    assert "A:p2" not in seen()
    assert os.path.exists(wake_dir(tmp_path / "w.db"))


async def test_a_doorbell_that_cannot_be_bound_falls_back_to_the_short_poll(
    tmp_path: Path, sender: SqliteConnection
) -> None:
    wake_dir(tmp_path / "w.db").write_text("not a directory")  # nothing can bind here
    conn, inbox = await receiver(tmp_path / "w.db", "g")
    try:
        assert conn._max_poll_interval == 0.2
        await sender.send(work_for("g", "p1"))
        _, msg = await inbox.first(within=5)
        assert msg["data"]["task"]["id"] == "p1"
    finally:
        await conn.stop()
