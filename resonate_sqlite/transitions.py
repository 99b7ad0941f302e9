"""What each request and each timer does to the store.

:class:`Transitions` holds one handler per request kind and the transitions
they share (the settle cascade, resuming an awaiter, pushing ``execute``), and
the three timers (a promise's deadline, a task's retry or lease, a schedule's
next run). :class:`resonate_sqlite.engine.Engine` runs them inside its
transactions.

The answers are resonate.sql's (the facts, not its code): the same checks in
the same order, the same status codes and response shapes, the same stored
state. The few deliberate differences are listed in ``README.md`` beside this
file; each is marked ``DIFFERENCE`` below.

A handler reads the request with :mod:`resonate_sqlite.wire`'s ``->>``-like
helpers, checks, and then writes; it returns ``(status, data)`` for an answer
(``data`` is the reason for a status >= 400), or raises
:class:`~resonate_sqlite.wire.Refusal` (which rolls its writes back).
"""

from __future__ import annotations

import enum
import logging
import sqlite3
from collections.abc import Callable
from typing import Any, Final, Literal

from resonate_sqlite import cron
from resonate_sqlite.schema import (
    ID,
    IS_TIMER,
    PARAM,
    S_CRON,
    S_ID,
    S_LAST_RUN_AT,
    S_NEXT_RUN_AT,
    S_PARAM,
    S_PROMISE_ID,
    S_TAGS,
    S_TIMEOUT,
    SETTLED_AT,
    SQL_CALLBACK_ADD,
    SQL_CALLBACKS_DROP,
    SQL_CALLBACKS_SCRUB,
    SQL_GET,
    SQL_HEARTBEAT,
    SQL_INSERT,
    SQL_LEASE,
    SQL_LEASE_GET,
    SQL_LISTENER_ADD,
    SQL_LISTENERS_DROP,
    SQL_OUTBOX_DROP,
    SQL_OUTBOX_PUT,
    SQL_PRELOAD,
    SQL_RESUME,
    SQL_RESUME_COUNT,
    SQL_SCHEDULE_ADVANCE,
    SQL_SCHEDULE_DELETE,
    SQL_SCHEDULE_GET,
    SQL_SCHEDULE_INSERT,
    SQL_SETTLE,
    SQL_TASK_ACQUIRE,
    SQL_TASK_HALT,
    SQL_TASK_PENDING,
    SQL_TASK_RETRY,
    SQL_TASK_SUSPEND,
    SQL_TASK_UNRESUMED,
    SQL_WAITERS,
    STATE,
    T_DUE,
    T_PID,
    T_RESUMES,
    T_STATE,
    T_TTL,
    T_VERSION,
    TAGS,
    TARGET,
    TIMEOUT_AT,
    VALUE,
    Row,
)
from resonate_sqlite.wire import (
    CLIENT_STATES,
    EMPTY_VALUE,
    I64_MAX,
    Refusal,
    add,
    bigint,
    bigint_text,
    decode,
    error_data,
    execute_body,
    int4,
    live,
    obj,
    record,
    schedule_record,
    tags_of,
    tags_text,
    task_record,
    text,
    timeout_state,
    unblock_body,
    valid_address,
    value_text,
)

__all__ = ["HANDLERS", "Result", "Transitions"]

logger = logging.getLogger(__name__)

#: (status, data): data is the response data, or the reason of a refusal.
type Result = tuple[int, Any]

NO_PRELOAD: Final[list[Any]] = []
#: A preload carries at most this many promises, whose param, value and tags
#: hold at most this many characters in all (one that would pass it is left
#: out): the SDK asks the store for any promise it needs that is not there.
PRELOAD_MAX: Final = 64
PRELOAD_BYTES: Final = 1 << 20


class _Unread(enum.Enum):
    UNREAD = enum.auto()


#: A row argument not read yet (the callee reads it); None is "not there".
UNREAD: Final = _Unread.UNREAD
type MaybeRow = Row | Literal[_Unread.UNREAD] | None


