"""Schedules: create, get, delete, and the timer that fires them as
resonate.sql does (a ``promise.create`` at every cron minute, missed ones too)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from resonate.resonate import Resonate
from resonate.types import TaskData, Value

from resonate_sqlite.connection import SqliteConnection
from tests.resonate_sqlite.conformance.helpers import stays, until
from tests.resonate_sqlite.protocol_server import GROUP, Server

MINUTE = 60_000
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z, a minute boundary


def create(server: Server, sid: str = "s", **over: Any) -> tuple[int, Any]:
    data: dict[str, Any] = {
        "id": sid,
        "cron": "*/2 * * * *",
        "promiseId": "run-{{.id}}-{{.timestamp}}",
        "promiseTimeout": 10 * MINUTE,
        "promiseParam": {"data": "e30="},
        "promiseTags": {"resonate:target": GROUP},
    }
    return server("schedule.create", **(data | over))


def promise_ids(server: Server) -> list[str]:
    assert server.engine.db is not None
    return [r[0] for r in server.engine.db.execute("SELECT id FROM r_promises ORDER BY id")]


def test_create_get_delete(tmp_path: Path) -> None:
    server = Server(tmp_path / "s.db")
    server.clock.now = T0 + 30_000
    status, data = create(server)
    assert status == 200
    assert data["schedule"] == {
        "id": "s",
        "cron": "*/2 * * * *",
        "promiseId": "run-{{.id}}-{{.timestamp}}",
        "promiseTimeout": 10 * MINUTE,
        "promiseParam": {"headers": {}, "data": "e30="},
        "promiseTags": {"resonate:target": GROUP},
        "nextRunAt": T0 + 2 * MINUTE,
        "lastRunAt": None,
        "createdAt": T0 + 30_000,
    }
    # a second create returns the first, whatever it carries
    assert create(server, cron="not cron") == (200, data)
    assert server("schedule.get", id="s") == (200, data)
    assert server("schedule.delete", id="s") == (200, {})
    assert server("schedule.get", id="s")[0] == 404
    assert server("schedule.delete", id="s")[0] == 404


def test_bad_schedules_are_refused(tmp_path: Path) -> None:
    server = Server(tmp_path / "s.db")
    assert create(server, cron="* * * *")[1] == (
        "bad request: unsupported cron (need 5 fields): '* * * *'"
    )
    assert create(server, cron="0 0 31 2 *")[0] == 400  # never fires
    assert create(server, promiseId=None)[0] == 400
    assert create(server, promiseTimeout="soon")[0] == 400
    assert create(server, promiseTags={"n": 1})[0] == 400
    assert server("schedule.get", id="s")[0] == 404


def test_the_timer_creates_a_promise_at_each_run(tmp_path: Path) -> None:
    server = Server(tmp_path / "s.db")
    server.clock.now = T0
    create(server)
    server.tick(2 * MINUTE - 1)
    assert promise_ids(server) == []
    server.tick(1)
    first = f"run-s-{T0 + 2 * MINUTE}"
    assert promise_ids(server) == [first]
    _, data = server("promise.get", id=first)
    assert data["promise"]["createdAt"] == T0 + 2 * MINUTE
    assert data["promise"]["timeoutAt"] == T0 + 12 * MINUTE
    assert data["promise"]["param"] == {"headers": {}, "data": "e30="}
    assert server("task.get", id=first)[1]["task"]["state"] == "pending"
    [(address, body)] = server.outbox()  # its execute, for the target
    assert (address, body["data"]["task"]) == (GROUP, {"id": first, "version": 0})
    _, data = server("schedule.get", id="s")
    assert (data["schedule"]["lastRunAt"], data["schedule"]["nextRunAt"]) == (
        T0 + 2 * MINUTE,
        T0 + 4 * MINUTE,
    )


def test_missed_runs_all_fire_each_at_its_own_time(tmp_path: Path) -> None:
    server = Server(tmp_path / "s.db")
    server.clock.now = T0
    create(server)
    server.tick(7 * MINUTE)  # runs at 2, 4 and 6 were due
    assert promise_ids(server) == [f"run-s-{T0 + k * MINUTE}" for k in (2, 4, 6)]
    _, data = server("promise.get", id=f"run-s-{T0 + 2 * MINUTE}")
    assert data["promise"]["createdAt"] == T0 + 2 * MINUTE
    assert server("schedule.get", id="s")[1]["schedule"]["nextRunAt"] == T0 + 8 * MINUTE


def test_a_fixed_promise_id_is_created_once_and_delete_stops_the_runs(tmp_path: Path) -> None:
    server = Server(tmp_path / "s.db")
    server.clock.now = T0
    create(server, promiseId="nightly", promiseTags={})
    server.tick(5 * MINUTE)
    assert promise_ids(server) == ["nightly"]
    server("schedule.delete", id="s")
    server("promise.settle", id="nightly", state="resolved", value={})
    server.tick(10 * MINUTE)
    assert promise_ids(server) == ["nightly"]


async def test_a_schedule_runs_a_workflow_through_the_sdk(tmp_path: Path) -> None:
    """End to end: the connection's timer fires the schedule, the SDK runs
    the function its promise names."""
    conn = SqliteConnection(tmp_path / "sdk.db", group="g", pid="p", timer_interval=0.02)
    await conn.start()
    r = Resonate(network=conn, group="g", pid="p")
    ran: list[str] = []

    async def tick(ctx: object, name: str) -> str:
        ran.append(name)
        return name

    r.register(tick)
    param = Value(data=TaskData(func="tick", args=("cron",), kwargs={}, version=1))
    tags = {"resonate:target": conn.resolve_target("g")}
    # yearly: the run forced below is the only one due while the test runs
    await r.schedules.create("yearly", "0 0 1 1 *", "tick-{{.timestamp}}", 60_000, param, tags)
    schedule = await r.schedules.get("yearly")
    # run it now rather than next January
    assert conn._engine.db is not None
    conn._engine.db.execute(
        "UPDATE r_schedules SET next_run_at = ? WHERE id = 'yearly'",
        (schedule.created_at,),
    )
    db = conn._engine.db

    def runs() -> list[tuple[str, str, str]]:
        return db.execute("SELECT id, state, value FROM r_promises ORDER BY id").fetchall()

    first = f"tick-{schedule.created_at}"
    await until(lambda: [(pid, state) for pid, state, _ in runs()] == [(first, "resolved")])
    # once: the schedule moved on to next year, and nothing else runs meanwhile
    await stays(lambda: ran == ["cron"] and len(runs()) == 1, 0.5, "the schedule ran again")
    [(_, _, value)] = runs()
    assert json.loads(value)["data"] is not None
    created = datetime.fromtimestamp(schedule.created_at / 1000, UTC)
    next_year = datetime(created.year + 1, 1, 1, tzinfo=UTC)
    [(next_run_at,)] = db.execute("SELECT next_run_at FROM r_schedules").fetchall()
    assert next_run_at == int(next_year.timestamp()) * 1000
    await r.stop()
