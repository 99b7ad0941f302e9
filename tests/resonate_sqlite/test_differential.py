"""The engine against the reference: resonate-pg's ``resonate.sql`` on Postgres.

Seeded random sequences of protocol requests and clock ticks go to both a
fresh :class:`~resonate_sqlite.engine.Engine` and a ``resonate.sql`` database
on the same clock (the engine's ``clock``; ``head["resonate:debug_time"]`` and
``process_timeouts(now)`` for the reference). After every step the answers and
the whole stored state (promises, tasks, callbacks, listeners, schedules,
outbox) must be equal once normalised. Each normalisation, and each thing the
generator leaves out, is one of the differences numbered in
``resonate_sqlite/README.md``:

* (1) every promise times out at its deadline: an internal promise past its
  deadline is compared as timed out, without its listeners, and the engine's
  ``unblock`` of that timeout is not compared;
* (2) awaiting an internal promise is allowed: no sequence awaits one;
* (3) error ``data``: only resonate.sql's status text is compared;
* (4) tags: the sequences send objects of strings only;
* (5) a heartbeat's version is an integer or a string of digits;
* (6) a schedule's tags never carry a bad ``resonate:delay``;
* (7) a task's timer is compared only while it runs (pending or acquired).

``test_cron_matches_resonate_sql`` also compares the cron reading with
resonate.sql's ``_next_cron`` on random specs.

Runs when ``TETHER_TEST_PG_DSN`` names a database with resonate.sql (commit
9187493 or later) applied whose role may ``CREATE DATABASE``; skips otherwise.
"""

from __future__ import annotations

import json
import os
import random
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from resonate_sqlite.engine import Engine
from tests.pg import drop_pg_database, fresh_pg_database, pg_dsn

pytestmark = pytest.mark.postgres  # every test here runs against resonate.sql

SEED = 20260401
SEQUENCES = 150
STEPS = 80
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
HOUR = 3_600_000

SKIP_NO_PG = (
    "differential test: set TETHER_TEST_PG_DSN to a Postgres database with resonate-pg's "
    "resonate.sql (commit 9187493 or later) applied, whose role may CREATE DATABASE"
)

RESET = (
    "TRUNCATE resonate.outbox, resonate.listeners, resonate.callbacks, resonate.task_resumes, "
    "resonate.tasks, resonate.schedules, resonate.promises CASCADE"
)


# -- the two servers -------------------------------------------------------------------


