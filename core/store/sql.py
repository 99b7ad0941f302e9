"""The job index on SQL: one implementation for SQLite and Postgres.

Queries are written once with `?` placeholders; a driver runs them (the Postgres
driver swaps in `%s`). Each query uses an index: nothing scans all jobs. Writes
return the row they wrote (`RETURNING`, SQLite >= 3.35), so a write is one round
trip to the store, not a write and a read.

A write that records events runs in one transaction (`Driver.transaction`): it
adds their number to the job's `events` counter (`UPDATE ... RETURNING`, the
same statement as the change where there is one) and inserts them numbered up
to the counter. The row lock orders a job's events: their `seq` is gap-free,
and one committed later never has a smaller `seq` (Postgres too), so a reader
asking for `seq > n` misses nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import operator
import time
import uuid
from collections.abc import Callable, Collection, Coroutine, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, NamedTuple, Protocol, cast

import msgspec

from core.aside import ASIDE_BYTES, aside
from core.models import FINAL_STATES, OPEN_STATES, RETRYABLE_STATES, Outcome, read_json
from core.store.jobs import (
    Event,
    JobRecord,
    Listed,
    Listener,
    NewEvent,
    Notification,
    NotTogether,
    Requests,
    Together,
    message_id,
    now_ms,
)
from core.store.schema import EVENT_ROWS, JOB_ROWS, NOTIFICATION_ROWS, json_text

HISTORY_LIMIT = 1000
"""Events kept per job. Past it the oldest events after the first
`HISTORY_HEAD` are deleted as new ones come: a job keeps how it started and
how it is going."""
HISTORY_HEAD = 10
"""The first events of a job, always kept: `accepted`, the trigger's tries,
`triggered`."""


class Session(Protocol):
    """Runs SQL written with `?` placeholders."""

    async def fetch(self, sql: str, args: Sequence[Any]) -> list[tuple[Any, ...]]: ...
    async def execute(self, sql: str, args: Sequence[Any]) -> int:
        """Run a statement; return the number of rows it changed."""
        ...


class Driver(Session, Protocol):
    def transaction(self) -> AbstractAsyncContextManager[Session]:
        """The block's statements in one transaction: committed when it ends,
        rolled back if it raises. The block awaits nothing but them. For
        migrations (`migration_lock`) and tests: the index's own writes go
        through `atomic`."""
        ...

    async def atomic[T](
        self,
        body: Callable[[Session], Coroutine[Any, Any, T]],
        after: Callable[[T], None] | None = None,
    ) -> T:
        """`body(tx)`'s statements in one transaction, committed before this
        returns (rolled back if it raises), as `transaction` does; `body`
        awaits nothing but them. `after(result)` runs once it committed, with
        no wait in between, even if the caller was cancelled meanwhile. The
        embedded store runs it inside its next group commit
        (`SqliteDriver.atomic`), so the job index's writes take no
        transaction of their own."""
        ...

    async def fetch_aside(
        self, sql: str, args: Sequence[Any], *, keep: bool = True
    ) -> list[tuple[Any, ...]]:
        """A read that may be long (one of a whole index, a page whose filters
        rarely meet) and must not hold up the event loop: the embedded store
        runs it on a connection and thread of its own, one at a time per
        process, and (with `keep`) gives the same statement's last answer
        again while nothing was committed since; Postgres runs every read on
        its server, as `fetch`."""
        ...

    async def close(self) -> None: ...

    def refused(self) -> str | None:
        """`JobIndex.refused`."""
        ...


log = logging.getLogger("tether")

COUNTS_MANY = 100_000
"""Jobs stored from which a count per state is reused for `COUNTS_REUSE_S`
(the count reads the whole state index: 78-100 ms at a million jobs)."""
COUNTS_REUSE_S = 5.0

COLUMNS = JOB_ROWS.columns
_J_COLUMNS = ", ".join(f"j.{c.name}" for c in JOB_ROWS.table.columns)
_row = JOB_ROWS.decode
_event = EVENT_ROWS.decode
TOMBSTONE_DAYS = 90
"""How long retention remembers a deleted job's id (`tether_tombstones`): a
new job under it within that time gets a salt of its own (`JobRecord.salt`).
After it, the id's keys are its promise ids' again, as for a first job: an
external system that remembers an idempotency key for longer would take the
new job's trigger for the old one's."""
_INSERT = f"{JOB_ROWS.insert} ON CONFLICT (id) DO NOTHING RETURNING {COLUMNS}"
_SELECT = f"SELECT {COLUMNS} FROM tether_jobs WHERE id = ?"
_SALT = "SELECT salt FROM tether_jobs WHERE id = ?"
_ATTEMPT_OF = "SELECT attempt, created_at FROM tether_jobs WHERE id = ?"
_COUNT = f"UPDATE tether_jobs SET events = events + ? WHERE id = ? RETURNING {COLUMNS}"


def _count_at(states: Collection[str]) -> str:
    """`_COUNT`, only while the job is at an attempt and in one of `states`."""
    marks = ", ".join("?" for _ in states)
    return (
        "UPDATE tether_jobs SET events = events + ? WHERE id = ? AND attempt = ?"
        f" AND state IN ({marks}) RETURNING {COLUMNS}"
    )


_COUNT_OPEN, _COUNT_ENDED = _count_at(OPEN_STATES), _count_at(FINAL_STATES)
NOTE_CLOCK_SLACK_MS = 12 * 3_600_000
"""How much later than a notification's making its job's creation may seem
(the two times from two hosts' clocks): a new job under a deleted one's id
comes a day later at least (`MIN_RETENTION`)."""
_COUNT_OF = (
    "UPDATE tether_jobs SET events = events + ? WHERE id = ? AND created_at <= ?"
    f" RETURNING {COLUMNS}"
)
_SET_EXTERNAL = (
    "UPDATE tether_jobs SET external = ?, updated_at = ?,"
    " next_check_at = CASE WHEN state = 'pending' THEN ? ELSE next_check_at END,"
    " heartbeat_due = CASE WHEN state = 'pending' THEN ? ELSE heartbeat_due END,"
    " state = CASE WHEN state = 'pending' THEN 'running' ELSE state END"
)


_TURN = (
    "INSERT INTO tether_slots (backend, turns) VALUES (?, 1)"
    " ON CONFLICT (backend) DO UPDATE SET turns = tether_slots.turns + 1"
)
_ACTIVE = "SELECT count(*) FROM tether_jobs WHERE backend = ? AND state IN ('pending', 'running')"
# A queued job past its deadline is never started: the watchdog times it out
# (through the deadlines' index), and the jobs queued after it go first.
_QUEUED = (
    "SELECT 1 FROM tether_jobs WHERE backend = ? AND state = 'queued' AND deadline > ? LIMIT 1"
)
_PROMOTE = (
    "UPDATE tether_jobs SET state = 'pending', queued_at = NULL, updated_at = ? WHERE id IN"
    " (SELECT id FROM tether_jobs WHERE backend = ? AND state = 'queued' AND deadline > ?"
    " ORDER BY queued_at, seq LIMIT ?)"
    # Again outside the subquery: Postgres checks a row another transaction
    # changed while this one waited for it (a cancel) by this WHERE alone.
    # Checked on each row (`_checked`), not read from the state index: SQLite
    # read every queued job of every backend through it to find a few ids.
    " AND {checked}state = 'queued'"
    f" RETURNING {COLUMNS}"
)
PROMOTE_BATCH = 500
"""Queued jobs of a backend without a limit (any more) started at once, at most."""
_N_COLUMNS = NOTIFICATION_ROWS.columns


def _no_message(rec: JobRecord) -> str:
    raise RuntimeError(f"job {rec.id!r} asks for a notification, and no message was set")


def finished_data(outcome: Outcome) -> dict[str, Any]:
    """The `finished` event's data: the final state, and the error's type."""
    data: dict[str, Any] = {"state": outcome.status}
    if outcome.error is not None and outcome.error.type:
        data["error_type"] = outcome.error.type
    return data


class Written:
    """What a write transaction of the index did: the job's row as it left it
    (none: no such job, or not changed), the events it filed, the queued jobs
    it promoted to `pending`, whether it made the row; `rec`, the row as a
    `JobRecord` when the transaction decoded it already.

    The row is decoded once, however many read it (the caller, the
    listeners); a large one on the worker's own thread (`read`: the loop
    goes on between the floats of a large result, read by Python's
    `float`, not during a decode of lists or strings, which holds the
    interpreter's lock). A duplicate of a 1 MiB callback of 340,000 small
    lists decoded its row five times on the loop, 0.1 s each (2026-12-07)."""

    __slots__ = ("_reading", "_rec", "_weight", "created", "filed", "promoted", "rows")

    def __init__(
        self,
        rows: list[tuple[Any, ...]],
        filed: Sequence[Event] = (),
        promoted: Sequence[JobRecord] = (),
        created: bool = False,
        rec: JobRecord | None = None,
    ) -> None:
        self.rows, self.filed, self.promoted, self.created = rows, filed, promoted, created
        self._rec = rec
        self._reading: asyncio.Future[JobRecord] | None = None
        self._weight = -1  # (not yet weighed)

    @property
    def heavy(self) -> bool:
        """Whether the row is still to be decoded, and large (`ASIDE_BYTES`)."""
        if not self.rows or self._rec is not None:
            return False
        if self._weight < 0:
            self._weight = _weight(self.rows[0])
        return self._weight > ASIDE_BYTES

    @property
    def rec(self) -> JobRecord | None:
        """The job's row (as promoted, if the write promoted it), decoded here."""
        if not self.rows:
            return None
        if self._rec is None:
            self._rec = _row(self.rows[0])
        return self._as_promoted(self._rec)

    async def read(self) -> JobRecord | None:
        """`rec`, a large row decoded aside (`core.aside`): once, shared by
        whoever asks while it is decoded (a listener's tell, the caller)."""
        if not self.heavy:
            return self.rec
        if self._reading is None:
            self._reading = asyncio.ensure_future(aside(self._weight, _row, self.rows[0]))
        self._rec = await asyncio.shield(self._reading)
        return self._as_promoted(self._rec)

    def _as_promoted(self, rec: JobRecord) -> JobRecord:
        return next((p for p in self.promoted if p.id == rec.id), rec)


type _Plan = tuple[list[tuple[str, str]], tuple[str, str] | None]
"""How one (state, backend) of a list page is read: the lists its filters
name (`(kind, value)`: a tag, a state, a backend), and the one that drives
(None: the table itself, by `seq`)."""


_COLUMN = {column.name: n for n, column in enumerate(JOB_ROWS.table.columns)}
_ID, _SEQ, _BACKEND, _STATE, _ATTEMPT, _EVENTS, _NOTIFY_URL, _EXTERNAL = (
    _COLUMN[name]
    for name in ("id", "seq", "backend", "state", "attempt", "events", "notify_url", "external")
)
_HEARTBEAT_NOTED_AT, _PROGRESS_NOTED = _COLUMN["heartbeat_noted_at"], _COLUMN["progress_noted"]
"""Where a job row holds what a write reads of it before its commit (the
events' place, its backend, the run): read there, not decoded with the rest."""
_JSON = operator.itemgetter(*(n for n, c in enumerate(JOB_ROWS.table.columns) if c.type == "json"))
"""A job row's JSON columns (params, metadata, the run, the outcome, progress,
tags): what may be large."""


def _skipping(sites: Sequence[str]) -> tuple[str, list[Any]]:
    """The outbox's condition (` AND ...`, and its arguments) that passes over
    the notifications whose URL begins with one of `sites` (a scheme and host
    as written, then the end, a path, a query or a fragment)."""
    where, args = "", []
    for site in sites:
        where += " AND NOT (url = ? OR substr(url, 1, ?) IN (?, ?, ?))"
        args += [site, len(site) + 1, f"{site}/", f"{site}?", f"{site}#"]
    return where, args


def _rows(found: list[tuple[Any, ...]]) -> list[JobRecord]:
    return [_row(r) for r in found]


def _weight(row: tuple[Any, ...]) -> int:
    """A job row's size as `SqlJobIndex.PAGE_BYTES` counts it: its JSON's
    text (about 1 µs a row: every column's took 4, a tenth of a page's read)."""
    return sum(map(len, filter(None, _JSON(row))))


class _Span(NamedTuple):
    """Where one read of a list page looks: `seq` below `before_seq`, in
    [`low`, `high`] (a time window's range), from `floor` up on the driving
    list (a stretch's end), and created strictly between the two times."""

    before_seq: int | None
    low: int | None
    high: int | None
    floor: int | None
    created_after: int | None
    created_before: int | None


class SqlJobIndex:
    settles_together = False
    root_settled_first = True
    """In a settle that also ends the waiting workflow (`core.settle`,
    `_settle_together`), whether its root promise is settled before the
    callback promise: on one writer (the embedded engine) it is, so the
    callback on the promise goes with the root and no resume is pushed. On
    Postgres it is not (`PostgresIndex`)."""

    def __init__(self, driver: Driver) -> None:
        self.db = driver
        self.on_event: Listener | None = None
        self.limits: Mapping[str, int] = {}
        """Each limited backend's slots (`TETHER_MAX_RUNNING`)."""
        self.message: Callable[[JobRecord], str] = _no_message
        """The body of the completion notification of the attempt a row ended
        (the job as clients see it: `core.views.finished_message`, set by the
        service, which knows the view)."""
        self.on_ready: Callable[[list[JobRecord]], None] | None = None
        """Told of the queued jobs a write of this index moved to `pending`
        (their slots freed), after it committed: their workflows start."""
        self.counts_many = COUNTS_MANY
        self.clock: Callable[[], float] = time.monotonic
        self._counts: tuple[dict[str, int], float] | None = None  # (counts, kept until)
        self._telling: set[asyncio.Task[None]] = set()
        """The tells of large rows' events under way (`_tell_later`)."""

    async def _admit(self, tx: Session, backend: str, now: int) -> tuple[bool, dict[str, Any]]:
        """Whether a job of `backend` may take a slot at `now`: the backend
        has no limit, or a slot free and no job queued before it (but past its
        deadline, which never starts). Takes the backend's turn
        (`tether_slots`) for the rest of the transaction. With the `queued`
        event's data for a job that may not."""
        limit = self.limits.get(backend)
        if limit is None:
            return True, {}
        await tx.execute(_TURN, (backend,))
        active = (await tx.fetch(_ACTIVE, (backend,)))[0][0]
        if active < limit and not await tx.fetch(_QUEUED, (backend, now)):
            return True, {}
        return False, {"limit": limit, "running": active}

    async def _promote(self, tx: Session, backend: str, now: int) -> list[JobRecord]:
        """Move the oldest queued jobs of `backend` to `pending`, as many as it
        has free slots (at most `PROMOTE_BATCH` without a limit). Not one past
        its deadline at `now`: it stays queued until the watchdog times it
        out, never triggered, and those queued after it take the slots."""
        limit = self.limits.get(backend)
        free = PROMOTE_BATCH
        if limit is not None:
            await tx.execute(_TURN, (backend,))
            free = limit - (await tx.fetch(_ACTIVE, (backend,)))[0][0]
        if free <= 0:
            return []
        promote = _PROMOTE.format(checked=self._checked)
        return [_row(r) for r in await tx.fetch(promote, (now, backend, now, free))]

    async def _unstick(
        self, tx: Session, backend: str, queued: dict[str, Any], now: int
    ) -> list[JobRecord]:
        """After a job was queued behind others while slots were free (the
        limit was raised, or a promotion's workflow start was lost), promote
        as many as are free, oldest first: no queue waits beside a free slot."""
        if queued and queued["running"] < queued["limit"]:
            return await self._promote(tx, backend, now)
        return []

    def _ready(self, promoted: list[JobRecord]) -> None:
        if promoted and self.on_ready is not None:
            self.on_ready(promoted)

    async def promote(self, backend: str, now: int) -> list[JobRecord]:
        """Start queued jobs of `backend` for which slots are free (after the
        limits changed); `on_ready` hears of them. Returns them."""

        async def body(tx: Session) -> Written:
            return Written([], promoted=await self._promote(tx, backend, now))

        return list((await self._write(body)).promoted)

    async def state_counts(self) -> dict[str, int]:
        """How many jobs are in each state that has any: a read of the whole
        state index (78-100 ms at a million jobs on the 2-core test machine).
        It runs aside (`Driver.fetch_aside`), never holding up the event
        loop's other requests; on SQLite, while nothing was committed since
        the last count, that count is the answer (an idle store's scrapes
        cost a pragma, not a read of a million rows). With `counts_many`
        jobs or more stored, a count is given again for `COUNTS_REUSE_S`
        whatever was committed meanwhile: a dashboard reloads its summary
        every 1.5 s while jobs change, which would otherwise read the whole
        index each time. Below that, every count is exact."""
        kept = self._counts
        if kept is not None and self.clock() < kept[1]:
            return dict(kept[0])
        rows = await self.db.fetch_aside(
            "SELECT state, count(*) FROM tether_jobs GROUP BY state", ()
        )
        counts = {str(state): int(n) for state, n in rows}
        many = sum(counts.values()) >= self.counts_many
        self._counts = (counts, self.clock() + COUNTS_REUSE_S) if many else None
        return dict(counts)

    async def waiting_backends(
        self, excluding: Collection[str], *, queued: bool = True
    ) -> dict[str, int]:
        """How many open jobs each backend not in `excluding` has (without
        `queued`: only those triggered or triggering, which hold a callback
        URL). The backends with open jobs are found by skipping through the
        indexes of the slots taken and of the queue, one lookup per backend
        (never a read of every open job); only those not excluded are counted."""
        found: dict[str, int] = {}
        for index, where in (
            ("tether_jobs_active", "state IN ('pending', 'running')"),
            ("tether_jobs_queue", "state = 'queued'"),
        )[: 2 if queued else 1]:
            jobs = f"tether_jobs{self._indexed_by(index)}"
            rows = await self.db.fetch(
                "WITH RECURSIVE b(name) AS ("
                f" SELECT (SELECT min(backend) FROM {jobs} WHERE {where})"
                f" UNION ALL SELECT (SELECT min(backend) FROM {jobs} WHERE {where}"
                " AND backend > b.name) FROM b WHERE b.name IS NOT NULL"
                ") SELECT name FROM b WHERE name IS NOT NULL",
                (),
            )
            for (name,) in rows:
                if name in excluding:
                    continue
                counted = await self.db.fetch(
                    f"SELECT count(*) FROM {jobs} WHERE {where} AND backend = ?", (name,)
                )
                found[name] = found.get(name, 0) + int(counted[0][0])
        return dict(sorted(found.items()))

    async def queued_backends(self) -> list[str]:
        """The backends that have queued jobs."""
        rows = await self.db.fetch(
            "SELECT DISTINCT backend FROM tether_jobs WHERE state = 'queued'", ()
        )
        return sorted(r[0] for r in rows)

    async def _file(
        self,
        tx: Session,
        row: tuple[Any, ...],
        events: Sequence[NewEvent],
        now: int,
        attempt: int | None = None,
    ) -> list[Event]:
        """Insert `events` of the job's `row` (as the write left it: they are
        counted in its events, its last ones) under `attempt` (None: the
        row's), and keep the job's history within `HISTORY_LIMIT`. Their `at`
        is `now`, or the job's last event's if later: `now` is taken before
        the transaction, and a write of another process or of the same group
        commit may have come in between with a later one (found in an audit,
        2026-12-04), so a history read by `seq` never goes back in time."""
        if not events:
            return []
        job_id, count = row[_ID], row[_EVENTS]
        attempt = row[_ATTEMPT] if attempt is None else attempt
        first = count - len(events) + 1
        at = now
        if first > 1:  # none when a test deleted it; `HISTORY_LIMIT` keeps the tail
            last = await tx.fetch(
                "SELECT at FROM tether_events WHERE job_id = ? AND seq = ?", (job_id, first - 1)
            )
            at = max([now, *(int(r[0]) for r in last)])
        filed = [
            Event(job_id=job_id, seq=first + i, at=at, type=e.type, attempt=attempt, data=e.data)
            for i, e in enumerate(events)
        ]
        marks = ", ".join(["(" + ", ".join("?" * len(EVENT_ROWS.table.columns)) + ")"] * len(filed))
        insert = EVENT_ROWS.insert.partition(" VALUES ")[0]
        args = [value for ev in filed for value in EVENT_ROWS.values(ev)]
        await tx.execute(f"{insert} VALUES {marks}", args)
        if count > HISTORY_LIMIT:
            await tx.execute(
                "DELETE FROM tether_events WHERE job_id = ? AND seq > ? AND seq <= ?",
                (job_id, HISTORY_HEAD, count - (HISTORY_LIMIT - HISTORY_HEAD)),
            )
        return filed

    def _tell(self, rec: JobRecord, events: Sequence[Event]) -> None:
        if self.on_event is not None:
            for event in events:
                self.on_event(rec, event)

    async def _write(self, body: Callable[[Session], Coroutine[Any, Any, Written]]) -> Written:
        """`body` in one transaction. Once it committed, with no wait in
        between (a caller cancelled meanwhile cannot skip it), the listeners
        hear of the events it filed and the jobs it promoted start: a
        promotion committed and never told would leave its job `pending`
        with no workflow."""
        return await self.db.atomic(body, self._committed)

    def _committed(self, done: Written) -> None:
        if done.filed and self.on_event is not None:  # (else the row is not decoded for it)
            if done.heavy:
                self._tell_later(done)
            else:
                rec = done.rec
                if rec is not None:
                    self._tell(rec, done.filed)
        self._ready(list(done.promoted))

    def _tell_later(self, done: Written) -> None:
        """Tell the listeners of a large row's events once it is decoded
        aside, in a task of the index's own: still told if the writer is
        cancelled meanwhile (`close` waits for it). Listeners may hear of
        a later write's events first, of the same job too (a small row's,
        told at once; the queued jobs it promoted start first): none relies
        on their order (they count, wake, and look at times). A listener's
        error is logged, as the embedded store logs one after its commit."""

        async def tell() -> None:
            try:
                rec = await done.read()
                if rec is not None:
                    self._tell(rec, done.filed)
            except Exception as exc:
                log.warning("telling of a job's events failed: %s", type(exc).__name__)

        task = asyncio.get_running_loop().create_task(tell())
        self._telling.add(task)  # (a strong reference: the loop keeps a weak one)
        task.add_done_callback(self._telling.discard)

    async def insert(
        self, rec: JobRecord, events: Sequence[NewEvent] = ()
    ) -> tuple[JobRecord, bool]:

        async def body(tx: Session) -> Written:
            row, new = rec, events
            admitted, queued = await self._admit(tx, row.backend, row.created_at)
            if not admitted:
                row = msgspec.structs.replace(row, state="queued", queued_at=row.created_at)
                new = [*new, NewEvent("queued", queued)]
            row = msgspec.structs.replace(row, events=len(new))
            if await tx.fetch("SELECT 1 FROM tether_tombstones WHERE id = ?", (row.id,)):
                row = msgspec.structs.replace(row, salt=uuid.uuid4().hex[:16])
            rows = await tx.fetch(_INSERT, JOB_ROWS.values(row))
            created = bool(rows)
            filed: list[Event] = []
            if created and row.tags:
                seq = rows[0][_SEQ]
                marks = ", ".join(["(?, ?, ?)"] * len(row.tags))
                await tx.execute(
                    f"INSERT INTO tether_job_tags (tag, seq, job_id) VALUES {marks}",
                    [value for tag in row.tags for value in (tag, seq, row.id)],
                )
            if created and new:
                filed = await self._file(tx, rows[0], new, row.created_at)
            elif not created:
                rows = await tx.fetch(_SELECT, (row.id,))
                assert rows, "a job row vanished right after its insert"
            promoted = await self._unstick(tx, row.backend, queued, row.created_at)
            return Written(rows, filed, promoted, created)

        done = await self._write(body)
        stored = await done.read()
        assert stored is not None
        return stored, done.created

    async def get(self, job_id: str) -> JobRecord | None:
        if "\0" in job_id:  # no job has one, and Postgres text cannot hold it
            return None
        rows = await self.db.fetch(_SELECT, (job_id,))
        if not rows:
            return None
        # a large row read aside (`core.aside`): a job is read at each
        # callback, heartbeat and look at it, and a megabyte of floats took
        # 15-60 ms of the loop each time (a review, 2026-12-07); on the thread
        # the loop goes on between them (not during a decode of lists or
        # strings: one C call that holds the interpreter's lock)
        return await aside(_weight(rows[0]), _row, rows[0])

    async def salt_of(self, job_id: str) -> str | None:
        if "\0" in job_id:
            return None
        rows = await self.db.fetch(_SALT, (job_id,))
        return rows[0][0] if rows else None

    async def attempt_of(self, job_id: str) -> tuple[int, int] | None:
        if "\0" in job_id:
            return None
        rows = await self.db.fetch(_ATTEMPT_OF, (job_id,))
        return (int(rows[0][0]), int(rows[0][1])) if rows else None

    SCAN = 10_000
    """The most entries of its driving lists (below) one page reads. A page
    whose filters rarely meet stops there, short, and says where the next one
    goes on (`Listed.resume_before`): two common tags never on the same job
    walked a quarter of a million entries at a million jobs (0.27 s), ten
    times that at ten million; now every page reads at most this many (that
    case 5.5 ms at the median, `./dev bench --phases pages`)."""
    FIRST_STRETCH = 1_000
    """A page reads this many of its driving lists' entries first; if that
    did not fill it, as many more as the matches found so far say it needs
    (half again, at least this many, at most the rest of `SCAN`): a page
    whose filters often meet walks little further than it must."""

    PAGE_BYTES = 8 << 20
    """The JSON a page keeps and answers with, at most, about (its rows'
    JSON text; a page holds one row at least, whatever its size): a page
    stops there, short, and says where the next one goes on
    (`Listed.resume_before`). What it reads may be more: its first read takes
    up to `PAGE_CHUNK` rows of each (state, backend) it lists, whatever their
    size, since sizes are known only once read; later reads take as many as
    the rows so far say fit. Jobs may
    hold up to a body's size of params and metadata each: a page of a
    thousand such read a gigabyte, and a few dozen read at once (or job-list
    streams, which read their page every second) took the worker's memory
    into gigabytes and the store from every other request (found by a
    security QA pass)."""
    PAGE_CHUNK = 101
    """Rows one read of a page takes at most, so a page of large rows stops
    within a read of `PAGE_BYTES`: a page of 100 rows or fewer, and the one
    row past it that says whether another page follows, is one read (at 100,
    each such page took a second read for that row: list pages at a million
    jobs went from 1.5-2.8 to 2.2-5.4 ms at the median, `./dev bench --phases
    pages`)."""

    async def pages(
        self,
        pairs: Sequence[tuple[str | None, str | None]],
        limit: int,
        before_seq: int | None,
        tags: Sequence[str] = (),
        created_after: int | None = None,
        created_before: int | None = None,
    ) -> Listed:
        """Jobs newest first (by `seq`), at most `limit`, older than
        `before_seq`, of any of `pairs` (a state and a backend, None: any),
        matching the other filters given (the times exclusive).

        A page reads one index range from its newest match down and stops at
        its last: it never reads every match to sort them.

        - A time window first becomes the range of `seq` its jobs lie in
          (`_window`), which bounds the read: a window long ago starts where
          its jobs are, and one with fewer than `limit` jobs ends where they end.
        - Of the lists the filters name (`(state, seq)`, `(backend, seq)`,
          each tag's `(tag, seq)`), the one with the fewest jobs in that range
          drives (`_driver`); the other filters are checked on each of its
          jobs (a tag: one key lookup). With none, the table itself, by `seq`.
        - Where filters are checked on the driving list's jobs, the page reads
          it in stretches (`FIRST_STRETCH`, then as many as the matches so far
          say it needs, up to `SCAN` in all), each ending at a `seq` found
          first (`_floor`), and stops at `SCAN` with a short page and where to
          go on.

        The pairs' pages are read in one statement per stretch, so a job that
        changes state meanwhile is listed once: stretches are disjoint ranges
        of `seq`, and within one every pair is read in one snapshot (read one
        after another, a job changing state between two reads was listed
        twice or not at all).
        """
        if any("\0" in tag for tag in tags):
            return Listed([])  # no job has one, and Postgres text cannot hold it
        low = high = None
        if created_after is not None or created_before is not None:
            window = await self._window(created_after, created_before)
            if window is None:
                return Listed([])
            low, high = window
        plans: list[_Plan] = []
        for state, backend in pairs:
            if "\0" not in (state or "") + (backend or ""):
                named = [*(("tag", tag) for tag in tags), ("state", state), ("backend", backend)]
                lists = [(kind, value) for kind, value in named if value is not None]
                drive = lists[0] if len(lists) == 1 else None
                if len(lists) > 1:
                    drive = await self._driver(lists, before_seq, low, high)
                plans.append((lists, drive))
        if not plans:
            return Listed([])
        # Only a list whose jobs are checked against other filters can be
        # walked far for few rows: the others fill the page as they go.
        # (Pairs that share a driving list, as several states under one tag,
        # walk it once.)
        walked = list(
            dict.fromkeys(drive for lists, drive in plans if len(lists) > 1 and drive is not None)
        )
        rows: list[JobRecord] = []
        upper, read, stretch, size = before_seq, 0, self.FIRST_STRETCH, 0
        while True:
            floor = await self._floor(walked, stretch, upper, low, high) if walked else None
            span = _Span(upper, low, high, floor, created_after, created_before)
            found, cut, size = await self._read_within(plans, limit - len(rows), span, size)
            rows += found
            if cut:  # `PAGE_BYTES` read: short, and the next page goes on below
                return Listed(rows, rows[-1].seq)
            if len(rows) >= limit or floor is None:
                return Listed(rows)
            read += stretch
            if read >= self.SCAN:
                return Listed(rows, floor)
            # The next stretch: as long as the matches so far say the page
            # needs, and half again (finding a stretch's end walks its index
            # entries: on Postgres ~1 µs each); the rest of the budget when
            # none matched.
            wanted = (limit - len(rows)) * stretch * 3 // (2 * len(found)) if found else self.SCAN
            upper, stretch = floor, min(self.SCAN - read, max(self.FIRST_STRETCH, wanted))

    async def _read_within(
        self, plans: Sequence[_Plan], limit: int, span: _Span, size: int
    ) -> tuple[list[JobRecord], bool, int]:
        """The newest `limit` matches of any of `plans` in `span`, read
        `PAGE_CHUNK` rows at a time (fewer once the rows so far say how large
        they are) until the page's rows weigh `PAGE_BYTES` (`size`: what its
        earlier reads weighed); whether that cut the read short of `limit`
        with more to read; and what the page's rows weigh now."""
        rows: list[JobRecord] = []
        while True:
            left = limit - len(rows)
            chunk = min(left, self.PAGE_CHUNK)
            if rows:  # as many as the rows so far say fit, and one
                chunk = min(chunk, max(self.PAGE_BYTES - size, 0) * len(rows) // size + 1)
            found = await self._read(plans, chunk, span)
            for rec, weight in found:
                if size and size + weight > self.PAGE_BYTES:
                    return rows, True, size
                rows.append(rec)
                size += weight
            if len(found) < chunk or len(rows) >= limit:
                return rows, False, size
            if size >= self.PAGE_BYTES:
                return rows, True, size
            span = span._replace(before_seq=rows[-1].seq)

    async def _read(
        self,
        plans: Sequence[_Plan],
        limit: int,
        span: _Span,
    ) -> list[tuple[JobRecord, int]]:
        """The newest `limit` matches of any of `plans` in `span`, in one
        statement, each with its weight: the length of its text."""
        arms = [self._page_query(lists, drive, limit, span) for lists, drive in plans]
        if len(arms) == 1:
            sql, args = arms[0]
        else:
            sql = " UNION ALL ".join(
                f"SELECT * FROM ({arm}) AS p{n}" for n, (arm, _) in enumerate(arms)
            )
            args = [value for _, values in arms for value in values]
        # Aside: a stretch whose filters rarely meet still reads its thousands
        # of entries, and on the event loop that held up every request and
        # heartbeat of the process meanwhile. So is the rows' JSON read, when
        # large (`core.aside`): a page of 7.5 MB held the loop 0.6 s (a QA
        # pass, 2026-12-07); on the thread the loop gets a turn between rows.
        found = await self.db.fetch_aside(sql, args, keep=False)
        weights = [_weight(r) for r in found]
        rows = list(zip(await aside(sum(weights), _rows, found), weights, strict=True))
        return rows if len(arms) == 1 else sorted(rows, key=lambda r: -r[0].seq)[:limit]

    async def _floor(
        self,
        drives: Sequence[tuple[str, str]],
        stretch: int,
        before_seq: int | None,
        low: int | None,
        high: int | None,
    ) -> int | None:
        """Where a stretch of `stretch` entries of each of `drives` below
        `before_seq` (in [`low`, `high`]) ends: the greatest of their last
        entries' `seq`, or None when each has fewer entries there (the
        stretch then reads them to their end). One statement of index walks."""
        last = "(SELECT seq {list} ORDER BY seq DESC LIMIT 1 OFFSET ?)"
        sql, args = self._each_list(last, drives, stretch - 1, before_seq, low, high)
        found = await self.db.fetch_aside(sql, args, keep=False)
        ends = [seq for seq in found[0] if seq is not None]
        return max(ends) if ends else None

    def _page_query(
        self,
        lists: Sequence[tuple[str, str]],
        drive: tuple[str, str] | None,
        limit: int,
        span: _Span,
    ) -> tuple[str, list[Any]]:
        """The statement reading one (state, backend)'s page in `span`, and
        its values: `lists`, the lists its filters name, read along `drive`."""
        order = "j.seq"
        source = "tether_jobs j"
        where: list[str] = []
        args: list[Any] = []
        if drive is not None and drive[0] == "tag":
            order = "t.seq"
            source = "tether_job_tags t JOIN tether_jobs j ON j.seq = t.seq"
            where.append("t.tag = ?")
            args.append(drive[1])
        for kind, value in lists:
            if (kind, value) == drive:
                if kind != "tag":
                    where.append(f"j.{kind} = ?")
                    args.append(value)
            elif kind == "tag":
                where.append(
                    f"EXISTS (SELECT 1 FROM tether_job_tags o WHERE o.tag = ? AND o.seq = {order})"
                )
                args.append(value)
            else:  # checked on each row: never a second index that drives
                where.append(f"{self._checked}j.{kind} = ?")
                args.append(value)
        # The window's range of seq (`low`, `high`) bounds the read, never
        # `created_at`'s index read whole and sorted. With tags, the range is
        # on both sides of the join, or Postgres's merge join reads the jobs
        # from the newest down to it.
        seqs = ["t.seq", "j.seq"] if order == "t.seq" else ["j.seq"]
        conditions = (
            ([f"{self._checked}j.created_at > ?"], span.created_after),
            ([f"{self._checked}j.created_at < ?"], span.created_before),
            ([f"{seq} < ?" for seq in seqs], span.before_seq),
            ([f"{seq} >= ?" for seq in seqs], span.low),
            ([f"{seq} <= ?" for seq in seqs], span.high),
            # The stretch's end on the driving list alone: on both sides,
            # Postgres merge-joins every job of the stretch's range of seq
            # (four times the list's entries for a tag on a quarter of them)
            # before checking the other filters.
            ([f"{seqs[0]} >= ?"], span.floor),
        )
        for spelled, bound in conditions:
            if bound is not None:
                where += spelled
                args += [bound] * len(spelled)
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        sql = f"SELECT {_J_COLUMNS} FROM {source}{clause} ORDER BY {order} DESC LIMIT ?"
        return sql, [*args, limit]

    @property
    def _dialect(self) -> str:
        """The database's dialect name (`sqlite`, `postgresql`)."""
        return str(getattr(getattr(self.db, "dialect", None), "name", ""))

    @property
    def _checked(self) -> str:
        """Written before a column, makes a condition one SQLite checks on each
        row instead of reading an index for it (its planner has no statistics,
        and may drive a page by the longer of two lists): `+`. Nothing on
        Postgres, whose planner chooses by its statistics (and misjudges a
        condition spelled otherwise)."""
        return "+" if self._dialect == "sqlite" else ""

    def _indexed_by(self, index: str) -> str:
        """Written after a table, has SQLite read it through `index` (a
        partial index its planner, without statistics, passes over for an
        index of the same column whose every entry it would read: at a
        million waiting jobs, `waiting_backends` took 0.8-4.5 s so, delaying
        `tether serve`'s start and the first callback after it; found by
        the scale benchmark, 2026-12-04). Nothing on Postgres."""
        return f" INDEXED BY {index}" if self._dialect == "sqlite" else ""

    _DAY = "created_at / 86400000"
    """A job's day of creation (UTC days since 1970, rounded toward zero), as
    the index `tether_jobs_created_day (day, seq, created_at)` spells it."""

    async def _window(
        self, after: int | None, before: int | None
    ) -> tuple[int | None, int | None] | None:
        """The least and the greatest `seq` of the jobs created strictly
        between `after` and `before` (None for a side left open), or None
        when no job was: every job of the window lies in that range of seq.

        Exact however the hosts' clocks disagreed (`created_at` is nearly,
        not exactly, in `seq` order): each day of creation the window
        touches that has jobs is visited once in `tether_jobs_created_day`,
        its least and greatest seq inside the window being one key lookup
        each (a short walk on the window's two edge days). About 2 lookups a
        day of history the window spans, in one statement."""
        day = self._DAY
        first, last = -(1 << 63), (1 << 63) - 1
        inside = "created_at > ? AND created_at < ?"
        edges = (first if after is None else after, last if before is None else before)
        columns: list[str] = []
        args: list[Any] = [edges[0], edges[1]]
        for wanted, pick, direction in ((after, "min", ""), (before, "max", " DESC")):
            if wanted is not None:
                columns.append(
                    f"{pick}((SELECT seq FROM tether_jobs WHERE {day} = days.d AND {inside}"
                    f" ORDER BY seq{direction} LIMIT 1))"
                )
                args += edges
        args.append(edges[1])
        # The days that have jobs, each found from the one before (a skip
        # scan of the index), from the window's first day to its last.
        rows = await self.db.fetch(
            "WITH RECURSIVE days (d) AS ("
            f" SELECT (SELECT {day} FROM tether_jobs WHERE {day} >= ? / 86400000"
            f" ORDER BY {day} LIMIT 1)"
            f" UNION ALL SELECT (SELECT {day} FROM tether_jobs WHERE {day} > days.d"
            f" ORDER BY {day} LIMIT 1) FROM days WHERE days.d < ? / 86400000)"
            f" SELECT {', '.join(columns)} FROM days WHERE days.d <= ? / 86400000",
            args,
        )
        found = list(rows[0]) if rows else [None]
        if any(value is None for value in found):
            return None
        low = found.pop(0) if after is not None else None
        high = found.pop(0) if before is not None else None
        return low, high

    LIST_PROBE = 5000
    """How many jobs of each list `_driver` counts at most."""

    async def _driver(
        self,
        lists: Sequence[tuple[str, str]],
        before_seq: int | None,
        low: int | None,
        high: int | None,
    ) -> tuple[str, str]:
        """Of `lists` (`("tag" | "state" | "backend", value)`), the one with
        the fewest jobs in the page's range of seq, counting up to
        `LIST_PROBE` of each (of lists as long as that, the first): reading
        it until the page is full reads the fewest rows that fail the other
        filters. One statement, each count a walk of one index range."""
        count = "(SELECT count(*) FROM (SELECT 1 {list} LIMIT ?) AS n)"
        sql, args = self._each_list(count, lists, self.LIST_PROBE, before_seq, low, high)
        found = (await self.db.fetch(sql, args))[0]
        return lists[min(range(len(lists)), key=lambda i: found[i])]

    @staticmethod
    def _each_list(
        template: str,
        lists: Sequence[tuple[str, str]],
        n: int,
        before_seq: int | None,
        low: int | None,
        high: int | None,
    ) -> tuple[str, list[Any]]:
        """A statement of one column per list of `lists`, each `template`
        with `{list}` spelled as that list's jobs below `before_seq` in
        [`low`, `high`] (`FROM <table> WHERE <kind> = ? AND seq < ? ...`) and
        its last `?` being `n`; and its values."""
        ranged = ""
        bounds: list[Any] = []
        for condition, bound in (("seq < ?", before_seq), ("seq >= ?", low), ("seq <= ?", high)):
            if bound is not None:
                ranged += f" AND {condition}"
                bounds.append(bound)
        columns: list[str] = []
        args: list[Any] = []
        for kind, value in lists:
            table = "tether_job_tags" if kind == "tag" else "tether_jobs"
            columns.append(template.format(list=f"FROM {table} WHERE {kind} = ?{ranged}"))
            args += [value, *bounds, n]
        return f"SELECT {', '.join(columns)}", args

    async def set_external(
        self,
        job_id: str,
        external: dict[str, Any],
        now: int,
        next_check_at: int | None,
        event: NewEvent | None = None,
        heartbeat_due: int | None = None,
        keys: Sequence[str] = (),
        open_only: bool = False,
        attempt: int | None = None,
        created_at: int | None = None,
    ) -> JobRecord | None:
        which: tuple[Any, ...] = (job_id,) if attempt is None else (job_id, attempt)
        where = "WHERE id = ?" if attempt is None else "WHERE id = ? AND attempt = ?"
        if created_at is not None:
            which, where = (*which, created_at), f"{where} AND created_at = ?"
        args = (json_text(external), now, next_check_at, heartbeat_due, *which)
        if open_only:
            where = f"{where} AND state IN ('pending', 'running')"
        again = f"{_SET_EXTERNAL} {where} RETURNING {COLUMNS}"
        if event is None and not keys:
            rows = await self.db.fetch(again, args)
            return _row(rows[0]) if rows else None

        async def body(tx: Session) -> Written:
            filed: list[Event] = []
            if event is not None:
                # The first receipt is the record: a second trigger of the
                # attempt (a process that stalled while another took its
                # workflow over) changes nothing, whatever it was answered.
                rows = await tx.fetch(
                    f"{_SET_EXTERNAL}, events = events + 1 {where} AND external IS NULL"
                    f" RETURNING {COLUMNS}",
                    args,
                )
                if rows:
                    filed = await self._file(tx, rows[0], [event], now)
                else:
                    rows = await tx.fetch(f"SELECT {COLUMNS} FROM tether_jobs {where}", which)
            else:
                rows = await tx.fetch(again, args)
            if rows and keys:
                await self._index_run_keys(tx, rows[0][_BACKEND], job_id, keys)
            return Written(rows, filed)

        return await (await self._write(body)).read()

    async def finish(
        self,
        job_id: str,
        outcome: Outcome,
        now: int,
        from_states: Sequence[str] = OPEN_STATES,
        attempt: int | None = None,
    ) -> JobRecord | None:
        return (await self.end(job_id, outcome, now, from_states, attempt=attempt))[0]

    async def end(
        self,
        job_id: str,
        outcome: Outcome,
        now: int,
        from_states: Sequence[str] = OPEN_STATES,
        events: Sequence[NewEvent] = (),
        attempt: int | None = None,
        stop_due: int | None = None,
        together: Together | None = None,
    ) -> tuple[JobRecord | None, bool]:
        marks = ", ".join("?" for _ in from_states)
        of_attempt = "" if attempt is None else " AND attempt = ?"
        events = [*events, NewEvent("finished", finished_data(outcome))]
        stop = ""
        if stop_due is not None:  # a run to stop; ELSE the column: Postgres types `?` as it
            stop = (
                ", stop_due = CASE WHEN external IS NOT NULL THEN ? ELSE stop_due END,"
                " stop_attempt = CASE WHEN external IS NOT NULL THEN attempt ELSE stop_attempt END"
            )

        async def body(tx: Session) -> Written:
            filed: list[Event] = []
            if together is not None:
                await together(cast(Requests, tx))
            if self.limits:  # the backend's turn before the job's row: one lock order
                current = await tx.fetch("SELECT backend FROM tether_jobs WHERE id = ?", (job_id,))
                if current and current[0][0] in self.limits:
                    await tx.execute(_TURN, (current[0][0],))
            rows = await tx.fetch(
                "UPDATE tether_jobs SET state = ?, result = ?, error = ?, finished_at = ?,"
                " updated_at = ?, next_check_at = NULL, heartbeat_due = NULL, events = events + ?"
                f"{stop} WHERE id = ? AND state IN ({marks}){of_attempt} RETURNING {COLUMNS}",
                (
                    outcome.status,
                    json_text(outcome.result),
                    json_text(outcome.error),
                    now,
                    now,
                    len(events),
                    *([] if stop_due is None else [stop_due]),
                    job_id,
                    *from_states,
                    *([] if attempt is None else [attempt]),
                ),
            )
            promoted: list[JobRecord] = []
            ended = None
            if rows:
                filed = await self._file(tx, rows[0], events, now)
                if rows[0][_NOTIFY_URL] is not None:  # its message holds the outcome
                    ended = _row(rows[0])
                    await self._post(tx, ended, now)
                if rows[0][_BACKEND] in self.limits:
                    promoted = await self._promote(tx, rows[0][_BACKEND], now)
            elif together is not None:
                raise NotTogether(f"job {job_id!r} was not open at attempt {attempt}")
            else:
                rows = await tx.fetch(_SELECT, (job_id,))
            return Written(rows, filed, promoted, rec=ended)

        done = await self._write(body)
        return await done.read(), bool(done.filed)

    async def _post(self, tx: Session, rec: JobRecord, now: int) -> None:
        """Put the notification of the attempt that just ended in the outbox."""
        assert rec.notify_url is not None
        note = Notification(
            id=message_id(rec.id, rec.created_at, rec.attempt),
            job_id=rec.id,
            attempt=rec.attempt,
            url=rec.notify_url,
            body=self.message(rec),
            created_at=now,
            due_at=now,
        )
        await tx.execute(NOTIFICATION_ROWS.insert, NOTIFICATION_ROWS.values(note))

    async def retry(
        self, job_id: str, attempt: int, deadline: int, now: int, event: NewEvent
    ) -> JobRecord | None:
        marks = ", ".join("?" for _ in RETRYABLE_STATES)

        async def body(tx: Session) -> Written:
            current = await tx.fetch("SELECT backend FROM tether_jobs WHERE id = ?", (job_id,))
            admitted, queued = await self._admit(tx, current[0][0], now) if current else (True, {})
            state, queued_at = ("pending", None) if admitted else ("queued", now)
            rows = await tx.fetch(
                "UPDATE tether_jobs SET state = ?, queued_at = ?, attempt = attempt + 1,"
                " deadline = ?,"
                " updated_at = ?, external = NULL, result = NULL, error = NULL,"
                " finished_at = NULL, next_check_at = NULL, heartbeat_at = NULL,"
                " heartbeat_due = NULL, progress = NULL, heartbeat_noted_at = NULL,"
                f" progress_noted = NULL, events = events + {1 if admitted else 2}"
                f" WHERE id = ? AND attempt = ? AND state IN ({marks}) AND stop_due IS NULL"
                f" RETURNING {COLUMNS}",
                (state, queued_at, deadline, now, job_id, attempt, *RETRYABLE_STATES),
            )
            new = [event] if admitted else [event, NewEvent("queued", queued)]
            filed = await self._file(tx, rows[0], new, now) if rows else []
            promoted = await self._unstick(tx, current[0][0], queued, now) if rows else []
            return Written(rows, filed, promoted)

        return await (await self._write(body)).read()

    async def record(
        self,
        job_id: str,
        events: Sequence[NewEvent],
        now: int,
        external: tuple[int, Mapping[str, Any]] | None = None,
        *,
        open_at: int | None = None,
        ended_at: int | None = None,
    ) -> JobRecord | None:

        async def body(tx: Session) -> Written:
            if open_at is not None:
                rows = await tx.fetch(_COUNT_OPEN, (len(events), job_id, open_at, *OPEN_STATES))
            elif ended_at is not None:
                rows = await tx.fetch(_COUNT_ENDED, (len(events), job_id, ended_at, *FINAL_STATES))
            else:
                rows = await tx.fetch(_COUNT, (len(events), job_id))
            filed = await self._file(tx, rows[0], events, now) if rows else []
            if rows and external is not None:
                rows = await self._merge_external(tx, rows[0], *external) or rows
            return Written(rows, filed)

        return await (await self._write(body)).read()

    async def _merge_external(
        self, tx: Session, row: tuple[Any, ...], attempt: int, changed: Mapping[str, Any]
    ) -> list[tuple[Any, ...]]:
        """Merge `changed` into the `external` of the job's `row`, running and
        still at `attempt` (the row is locked by the caller's update); []
        otherwise. Only the run's column is decoded (the row may be large)."""
        if row[_ATTEMPT] != attempt or row[_STATE] != "running" or row[_EXTERNAL] is None:
            return []
        external = read_json(row[_EXTERNAL], dict[str, Any])
        merged = {**external, **changed}
        if merged == external:
            return []
        return await tx.fetch(
            f"UPDATE tether_jobs SET external = ? WHERE id = ? RETURNING {COLUMNS}",
            (json_text(merged), row[_ID]),
        )

    async def events_after(
        self, job_id: str, after: int, limit: int
    ) -> tuple[JobRecord | None, list[Event]]:
        """The job and its events with `seq > after`, oldest first, at most `limit`."""
        rec = await self.get(job_id)
        if rec is None or rec.events <= after:
            return rec, []
        rows = await self.db.fetch(
            f"SELECT {EVENT_ROWS.columns} FROM tether_events WHERE job_id = ? AND seq > ?"
            " ORDER BY seq LIMIT ?",
            (job_id, after, limit),
        )
        return rec, [_event(r) for r in rows]

    async def last_tries(self, job_id: str, attempt: int, limit: int) -> list[Event]:
        trying = "('trigger_failed', 'trigger_slow')"
        rows = await self.db.fetch(
            f"SELECT {EVENT_ROWS.columns} FROM tether_events WHERE job_id = ? AND attempt = ?"
            f" AND type IN {trying} ORDER BY seq DESC LIMIT ?",
            (job_id, attempt, limit),
        )
        return [_event(r) for r in reversed(rows)]

    async def history(
        self, job_id: str, after: int, limit: int
    ) -> tuple[JobRecord | None, list[Event], int]:
        rec, events = await self.events_after(job_id, after, limit)
        if rec is None or rec.events <= HISTORY_HEAD:
            return rec, events, 0
        rows = await self.db.fetch("SELECT count(*) FROM tether_events WHERE job_id = ?", (job_id,))
        return rec, events, max(rec.events - rows[0][0], 0)

    async def due(self, now: int, limit: int) -> list[JobRecord]:
        late = await self.db.fetch(
            f"SELECT {COLUMNS} FROM tether_jobs WHERE finished_at IS NULL AND deadline <= ?"
            " ORDER BY deadline LIMIT ?",
            (now, limit),
        )
        checks = await self.db.fetch(
            f"SELECT {COLUMNS} FROM tether_jobs WHERE next_check_at IS NOT NULL"
            " AND next_check_at <= ? ORDER BY next_check_at LIMIT ?",
            (now, limit),
        )
        beats = await self.db.fetch(
            f"SELECT {COLUMNS} FROM tether_jobs WHERE heartbeat_due IS NOT NULL"
            " AND heartbeat_due <= ? ORDER BY heartbeat_due LIMIT ?",
            (now, limit),
        )
        stops = await self.db.fetch(
            f"SELECT {COLUMNS} FROM tether_jobs WHERE stop_due IS NOT NULL"
            " AND stop_due <= ? ORDER BY stop_due LIMIT ?",
            (now, limit),
        )
        seen = {rec.id: rec for rec in map(_row, (*late, *checks, *beats, *stops))}
        return list(seen.values())

    async def next_due(self, after: int) -> int | None:
        """The earliest deadline, status check or heartbeat due of an open
        job, or run's stop due, strictly after `after` (None: none): the
        first row of each of their partial indexes, one round trip."""
        rows = await self.db.fetch(
            "SELECT (SELECT deadline FROM tether_jobs WHERE finished_at IS NULL"
            " AND deadline > ? ORDER BY deadline LIMIT 1),"
            " (SELECT next_check_at FROM tether_jobs WHERE next_check_at IS NOT NULL"
            " AND next_check_at > ? ORDER BY next_check_at LIMIT 1),"
            " (SELECT heartbeat_due FROM tether_jobs WHERE heartbeat_due IS NOT NULL"
            " AND heartbeat_due > ? ORDER BY heartbeat_due LIMIT 1),"
            " (SELECT stop_due FROM tether_jobs WHERE stop_due IS NOT NULL"
            " AND stop_due > ? ORDER BY stop_due LIMIT 1)",
            (after, after, after, after),
        )
        found = [at for at in rows[0] if at is not None] if rows else []
        return min(found, default=None)

    async def reschedule_check(self, job_id: str, expected: int, next_check_at: int | None) -> bool:
        changed = await self.db.execute(
            "UPDATE tether_jobs SET next_check_at = ? WHERE id = ? AND next_check_at = ?",
            (next_check_at, job_id, expected),
        )
        return changed == 1

    async def beat(
        self, job_id: str, attempt: int, now: int, progress: Any, due: int | None, note_every: int
    ) -> JobRecord | None:
        marks = ", ".join("?" for _ in OPEN_STATES)
        told = "" if progress is None else ", progress = ?"
        args = [now, due, *([] if progress is None else [json_text(progress)]), job_id, attempt]

        async def body(tx: Session) -> Written:
            filed: list[Event] = []
            # The update holds the row until the commit, so of two heartbeats
            # at once one decides after the other's event is counted.
            rows = await tx.fetch(
                f"UPDATE tether_jobs SET heartbeat_at = ?, heartbeat_due = ?{told}"
                f" WHERE id = ? AND attempt = ? AND state IN ({marks}) RETURNING {COLUMNS}",
                (*args, *OPEN_STATES),
            )
            if rows and progress is not None:
                noted_at, noted = rows[0][_HEARTBEAT_NOTED_AT], rows[0][_PROGRESS_NOTED]
                digest = hashlib.sha256(msgspec.json.encode(progress, order="sorted")).hexdigest()
                quiet = noted_at is None or now - noted_at >= note_every
                if quiet and digest != noted:
                    rows = await tx.fetch(
                        "UPDATE tether_jobs SET heartbeat_noted_at = ?, progress_noted = ?,"
                        f" events = events + 1 WHERE id = ? RETURNING {COLUMNS}",
                        (now, digest, job_id),
                    )
                    heartbeat = NewEvent("heartbeat", {"progress": progress})
                    filed = await self._file(tx, rows[0], [heartbeat], now)
            return Written(rows, filed)

        return await (await self._write(body)).read()

    async def mark_tries(
        self, job_id: str, created_at: int, attempt: int, seen: str | None, mark: str
    ) -> bool:
        changed = await self.db.execute(
            "UPDATE tether_jobs SET tries_run = ? WHERE id = ? AND created_at = ?"
            " AND attempt = ? AND COALESCE(tries_run, '') IN (?, ?)",
            (mark, job_id, created_at, attempt, seen or "", mark),
        )
        return changed == 1

    async def claim_heartbeat(self, job_id: str, expected: int, next_due: int) -> bool:
        changed = await self.db.execute(
            "UPDATE tether_jobs SET heartbeat_due = ? WHERE id = ? AND heartbeat_due = ?",
            (next_due, job_id, expected),
        )
        return changed == 1

    async def hold_stop(self, job_id: str, attempt: int, until: int) -> JobRecord | None:
        rows = await self.db.fetch(
            "UPDATE tether_jobs SET stop_due = ?, stop_attempt = attempt WHERE id = ?"
            " AND attempt = ? AND state IN ('canceled', 'timed_out') AND external IS NULL"
            f" AND stop_due IS NULL RETURNING {COLUMNS}",
            (until, job_id, attempt),
        )
        return _row(rows[0]) if rows else None

    async def claim_stop(self, job_id: str, expected: int, until: int) -> JobRecord | None:
        rows = await self.db.fetch(
            "UPDATE tether_jobs SET stop_due = ? WHERE id = ? AND stop_due = ?"
            f" RETURNING {COLUMNS}",
            (until, job_id, expected),
        )
        return _row(rows[0]) if rows else None

    async def stopped(
        self, job_id: str, attempt: int, claim: int, events: Sequence[NewEvent], now: int
    ) -> JobRecord | None:

        async def body(tx: Session) -> Written:
            rows = await tx.fetch(
                "UPDATE tether_jobs SET stop_due = NULL, stop_attempt = NULL, events = events + ?"
                " WHERE id = ? AND stop_due = ? AND COALESCE(stop_attempt, attempt) = ?"
                f" RETURNING {COLUMNS}",
                (len(events), job_id, claim, attempt),
            )
            filed = []
            if rows and events:  # (a host before `stop_due` may have retried the job since)
                filed = await self._file(tx, rows[0], events, now, attempt)
            return Written(rows, filed)

        return await (await self._write(body)).read()

    async def release_stop(self, job_id: str, attempt: int, claim: int, due: int) -> bool:
        changed = await self.db.execute(
            "UPDATE tether_jobs SET stop_due = ? WHERE id = ? AND stop_due = ?"
            " AND COALESCE(stop_attempt, attempt) = ?",
            (due, job_id, claim, attempt),
        )
        return changed == 1

    async def delete_finished(self, before: int, limit: int) -> list[str]:
        async def body(tx: Session) -> list[str]:
            rows = await tx.fetch(
                "DELETE FROM tether_jobs WHERE id IN (SELECT id FROM tether_jobs"
                " WHERE finished_at IS NOT NULL AND finished_at < ? AND stop_due IS NULL"
                " ORDER BY finished_at LIMIT ?)"
                # Again outside the subquery, as in `_PROMOTE`: a job retried
                # while this waited for its row is open again, and stays. A
                # job whose run's stop is still due stays until it is made
                # (its row is all that says the run is to be stopped).
                " AND finished_at IS NOT NULL AND finished_at < ? AND stop_due IS NULL"
                " RETURNING id",
                (before, limit, before),
            )
            ids = [r[0] for r in rows]
            now = now_ms()
            if ids:
                marks = ", ".join("?" for _ in ids)
                await tx.execute(f"DELETE FROM tether_events WHERE job_id IN ({marks})", ids)
                await tx.execute(f"DELETE FROM tether_job_tags WHERE job_id IN ({marks})", ids)
                await tx.execute(f"DELETE FROM tether_run_keys WHERE job_id IN ({marks})", ids)
                await tx.execute(
                    "INSERT INTO tether_tombstones (id, deleted_at) VALUES"
                    + ", ".join(["(?, ?)"] * len(ids))
                    + " ON CONFLICT (id) DO UPDATE SET deleted_at = excluded.deleted_at",
                    [v for job_id in ids for v in (job_id, now)],
                )
            await tx.execute(
                "DELETE FROM tether_tombstones WHERE deleted_at < ?",
                (now - TOMBSTONE_DAYS * 86_400_000,),
            )
            return ids

        return await self.db.atomic(body)

    async def notifications_due(
        self, now: int, limit: int, skipping: Sequence[str] = ()
    ) -> list[Notification]:
        """Notifications whose time to be tried has come, the longest due
        first, but those to a URL beginning with one of `skipping` (a scheme
        and host as written, `notify_site`)."""
        where, args = _skipping(skipping)
        rows = await self.db.fetch(
            f"SELECT {_N_COLUMNS} FROM tether_notifications WHERE due_at <= ?{where}"
            " ORDER BY due_at LIMIT ?",
            (now, *args, limit),
        )
        return [NOTIFICATION_ROWS.decode(r) for r in rows]

    async def next_notification_at(self, skipping: Sequence[str] = ()) -> int | None:
        """When the next notification is due (None: none waits), but those
        to a URL beginning with one of `skipping`."""
        if not skipping:  # the first entry of the index
            rows = await self.db.fetch("SELECT min(due_at) FROM tether_notifications", ())
            return rows[0][0] if rows else None
        where, args = _skipping(skipping)
        rows = await self.db.fetch(
            f"SELECT due_at FROM tether_notifications WHERE 1 = 1{where} ORDER BY due_at LIMIT 1",
            tuple(args),
        )
        return rows[0][0] if rows else None

    async def notification_waiting(self, job_id: str, created_at: int) -> bool:
        """Whether a notification of the job made at `created_at` waits in the
        outbox (not yet delivered or given up): one read of the outbox's job
        index. Not one of a deleted job under the same id (older than the job
        by more than the hosts' clocks may disagree): its tries are never
        filed on this one (`notification_tried`)."""
        rows = await self.db.fetch(
            "SELECT 1 FROM tether_notifications WHERE job_id = ? AND created_at >= ? LIMIT 1",
            (job_id, created_at - NOTE_CLOCK_SLACK_MS),
        )
        return bool(rows)

    async def claim_notification(self, note: Notification, until: int) -> bool:
        """Take a try of `note`: move it from its `due_at` to `until` (when
        another may try it, should this process die) and count the try;
        False if another process took it first."""
        changed = await self.db.execute(
            "UPDATE tether_notifications SET due_at = ?, tries = tries + 1"
            " WHERE id = ? AND due_at = ?",
            (until, note.id, note.due_at),
        )
        return changed == 1

    async def notification_tried(
        self,
        note: Notification,
        again_at: int | None,
        events: Sequence[NewEvent],
        now: int,
        given_up: NewEvent | None = None,
    ) -> bool:
        """After a try of `note` (as this process's claim left it: its
        `due_at` and `tries`), `events` recorded in its job's history (if the
        job is still kept) and the outbox changed, in one transaction:

        - delivered (`again_at` and `given_up` None): out of the outbox,
          whoever claimed it since (a delivered notification stays delivered);
        - failed: due again at `again_at`, or given up (`given_up`, its
          `notify_failed`, filed after `events`) out of the outbox, only while
          the claim still holds (a compare-and-set on it). A claim that ran
          out is another process's now, or the notification was delivered
          (or given up) meanwhile: that one's outcome stands, and this try
          is filed as a try alone, never given up.

        Whether the outbox changed (False: the claim was lost; for a
        delivery, it was out of the outbox already)."""
        held = " AND due_at = ? AND tries = ?"
        claim = (note.due_at, note.tries)
        changed = 0

        async def body(tx: Session) -> Written:
            nonlocal changed
            if again_at is None and given_up is None:
                changed = await tx.execute(
                    "DELETE FROM tether_notifications WHERE id = ?", (note.id,)
                )
            elif again_at is None:
                changed = await tx.execute(
                    f"DELETE FROM tether_notifications WHERE id = ?{held}", (note.id, *claim)
                )
            else:
                changed = await tx.execute(
                    f"UPDATE tether_notifications SET due_at = ? WHERE id = ?{held}",
                    (again_at, note.id, *claim),
                )
            filing = [*events, given_up] if changed and given_up is not None else list(events)
            # Filed on the job it tells of: not on a new job under the same id,
            # made after retention deleted that one (at least a day after its
            # end; half a day's slack for hosts' clocks that disagree).
            counted = (len(filing), note.job_id, note.created_at + NOTE_CLOCK_SLACK_MS)
            rows = await tx.fetch(_COUNT_OF, counted) if filing else []
            # Filed under the attempt the notification tells of, which the job
            # may have left (a retry) before it was delivered.
            filed = []
            if rows:
                filed = await self._file(tx, rows[0], filing, now, note.attempt)
            return Written(rows, filed)

        await self._write(body)
        return changed == 1

    async def ping(self) -> None:
        await self.db.fetch("SELECT 1", ())

    async def change_mark(self) -> object:
        return None  # SQLite's: `SqliteIndex`

    def refused(self) -> str | None:
        return self.db.refused()

    async def identity(self) -> str:
        """This index's id: a random one, made the first time it is asked for
        (by whichever process gets there first) and the same ever after, in a
        copy or a restore of it too. A Resonate server is paired with it, and
        each health check reads it again (a read; the write only the once)."""
        return await self.claim_meta("index_id", uuid.uuid4().hex)

    async def claim_meta(self, name: str, value: str) -> str:
        """The fact `name` of `tether_meta`, made `value` if it has none yet:
        of processes claiming it at once, the first one's. A read while it
        has one; the write only the once."""
        found = await self.meta(name)
        if found is None:
            await self.db.execute(
                "INSERT INTO tether_meta (name, value) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
                (name, value),
            )
            found = await self.meta(name)
        return str(found)

    async def has_jobs(self) -> bool:
        """Whether any job is kept (one index lookup)."""
        return bool(await self.db.fetch("SELECT 1 FROM tether_jobs LIMIT 1", ()))

    async def swap_meta(self, name: str, value: str) -> str | None:
        """Set the fact `name` of `tether_meta` to `value`; the value it had
        (None: none yet). One transaction, the row locked on Postgres (SQLite's
        takes the write lock first): processes swapping at once each get the
        value the one before it left (the row is made first if missing: on
        Postgres a second maker waits for the first to commit)."""

        async def body(tx: Session) -> str | None:
            made = await tx.execute(
                "INSERT INTO tether_meta (name, value) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
                (name, value),
            )
            if made:
                return None
            rows = await tx.fetch(
                "SELECT value FROM tether_meta WHERE name = ?" + self._row_lock, (name,)
            )
            await tx.execute("UPDATE tether_meta SET value = ? WHERE name = ?", (value, name))
            return str(rows[0][0])

        return await self.db.atomic(body)

    async def meta(self, name: str) -> str | None:
        """The fact `name` of `tether_meta` (None: none yet)."""
        rows = await self.db.fetch("SELECT value FROM tether_meta WHERE name = ?", (name,))
        return str(rows[0][0]) if rows else None

    async def take_group(self, group: str, assumed: str | None = None) -> tuple[str | None, int]:
        """Record `group` as the one the store's workflows run in (the
        `tether_meta` fact `group`) unless jobs run in the one recorded: that
        group (`assumed` when none is recorded; None: none known) and, when it
        is another, how many jobs are pending or running (recorded only at 0).
        One transaction: the row is made first if missing (as `assumed`, or
        `group`), then read locked, so hosts starting together take turns on
        Postgres too (SQLite's transactions take the write lock first)."""

        async def body(tx: Session) -> tuple[str | None, int]:
            made = await tx.execute(
                "INSERT INTO tether_meta (name, value) VALUES ('group', ?)"
                " ON CONFLICT (name) DO NOTHING",
                (assumed or group,),
            )
            rows = await tx.fetch(
                "SELECT value FROM tether_meta WHERE name = 'group'" + self._row_lock, ()
            )
            recorded = str(rows[0][0])
            running = 0
            if recorded != group:
                [(running,)] = await tx.fetch(
                    "SELECT count(*) FROM tether_jobs WHERE state IN ('pending', 'running')", ()
                )
                if not running:
                    await tx.execute(
                        "UPDATE tether_meta SET value = ? WHERE name = 'group'", (group,)
                    )
            return (None if made and assumed is None else recorded), int(running)

        return await self.db.atomic(body)

    @property
    def _row_lock(self) -> str:
        """What locks the rows a select in a transaction reads until it ends:
        Postgres' `FOR UPDATE`; nothing on SQLite, whose transactions take the
        write lock first."""
        return " FOR UPDATE" if self._dialect == "postgresql" else ""

    async def close(self) -> None:
        while self._telling:  # (a write that commits meanwhile may start one more)
            await asyncio.gather(*self._telling, return_exceptions=True)
        await self.db.close()

    async def _index_run_keys(
        self, tx: Session, backend: str, job_id: str, keys: Sequence[str]
    ) -> None:
        """Index the keys a backend knows the job's run by (`tether_run_keys`):
        a key already there belongs to this job from now on."""
        unique = list(dict.fromkeys(keys))  # Postgres refuses one key twice in an upsert
        marks = ", ".join(["(?, ?, ?)"] * len(unique))
        await tx.execute(
            f"INSERT INTO tether_run_keys (backend, run_key, job_id) VALUES {marks}"
            " ON CONFLICT (backend, run_key) DO UPDATE SET job_id = excluded.job_id",
            [value for key in unique for value in (backend, key, job_id)],
        )

    async def jobs_of_run_keys(
        self, backend: str, keys: Sequence[str]
    ) -> list[tuple[str, JobRecord]]:
        """The jobs of `backend` whose runs are known by any of `keys`, each
        with the key that found it: one read of the key index's primary key
        (nothing found: nothing else is read, nothing written)."""
        if not keys:
            return []
        unique = list(dict.fromkeys(keys))
        marks = ", ".join("?" for _ in unique)
        rows = await self.db.fetch(
            f"SELECT k.run_key, {_J_COLUMNS} FROM tether_run_keys k"
            " JOIN tether_jobs j ON j.id = k.job_id"
            f" WHERE k.backend = ? AND k.run_key IN ({marks})",
            (backend, *unique),
        )
        return [(r[0], _row(r[1:])) for r in rows]