class Transitions:
    """The request handlers and timer transitions of :class:`~resonate_sqlite.engine.Engine`."""

    #: Pending tasks are pushed again this often.
    retry_ms: int
    #: Addresses this process receives on (see Engine).
    local_addresses: set[str]
    #: Executes that may still go to this process directly (see Engine).
    local_room: int
    #: Messages for in-process delivery produced by the current request.
    _out: list[str]
    #: The task whose hold the current request ended (see Engine.handle).
    _released: str | None

    # -- reads ------------------------------------------------------------------

    @staticmethod
    def _row(db: sqlite3.Connection, pid: str | None) -> Row | None:
        if pid is None:
            return None
        row = db.execute(SQL_GET, (pid,)).fetchone()
        return None if row is None else list(row)

    # -- promise.get / promise.create / promise.settle -------------------------------

    def _promise_get(self, db: sqlite3.Connection, now: int, d: Any) -> Result:
        row = self._row(db, pid := text(d, "id"))
        if row is None:
            return 404, f"promise {pid} not found"
        return 200, {"promise": record(row, now)}

    def _promise_create(self, db: sqlite3.Connection, now: int, d: Any) -> Result:
        pid, timeout_at = text(d, "id"), bigint(d, "timeoutAt")
        return self._create(db, now, pid, timeout_at, value_text(obj(d).get("param")), tags_of(d))

    def _create(
        self,
        db: sqlite3.Connection,
        now: int,
        pid: str | None,
        timeout_at: int | None,
        param: str,
        tags: dict[str, str],
        row: MaybeRow = UNREAD,
    ) -> Result:
        """promise.create (also a fence's, and a schedule's run); ``row`` is
        promise ``pid``'s when the caller has read it."""
        if pid is None or timeout_at is None:
            return 400, "promise.create needs id and timeoutAt"
        if row is UNREAD:
            row = self._row(db, pid)
        if row is not None:
            return 200, {"promise": record(row, now)}
        target = tags.get("resonate:target")
        timer = tags.get("resonate:timer") == "true"
        t_state = t_version = t_due = None
        if timeout_at > now:
            state, created_at, settled_at = "pending", now, None
            dispatch = False
            if target is not None:
                t_state, t_version = "pending", 0
                delay = tags.get("resonate:delay")
                until = None if delay is None else bigint_text(delay, "resonate:delay")
                if until is not None and until > now:
                    t_due = until  # the first execute waits for the delay
                else:
                    t_due, dispatch = now + self.retry_ms, True
        else:  # created past its deadline: settled at once
            state = "resolved" if timer else "rejected_timedout"
            created_at = settled_at = timeout_at
            dispatch = False
            if target is not None:
                t_state, t_version = "fulfilled", 0
        row = [
            pid,
            state,
            param,
            EMPTY_VALUE,
            tags_text(tags),
            target,
            int(timer),
            timeout_at,
            created_at,
            settled_at,
            t_state,
            t_version,
            None,
            None,
            t_due,
            None if t_state is None else 0,
        ]
        db.execute(SQL_INSERT, (*row, tags.get("resonate:origin")))
        if dispatch:
            assert target is not None
            self._emit_execute(db, target, pid, 0)
        return 200, {"promise": record(row, now)}

    def _promise_settle(self, db: sqlite3.Connection, now: int, d: Any) -> Result:
        return self._settle_req(db, now, text(d, "id"), text(d, "state"), obj(d).get("value"))

    def _settle_req(
        self,
        db: sqlite3.Connection,
        now: int,
        pid: str | None,
        state: str | None,
        value: Any,
        row: MaybeRow = UNREAD,
    ) -> Result:
        """promise.settle (also a fence's); ``row`` is promise ``pid``'s when
        the caller has read it."""
        # rejected_timedout is the timer's: a client cannot forge a timeout
        if state not in CLIENT_STATES:
            return 400, f"invalid settle state: {state!r}"
        if row is UNREAD:
            row = self._row(db, pid)
        if row is None:
            return 404, f"promise {pid} not found"
        if live(row, now):
            self._settle(db, now, row, state, value_text(value), now)
        return 200, {"promise": record(row, now)}

    # -- promise.register_listener / promise.register_callback ----------------------

    def _register_listener(self, db: sqlite3.Connection, now: int, d: Any) -> Result:
        address = text(d, "address")
        if not valid_address(address):
            return 400, f"invalid listener address: {address!r} (http(s)://, or poll://...@group)"
        row = self._row(db, awaited := text(d, "awaited"))
        if row is None:
            return 404, f"promise {awaited} not found"
        if live(row, now):
            db.execute(SQL_LISTENER_ADD, (awaited, address))
        return 200, {"promise": record(row, now)}

    def _register_callback(self, db: sqlite3.Connection, now: int, d: Any) -> Result:
        awaited, awaiter = text(d, "awaited"), text(d, "awaiter")
        if awaited is not None and awaited == awaiter:
            return 400, f"{awaiter} cannot await itself"
        arow = self._row(db, awaited)
        if arow is None:
            return 404, f"promise {awaited} not found"
        wrow = self._row(db, awaiter)
        if wrow is None or wrow[TARGET] is None:
            return 422, f"awaiter {awaiter} is not a task"
        # DIFFERENCE: an internal promise may be awaited (resonate.sql: 422).
        if live(arow, now) and live(wrow, now):
            db.execute(SQL_CALLBACK_ADD, (awaited, awaiter))
        return 200, {"promise": record(arow, now)}

    # -- task.get / task.create / task.acquire -----------------------------------------

    def _task_get(self, db: sqlite3.Connection, now: int, d: Any) -> Result:
        row = self._row(db, tid := text(d, "id"))
        if row is None or row[T_STATE] is None:
            return 404, f"task {tid} not found"
        if live(row, now):
            return 200, {"task": task_record(row)}
        task = {"id": tid, "state": "fulfilled", "version": row[T_VERSION]}
        return 200, {"task": task | {"resumes": 0, "ttl": None, "pid": None}}

    def _task_create(self, db: sqlite3.Connection, now: int, d: Any) -> Result:
        pid, ttl = text(d, "pid"), bigint(d, "ttl")
        a = obj(obj(obj(d).get("action")).get("data"))
        tid, timeout_at = text(a, "id"), bigint(a, "timeoutAt")
        tags = tags_of(a)
        if tid is None or timeout_at is None or pid is None or ttl is None:
            return 400, "task.create needs pid, ttl, and an action with id and timeoutAt"
        if "resonate:target" not in tags:
            return 400, "task.create needs a resonate:target tag"
        row = self._row(db, tid)
        if row is None:
            if timeout_at <= now:
                self._create(db, now, tid, timeout_at, value_text(a.get("param")), tags)
                row = self._row(db, tid)
                assert row is not None
            else:
                timer = tags.get("resonate:timer") == "true"
                row = [
                    tid,
                    "pending",
                    value_text(a.get("param")),
                    EMPTY_VALUE,
                    tags_text(tags),
                    tags["resonate:target"],
                    int(timer),
                    timeout_at,
                    now,
                    None,
                    "acquired",
                    1,
                    pid,
                    ttl,
                    add(now, ttl),
                    0,
                ]
                db.execute(SQL_INSERT, (*row, tags.get("resonate:origin")))
        elif row[TARGET] is None:
            return 422, f"promise {tid} exists and is not a task (no resonate:target)"
        elif row[T_STATE] == "pending":
            self._acquire(db, now, row, pid, ttl)
        elif row[T_STATE] != "fulfilled":
            return 409, f"task {tid} already exists (state {row[T_STATE]})"
        preload = self._preload(db, now, tid) if row[T_STATE] == "acquired" else NO_PRELOAD
        return 200, {"task": task_record(row), "promise": record(row), "preload": preload}

    def _acquire(self, db: sqlite3.Connection, now: int, row: Row, pid: str, ttl: int) -> None:
        version, due = row[T_VERSION] + 1, add(now, ttl)
        db.execute(SQL_TASK_ACQUIRE, (version, pid, ttl, due, row[ID]))
        row[T_STATE], row[T_VERSION], row[T_PID], row[T_TTL] = "acquired", version, pid, ttl
        row[T_DUE], row[T_RESUMES] = due, 0

    def _task_acquire(self, db: sqlite3.Connection, now: int, d: Any) -> Result:
        tid, version = text(d, "id"), int4(d, "version")
        pid, ttl = text(d, "pid"), bigint(d, "ttl")
        self._released = tid  # unless acquired below (and not a timer)
        if pid is None or ttl is None:
            return 400, "task.acquire needs pid and ttl"
        row = self._row(db, tid)
        if row is None or row[T_STATE] is None:
            return 404, f"task {tid} not found"
        if row[T_STATE] != "pending":
            return 409, f"task {tid} is {row[T_STATE]}, not pending"
        if not live(row, now):
            return 409, f"the promise of task {tid} is settled or timed out"
        if row[T_VERSION] != version:
            return 409, f"task {tid} is at version {row[T_VERSION]}, not {version}"
        self._acquire(db, now, row, pid, ttl)
        if not row[IS_TIMER]:  # the SDK drops a not-yet-due timer without a word
            self._released = None
        preload = self._preload(db, now, row[ID])
        return 200, {"task": task_record(row), "promise": record(row, now), "preload": preload}

    @staticmethod
    def _preload(db: sqlite3.Connection, now: int, tid: str) -> list[Any]:
        """The ``preload`` of task ``tid``'s answers (task.create and
        task.acquire when they acquire, task.suspend's 300): the promises that
        share the ``resonate:branch`` of the task's promise, the task's own
        left out, by id, as promise.get reads them (the protocol's and the
        Resonate server's rule), and the bare promises the branch promise
        made (its children without a ``resonate:target``: ``ctx.promise``;
        a ``ctx.sleep`` timer has one), which the protocol's rule leaves out
        as branches of their own. The SDK takes them as it takes a fence's answer, so a
        replayed body asks again only for what is not there.
        DIFFERENCE: the bare children; at most PRELOAD_MAX promises and PRELOAD_BYTES characters,
        and only the branch promise and the ids under it (the protocol's id
        rule), where the server sends every promise tagged with the branch."""
        found: list[Any] = []
        room = PRELOAD_BYTES
        for row in db.execute(SQL_PRELOAD, (tid, tid, PRELOAD_MAX)):
            size = len(row[PARAM]) + len(row[VALUE]) + len(row[TAGS])
            if size <= room:
                room -= size
                found.append(record(row, now))
        if len(found) > 1:
            found.sort(key=_by_id)
        return found or NO_PRELOAD

    def _held(self, db: sqlite3.Connection, now: int, tid: str | None, version: int | None) -> Row:
        """The row of a task acquired at ``version`` whose promise is live."""
        row = self._row(db, tid)
        if row is None:
            raise Refusal(404, f"task {tid} not found")
        _check_lease(now, tid, version, row[T_STATE], row[T_VERSION], row[STATE], row[TIMEOUT_AT])
        return row

    @staticmethod
    def _lease(
        db: sqlite3.Connection, now: int, tid: str | None, version: int | None
    ) -> str | None:
        """:meth:`_held`'s checks on a narrow read (no param, value or tags),
        for the requests that need only them; returns the task's target."""
        lease = None if tid is None else db.execute(SQL_LEASE, (tid,)).fetchone()
        if lease is None:
            raise Refusal(404, f"task {tid} not found")
        _check_lease(now, tid, version, *lease[:4])
        return lease[4]  # type: ignore[no-any-return]

    # -- task.release / task.fulfill / task.fence ---------------------------------------

    def _task_release(self, db: sqlite3.Connection, now: int, d: Any) -> Result:
        tid, version = text(d, "id"), int4(d, "version")
        self._released = tid
        target = self._lease(db, now, tid, version)
        assert tid is not None and version is not None
        db.execute(SQL_TASK_PENDING, (now + self.retry_ms, tid))
        if target:
            self._emit_execute(db, target, tid, version)
        return 200, {}

    def _task_fulfill(self, db: sqlite3.Connection, now: int, d: Any) -> Result:
        tid, version = text(d, "id"), int4(d, "version")
        settle = obj(obj(obj(d).get("action")).get("data"))
        state = text(settle, "state")
        self._released = tid
        if state not in CLIENT_STATES:
            return 400, f"invalid settle state: {state!r}"
        row = self._held(db, now, tid, version)
        self._settle(db, now, row, state, value_text(settle.get("value")), now)
        return 200, {"promise": record(row)}

    def _task_fence(self, db: sqlite3.Connection, now: int, d: Any) -> Result:
        tid, version = text(d, "id"), int4(d, "version")
        action = obj(obj(d).get("action"))
        inner = action.get("data")
        pid = text(inner, "id")
        # a fence on the task's own promise: settling yourself is task.fulfill's job
        if tid is not None and pid == tid:
            return 400, f"task.fence cannot create or settle its own promise {tid}"
        # the lease and the promise in one read (the checks keep their order)
        found = None if tid is None else db.execute(SQL_LEASE_GET, (pid, tid)).fetchone()
        if found is None:
            raise Refusal(404, f"task {tid} not found")
        _check_lease(now, tid, version, *found[:4])
        row = None if found[5] is None else list(found[5:])  # (id is NOT NULL)
        if text(action, "kind") == "promise.create":
            kind = "promise.create"
            timeout_at = bigint(inner, "timeoutAt")
            param, tags = value_text(obj(inner).get("param")), tags_of(inner)
            status, data = self._create(db, now, pid, timeout_at, param, tags, row)
        else:  # (resonate.sql settles for any other kind)
            kind = "promise.settle"
            status, data = self._settle_req(
                db, now, pid, text(inner, "state"), obj(inner).get("value"), row
            )
        if status >= 400:
            data = error_data(status, data)
        # Engine._run adds corrId and version to the inner head
        inner_answer = {"kind": kind, "head": {"status": status}, "data": data}
        # DIFFERENCE: no preload (as resonate.sql; the protocol says nothing of
        # a fence's, the Resonate server sends the branch's): the body that
        # fences already holds what its branch made, so it would be a read per
        # fence that saves no request.
        return 200, {"action": inner_answer, "preload": NO_PRELOAD}

    # -- task.suspend / task.heartbeat -----------------------------------------------

    def _task_suspend(self, db: sqlite3.Connection, now: int, d: Any) -> Result:
        tid, version = text(d, "id"), int4(d, "version")
        actions = obj(d).get("actions", [])
        if not isinstance(actions, list):
            raise Refusal(400, "actions must be an array")
        awaited = [text(obj(a).get("data"), "awaited") for a in actions]
        # malformed awaits are refused before anything is looked up
        if not awaited:
            return 400, "task.suspend needs at least one awaited promise"
        if tid is not None and tid in awaited:
            return 400, f"{tid} cannot await itself"
        named = [a for a in awaited if a is not None]
        if len(set(named)) != len(named):
            return 400, "task.suspend names an awaited promise twice"
        self._lease(db, now, tid, version)
        rows = [self._row(db, a) for a in awaited]
        missing = [a for a, r in zip(awaited, rows, strict=True) if r is None]
        if missing:
            return 422, f"awaited promise {missing[0]} not found"
        # DIFFERENCE: an internal promise may be awaited (resonate.sql: 422).
        if not all(live(r, now) for r in rows if r is not None):
            db.execute(SQL_TASK_UNRESUMED, (tid,))
            assert tid is not None
            return 300, {"preload": self._preload(db, now, tid)}  # the task stays with its holder
        db.executemany(SQL_CALLBACK_ADD, [(a, tid) for a in named])
        db.execute(SQL_TASK_SUSPEND, (tid,))
        self._released = tid
        return 200, {"preload": NO_PRELOAD}

    def _task_heartbeat(self, db: sqlite3.Connection, now: int, d: Any) -> Result:
        pid = text(d, "pid")
        tasks = obj(d).get("tasks", [])
        if not isinstance(tasks, list):
            raise Refusal(400, "tasks must be an array")
        # DIFFERENCE: a version that is not an integer is always a 400 (where
        # resonate.sql casts it depends on its query plan).
        refs = [(text(t, "id"), int4(t, "version")) for t in tasks]
        if pid is not None:
            for tid, version in refs:
                if tid is not None and version is not None:
                    db.execute(SQL_HEARTBEAT, (now, tid, pid, version, now))
        return 200, {}

    # -- task.halt / task.continue -----------------------------------------------------

    def _task_halt(self, db: sqlite3.Connection, now: int, d: Any) -> Result:
        row = self._row(db, tid := text(d, "id"))
        if row is None or row[T_STATE] is None:
            return 404, f"task {tid} not found"
        if row[T_STATE] == "fulfilled":
            return 409, f"task {tid} is fulfilled"
        if row[T_STATE] != "halted":
            db.execute(SQL_TASK_HALT, (tid,))
        return 200, {}

    def _task_continue(self, db: sqlite3.Connection, now: int, d: Any) -> Result:
        row = self._row(db, tid := text(d, "id"))
        if row is None or row[T_STATE] is None:
            return 404, f"task {tid} not found"
        if row[T_STATE] != "halted":
            return 409, f"task {tid} is {row[T_STATE]}, not halted"
        db.execute(SQL_TASK_PENDING, (now + self.retry_ms, tid))
        if row[TARGET]:
            self._emit_execute(db, row[TARGET], row[ID], row[T_VERSION])
        return 200, {}

    # -- schedules -------------------------------------------------------------------------

    def _schedule_get(self, db: sqlite3.Connection, now: int, d: Any) -> Result:
        sid = text(d, "id")
        row = None if sid is None else db.execute(SQL_SCHEDULE_GET, (sid,)).fetchone()
        if row is None:
            return 404, f"schedule {sid} not found"
        return 200, {"schedule": schedule_record(row)}

    def _schedule_create(self, db: sqlite3.Connection, now: int, d: Any) -> Result:
        sid, spec, promise_id = text(d, "id"), text(d, "cron"), text(d, "promiseId")
        timeout = bigint(d, "promiseTimeout")
        param = value_text(obj(d).get("promiseParam"))
        tags = tags_of(d, "promiseTags")
        if sid is None or spec is None or promise_id is None or timeout is None:
            return 400, "schedule.create needs id, cron, promiseId and promiseTimeout"
        row = db.execute(SQL_SCHEDULE_GET, (sid,)).fetchone()
        if row is None:
            try:
                next_run = cron.next_run(spec, now)
            except cron.CronError as exc:
                return 400, str(exc)
            row = (sid, spec, promise_id, timeout, param, tags_text(tags), now, next_run, None)
            db.execute(SQL_SCHEDULE_INSERT, row)
        return 200, {"schedule": schedule_record(row)}

    def _schedule_delete(self, db: sqlite3.Connection, now: int, d: Any) -> Result:
        sid = text(d, "id")
        if sid is None or db.execute(SQL_SCHEDULE_DELETE, (sid,)).rowcount == 0:
            return 404, f"schedule {sid} not found"
        return 200, {}

    def _not_implemented(self, db: sqlite3.Connection, now: int, d: Any) -> Result:
        return 501, "search is not implemented (as in resonate.sql): keep your own index"

    # -- the cascade ---------------------------------------------------------------------

    def _settle(
        self,
        db: sqlite3.Connection,
        now: int,
        row: Row,
        state: str,
        value: str,
        settled_at: int,
    ) -> None:
        """Settle a pending promise and cascade: fulfil its task (dropping its
        execute and its own callbacks), notify its listeners, resume its
        awaiters. Updates ``row``."""
        pid = row[ID]
        db.execute(SQL_SETTLE, (state, value, settled_at, pid))
        row[STATE], row[VALUE], row[SETTLED_AT] = state, value, settled_at
        if row[T_STATE] is not None:
            row[T_STATE], row[T_RESUMES] = "fulfilled", 0
            row[T_PID] = row[T_TTL] = row[T_DUE] = None
            db.execute(SQL_OUTBOX_DROP, ("x:" + pid,))
            db.execute(SQL_CALLBACKS_SCRUB, (pid,))
        waiters = db.execute(SQL_WAITERS, (pid, pid)).fetchall()
        if not waiters:
            return
        listeners = sorted(a for k, a in waiters if k == 0)
        if listeners:
            db.execute(SQL_LISTENERS_DROP, (pid,))
            body = unblock_body(row)
            for address in listeners:
                if address in self.local_addresses:
                    self._out.append(body)
                else:
                    db.execute(SQL_OUTBOX_PUT, (f"u:{pid}\n{address}", address, body))
        awaiters = sorted(a for k, a in waiters if k == 1)
        if awaiters:
            db.execute(SQL_CALLBACKS_DROP, (pid,))
        for awaiter in awaiters:
            self._resume(db, now, awaiter)

    def _resume(self, db: sqlite3.Connection, now: int, awaiter: str) -> None:
        """An awaited promise of ``awaiter`` settled: a suspended task becomes
        pending (``execute`` pushed); any other live task counts a resume."""
        resumed = db.execute(SQL_RESUME, (now + self.retry_ms, awaiter)).fetchone()
        if resumed is None:
            db.execute(SQL_RESUME_COUNT, (awaiter,))
        elif resumed[1]:
            self._emit_execute(db, resumed[1], awaiter, resumed[0])

    def _emit_execute(
        self, db: sqlite3.Connection, target: str, task_id: str, version: int
    ) -> None:
        body = execute_body(task_id, version)
        if target in self.local_addresses and self.local_room > 0:
            self.local_room -= 1
            db.execute(SQL_OUTBOX_DROP, ("x:" + task_id,))
            self._out.append(body)
        else:
            db.execute(SQL_OUTBOX_PUT, ("x:" + task_id, target, body))

    # -- timers ----------------------------------------------------------------------------

    def _promise_timer(self, db: sqlite3.Connection, now: int, row: Row) -> bool:
        """A pending promise past its deadline times out (a timer resolves).
        DIFFERENCE: every promise, not only external ones."""
        if row[STATE] != "pending" or row[TIMEOUT_AT] > now:
            return False
        self._settle(db, now, row, timeout_state(row), EMPTY_VALUE, row[TIMEOUT_AT])
        return True

    def _task_timer(self, db: sqlite3.Connection, now: int, row: Row) -> bool:
        """A pending task is pushed again; an acquired one whose lease ran out
        goes back to pending and is pushed again."""
        if row[T_DUE] is None or row[T_DUE] > now:
            return False
        if self._promise_timer(db, now, row):  # (its promise is due too)
            return True
        if row[T_STATE] == "pending":
            db.execute(SQL_TASK_RETRY, (now + self.retry_ms, row[ID]))
        elif row[T_STATE] == "acquired":
            db.execute(SQL_TASK_PENDING, (now + self.retry_ms, row[ID]))
        else:
            return False
        if row[TARGET]:
            self._emit_execute(db, row[TARGET], row[ID], row[T_VERSION])
        return True

    def _schedule_timer(self, db: sqlite3.Connection, now: int, sid: str) -> int:
        """Create the promise of every run of schedule ``sid`` due by ``now``
        (missed runs too, each with its own time); returns how many."""
        srow = db.execute(SQL_SCHEDULE_GET, (sid,)).fetchone()
        if srow is None or srow[S_NEXT_RUN_AT] > now:
            return 0
        spec = cron.parse(srow[S_CRON])
        tags: dict[str, str] = decode(srow[S_TAGS])
        next_run, last_run, runs = srow[S_NEXT_RUN_AT], srow[S_LAST_RUN_AT], 0
        while next_run <= now:
            at = next_run
            pid = srow[S_PROMISE_ID].replace("{{.timestamp}}", str(at)).replace("{{.id}}", sid)
            try:
                self._create(db, at, pid, add(at, srow[S_TIMEOUT]), srow[S_PARAM], tags)
            except Refusal as exc:
                logger.warning("resonate-sqlite: schedule %s cannot create %s: %s", sid, pid, exc)
            last_run, runs = at, runs + 1
            try:
                next_run = cron.next_run(spec, at)
            except cron.CronError as exc:  # (a spec that fired once fires again within 9 years)
                logger.warning("resonate-sqlite: schedule %s stops: %s", sid, exc)
                next_run = I64_MAX
        db.execute(SQL_SCHEDULE_ADVANCE, (last_run, next_run, srow[S_ID]))
        return runs