class Reference:
    """resonate.sql on one Postgres connection."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def send(self, req: dict[str, Any], now: int) -> dict[str, Any]:
        from psycopg.types.json import Jsonb

        req = dict(req)
        head = dict(req.get("head") or {})
        head["resonate:debug_time"] = now
        req["head"] = head
        row = self.conn.execute("SELECT resonate.resonate_rpc(%s)", (Jsonb(req),)).fetchone()
        return row[0]  # type: ignore[no-any-return]

    def tick(self, now: int) -> None:
        self.conn.execute("SELECT resonate.process_timeouts(%s)", (now,))

    def reset(self) -> None:
        self.conn.execute(RESET)

    def snapshot(self) -> dict[str, Any]:
        q = self.conn.execute
        promises = {
            r[0]: {
                "state": r[1],
                "param": {"headers": r[2], "data": r[3]},
                "value": {"headers": r[4], "data": r[5]},
                "tags": r[6],
                "timeoutAt": r[7],
                "createdAt": r[8],
                "settledAt": r[9],
            }
            for r in q(
                "SELECT id, state, param_headers, param_data, value_headers, value_data, tags, "
                "timeout_at, created_at, settled_at FROM resonate.promises"
            )
        }
        tasks = {
            r[0]: {
                "state": r[1],
                "version": r[2],
                "resumes": r[3],
                "ttl": r[4],
                "pid": r[5],
                "due": r[6],
            }
            for r in q(
                "SELECT t.id, t.state, t.version, (SELECT count(*) FROM resonate.task_resumes x "
                "WHERE x.task_id = t.id), t.ttl, t.pid, t.timeout_at FROM resonate.tasks t"
            )
        }
        schedules = {
            r[0]: {
                "cron": r[1],
                "promiseId": r[2],
                "promiseTimeout": r[3],
                "promiseParam": {"headers": r[4], "data": r[5]},
                "promiseTags": r[6],
                "createdAt": r[7],
                "nextRunAt": r[8],
                "lastRunAt": r[9],
            }
            for r in q(
                "SELECT id, cron, promise_id, promise_timeout, promise_param_headers, "
                "promise_param_data, promise_tags, created_at, next_run_at, last_run_at "
                "FROM resonate.schedules"
            )
        }
        outbox = [
            ("execute", r[1], r[2], r[3]) if r[0] == "execute" else ("unblock", r[1], r[4])
            for r in q("SELECT kind, address, task_id, version, promise FROM resonate.outbox")
        ]
        return {
            "promises": promises,
            "tasks": tasks,
            "callbacks": sorted(q("SELECT awaited_id, awaiter_id FROM resonate.callbacks")),
            "listeners": sorted(q("SELECT awaited_id, address FROM resonate.listeners")),
            "schedules": schedules,
            "outbox": outbox,
        }


class Subject:
    """The engine on a fresh file, on the test's clock."""

    def __init__(self, path: Path, clock: Callable[[], int]) -> None:
        self.engine = Engine(path, clock=clock)
        self.engine.open(timeout=1)

    def send(self, req: dict[str, Any]) -> dict[str, Any]:
        raw, _, _ = self.engine.handle(json.dumps(req))
        return json.loads(raw)  # type: ignore[no-any-return]

    def tick(self) -> None:
        # one pass, as one process_timeouts(now)
        self.engine.fire(*self.engine.due(100_000))

    def snapshot(self) -> dict[str, Any]:
        db = self.engine.db
        assert db is not None
        promises, tasks = {}, {}
        for r in db.execute(
            "SELECT id, state, param, value, tags, timeout_at, created_at, settled_at, "
            "t_state, t_version, t_resumes, t_ttl, t_pid, t_due FROM r_promises"
        ):
            promises[r[0]] = {
                "state": r[1],
                "param": json.loads(r[2]),
                "value": json.loads(r[3]),
                "tags": json.loads(r[4]),
                "timeoutAt": r[5],
                "createdAt": r[6],
                "settledAt": r[7],
            }
            if r[8] is not None:
                tasks[r[0]] = dict(
                    zip(("state", "version", "resumes", "ttl", "pid", "due"), r[8:], strict=True)
                )
        schedules = {
            r[0]: {
                "cron": r[1],
                "promiseId": r[2],
                "promiseTimeout": r[3],
                "promiseParam": json.loads(r[4]),
                "promiseTags": json.loads(r[5]),
                "createdAt": r[6],
                "nextRunAt": r[7],
                "lastRunAt": r[8],
            }
            for r in db.execute(
                "SELECT id, cron, promise_id, promise_timeout, promise_param, promise_tags, "
                "created_at, next_run_at, last_run_at FROM r_schedules"
            )
        }
        outbox: list[tuple[Any, ...]] = []
        for address, body in db.execute("SELECT address, body FROM r_outbox"):
            msg = json.loads(body)
            if msg["kind"] == "execute":
                task = msg["data"]["task"]
                outbox.append(("execute", address, task["id"], task["version"]))
            else:
                outbox.append(("unblock", address, msg["data"]["promise"]))
        return {
            "promises": promises,
            "tasks": tasks,
            "callbacks": sorted(db.execute("SELECT awaited_id, awaiter_id FROM r_callbacks")),
            "listeners": sorted(db.execute("SELECT awaited_id, address FROM r_listeners")),
            "schedules": schedules,
            "outbox": outbox,
        }


# -- normalisation (each one a written-down difference) ------------------------------------


def external(tags: Any) -> bool:
    """resonate.sql's ``external`` column."""
    if not isinstance(tags, dict):
        return False
    return (
        tags.get("resonate:target") is not None
        or tags.get("resonate:timer") == "true"
        or tags.get("resonate:external") == "true"
    )


