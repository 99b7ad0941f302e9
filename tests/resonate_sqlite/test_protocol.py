"""The embedded store's answers to raw protocol requests, on a controlled clock.

These drive :class:`resonate_sqlite.engine.Engine` (what
``SqliteConnection.send`` runs) directly, so timers fire exactly when the
test moves the clock.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from resonate_sqlite.busy import BusyBackoff
from resonate_sqlite.engine import Engine, StoreBusy
from resonate_sqlite.transitions import HANDLERS, Transitions
from tests.resonate_sqlite.protocol_server import (
    GROUP,
    HOUR,
    ME,
    OTHER,
    T0,
    Server,
    fence_create,
    root_tags,
    start,
    sub,
    suspend_on,
)

# -- errors never crash ---------------------------------------------------------------


def test_unknown_kinds_and_searches_are_501(server: Server) -> None:
    status, data = server("promise.frobnicate", id="x")
    assert (status, data) == (501, "not implemented: unknown request kind 'promise.frobnicate'")
    for kind in ("promise.search", "task.search", "schedule.search"):
        status, data = server(kind, state="pending")
        assert status == 501
        assert data.startswith("not implemented: search is not implemented")


def test_a_request_in_a_hosts_transaction_that_fails_part_way_leaves_nothing(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``request_in`` under a host's open transaction: a handler that fails
    after a write (a bug, a storage error) takes its writes back and closes
    its savepoint before the error goes on, so a host that catches it and
    commits commits none of the request."""
    server("promise.create", id="p", timeoutAt=T0 + HOUR)
    db = server.engine.db
    assert db is not None

    def part_way(self: Transitions, db: Any, now: int, data: dict[str, Any]) -> Any:
        db.execute("UPDATE r_promises SET state = 'resolved' WHERE id = 'p'")
        raise ValueError("part way")

    monkeypatch.setitem(HANDLERS, "promise.settle", part_way)
    db.execute("BEGIN IMMEDIATE")
    with pytest.raises(ValueError, match="part way"):
        server.engine.request_in(db, "promise.settle", {"id": "p", "state": "resolved"})
    db.execute("COMMIT")  # the host caught it and went on
    monkeypatch.undo()

    assert not db.in_transaction
    assert server("promise.get", id="p")[1]["promise"]["state"] == "pending"


def test_malformed_requests_are_400(server: Server) -> None:
    raw, out, _ = server.engine.handle(b"{not json")
    assert json.loads(raw)["head"]["status"] == 400
    assert out == []
    assert server("promise.create", timeoutAt="soon")[0] == 400
    assert server("promise.create", id="x")[0] == 400  # no timeoutAt
    assert server("promise.create", id="x", timeoutAt=1.5)[0] == 400
    assert server("promise.create", id="x", timeoutAt=T0 + 1, tags={"n": 1})[0] == 400
    assert server("promise.settle", id="x", state="pending", value={})[0] == 400
    assert server("promise.get", id="x")[0] == 404  # nothing of those was stored


# -- promises ----------------------------------------------------------------------------


def test_create_get_settle_first_wins(server: Server) -> None:
    status, data = server("promise.create", id="p", timeoutAt=T0 + HOUR, param={"data": "MQ=="})
    assert status == 200
    assert data["promise"] == {
        "id": "p",
        "state": "pending",
        "param": {"headers": {}, "data": "MQ=="},
        "value": {"headers": {}, "data": None},
        "tags": {},
        "timeoutAt": T0 + HOUR,
        "createdAt": T0,
        "settledAt": None,
    }
    status, again = server("promise.create", id="p", timeoutAt=T0 + 5, param={})
    assert status == 200 and again["promise"] == data["promise"]

    status, data = server("promise.settle", id="p", state="resolved", value={"data": "Mg=="})
    assert status == 200
    assert data["promise"]["state"] == "resolved"
    assert data["promise"]["settledAt"] == T0
    status, data = server("promise.settle", id="p", state="rejected", value={"data": "Mw=="})
    assert (status, data["promise"]["state"]) == (200, "resolved")
    assert data["promise"]["value"] == {"headers": {}, "data": "Mg=="}
    assert server("promise.get", id="p")[1]["promise"]["value"]["data"] == "Mg=="
    assert server("promise.get", id="nope")[0] == 404
    assert server("promise.settle", id="nope", state="resolved", value={})[0] == 404