def _by_id(promise: dict[str, Any]) -> str:
    return str(promise["id"])


def _check_lease(
    now: int,
    tid: str | None,
    version: int | None,
    t_state: str | None,
    t_version: int | None,
    state: str,
    timeout_at: int,
) -> None:
    """Refuse unless the task is acquired at ``version`` and its promise is
    live (pending, before its deadline): the lease every task.* write needs."""
    if t_state is None:
        raise Refusal(404, f"task {tid} not found")
    if t_state != "acquired":
        raise Refusal(409, f"task {tid} is {t_state}, not acquired")
    if not (state == "pending" and timeout_at > now):  # wire.live
        raise Refusal(409, f"the promise of task {tid} is settled or timed out")
    if t_version != version:
        raise Refusal(409, f"task {tid} is at version {t_version}, not {version}")


type Handler = Callable[[Transitions, sqlite3.Connection, int, Any], Result]

#: The handler of each request kind.
HANDLERS: Final[dict[str, Handler]] = {
    "promise.get": Transitions._promise_get,
    "promise.create": Transitions._promise_create,
    "promise.settle": Transitions._promise_settle,
    "promise.register_listener": Transitions._register_listener,
    "promise.register_callback": Transitions._register_callback,
    "promise.search": Transitions._not_implemented,
    "task.get": Transitions._task_get,
    "task.create": Transitions._task_create,
    "task.acquire": Transitions._task_acquire,
    "task.release": Transitions._task_release,
    "task.fulfill": Transitions._task_fulfill,
    "task.fence": Transitions._task_fence,
    "task.suspend": Transitions._task_suspend,
    "task.heartbeat": Transitions._task_heartbeat,
    "task.halt": Transitions._task_halt,
    "task.continue": Transitions._task_continue,
    "task.search": Transitions._not_implemented,
    "schedule.get": Transitions._schedule_get,
    "schedule.create": Transitions._schedule_create,
    "schedule.delete": Transitions._schedule_delete,
    "schedule.search": Transitions._not_implemented,
}