def normal_state(snap: dict[str, Any], now: int) -> dict[str, Any]:
    expired = set()
    for pid, p in snap["promises"].items():
        # every promise times out at its deadline
        if not external(p["tags"]) and p["state"] == "pending" and p["timeoutAt"] <= now:
            p["state"], p["settledAt"] = "rejected_timedout", p["timeoutAt"]
            expired.add(pid)
        if not external(p["tags"]) and p["state"] == "rejected_timedout":
            expired.add(pid)
    snap["listeners"] = [row for row in snap["listeners"] if row[0] not in expired]
    snap["outbox"] = sorted(
        json.dumps(m, sort_keys=True)
        for m in snap["outbox"]
        if not (m[0] == "unblock" and m[2]["id"] in expired)
    )
    for t in snap["tasks"].values():  # a task's timer, only while it runs
        if t["state"] not in ("pending", "acquired"):
            t["due"] = None
    snap["callbacks"] = [list(r) for r in snap["callbacks"]]
    snap["listeners"] = [list(r) for r in snap["listeners"]]
    return snap


def normal_answer(resp: dict[str, Any]) -> Any:
    """Error data: compare resonate.sql's status text (the engine adds a reason)."""
    head, data = resp["head"], resp["data"]
    if head["status"] >= 400 and isinstance(data, str):
        data = data.split(": ", 1)[0]
    if resp["kind"] == "task.fence" and head["status"] == 200:
        data = dict(data, action=normal_answer(data["action"]))
    return {"kind": resp["kind"], "head": head, "data": data}


# -- the request generator -------------------------------------------------------------------

IDS = ["a", "b", "c", "d", "e", "f"]
G = "poll://any@g"