def test_create_past_its_deadline_is_already_timed_out(server: Server) -> None:
    _, data = server("promise.create", id="late", timeoutAt=T0 - 1)
    assert data["promise"]["state"] == "rejected_timedout"
    _, data = server("promise.create", id="nap", timeoutAt=T0, tags={"resonate:timer": "true"})
    assert data["promise"]["state"] == "resolved"


def test_values_are_stored_as_headers_and_data(server: Server) -> None:
    server("promise.create", id="p", timeoutAt=T0 + HOUR, param=None)
    _, data = server("promise.settle", id="p", state="resolved", value=None)
    empty: dict[str, Any] = {"headers": {}, "data": None}
    assert data["promise"]["param"] == empty and data["promise"]["value"] == empty
    # headers as sent, data as text (resonate.sql's columns), other keys dropped
    value = {"headers": {"k": "v"}, "data": 7, "extra": True}
    _, data = server("promise.create", id="q", timeoutAt=T0 + HOUR, param=value)
    assert data["promise"]["param"] == {"headers": {"k": "v"}, "data": "7"}


def test_external_promise_times_out_unattended_and_resumes_its_awaiter(server: Server) -> None:
    start(server, "wf")
    fence_create(server, "wf", 1, "wf:1", timeout=1_000)
    server("promise.register_listener", awaited="wf:1", address=ME)
    assert suspend_on(server, "wf", 1, "wf:1")[0] == 200
    server.take()
    server.tick(999)
    assert server.take() == []
    server.tick(1)
    pushed = server.take()
    unblock = next(m for m in pushed if m["kind"] == "unblock")
    assert unblock["data"]["promise"]["state"] == "rejected_timedout"
    assert unblock["data"]["promise"]["value"] == {"headers": {}, "data": None}  # never null
    assert {"kind": "execute", "head": {}, "data": {"task": {"id": "wf", "version": 1}}} in pushed
    # the resumed task is pending again; an acquire at the pushed version wins
    status, data = server("task.acquire", id="wf", version=1, pid="me", ttl=10_000)
    assert status == 200 and data["task"]["version"] == 2


def test_timer_promise_resolves_when_due(server: Server) -> None:
    start(server, "wf")
    server(
        "task.fence",
        id="wf",
        version=1,
        action=sub(
            "promise.create",
            {
                "id": "wf:1",
                "timeoutAt": T0 + 500,
                "tags": {"resonate:timer": "true", "resonate:target": GROUP},
            },
        ),
    )
    server.tick(500)
    assert server("promise.get", id="wf:1")[1]["promise"]["state"] == "resolved"
    assert server("task.get", id="wf:1")[1]["task"]["state"] == "fulfilled"


def test_listener_on_another_process_goes_to_the_outbox(server: Server) -> None:
    server("promise.create", id="p", timeoutAt=T0 + HOUR)
    server("promise.register_listener", awaited="p", address=OTHER)
    server("promise.register_listener", awaited="p", address=ME)
    server("promise.settle", id="p", state="resolved", value={"data": "MQ=="})
    mine = server.take()
    assert [m["kind"] for m in mine] == ["unblock"]
    [(address, body)] = server.outbox()
    assert address == OTHER and body == mine[0]


# -- tasks -----------------------------------------------------------------------------------


