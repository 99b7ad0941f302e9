"""A request costs the same with 100 or 100,000 promises stored.

Two checks that can fail (neither is a timing):

* every statement on the request, timer and delivery paths is planned as an
  index search (``EXPLAIN QUERY PLAN`` has no ``SCAN`` of a table), with the
  index we meant;
* the number of SQLite virtual-machine instructions each request of a
  workflow executes is identical on a small and on a large store (a scan would
  add instructions per stored row; a deeper b-tree adds none).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from resonate_sqlite.engine import Engine
from resonate_sqlite.schema import HOT_QUERIES

EXPECTED_INDEX = {
    "due_promises": "r_promises_due",
    "due_tasks": "r_tasks_due",
    "due_schedules": "r_schedules_due",
    "gc_roots": "r_roots_settled",
    "outbox_next": "r_outbox_address",
    "outbox_peek": "r_outbox_address",
    "outbox_drop_address": "r_outbox_address",
    "callbacks_scrub": "r_callbacks_awaiter",
    "listeners_drop_address": "r_listeners_address",
    "process_dead": "r_processes_heartbeat",
}


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    e = Engine(tmp_path / "plans.db")
    e.open(timeout=1)
    return e


@pytest.mark.parametrize("name", sorted(HOT_QUERIES))
def test_every_hot_statement_is_an_index_search(engine: Engine, name: str) -> None:
    sql = HOT_QUERIES[name]
    params = tuple(0 for _ in range(sql.count("?")))
    plan = engine.explain(sql, params)
    scans = [line for line in plan if re.match(r"SCAN (r_\w+)", line)]
    assert not scans, f"{name} scans a table: {plan}"
    if name in EXPECTED_INDEX:
        assert any(EXPECTED_INDEX[name] in line for line in plan), f"{name}: {plan}"


ADDR = "poll://any@g"
UNI = "poll://uni@g/p1"
T0 = 1_700_000_000_000


def env(kind: str, data: dict[str, Any]) -> bytes:
    return json.dumps(
        {"kind": kind, "head": {"corrId": "c", "version": "v"}, "data": data}
    ).encode()


def sub(kind: str, data: dict[str, Any]) -> dict[str, Any]:
    return {"kind": kind, "head": {"corrId": "s", "version": "v"}, "data": data}


def workflow(root: str) -> list[bytes]:
    """The requests resonate-sdk sends for one workflow with one step and one
    external promise settled from outside (the shape of a Tether job)."""
    p, s = f"{root}:1", f"{root}:2"
    far = T0 + 3_600_000
    rtags = {
        "resonate:origin": root,
        "resonate:branch": root,
        "resonate:parent": root,
        "resonate:scope": "global",
        "resonate:target": ADDR,
    }
    ptags = {
        "resonate:scope": "global",
        "resonate:branch": p,
        "resonate:parent": root,
        "resonate:origin": root,
        "resonate:external": "true",
    }
    stags = {
        "resonate:scope": "local",
        "resonate:branch": root,
        "resonate:parent": root,
        "resonate:origin": root,
    }
    create_p = sub("promise.create", {"id": p, "timeoutAt": far, "param": {}, "tags": ptags})
    create_s = sub("promise.create", {"id": s, "timeoutAt": far, "param": {}, "tags": stags})
    return [
        env(
            "task.create",
            {
                "pid": "p1",
                "ttl": 60000,
                "action": sub(
                    "promise.create",
                    {"id": root, "timeoutAt": far, "param": {"data": "e30="}, "tags": rtags},
                ),
            },
        ),
        env("promise.register_listener", {"awaited": root, "address": UNI}),
        env("task.heartbeat", {"pid": "p1", "tasks": [{"id": root, "version": 1}]}),
        env("task.fence", {"id": root, "version": 1, "action": create_p}),
        env("task.fence", {"id": root, "version": 1, "action": create_s}),
        env(
            "task.fence",
            {
                "id": root,
                "version": 1,
                "action": sub(
                    "promise.settle", {"id": s, "state": "resolved", "value": {"data": "Mg=="}}
                ),
            },
        ),
        env(
            "task.suspend",
            {
                "id": root,
                "version": 1,
                "actions": [sub("promise.register_callback", {"awaited": p, "awaiter": root})],
            },
        ),
        env("promise.settle", {"id": p, "state": "resolved", "value": {"data": "Mg=="}}),
        env("task.acquire", {"id": root, "version": 1, "pid": "p1", "ttl": 60000}),
        env("task.fence", {"id": root, "version": 2, "action": create_p}),
        env("task.fence", {"id": root, "version": 2, "action": create_s}),
        env(
            "task.fulfill",
            {
                "id": root,
                "version": 2,
                "action": sub(
                    "promise.settle", {"id": root, "state": "resolved", "value": {"data": "Mg=="}}
                ),
            },
        ),
        env("promise.get", {"id": p}),
    ]


def fill(engine: Engine, n: int) -> None:
    """``n`` lineages of stored state: settled roots and steps, suspended
    workflows with pending external promises (timers in the future), their
    callbacks and listeners, and messages for other processes."""
    db = engine.db
    assert db is not None
    cols = (
        "id, state, param, value, tags, target, is_timer, timeout_at, created_at, "
        "settled_at, t_state, t_version, t_pid, t_ttl, t_due, origin"
    )
    rows = []
    for i in range(n):
        root = f"old{i:07d}"
        tags = json.dumps({"resonate:origin": root, "resonate:target": ADDR})
        if i % 2:
            rows.append(
                (
                    root,
                    "resolved",
                    "{}",
                    "{}",
                    tags,
                    ADDR,
                    0,
                    T0 + 9e9,
                    T0 - 9e6,
                    T0 - 8e6,
                    "fulfilled",
                    2,
                    None,
                    None,
                    None,
                    root,
                )
            )
            rows.append(
                (
                    f"{root}:1",
                    "resolved",
                    "{}",
                    "{}",
                    "{}",
                    None,
                    0,
                    T0 + 9e9,
                    T0 - 9e6,
                    T0 - 8e6,
                    None,
                    None,
                    None,
                    None,
                    None,
                    root,
                )
            )
        else:
            rows.append(
                (
                    root,
                    "pending",
                    "{}",
                    "{}",
                    tags,
                    ADDR,
                    0,
                    T0 + 9e9,
                    T0 - 9e6,
                    None,
                    "suspended",
                    1,
                    None,
                    None,
                    None,
                    root,
                )
            )
            rows.append(
                (
                    f"{root}:1",
                    "pending",
                    "{}",
                    "{}",
                    "{}",
                    None,
                    0,
                    T0 + 9e9,
                    T0 - 9e6,
                    None,
                    None,
                    None,
                    None,
                    None,
                    None,
                    root,
                )
            )
    db.execute("BEGIN")
    db.executemany(f"INSERT INTO r_promises ({cols}) VALUES ({','.join('?' * 16)})", rows)
    db.executemany(
        "INSERT INTO r_callbacks VALUES (?, ?)",
        [(f"old{i:07d}:1", f"old{i:07d}") for i in range(0, n, 2)],
    )
    db.executemany(
        "INSERT INTO r_listeners VALUES (?, ?)",
        [(f"old{i:07d}", f"poll://uni@g/x{i % 7}") for i in range(0, n, 2)],
    )
    db.executemany(
        "INSERT INTO r_outbox (key, address, body) VALUES (?, ?, ?)",
        [(f"x:old{i:07d}", "poll://any@other", "{}") for i in range(0, n, 4)],
    )
    db.execute("COMMIT")
    db.execute("ANALYZE")


def vm_instructions(engine: Engine, fn: Any) -> int:
    """SQLite VM instructions ``fn`` executes on ``engine``'s connection."""
    db = engine.db
    assert db is not None
    count = 0

    def tick() -> int:
        nonlocal count
        count += 1
        return 0

    db.set_progress_handler(tick, 1)
    try:
        fn()
    finally:
        db.set_progress_handler(None, 1)
    return count