class Gen:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.now = T0
        self.snap: dict[str, Any] = {"promises": {}, "tasks": {}}

    def pick(self, *options: Any) -> Any:
        return self.rng.choice(options)

    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    def pid(self) -> str:
        return str(self.pick(*IDS))

    def awaitable(self, exclude: str = "") -> str:
        """An id that is external, or not there (never an internal promise)."""
        promises = self.snap["promises"]
        there = [i for i in IDS if i != exclude and i in promises and external(promises[i]["tags"])]
        if there and self.chance(0.8):
            return str(self.pick(*there))
        return str(self.pick(*[i for i in IDS if i not in promises] or ["zz"]))

    def task_id(self, state: str | None = None) -> str:
        """Mostly a task there is (in ``state``, when one is)."""
        tasks = self.snap["tasks"]
        preferred = [t for t in tasks if state is None or tasks[t]["state"] == state]
        if preferred and self.chance(0.7):
            return str(self.pick(*preferred))
        return str(self.pick(*tasks)) if tasks and self.chance(0.7) else self.pid()

    def version(self, tid: str) -> Any:
        task = self.snap["tasks"].get(tid)
        if task is not None and self.chance(0.85):
            return task["version"]
        return self.pick(0, 1, 2, None, "1", 2**40)

    def timeout(self) -> Any:
        if self.chance(0.05):
            return self.pick(None, "soon", 1.5, str(self.now + HOUR))
        return self.now + self.pick(-1000, 0, 1, 1000, 6000, 60_000, HOUR, HOUR, HOUR)

    def tags(self, *, target: bool | None = None, bad_delay: bool = True) -> dict[str, str]:
        kind = self.pick("target", "target", "external", "timer", "internal", "internal")
        if target is not None:
            kind = "target" if target else self.pick("external", "internal")
        tags: dict[str, str] = {}
        if kind == "target":
            tags["resonate:target"] = self.pick(G, G, "poll://any@h", "")
            if self.chance(0.15):
                delays = (str(self.now + 3000), "1", "soon") if bad_delay else ("1",)
                tags["resonate:delay"] = self.pick(*delays)
        elif kind == "external":
            tags["resonate:external"] = "true"
        elif kind == "timer":
            tags["resonate:timer"] = "true"
        elif self.chance(0.5):
            tags["resonate:scope"] = "local"
        return tags

    def value(self) -> Any:
        return self.pick(
            None, {}, {"data": "eyJ4IjoxfQ=="}, {"headers": {"k": "v"}, "data": "YQ=="}, {"data": 7}
        )

    def state(self) -> Any:
        if self.chance(0.2):
            return self.pick("rejected_timedout", "pending", None, "done")
        return self.pick("resolved", "rejected", "rejected_canceled")

    def create_data(self, pid: str | None = None, **tag_kw: Any) -> dict[str, Any]:
        data: dict[str, Any] = {"id": pid or self.pid(), "timeoutAt": self.timeout()}
        if self.chance(0.7):
            data["param"] = self.value()
        if self.chance(0.9):
            data["tags"] = self.tags(**tag_kw)
        return data

    def request(self) -> dict[str, Any]:
        kind = self.pick(
            "promise.get",
            "promise.create",
            "promise.create",
            "promise.settle",
            "promise.settle",
            "promise.register_listener",
            "promise.register_callback",
            "task.get",
            "task.create",
            "task.create",
            "task.acquire",
            "task.acquire",
            "task.release",
            "task.fulfill",
            "task.fence",
            "task.fence",
            "task.fence",
            "task.suspend",
            "task.suspend",
            "task.heartbeat",
            "task.halt",
            "task.continue",
            "schedule.create",
            "schedule.get",
            "schedule.delete",
            "promise.search",
            "task.frobnicate",
        )
        data = getattr(self, "_" + kind.replace(".", "_"), self._other)()
        head: dict[str, Any] = {"corrId": self.pick("c1", "c2", 7)}
        if self.chance(0.8):
            head["version"] = "2026-04-01"
        return {"kind": kind, "head": head, "data": data}

    def _other(self) -> dict[str, Any]:
        return {"id": self.pid()}

    def _promise_get(self) -> dict[str, Any]:
        return {"id": self.pid()}

    def _promise_create(self) -> dict[str, Any]:
        return self.create_data()

    def _promise_settle(self) -> dict[str, Any]:
        data = {"id": self.pid(), "state": self.state(), "value": self.value()}
        if self.chance(0.05):
            del data["id"]
        return data

    def _promise_register_listener(self) -> dict[str, Any]:
        address = self.pick(
            "poll://uni@g/p1", "poll://any@g", "http://x.test/h", "https://y.test/", "poll://x"
        )
        return {"awaited": self.pid(), "address": self.pick(address, address, "udp://x", None)}

    def _promise_register_callback(self) -> dict[str, Any]:
        awaiter = self.task_id()
        awaited = awaiter if self.chance(0.1) else self.awaitable(awaiter)
        return {"awaited": awaited, "awaiter": awaiter}

    def _task_get(self) -> dict[str, Any]:
        return {"id": self.task_id()}

    def _task_create(self) -> dict[str, Any]:
        action = self.create_data(target=self.chance(0.9))
        data: dict[str, Any] = {"pid": "p1", "ttl": self.pick(1000, 10_000, 60_000)}
        data["action"] = {"kind": "promise.create", "head": {"corrId": "s"}, "data": action}
        if self.chance(0.05):
            del data[self.pick("pid", "ttl")]
        return data

    def _task_acquire(self) -> dict[str, Any]:
        tid = self.task_id("pending")
        data = {"id": tid, "version": self.version(tid), "pid": "p2", "ttl": self.pick(500, 5000)}
        if self.chance(0.05):
            del data["pid"]
        return data

    def _task_release(self) -> dict[str, Any]:
        tid = self.task_id("acquired")
        return {"id": tid, "version": self.version(tid)}

    _task_halt = _task_continue = _task_get

    def _task_fulfill(self) -> dict[str, Any]:
        tid = self.task_id("acquired")
        settle = {"id": tid, "state": self.state(), "value": self.value()}
        return {
            "id": tid,
            "version": self.version(tid),
            "action": {"kind": "promise.settle", "head": {"corrId": "s"}, "data": settle},
        }

    def _task_fence(self) -> dict[str, Any]:
        tid = self.task_id("acquired")
        inner_id = tid if self.chance(0.1) else self.pick(*[i for i in IDS if i != tid])
        if self.chance(0.5):
            kind, inner = "promise.create", self.create_data(inner_id)
        else:
            kind = self.pick("promise.settle", "promise.settle", "promise.frob")
            inner = {"id": inner_id, "state": self.state(), "value": self.value()}
        return {
            "id": tid,
            "version": self.version(tid),
            "action": {"kind": kind, "head": {"corrId": "s"}, "data": inner},
        }

    def _task_suspend(self) -> dict[str, Any]:
        tid = self.task_id("acquired")
        awaited = list(dict.fromkeys(self.awaitable(tid) for _ in range(self.pick(1, 1, 2, 3))))
        if self.chance(0.1):  # malformed: none, itself, twice
            awaited = self.pick([], [*awaited, tid], [*awaited, awaited[0]])
        actions = [
            {
                "kind": "promise.register_callback",
                "head": {"corrId": "s"},
                "data": {"awaited": a, "awaiter": tid},
            }
            for a in awaited
        ]
        return {"id": tid, "version": self.version(tid), "actions": actions}

    def _task_heartbeat(self) -> dict[str, Any]:
        # (a version that is not an int: resonate.sql's answer depends on its plan: README)
        versions = {t: self.version(t) for t in list(self.snap["tasks"])[:3]}
        refs = [{"id": t, "version": 1 if v == 2**40 else v} for t, v in versions.items()]
        return {"pid": self.pick("p1", "p2"), "tasks": refs}

    def _schedule_create(self) -> dict[str, Any]:
        return {
            "id": self.pick("s1", "s2"),
            "cron": self.pick(
                "* * * * *",
                "*/2 * * * *",
                "0 * * * *",
                "5,10-12 * * * *",
                "1-3/2 * * * 1",
                "0 0 31 2 *",
                "* * * *",
                "*/0 * * * *",
                "x * * * *",
            ),
            "promiseId": self.pick("r-{{.id}}-{{.timestamp}}", "a", "r-{{.timestamp}}"),
            "promiseTimeout": self.pick(30_000, HOUR, -1),
            "promiseParam": self.value(),
            # (a bad resonate:delay here stops resonate.sql's timer sweep: README)
            "promiseTags": self.tags(bad_delay=False),
        }

    def _schedule_get(self) -> dict[str, Any]:
        return {"id": self.pick("s1", "s2")}

    _schedule_delete = _schedule_get