def test_task_create_twice_conflicts_and_fulfilled_reports_fulfilled(server: Server) -> None:
    start(server, "wf")
    action = sub("promise.create", {"id": "wf", "timeoutAt": T0 + HOUR, "tags": root_tags("wf")})
    assert server("task.create", pid="other", ttl=1000, action=action)[0] == 409
    server(
        "task.fulfill",
        id="wf",
        version=1,
        action=sub("promise.settle", {"id": "wf", "state": "resolved", "value": {}}),
    )
    status, data = server("task.create", pid="other", ttl=1000, action=action)
    assert status == 200
    assert data["task"] == {
        "id": "wf",
        "state": "fulfilled",
        "version": 1,
        "resumes": 0,
        "ttl": None,
        "pid": None,
    }
    assert data["promise"]["state"] == "resolved"
    # a plain promise has no task to create
    server("promise.create", id="plain", timeoutAt=T0 + HOUR)
    tags = {"resonate:target": GROUP}
    plain = sub("promise.create", {"id": "plain", "timeoutAt": T0 + HOUR, "tags": tags})
    assert server("task.create", pid="x", ttl=1, action=plain)[0] == 422


def test_fence_is_refused_for_a_stale_version_and_applies_nothing(server: Server) -> None:
    start(server, "wf")
    status, data = fence_create(server, "wf", 0, "wf:1")
    assert status == 409
    assert server("promise.get", id="wf:1")[0] == 404
    status, data = fence_create(server, "wf", 1, "wf:1")
    assert status == 200
    assert data["action"]["kind"] == "promise.create"
    assert data["action"]["head"] == {"corrId": "c1", "status": 200, "version": "v"}
    assert data["action"]["data"]["promise"]["id"] == "wf:1"
    assert data["preload"] == []


def test_suspend_redirects_when_an_awaited_promise_already_settled(server: Server) -> None:
    start(server, "wf")
    fence_create(server, "wf", 1, "wf:1")
    server("promise.settle", id="wf:1", state="resolved", value={})
    status, data = suspend_on(server, "wf", 1, "wf:1")
    assert (status, data) == (300, {"preload": []})
    assert server("task.get", id="wf")[1]["task"]["state"] == "acquired"
    assert suspend_on(server, "wf", 1, "missing")[0] == 422
    assert suspend_on(server, "wf", 1, "wf")[0] == 400
    assert suspend_on(server, "nowhere", 1, "nowhere")[0] == 400  # checked before 404


def test_suspend_then_settle_pushes_execute_to_the_group(server: Server) -> None:
    start(server, "wf")
    fence_create(server, "wf", 1, "wf:1")
    assert suspend_on(server, "wf", 1, "wf:1") == (200, {"preload": []})
    assert server("task.get", id="wf")[1]["task"]["state"] == "suspended"
    server.take()
    server("promise.settle", id="wf:1", state="resolved", value={"data": "MQ=="})
    assert server.take() == [
        {"kind": "execute", "head": {}, "data": {"task": {"id": "wf", "version": 1}}}
    ]
    assert server("task.acquire", id="wf", version=0, pid="me", ttl=1)[0] == 409
    assert server("task.acquire", id="wf", version=1, pid="me", ttl=1)[0] == 200


def test_lease_expiry_makes_the_task_pending_and_pushes_execute(server: Server) -> None:
    start(server, "wf", ttl=1_000)
    server.take()
    server.tick(1_000)
    assert server.take() == [
        {"kind": "execute", "head": {}, "data": {"task": {"id": "wf", "version": 1}}}
    ]
    assert server("task.get", id="wf")[1]["task"]["state"] == "pending"
    # the old holder is fenced out; the next acquire runs at version 2
    assert fence_create(server, "wf", 1, "wf:1")[0] == 409
    _, data = server("task.acquire", id="wf", version=1, pid="b", ttl=1_000)
    assert data["task"] == {
        "id": "wf",
        "state": "acquired",
        "version": 2,
        "resumes": 0,
        "pid": "b",
        "ttl": 1_000,
    }


