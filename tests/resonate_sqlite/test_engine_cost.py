"""What a request costs the engine, and that the cheap paths answer as the full ones.

* A batch in which nothing is refused runs under one savepoint, not one per
  request; a batch with a refused or failing request runs again, each request
  under its own savepoint, and answers, stores and delivers exactly what the
  requests would one at a time.
* The task lease is checked on a narrow read (task.fence, task.suspend,
  task.release; the fence reads its inner promise in the same statement) and
  on the whole row (task.fulfill): every refusal reads the same on all of them.
* The statements a workflow's requests run, counted: a regression shows here.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from resonate_sqlite import engine as sqlite_engine
from resonate_sqlite.engine import Engine
from tests.resonate_sqlite.protocol_server import (
    GROUP,
    HOUR,
    ME,
    T0,
    Server,
    fence_create,
    root_tags,
    start,
    sub,
)


def req(kind: str, **data: Any) -> str:
    return json.dumps({"kind": kind, "head": {"corrId": kind, "version": "v"}, "data": data})


def count_statements(engine: Engine) -> Counter[str]:
    """Every statement the engine's connection runs from now on, by its first words."""
    counts: Counter[str] = Counter()
    assert engine.db is not None

    def trace(sql: str) -> None:
        words = sql.split()
        head = words[0].upper()
        counts[" ".join(words[:2]).upper() if head in ("ROLLBACK", "RELEASE") else head] += 1

    engine.db.set_trace_callback(trace)
    return counts


def root(pid: str) -> str:
    """promise.create of a workflow root: its task's execute goes to GROUP."""
    return req("promise.create", id=pid, timeoutAt=T0 + HOUR, tags=root_tags(pid))


def answers_of(out: list[Any]) -> list[Any]:
    return [
        type(a).__name__ if isinstance(a, Exception) else (json.loads(a[0]), a[1], a[2])
        for a in out
    ]


# -- group commit -----------------------------------------------------------------------


def test_a_batch_with_nothing_refused_takes_one_savepoint(server: Server) -> None:
    counts = count_statements(server.engine)
    out = server.engine.handle_batch([root(f"wf{i}") for i in range(5)])
    assert [json.loads(a[0])["head"]["status"] for a in out] == [200] * 5  # type: ignore[index]
    assert counts["SAVEPOINT"] == 1
    assert counts["RELEASE R"] == counts["ROLLBACK TO"] == 0
    assert counts["BEGIN"] == counts["COMMIT"] == 1


BATCH = [
    root("a"),  # dispatches an execute in process
    root("b"),
    req("promise.create", id="c", timeoutAt="later"),  # refused: 400, nothing stored
    root("d"),
    req("promise.settle", id="a", state="resolved", value={}),  # sees a's create
    "not json",
    req("promise.get", id="c"),
]


def run_alone(tmp_path: Path, reqs: list[str], room: int) -> tuple[list[Any], int]:
    server = Server(tmp_path / "alone.db", local={GROUP, ME})
    server.engine.local_room = room
    out = [server.engine.handle(r) for r in reqs]
    return answers_of(out), server.engine.local_room


@pytest.mark.parametrize("room", [10, 1])
def test_a_refused_request_sends_the_batch_again_with_the_same_answers(
    server: Server, tmp_path: Path, room: int
) -> None:
    server.engine.local_room = room
    counts = count_statements(server.engine)
    out = answers_of(server.engine.handle_batch(BATCH))
    alone, room_alone = run_alone(tmp_path, BATCH, room)
    assert out == alone
    assert [a[0]["head"]["status"] for a in out] == [200, 200, 400, 200, 200, 400, 404]
    # each execute once: none from the first run, which was rolled back
    executes = [m for a in out for m in a[1] if '"execute"' in m]
    assert len(executes) == min(room, 3)
    assert server.engine.local_room == room_alone == max(room - 3, 0)
    assert counts["ROLLBACK TO"] == 2  # the batch's savepoint, then c's own
    assert counts["COMMIT"] == 1
    assert server("promise.get", id="a")[1]["promise"]["state"] == "resolved"
    # past the room, executes wait in the outbox, written once
    assert [body["data"]["task"]["id"] for _, body in server.outbox()] == ["a", "b", "d"][room:]


