"""The job index's writes on the embedded store ride the store engine's group
commit (`SqliteDriver.atomic`, `SqliteConnection.atomic`): one `BEGIN` and one
`COMMIT` for the protocol requests and the index's writes of a turn of the
loop, each write still atomic on its own."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
import pytest

from core.errors import StoreUnavailable
from core.models import Outcome
from core.settings import Settings
from core.store import open_store
from core.store.embedded import EmbeddedStore
from core.store.jobs import JobRecord, NewEvent
from resonate_sqlite.connection import SqliteConnection, SqliteStoreError
from resonate_sqlite.engine import StoreBusy, StoreFailure
from tests.core.store.test_index_writes import job

NOW = 1_700_000_000_000


def _job(job_id: str) -> JobRecord:
    return job(job_id, "http_webhook", NOW)


def _request(kind: str, **data: Any) -> str:
    return json.dumps({"kind": kind, "head": {"corrId": "c", "version": "v"}, "data": data})


def _create(promise_id: str) -> str:
    return _request("promise.create", id=promise_id, timeoutAt=NOW * 2, param={}, tags={})


@pytest.fixture
async def store(tmp_path: Any) -> Any:
    opened = await open_store(Settings.from_env({}, store=f"sqlite:///{tmp_path}/t.db"), "p1")
    assert isinstance(opened, EmbeddedStore)
    yield opened
    await opened.close()


def _begins(store: EmbeddedStore) -> list[str]:
    """The transactions the engine's connection begins from now on."""
    db = store.connection.shared_db()
    assert db is not None
    seen: list[str] = []
    db.set_trace_callback(lambda sql: seen.append(sql) if sql.startswith("BEGIN") else None)
    return seen


def _rows(store: EmbeddedStore, sql: str) -> list[tuple[Any, ...]]:
    """Read through a connection of its own: only what was committed."""
    return _rows_at(store.connection.path, sql)


def _rows_at(path: Any, sql: str) -> list[tuple[Any, ...]]:
    other = sqlite3.connect(path)
    try:
        return other.execute(sql).fetchall()
    finally:
        other.close()


async def test_writes_of_one_turn_share_one_transaction_with_the_engines_requests(store):
    begins = _begins(store)
    jobs = store.jobs
    created = await asyncio.gather(
        jobs.insert(_job("a"), [NewEvent("accepted", {})]),
        jobs.insert(_job("b"), [NewEvent("accepted", {})]),
        store.connection.send(_create("p")),
    )
    assert [c[1] for c in created[:2]] == [True, True]
    assert json.loads(created[2])["head"]["status"] == 200
    assert begins == ["BEGIN IMMEDIATE"]  # one lock taken, one commit, for the three
    assert _rows(store, "SELECT id FROM tether_jobs ORDER BY id") == [("a",), ("b",)]
    assert _rows(store, "SELECT count(*) FROM tether_events") == [(2,)]
    assert _rows(store, "SELECT id FROM r_promises") == [("p",)]

    begins.clear()  # a job's three writes, each awaited: one transaction each
    await jobs.set_external("a", {"run": 1}, NOW, None, event=NewEvent("triggered", {}))
    await jobs.end("a", Outcome(status="succeeded", result=1), NOW)
    assert begins == ["BEGIN IMMEDIATE"] * 2
    assert _rows(store, "SELECT state FROM tether_jobs WHERE id = 'a'") == [("succeeded",)]


async def test_a_write_that_fails_is_rolled_back_alone(store):
    async def fails(tx: Any) -> None:
        await tx.execute("INSERT INTO tether_meta (name, value) VALUES ('x', 'y')", ())
        raise ValueError("boom")

    # a request the engine refuses (rolled back) in the same batch, too
    release = _request("task.release", id="nope", version=1)
    failed, (_, created), refused, answered = await asyncio.gather(
        store.jobs.db.atomic(fails),
        store.jobs.insert(_job("b")),
        store.connection.send(release),
        store.connection.send(_create("p")),
        return_exceptions=True,
    )
    assert isinstance(failed, ValueError)
    assert created
    assert json.loads(refused)["head"]["status"] == 404
    assert json.loads(answered)["head"]["status"] == 200
    assert _rows(store, "SELECT name FROM tether_meta WHERE name = 'x'") == []
    assert _rows(store, "SELECT id FROM tether_jobs") == [("b",)]
    assert _rows(store, "SELECT id FROM r_promises") == [("p",)]