def test_heartbeat_extends_the_lease(server: Server) -> None:
    start(server, "wf", ttl=1_000)
    server.take()
    for _ in range(5):
        server.tick(600)
        assert server("task.heartbeat", pid="me", tasks=[{"id": "wf", "version": 1}])[0] == 200
    assert server.take() == []
    assert server("task.get", id="wf")[1]["task"]["state"] == "acquired"
    # a heartbeat under another pid or version, or none, does nothing
    server("task.heartbeat", pid="intruder", tasks=[{"id": "wf", "version": 1}])
    server("task.heartbeat", pid="me", tasks=[{"id": "wf", "version": 7}])
    server("task.heartbeat", pid="me", tasks=[{"id": "wf"}])
    server.tick(1_000)
    assert server("task.get", id="wf")[1]["task"]["state"] == "pending"


def test_pending_task_is_pushed_again_every_retry_period(server: Server) -> None:
    server("promise.create", id="r", timeoutAt=T0 + HOUR, tags={"resonate:target": GROUP})
    assert len(server.take()) == 1
    server.tick(4_999)
    assert server.take() == []
    server.tick(1)
    assert [m["kind"] for m in server.take()] == ["execute"]
    server.tick(5_000)
    assert [m["kind"] for m in server.take()] == ["execute"]


def test_release_pushes_execute_again(server: Server) -> None:
    start(server, "wf")
    server.take()
    assert server("task.release", id="wf", version=1) == (200, {})  # (resonate.sql: {})
    assert [m["data"]["task"] for m in server.take()] == [{"id": "wf", "version": 1}]
    assert server("task.release", id="wf", version=1)[0] == 409


def test_halt_and_continue(server: Server) -> None:
    start(server, "wf")
    assert server("task.halt", id="wf")[0] == 200
    assert server("task.get", id="wf")[1]["task"]["state"] == "halted"
    server.take()
    assert server("task.continue", id="wf")[0] == 200
    assert [m["kind"] for m in server.take()] == ["execute"]
    assert server("task.continue", id="wf")[0] == 409


def test_execute_for_another_group_goes_to_the_outbox(server: Server) -> None:
    server(
        "promise.create",
        id="r",
        timeoutAt=T0 + HOUR,
        tags={"resonate:target": "poll://any@elsewhere"},
    )
    assert server.take() == []
    [(address, body)] = server.outbox()
    assert address == "poll://any@elsewhere"
    assert body["data"]["task"] == {"id": "r", "version": 0}


# -- several processes -----------------------------------------------------------------------