def test_a_request_that_fails_is_rolled_back_alone(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = sqlite_engine.Engine._settle_req
    calls: list[str | None] = []

    def flaky(self: Engine, db: Any, now: int, pid: Any, *args: Any) -> Any:
        calls.append(pid)
        answer = real(self, db, now, pid, *args)  # writes, then blows up
        if pid == "b":
            raise RuntimeError("bug")
        return answer

    monkeypatch.setattr(sqlite_engine.Engine, "_settle_req", flaky)
    out = server.engine.handle_batch(
        [
            root("a"),
            root("b"),
            req("promise.settle", id="a", state="resolved", value={}),
            req("promise.settle", id="b", state="resolved", value={}),
            req("promise.get", id="b"),
        ]
    )
    assert isinstance(out[3], RuntimeError)
    assert [json.loads(a[0])["head"]["status"] for a in out if isinstance(a, tuple)] == [200] * 4
    assert calls == ["a", "b", "a", "b"]  # together, then each on its own
    assert len([m for a in out if isinstance(a, tuple) for m in a[1]]) == 2  # a's, b's execute
    assert server("promise.get", id="a")[1]["promise"]["state"] == "resolved"
    assert server("promise.get", id="b")[1]["promise"]["state"] == "pending"


# -- the lease --------------------------------------------------------------------------


def lease_requests(tid: str, version: int) -> dict[str, tuple[str, dict[str, Any]]]:
    """Every request that needs task ``tid`` held at ``version``."""
    create = sub("promise.create", {"id": f"{tid}:x", "timeoutAt": T0 + HOUR})
    settle = sub("promise.settle", {"id": f"{tid}:x", "state": "resolved", "value": {}})
    await_x = sub("promise.register_callback", {"awaited": f"{tid}:x", "awaiter": tid})
    fulfill = sub("promise.settle", {"id": tid, "state": "resolved", "value": {}})
    common = {"id": tid, "version": version}
    return {
        "fence create": ("task.fence", common | {"action": create}),
        "fence settle": ("task.fence", common | {"action": settle}),
        "suspend": ("task.suspend", common | {"actions": [await_x]}),
        "release": ("task.release", common),
        "fulfill": ("task.fulfill", common | {"action": fulfill}),
    }


def refusals(server: Server, tid: str, version: int) -> dict[str, tuple[int, Any]]:
    return {
        name: server(kind, **data) for name, (kind, data) in lease_requests(tid, version).items()
    }


def test_every_task_request_refuses_a_missing_lease_alike(server: Server) -> None:
    start(server, "wf")  # acquired at version 1
    server("promise.create", id="plain", timeoutAt=T0 + HOUR)  # a promise with no task
    server("promise.create", id="queued", timeoutAt=T0 + HOUR, tags=root_tags("queued"))
    cases = {
        ("nowhere", 1): (404, "not found: task nowhere not found"),
        ("plain", 1): (404, "not found: task plain not found"),
        ("queued", 0): (409, "conflict: task queued is pending, not acquired"),
        ("wf", 2): (409, "conflict: task wf is at version 1, not 2"),
    }
    for (tid, version), expected in cases.items():
        got = refusals(server, tid, version)
        assert got == dict.fromkeys(got, expected), (tid, version)
    server.clock.now = T0 + HOUR  # the promise's deadline: no longer live
    expected = (409, "conflict: the promise of task wf is settled or timed out")
    got = refusals(server, "wf", 1)
    assert got == dict.fromkeys(got, expected)


def test_a_fence_reads_its_lease_and_its_promise_in_one_statement(server: Server) -> None:
    start(server, "wf")
    fence_create(server, "wf", 1, "wf:1")
    counts = count_statements(server.engine)
    status, data = fence_create(server, "wf", 1, "wf:1")  # again: the stored promise
    assert status == 200
    assert data["action"]["data"]["promise"]["id"] == "wf:1"
    assert counts == Counter({"BEGIN": 1, "SELECT": 1, "COMMIT": 1})
