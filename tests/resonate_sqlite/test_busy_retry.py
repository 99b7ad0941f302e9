"""`retry_briefly`: a call that finds the write lock taken is tried again at
once, for a bounded time, before the caller sleeps on the event loop. On a
real file, with the lock held by another connection."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from resonate_sqlite import busy
from resonate_sqlite.busy import SPIN, SPIN_COOLDOWN, retry_briefly
from resonate_sqlite.engine import is_busy


@pytest.fixture(autouse=True)
def no_recent_spin(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with no failed spin behind it."""
    monkeypatch.setattr(busy, "_spin_failed_at", float("-inf"))


def locked(exc: Exception) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and is_busy(exc)


@pytest.fixture
def two(tmp_path: Path) -> Iterator[tuple[sqlite3.Connection, sqlite3.Connection]]:
    """Two connections to one WAL file, neither waiting inside SQLite."""
    path = tmp_path / "lock.db"
    conns = []
    for _ in range(2):
        conn = sqlite3.connect(path, isolation_level=None, timeout=0, check_same_thread=False)
        conn.execute("PRAGMA journal_mode = WAL")
        conns.append(conn)
    conns[0].execute("CREATE TABLE t (x)")
    yield conns[0], conns[1]
    for conn in conns:
        conn.close()


def counted(conn: sqlite3.Connection, sql: str) -> tuple[list[int], Callable[[], None]]:
    tries = [0]

    def call() -> None:
        tries[0] += 1
        conn.execute(sql)

    return tries, call


def test_a_lock_let_go_within_the_budget_is_taken(
    two: tuple[sqlite3.Connection, sqlite3.Connection],
) -> None:
    holder, waiter = two
    holder.execute("BEGIN IMMEDIATE")
    release = threading.Timer(0.02, lambda: holder.execute("COMMIT"))
    tries, call = counted(waiter, "BEGIN IMMEDIATE")
    t0 = time.monotonic()
    release.start()
    try:
        retry_briefly(call, locked, budget=5.0)
    finally:
        release.join()
    assert time.monotonic() - t0 >= 0.015
    assert tries[0] > 1  # it found the lock taken, and tried again
    assert waiter.in_transaction
    waiter.execute("INSERT INTO t VALUES (1)")
    waiter.execute("COMMIT")
    assert holder.execute("SELECT count(*) FROM t").fetchone() == (1,)


def test_a_lock_held_past_the_budget_raises_busy(
    two: tuple[sqlite3.Connection, sqlite3.Connection],
) -> None:
    holder, waiter = two
    holder.execute("BEGIN IMMEDIATE")
    tries, call = counted(waiter, "BEGIN IMMEDIATE")
    t0 = time.monotonic()
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        retry_briefly(call, locked, budget=0.03)
    took = time.monotonic() - t0
    assert 0.03 <= took < 1.0
    assert tries[0] > 2
    assert not waiter.in_transaction
    holder.execute("ROLLBACK")


def test_the_default_budget_holds_the_caller_under_a_few_milliseconds(
    two: tuple[sqlite3.Connection, sqlite3.Connection],
) -> None:
    holder, waiter = two
    holder.execute("BEGIN IMMEDIATE")
    _, call = counted(waiter, "BEGIN IMMEDIATE")
    t0 = time.monotonic()
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        retry_briefly(call, locked)
    assert SPIN <= time.monotonic() - t0 < 0.05  # not a wait of the loop's length
    holder.execute("ROLLBACK")


def test_other_errors_are_raised_at_once(
    two: tuple[sqlite3.Connection, sqlite3.Connection],
) -> None:
    _, waiter = two
    tries, call = counted(waiter, "SELECT * FROM missing")
    with pytest.raises(sqlite3.OperationalError, match="no such table"):
        retry_briefly(call, locked, budget=5.0)
    assert tries[0] == 1


def test_after_a_failed_spin_waiters_try_once_until_the_cooldown_passes(
    two: tuple[sqlite3.Connection, sqlite3.Connection],
) -> None:
    """A lock another process holds for long (a gc, a migration): the first
    call spins and gives up; the calls right after it try once each (however
    many wait, the loop is not held up by each in turn); once the cooldown
    has passed, a call spins again."""
    holder, waiter = two
    holder.execute("BEGIN IMMEDIATE")
    tries, call = counted(waiter, "BEGIN IMMEDIATE")
    # spins of 20 ms: a few tries each even on a loaded machine, whose
    # sleeps of SPIN_STEP may last milliseconds
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        retry_briefly(call, locked, budget=0.02)
    spun = tries[0]
    assert spun > 2
    for _ in range(10):
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            retry_briefly(call, locked, budget=0.02)
    assert tries[0] == spun + 10  # one try each
    time.sleep(SPIN_COOLDOWN)
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        retry_briefly(call, locked, budget=0.02)
    assert tries[0] > spun + 12  # it spun again
    holder.execute("ROLLBACK")
    retry_briefly(call, locked)  # free: taken at the first try
    waiter.execute("ROLLBACK")


def test_backoff_gives_up_after_its_timeout_and_pace_never_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`next_delay`: None once `timeout` has passed since the first busy
    answer. `pace` (the group commit's queue, whose entries keep deadlines of
    their own): the same delays, doubling up to the cap, whatever the time."""
    now = [100.0]
    monkeypatch.setattr(busy, "time", SimpleNamespace(monotonic=lambda: now[0]))
    backoff = busy.BusyBackoff(timeout=1.0)
    paced = busy.BusyBackoff(timeout=1.0)
    assert backoff.next_delay() == paced.pace() == busy.FIRST_DELAY
    assert backoff.next_delay() == paced.pace() == 2 * busy.FIRST_DELAY
    now[0] += 1.0
    assert backoff.next_delay() is None
    assert backoff.next_delay() == busy.FIRST_DELAY  # a new wait
    for _ in range(20):
        delay = paced.pace()
    assert delay == busy.MAX_DELAY
    paced.reset()
    assert paced.pace() == busy.FIRST_DELAY