async def test_a_refused_request_alone_in_a_batch_leaves_the_writes_beside_it(store):
    """One request and an index write: the request's refusal (which rolls back
    a batch of one request whole) must not take the write with it."""
    release = _request("task.release", id="nope", version=1)
    refused, (_, created) = await asyncio.gather(
        store.connection.send(release), store.jobs.insert(_job("a"))
    )
    assert json.loads(refused)["head"]["status"] == 404
    assert created
    assert _rows(store, "SELECT id FROM tether_jobs") == [("a",)]


async def test_a_write_that_waits_on_anything_but_its_statements_is_refused(store):
    async def waits(tx: Any) -> None:
        await tx.execute("INSERT INTO tether_meta (name, value) VALUES ('x', 'y')", ())
        await asyncio.sleep(0)  # would hold the write lock across turns of the loop

    with pytest.raises(RuntimeError, match="waited on something"):
        await store.jobs.db.atomic(waits)
    assert _rows(store, "SELECT name FROM tether_meta WHERE name = 'x'") == []
    assert (await store.jobs.insert(_job("a")))[1]  # the next batch is fine


async def test_a_write_waits_while_another_process_holds_the_file(store):
    holder = sqlite3.connect(store.connection.path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    insert = asyncio.ensure_future(store.jobs.insert(_job("a")))
    await asyncio.sleep(0.3)
    assert not insert.done()
    holder.execute("ROLLBACK")
    holder.close()
    _, created = await asyncio.wait_for(insert, 10)
    assert created
    assert _rows(store, "SELECT id FROM tether_jobs") == [("a",)]


async def test_a_storage_failure_is_store_unavailable(store, monkeypatch):
    def broken(*args: Any) -> Any:
        raise StoreFailure("sqlite store t.db: disk image is malformed")

    engine = store.connection._engine
    monkeypatch.setattr(engine, "_begin", broken)
    with pytest.raises(StoreUnavailable, match="malformed"):
        await store.jobs.insert(_job("a"))


async def test_a_write_after_stop_opens_the_file_again(tmp_path):
    """A step still running at shutdown ends its job late (the SDK stops the
    store's connection before it joins its steps)."""
    url = f"sqlite:///{tmp_path}/t.db"
    store = await open_store(Settings.from_env({}, store=url), "p1")
    assert isinstance(store, EmbeddedStore)
    await store.jobs.insert(_job("a"))
    await store.close()
    assert store.connection.shared_db() is None
    try:
        ended, _ = await store.jobs.end("a", Outcome(status="succeeded"), NOW)
        assert ended is not None and ended.state == "succeeded"
    finally:
        store.connection.close()
    assert _rows(store, "SELECT state FROM tether_jobs") == [("succeeded",)]


async def test_a_write_whose_caller_was_cancelled_while_it_waited_is_not_applied(store):
    """A caller cancelled while its write waits for the batch (a `store_call`
    timeout, a watchdog look cancelled at stop) writes nothing, as a
    transaction cancelled while waiting for the lock wrote nothing."""
    holder = sqlite3.connect(store.connection.path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    insert = asyncio.ensure_future(store.jobs.insert(_job("a")))
    await asyncio.sleep(0.2)
    insert.cancel()
    with pytest.raises(asyncio.CancelledError):
        await insert
    holder.execute("ROLLBACK")
    holder.close()
    await store.jobs.insert(_job("b"))  # a later write gets through
    assert _rows(store, "SELECT id FROM tether_jobs ORDER BY id") == [("b",)]


async def test_a_promotion_whose_caller_was_cancelled_is_not_lost(store):
    """`end` frees a slot and promotes a queued job inside its transaction;
    `on_ready` starts the promoted job's workflow. A promotion committed and
    never told would leave the job `pending` with no workflow."""
    jobs = store.jobs
    jobs.limits = {"http_webhook": 1}
    ready: list[str] = []
    jobs.on_ready = lambda recs: ready.extend(r.id for r in recs)
    await jobs.insert(_job("a"))
    second, _ = await jobs.insert(msgspec.structs.replace(_job("b"), created_at=NOW + 1))
    assert second.state == "queued"
    ending = asyncio.ensure_future(jobs.end("a", Outcome(status="succeeded"), NOW + 2))
    await asyncio.sleep(0)  # queued for the next batch
    ending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await ending
    await asyncio.sleep(0.05)
    b_state = _rows(store, "SELECT state FROM tether_jobs WHERE id = 'b'")[0][0]
    # consistent: either the promotion did not happen, or on_ready heard of it
    assert b_state == "queued" or ready == ["b"], (b_state, ready)


async def test_an_extra_that_raises_a_base_exception_does_not_wedge_the_store(store):
    """A CancelledError raised inside a body (awaiting a future already
    cancelled) is that write's failure alone: it must not escape the batch,
    leave it queued and unanswered, and be run again by every later flush."""
    loop = asyncio.get_running_loop()
    gone = loop.create_future()
    gone.cancel()

    async def body(tx: Any) -> None:
        await tx.execute("INSERT INTO tether_meta (name, value) VALUES ('x', 'y')", ())
        await gone  # raises CancelledError at once, no yield

    bad = asyncio.ensure_future(store.jobs.db.atomic(body))
    other = asyncio.ensure_future(store.connection.send(_create("p")))
    await asyncio.wait([bad, other], timeout=2)
    assert other.done(), "a protocol request beside it was never answered"
    later = asyncio.ensure_future(store.jobs.insert(_job("a")))
    await asyncio.wait([later], timeout=2)
    assert later.done(), "the store is wedged"
    for t in (bad, other, later):
        t.cancel()


async def test_stop_commits_the_writes_still_queued(tmp_path):
    opened = await open_store(Settings.from_env({}, store=f"sqlite:///{tmp_path}/t.db"), "p1")
    assert isinstance(opened, EmbeddedStore)
    inserts = [asyncio.ensure_future(opened.jobs.insert(_job(f"j{i}"))) for i in range(5)]
    await asyncio.sleep(0)  # queued, not yet flushed
    await opened.connection.stop()
    assert all(t.done() and t.result()[1] for t in inserts)
    opened.connection.close()
    assert _rows(opened, "SELECT count(*) FROM tether_jobs") == [(5,)]


async def test_more_writes_than_a_batch_holds_all_commit(store):
    begins = _begins(store)
    n = 150
    done = await asyncio.gather(*(store.jobs.insert(_job(f"j{i:03}")) for i in range(n)))
    assert all(created for _, created in done)
    assert len(begins) == 3  # 64 + 64 + 22
    assert _rows(store, "SELECT count(*) FROM tether_jobs") == [(n,)]


async def test_a_write_that_loses_the_whole_transaction_fails_the_batch(store):
    """SQLITE_FULL/IOERR may roll the whole transaction back: nothing of the
    batch may then be answered as committed."""

    def rolled_back(db: sqlite3.Connection) -> None:
        db.execute("ROLLBACK")  # as SQLite does on some I/O errors
        raise sqlite3.OperationalError("disk I/O error")

    res = await asyncio.gather(
        store.connection.send(_create("p")),
        store.connection.atomic(rolled_back),
        store.jobs.insert(_job("a")),
        return_exceptions=True,
    )
    assert all(isinstance(r, Exception) for r in res), res
    assert _rows(store, "SELECT id FROM r_promises") == []
    assert _rows(store, "SELECT id FROM tether_jobs") == []
    # the error the callers see names what went wrong
    assert "disk I/O error" in str(res[1]), str(res[1])


@contextlib.asynccontextmanager
async def _held(
    tmp_path: Any, lock_timeout: float, **options: Any
) -> AsyncIterator[tuple[SqliteConnection, Any]]:
    """A connection with a short `lock_timeout` and a table `t` of its own,
    and another connection holding the file's write lock (`ROLLBACK` it to
    let go; let go at the end anyway)."""
    conn = SqliteConnection(tmp_path / "t.db", lock_timeout=lock_timeout, **options)
    await conn.start()
    await conn.atomic(lambda db: db.execute("CREATE TABLE t (x TEXT)"))
    holder = sqlite3.connect(conn.path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        yield conn, holder
    finally:
        if holder.in_transaction:
            holder.execute("ROLLBACK")
        holder.close()
        await conn.stop()


def _insert(x: str) -> Callable[[sqlite3.Connection], Any]:
    return lambda db: db.execute("INSERT INTO t (x) VALUES (?)", (x,))


async def test_a_write_queued_late_in_a_busy_stretch_gets_the_whole_wait(tmp_path):
    """Each request and write waits up to the lock timeout for the lock from
    when it was queued: one queued just before an older one gives up is not
    failed with it, having waited almost nothing."""
    async with _held(tmp_path, lock_timeout=0.5) as (conn, _):
        first = asyncio.ensure_future(conn.send(_create("p")))
        await asyncio.sleep(0.45)
        queued_at = time.monotonic()
        late = asyncio.ensure_future(conn.atomic(_insert("late")))
        await asyncio.wait([first], timeout=5)
        assert first.done() and isinstance(first.exception(), SqliteStoreError)
        assert "gave up after 0.5 s" in str(first.exception())
        await asyncio.wait([late], timeout=5)
        waited = time.monotonic() - queued_at
        assert late.done() and isinstance(late.exception(), SqliteStoreError)  # never got it
        assert waited >= 0.45, f"the late write failed after {waited:.2f} s"


async def test_only_what_waited_its_whole_lock_timeout_fails(tmp_path):
    """A request and a write whose own wait ran out are failed; a request and
    a write queued later stay queued and commit once the lock is let go."""
    async with _held(tmp_path, lock_timeout=1.0) as (conn, holder):
        old = [
            asyncio.ensure_future(conn.send(_create("old"))),
            asyncio.ensure_future(conn.atomic(_insert("old"))),
        ]
        await asyncio.sleep(0.6)
        young = [
            asyncio.ensure_future(conn.send(_create("young"))),
            asyncio.ensure_future(conn.atomic(_insert("young"))),
        ]
        await asyncio.wait(old, timeout=5)
        for task in old:
            assert task.done() and isinstance(task.exception(), SqliteStoreError)
            assert "locked (gave up after 1 s)" in str(task.exception())
        assert not any(task.done() for task in young)
        holder.execute("ROLLBACK")
        created, _ = await asyncio.wait_for(asyncio.gather(*young), 5)
        assert json.loads(created)["head"]["status"] == 200
        assert _rows_at(conn.path, "SELECT id FROM r_promises") == [("young",)]
        assert _rows_at(conn.path, "SELECT x FROM t") == [("young",)]


async def test_what_gave_up_waiting_is_never_run_even_beyond_a_batch(tmp_path):
    """More queued than a batch holds: the requests and writes whose own wait
    ran out fail wherever they are in the queue, and never run, nor does
    what follows a write (`after`); the younger ones commit, a batch at a
    time, once the lock is let go."""
    ran: list[str] = []
    followed: list[str] = []

    def write(x: str) -> Callable[[sqlite3.Connection], str]:
        def fn(db: sqlite3.Connection) -> str:
            ran.append(x)
            _insert(x)(db)
            return x

        return fn

    def queue(prefix: str, n: int) -> list[asyncio.Future[Any]]:
        names = [f"{prefix}{i}" for i in range(n)]
        return [asyncio.ensure_future(conn.atomic(write(x), followed.append)) for x in names] + [
            asyncio.ensure_future(conn.send(_create(x))) for x in names
        ]

    async with _held(tmp_path, lock_timeout=0.5, max_batch=2) as (conn, holder):
        old = queue("old", 5)
        await asyncio.sleep(0.3)
        young = queue("young", 3)
        await asyncio.wait(old, timeout=5)
        for task in old:
            assert task.done() and isinstance(task.exception(), SqliteStoreError)
        assert not any(task.done() for task in young)
        holder.execute("ROLLBACK")
        await asyncio.wait_for(asyncio.gather(*young), 5)
        names = ["young0", "young1", "young2"]
        assert ran == followed == names
        assert _rows_at(conn.path, "SELECT x FROM t ORDER BY x") == [(x,) for x in names]
        assert _rows_at(conn.path, "SELECT id FROM r_promises ORDER BY id") == [(x,) for x in names]


class _Counted:
    """A queued entry whose deadline counts the reads of it."""

    reads = 0

    def __init__(self, deadline: float) -> None:
        self._deadline = deadline
        self.fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    @property
    def deadline(self) -> float:
        _Counted.reads += 1
        return self._deadline


async def test_a_retry_while_the_lock_is_taken_looks_only_at_the_entries_that_ran_out(tmp_path):
    """The queue is in the order of its deadlines (queued + the same
    lock_timeout): a retry that finds the lock taken looks at its head only,
    not at the thousands queued behind it while the lock stays taken (a retry
    every 5 ms)."""
    conn = SqliteConnection(tmp_path / "t.db", lock_timeout=5.0)
    now = time.monotonic()
    for queue in (conn._queue, conn._extras):
        queue[:] = [_Counted(now - 1), _Counted(now - 0.5)]
        queue += [_Counted(now + 5 + i / 1000) for i in range(1000)]
    expired = [entry.fut for entry in conn._queue[:2] + conn._extras[:2]]
    _Counted.reads = 0
    conn._give_up_waiting(StoreBusy("database is locked"))
    for fut in expired:
        assert "database is locked (gave up after 5 s)" in str(fut.exception())
    assert len(conn._queue) == len(conn._extras) == 1000
    assert not any(entry.fut.done() for entry in conn._queue + conn._extras)
    assert _Counted.reads <= 6, f"{_Counted.reads} deadlines read"
    _Counted.reads = 0
    conn._give_up_waiting(StoreBusy("database is locked"))  # none ran out: the heads only
    assert len(conn._queue) == len(conn._extras) == 1000
    assert _Counted.reads <= 2, f"{_Counted.reads} deadlines read"


async def test_stop_waits_for_the_lock_without_multiplying_the_retries(tmp_path, monkeypatch):
    """`stop` drains the queue through the flushes already scheduled: while
    another connection holds the lock, one chain of retries paced by the
    backoff (at most one every 5 ms once it has grown), not one more chain
    for each turn of `stop`'s own wait (thousands of tries in 0.3 s)."""
    async with _held(tmp_path, lock_timeout=5.0) as (conn, holder):
        write = asyncio.ensure_future(conn.atomic(_insert("queued")))
        await asyncio.sleep(0.05)  # waiting for the lock, its retries paced
        assert not write.done()
        tries = 0
        run_batch = conn._engine.run_batch

        def counted(*args: Any) -> Any:
            nonlocal tries
            tries += 1
            return run_batch(*args)

        monkeypatch.setattr(conn._engine, "run_batch", counted)
        asyncio.get_running_loop().call_later(0.3, holder.execute, "ROLLBACK")
        await asyncio.wait_for(conn.stop(), 5)
        assert write.done() and write.exception() is None
        assert _rows_at(conn.path, "SELECT x FROM t") == [("queued",)]
        # paced: about 60 tries in 0.3 s on any machine (fewer on a slow one)
        assert 1 <= tries <= 150, f"{tries} tries of the batch during stop"


async def test_what_follows_a_committed_write_is_not_lost_to_a_late_cancel(store):
    """The write committed and its caller is cancelled before it resumes: the
    listeners and the promoted job's start run at the commit, not after the
    caller's `await`, so the cancel cannot skip them."""
    jobs = store.jobs
    jobs.limits = {"http_webhook": 1}
    ready: list[str] = []
    jobs.on_ready = lambda recs: ready.extend(r.id for r in recs)
    await jobs.insert(_job("a"))
    await jobs.insert(msgspec.structs.replace(_job("b"), created_at=NOW + 1))
    ending = asyncio.ensure_future(jobs.end("a", Outcome(status="succeeded"), NOW + 2))
    await asyncio.sleep(0)  # `end` queues its write and the batch's flush
    await asyncio.sleep(0)  # the flush commits; `end` is due to resume after this
    assert _rows(store, "SELECT state FROM tether_jobs WHERE id = 'b'") == [("pending",)]
    ending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await ending
    assert ready == ["b"]