# -- the test ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(request: pytest.FixtureRequest) -> Iterator[Reference]:
    template = pg_dsn(request.config)
    if not template:
        pytest.skip(SKIP_NO_PG)
    import psycopg

    name = f"differential_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    dsn = fresh_pg_database(template, name)
    conn = psycopg.connect(dsn, autocommit=True, options="-c TimeZone=UTC")
    try:
        ref = Reference(conn)
        probe = {"kind": "task.suspend", "head": {}, "data": {"id": "none", "actions": []}}
        if ref.send(probe, T0)["head"]["status"] != 400:
            pytest.skip(f"{SKIP_NO_PG}: the resonate.sql there predates commit 9187493")
        yield ref
    finally:
        conn.close()
        drop_pg_database(template, name)


def run_sequence(
    seq: int, ref: Reference, tmp_path: Path, counts: dict[str, int], seen: Counter[str]
) -> str | None:
    """One sequence; the first divergence, described, or None."""
    rng = random.Random(f"{SEED}:{seq}")
    gen = Gen(rng)
    ref.reset()
    subject = Subject(tmp_path / f"seq{seq}.db", lambda: gen.now)
    history: list[str] = []
    try:
        for step in range(STEPS):
            if gen.chance(0.2):
                gen.now += gen.pick(0, 1, 999, 1000, 4999, 5000, 30_000, 60_000, 300_000)
                ref.tick(gen.now)
                subject.tick()
                counts["ticks"] += 1
                history.append(f"tick -> {gen.now - T0}")
            else:
                req = gen.request()
                counts["requests"] += 1
                history.append(json.dumps(req))
                want, got = ref.send(req, gen.now), subject.send(req)
                if normal_answer(want) != normal_answer(got):
                    return describe(seq, step, history, "answer", want, got)
                seen[f"{req['kind']} {want['head']['status']}"] += 1
            want_state = normal_state(ref.snapshot(), gen.now)
            got_state = normal_state(subject.snapshot(), gen.now)
            if want_state != got_state:
                return describe(seq, step, history, "state", want_state, got_state)
            gen.snap = want_state
    finally:
        subject.engine.close()
    return None


