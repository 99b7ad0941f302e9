"""The job index's writes on the embedded store ride the store engine's group
commit (`SqliteDriver.atomic`, `SqliteConnection.atomic`): one `BEGIN` and one
`COMMIT` for the protocol requests and the index's writes of a turn of the
loop, each write still atomic on its own."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from typing import Any

import pytest

from core.errors import StoreUnavailable
from core.models import Outcome
from core.settings import Settings
from core.store import open_store
from core.store.embedded import EmbeddedStore
from core.store.jobs import JobRecord, NewEvent

NOW = 1_700_000_000_000


def _job(job_id: str) -> JobRecord:
    return JobRecord(
        id=job_id,
        backend="http_webhook",
        state="pending",
        params={},
        metadata={},
        timeout=60.0,
        fingerprint="f",
        deadline=NOW + 60_000,
        created_at=NOW,
        updated_at=NOW,
    )


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
    other = sqlite3.connect(store.connection.path)
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
        raise sqlite3.DatabaseError("disk image is malformed")

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