def test_each_outbox_message_is_claimed_by_exactly_one_connection(tmp_path: Path) -> None:
    db = tmp_path / "claim.db"
    producer = Server(db)  # receives nothing: everything goes to the outbox
    for i in range(300):
        producer("promise.create", id=f"r{i}", timeoutAt=T0 + HOUR, tags={"resonate:target": GROUP})
    claimed: list[list[str]] = [[], [], []]
    failures: list[BaseException] = []
    # all claim at once, not one after another (whether two claims then overlap
    # is up to the scheduler: the next test makes that overlap certain)
    together = threading.Barrier(3, timeout=10)

    def claim(k: int) -> None:
        engine = Engine(db)
        try:
            engine.open(timeout=5)
            together.wait()
            backoff = BusyBackoff(timeout=10)  # then the lock was never let go: a failure
            while True:
                try:
                    msgs = engine.claim([(GROUP, 7)])
                except StoreBusy:  # another claimer holds the write lock
                    delay = backoff.next_delay()
                    if delay is None:
                        raise
                    time.sleep(delay)
                    continue
                backoff.reset()
                if not msgs:
                    break
                claimed[k] += [json.loads(m)["data"]["task"]["id"] for m in msgs]
        except BaseException as exc:  # anything else is a failure of the test, at once
            failures.append(exc)
        finally:
            engine.close()

    threads = [threading.Thread(target=claim, args=(k,), daemon=True) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "a claimer is stuck"
    assert failures == []
    every = claimed[0] + claimed[1] + claimed[2]
    assert sorted(every) == sorted(f"r{i}" for i in range(300))
    assert len(set(every)) == 300


def test_a_claim_made_while_another_is_taking_its_rows_finds_the_lock_taken(
    tmp_path: Path,
) -> None:
    """The interleaving the threads above may or may not hit, made certain: b
    claims while a is between reading its rows and deleting them."""
    db = tmp_path / "claim2.db"
    producer = Server(db)
    for i in range(4):
        producer("promise.create", id=f"r{i}", timeoutAt=T0 + HOUR, tags={"resonate:target": GROUP})
    a, b = Engine(db), Engine(db)
    a.open(timeout=5)
    b.open(timeout=5)
    assert a.db is not None
    meanwhile: list[object] = []

    def inside_a(statement: str) -> None:  # sqlite3 swallows what a trace callback raises
        if statement.lstrip().upper().startswith("DELETE") and not meanwhile:
            try:
                meanwhile.append(b.claim([(GROUP, 4)]))
            except Exception as exc:
                meanwhile.append(exc)

    def ids(msgs: list[str]) -> list[str]:
        return [json.loads(m)["data"]["task"]["id"] for m in msgs]

    a.db.set_trace_callback(inside_a)
    got_a = ids(a.claim([(GROUP, 2)]))
    a.db.set_trace_callback(None)
    assert len(meanwhile) == 1 and isinstance(meanwhile[0], StoreBusy), meanwhile
    got_b = ids(b.claim([(GROUP, 4)]))
    assert got_a == ["r0", "r1"]  # oldest first
    assert got_b == ["r2", "r3"]
    a.close()
    b.close()


def test_dead_processes_lose_their_listeners_and_messages(server: Server) -> None:
    engine = server.engine
    engine.register_process("other", "g", OTHER, GROUP)
    engine.register_process("me", "g", ME, GROUP)
    server("promise.create", id="p", timeoutAt=T0 + HOUR)
    server("promise.create", id="q", timeoutAt=T0 + HOUR)
    server("promise.register_listener", awaited="p", address=OTHER)
    server("promise.register_listener", awaited="q", address=OTHER)
    server("promise.settle", id="p", state="resolved", value={})
    assert [a for a, _ in server.outbox()] == [OTHER]
    server.clock.now += 10_000
    engine.beat_process("me", "g", ME, GROUP)
    assert engine.reap_processes(5_000) == ["other"]
    assert server.outbox() == []
    assert engine.db is not None
    assert engine.db.execute("SELECT count(*) FROM r_listeners").fetchone()[0] == 0
    assert [r[0] for r in engine.db.execute("SELECT pid FROM r_processes")] == ["me"]


# -- retention --------------------------------------------------------------------------------


def finish(server: Server, root: str) -> None:
    start(server, root)
    fence_create(server, root, 1, f"{root}:1")
    server(
        "task.fence",
        id=root,
        version=1,
        action=sub("promise.settle", {"id": f"{root}:1", "state": "resolved", "value": {}}),
    )
    server(
        "task.fulfill",
        id=root,
        version=1,
        action=sub("promise.settle", {"id": root, "state": "resolved", "value": {}}),
    )


def count(server: Server, table: str) -> int:
    assert server.engine.db is not None
    return int(server.engine.db.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


def test_gc_deletes_finished_lineages_and_never_pending_work(server: Server) -> None:
    finish(server, "old")
    server("promise.create", id="plain-old", timeoutAt=T0 + HOUR)
    server("promise.settle", id="plain-old", state="resolved", value={})
    # a finished root whose lineage still has a pending (detached) member
    finish(server, "busy")
    fence = sub(
        "promise.create",
        {
            "id": "busy:d1",
            "timeoutAt": T0 + HOUR,
            "tags": {"resonate:origin": "busy", "resonate:target": GROUP},
        },
    )
    server("promise.create", **fence["data"])
    start(server, "running")  # pending
    server.clock.now += 60_000
    finish(server, "recent")

    def gc(older_than: int) -> int:
        total, cursor = 0, (-1, "")
        while cursor is not None:
            deleted, cursor = server.engine.gc_batch(server.clock.now - older_than, cursor, 2)
            total += deleted
        return total

    assert gc(30_000) == 3  # old, old:1, plain-old
    ids = {r[0] for r in server.engine.db.execute("SELECT id FROM r_promises")}  # type: ignore[union-attr]
    assert ids == {"busy", "busy:1", "busy:d1", "running", "recent", "recent:1"}
    assert gc(0) == 2  # recent, recent:1 -- busy and running stay
    assert count(server, "r_callbacks") == 0


async def test_connection_gc(tmp_path: Path) -> None:
    from resonate_sqlite.connection import SqliteConnection

    conn = SqliteConnection(tmp_path / "gc.db")
    for i in range(5):
        req = {
            "kind": "promise.create",
            "head": {"corrId": "c"},
            "data": {"id": f"p{i}", "timeoutAt": 2**60},
        }
        await conn.send(json.dumps(req))
    req = {
        "kind": "promise.settle",
        "head": {"corrId": "c"},
        "data": {"id": "p0", "state": "resolved", "value": {}},
    }
    await conn.send(json.dumps(req))
    assert await conn.gc(3_600_000) == 0
    assert await conn.gc(0) == 1
    await conn.stop()


# -- group commit -------------------------------------------------------------------------


def req(kind: str, **data: Any) -> str:
    return json.dumps({"kind": kind, "head": {"corrId": kind}, "data": data})


def test_a_batch_applies_in_order_and_each_request_is_atomic(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    from resonate_sqlite import engine as sqlite_engine

    real = sqlite_engine.Engine._settle_req

    def flaky(self: Engine, db: Any, now: int, pid: Any, state: Any, value: Any) -> Any:
        status, data = real(self, db, now, pid, state, value)  # writes, then blows up
        if pid == "boom":
            raise RuntimeError("bug")
        return status, data

    monkeypatch.setattr(sqlite_engine.Engine, "_settle_req", flaky)
    answers = server.engine.handle_batch(
        [
            req("promise.create", id="a", timeoutAt=T0 + HOUR),
            req("promise.create", id="boom", timeoutAt=T0 + HOUR),
            req("promise.settle", id="a", state="resolved", value={}),  # sees the create
            req("promise.settle", id="boom", state="resolved", value={}),  # rolled back alone
            req("promise.get", id="boom"),
            req("promise.create", id="c", timeoutAt="later"),  # refused: a 400
            "not json",
        ]
    )
    assert isinstance(answers[3], RuntimeError)
    statuses = [json.loads(a[0])["head"]["status"] for a in answers if not isinstance(a, Exception)]
    assert statuses == [200, 200, 200, 200, 400, 400]
    assert server("promise.get", id="a")[1]["promise"]["state"] == "resolved"
    assert server("promise.get", id="boom")[1]["promise"]["state"] == "pending"


async def test_concurrent_sends_share_a_transaction(tmp_path: Path) -> None:
    import asyncio

    from resonate_sqlite.connection import SqliteConnection

    conn = SqliteConnection(tmp_path / "batch.db")
    await conn.start()
    before = conn._engine.commits
    answers = await asyncio.gather(
        *(conn.send(req("promise.create", id=f"p{i}", timeoutAt=2**60)) for i in range(50))
    )
    assert [json.loads(a)["head"]["status"] for a in answers] == [200] * 50
    assert conn._engine.commits - before < 5  # 50 requests, a handful of transactions
    await conn.stop()