def describe(seq: int, step: int, history: list[str], what: str, want: Any, got: Any) -> str:
    if what == "state":
        want = {k: v for k, v in want.items() if v != got.get(k)}
        got = {k: v for k, v in got.items() if k in want}
    return (
        f"sequence {seq} step {step}: {what} differs\n  resonate.sql: {want}\n  engine:       "
        f"{got}\n  last requests:\n    " + "\n    ".join(history[-12:])
    )


#: Outcomes the sequences must reach, so that a generator change that stops
#: exercising the interesting paths fails instead of passing vacuously.
MUST_SEE = {
    "promise.create 200",
    "promise.create 400",
    "promise.settle 200",
    "promise.settle 400",
    "promise.settle 404",
    "promise.register_listener 200",
    "promise.register_listener 400",
    "promise.register_callback 200",
    "promise.register_callback 422",
    "task.create 200",
    "task.create 400",
    "task.create 409",
    "task.create 422",
    "task.acquire 200",
    "task.acquire 409",
    "task.release 200",
    "task.fulfill 200",
    "task.fulfill 400",
    "task.fence 200",
    "task.fence 400",
    "task.fence 409",
    "task.suspend 200",
    "task.suspend 300",
    "task.suspend 400",
    "task.suspend 422",
    "task.halt 200",
    "task.continue 200",
    "task.get 200",
    "schedule.create 200",
    "schedule.create 400",
    "schedule.delete 200",
    "promise.search 501",
}


def test_engine_answers_and_stores_what_resonate_sql_does(
    reference: Reference, tmp_path: Path
) -> None:
    counts = {"requests": 0, "ticks": 0}
    seen: Counter[str] = Counter()
    divergences = [
        d for seq in range(SEQUENCES) if (d := run_sequence(seq, reference, tmp_path, counts, seen))
    ]
    print(
        f"\ndifferential: {SEQUENCES} sequences, {counts['requests']} requests, "
        f"{counts['ticks']} ticks, {len(divergences)} divergences"
    )
    assert not divergences, "\n\n".join(divergences[:3])
    assert set(seen) >= MUST_SEE, f"never reached: {sorted(MUST_SEE - set(seen))}"


def random_cron(rng: random.Random) -> str:
    """A spec from the grammar both read, with values in range (a value out
    of range makes resonate.sql search nine years minute by minute)."""

    def field(lo: int, hi: int) -> str:
        parts = []
        for _ in range(rng.choice((1, 1, 1, 2, 3))):
            a = rng.randint(lo, hi)
            b = rng.randint(a, hi)
            part = rng.choice(("*", str(a), f"{a}-{b}", "*", f"{a}"))
            if rng.random() < 0.3:
                part += f"/{rng.randint(1, 4)}"
            parts.append(part)
        return ",".join(parts)

    return " ".join(field(lo, hi) for lo, hi in ((0, 59), (0, 23), (1, 31), (1, 12), (0, 6)))


def test_cron_matches_resonate_sql(reference: Reference) -> None:
    import psycopg

    from resonate_sqlite.cron import CronError, next_run

    rng = random.Random(SEED)
    outcomes: Counter[str] = Counter()
    for spec in [random_cron(rng) for _ in range(400)] + ["0 0 31 2 *", "*/0 * * * *", "a"]:
        after = T0 + rng.randint(0, 4 * 365 * 24 * HOUR)
        want: int | str
        try:
            want = reference.conn.execute(
                "SELECT resonate._next_cron(%s, %s)", (spec, after)
            ).fetchone()[0]
        except psycopg.Error:  # a spec resonate.sql refuses
            want = "refused"
        try:
            got: int | str = next_run(spec, after)
        except CronError:
            got = "refused"
        assert got == want, f"{spec!r} after {after}"
        outcomes["refused" if got == "refused" else "next run"] += 1
    assert outcomes["next run"] > 300 and outcomes["refused"] >= 3, outcomes