def profile(engine: Engine) -> list[tuple[str, int]]:
    out = []
    for req in workflow("job-42"):
        kind = json.loads(req)["kind"]
        result: list[Any] = []
        ops = vm_instructions(
            engine, lambda req=req, result=result: result.append(engine.handle(req))
        )
        status = json.loads(result[0][0])["head"]["status"]
        assert status < 400, (kind, result[0][0])
        out.append((kind, ops))
    out.append(("timers.due", vm_instructions(engine, lambda: engine.due(100))))
    out.append(
        ("outbox.claim", vm_instructions(engine, lambda: engine.claim([(UNI, 100), (ADDR, 100)])))
    )
    return out


def test_request_cost_does_not_depend_on_store_size(tmp_path: Path) -> None:
    costs = {}
    for n in (100, 100_000):
        engine = Engine(tmp_path / f"size-{n}.db", clock=lambda: T0, local_addresses={ADDR, UNI})
        engine.open(timeout=1)
        fill(engine, n)
        costs[n] = profile(engine)
        engine.close()
    small, large = costs[100], costs[100_000]
    assert [k for k, _ in small] == [k for k, _ in large]
    for (kind, a), (_, b) in zip(small, large, strict=True):
        assert a == b, f"{kind}: {a} VM instructions with 100 lineages, {b} with 100,000"
