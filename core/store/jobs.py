"""The job index: one row per job, kept in the same store as the promises.

The durable promises decide how a job ends (the first settle wins); the index
records what clients list and read, and when the watchdog must look at a job
(its deadline, its next status check). Every write is a conditional update, so
a replayed step or two processes racing leave the same row behind.

Beside each row, the job's history (`Event`s): a write that changes the job
records its event in the same transaction, and only when it changed the row,
so a replayed step records nothing twice (docs/architecture.md, "Job history").
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from typing import Any, NamedTuple, Protocol

import msgspec

from core.models import FINAL_STATES, OPEN_STATES, ErrorInfo, EventType, JobState, Outcome


def now_ms() -> int:
    return int(time.time() * 1000)


class JobRecord(msgspec.Struct, kw_only=True):
    """A job row as stored. Times are Unix milliseconds."""

    id: str
    backend: str
    state: JobState
    params: dict[str, Any]
    metadata: dict[str, Any]
    timeout: float
    fingerprint: str
    deadline: int
    created_at: int
    updated_at: int
    seq: int = 0
    external: dict[str, Any] | None = None
    result: Any = None
    error: ErrorInfo | None = None
    finished_at: int | None = None
    next_check_at: int | None = None
    attempt: int = 1
    """Which run of the job this is: 1, then one more per retry (`retry`)."""
    events: int = 0
    """Events ever recorded for the job: the `seq` of the last one."""
    heartbeat_timeout: float | None = None
    """Seconds the run may go without a heartbeat (None: it need not send any)."""
    heartbeat_at: int | None = None
    """When the last heartbeat came."""
    heartbeat_due: int | None = None
    """When the watchdog next looks for a missed heartbeat (None: never)."""
    progress: Any = None
    """What the last heartbeat that carried progress said."""
    heartbeat_noted_at: int | None = None
    """When the last `heartbeat` event was recorded."""
    progress_noted: str | None = None
    """The SHA-256 of the progress the last `heartbeat` event recorded."""
    tags: list[str] = msgspec.field(default_factory=list)
    """The job's tags, sorted; `tether_job_tags` indexes them for the list."""
    notify_url: str | None = None
    """Where completion notifications go (a secret of sorts: never shown whole)."""
    queued_at: int | None = None
    """When the job joined its backend's queue (`queued`): the queue's order;
    None again once it leaves the queue for `pending`."""
    salt: str | None = None
    """Set when the job's id was used before by a job retention deleted
    (`tether_tombstones`): its callback tokens and idempotency keys are made
    with it, so the earlier job's URLs and keys are not this one's. None
    otherwise (the id's first job: tokens and keys of its promise id alone)."""
    stop_due: int | None = None
    """Set while the run of an attempt that ended without a workflow to
    finish it (`core.settle`: an orphan) is still to be stopped: when that
    stop may be claimed, by the watchdog of any process, should the process
    running it have died (its lease: `claim_stop`). Set in the write that
    ends the attempt, None again in the one that records the stop's outcome
    (`stopped`)."""
    stop_attempt: int | None = None
    """The attempt whose run `stop_due` is the stop of, set with it: a host
    of a release before it may retry the job meanwhile (it does not see
    `stop_due`), and the row's `external` is then another attempt's run."""
    tries_run: str | None = None
    """`"{attempt}:{run}"`: the run of the workflow's body (a random token
    each run) that began the trigger tries of that attempt, written before
    its first try for a backend that asks to be told of a replay
    (`Backend.asks_if_replayed`; None otherwise). A run that finds another
    run's mark for its attempt is a replay: that run may have died inside a
    try (`JobSteps._mark_tries`). Told without comparing clocks."""

    @property
    def finished(self) -> bool:
        return self.state in FINAL_STATES

    def log_extra(self, promise_id: str | None = None) -> dict[str, str]:
        """What a log line about this job carries besides its message (the
        fields of `TETHER_LOG_FORMAT=json`)."""
        extra = {"job_id": self.id, "backend": self.backend}
        if promise_id is not None:
            extra["promise_id"] = promise_id
        return extra


def message_id(job_id: str, created_at: int, attempt: int) -> str:
    """The `webhook-id` of the completion notification of a job's attempt:
    `msg_` and 32 hex digits, made from the job (its id, the Unix ms it was
    created at, the attempt), not drawn at random: an attempt that ends again
    after a restore from a backup taken before its end is told of under the
    same id, which a receiver dedupes (a random one made it act twice: a QA
    pass), while a job re-created under a deleted one's id, or its next
    attempt, gets another."""
    made = hashlib.sha256(f"{job_id}\n{created_at}\n{attempt}".encode()).hexdigest()
    return f"msg_{made[:32]}"


class Notification(msgspec.Struct, kw_only=True):
    """A completion notification to deliver (the outbox): written with the
    end of the attempt it tells of, deleted once delivered or given up."""

    id: str
    """Its `webhook-id`: the same on every redelivery."""
    job_id: str
    attempt: int
    url: str
    body: str
    """The JSON delivered, made when the attempt ended."""
    created_at: int
    due_at: int
    """When a worker may next try it: a try claims it by moving this on."""
    tries: int = 0


class NewEvent(NamedTuple):
    """An event to record: the store numbers, times and files it."""

    type: EventType
    data: dict[str, Any]


class Event(msgspec.Struct, frozen=True, kw_only=True):
    """One entry of a job's history as stored. `seq` counts from 1 per job,
    without gaps; `at` is Unix milliseconds."""

    job_id: str
    seq: int
    at: int
    type: EventType
    attempt: int
    data: dict[str, Any]


Listener = Callable[[JobRecord, Event], None]
"""Told of each event after its transaction committed, in the process that
recorded it, with the job's row as that transaction left it."""


class Listed(NamedTuple):
    """A page of the job list as the index read it."""

    rows: list[JobRecord]
    """Newest first, at most the `limit` asked for."""
    resume_before: int | None = None
    """Set when the read stopped short of a full page: the filters met so
    rarely that the page read its budget of the lists they name
    (`SqlJobIndex.SCAN`) first, or its jobs weighed `SqlJobIndex.PAGE_BYTES`
    first. The page holds every match with a `seq` from
    this one up (to the `before_seq` asked for); the next page reads
    `before_seq=resume_before`. None: `rows` is every match there is, or a
    full page."""


class Requests(Protocol):
    """A transaction of the job index that also answers Resonate protocol
    requests: where the promises and the index share a database
    (`JobIndex.settles_together`: the embedded store's file, Postgres with
    resonate-pg's schema)."""

    async def request(self, kind: str, data: dict[str, Any]) -> tuple[int, Any]:
        """The status and the answer's data (the reason, for a status >=
        400) of one protocol request, made inside the transaction."""
        ...


Together = Callable[[Requests], Awaitable[None]]
"""Protocol requests an index write makes in its own transaction
(`JobIndex.end`'s `together`). It raises `NotTogether` when the store is not
as it needs: nothing of the write is then committed."""


class NotTogether(Exception):
    """A write's protocol requests (`Together`) found the store not as they
    need it, or the write itself changed nothing: it was rolled back whole."""


class JobIndex(Protocol):
    """What the service needs of a job index. The implementation: SQL
    (`core.store.sql`) on SQLite and Postgres."""

    on_event: Listener | None
    """Called for each event this index recorded, after it committed."""
    limits: Mapping[str, int]
    """Each limited backend's slots: a job of one is `queued` while they are
    all taken (or others wait before it), and the end of one of its jobs
    moves the oldest queued one to `pending`, in the same transaction."""
    message: Callable[[JobRecord], str]
    """The completion notification's body for the attempt a row ended."""
    on_ready: Callable[[list[JobRecord]], None] | None
    """Told of the queued jobs a write moved to `pending`, after it committed."""

    @property
    def settles_together(self) -> bool:
        """Whether `end` can make protocol requests in its own transaction
        (`together`): the embedded store, whose promises share the file, and
        Postgres, whose promises are resonate-pg's in the same database."""
        ...

    @property
    def root_settled_first(self) -> bool:
        """In a settle that ends the waiting workflow too, whether its root
        promise is settled before the callback promise (the order the
        store's locks need: `SqlJobIndex.root_settled_first`)."""
        ...

    async def promote(self, backend: str, now: int) -> list[JobRecord]:
        """Move queued jobs of `backend` to `pending` while it has free slots."""
        ...

    async def waiting_backends(
        self, excluding: Collection[str], *, queued: bool = True
    ) -> dict[str, int]:
        """Open jobs by backend, for the backends not in `excluding` (without
        `queued`: only those triggered or triggering); one index lookup per
        backend that has open jobs."""
        ...

    async def queued_backends(self) -> list[str]:
        """The backends that have queued jobs."""
        ...

    async def notifications_due(
        self, now: int, limit: int, skipping: Sequence[str] = ()
    ) -> list[Notification]:
        """Outbox: notifications due to be tried, the longest due first, but
        those to a URL beginning with one of `skipping` (`notify_site`). The
        end of an attempt of a job with a notify URL puts one there."""
        ...

    async def next_notification_at(self, skipping: Sequence[str] = ()) -> int | None: ...

    async def notification_waiting(self, job_id: str, created_at: int) -> bool:
        """Whether a notification of the job made at `created_at` (not of a
        deleted one under the same id) is still in the outbox."""
        ...

    async def claim_notification(self, note: Notification, until: int) -> bool:
        """Take a try of `note` (its `due_at` moves to `until`); False if taken."""
        ...

    async def notification_tried(
        self,
        note: Notification,
        again_at: int | None,
        events: Sequence[NewEvent],
        now: int,
        given_up: NewEvent | None = None,
    ) -> bool:
        """After a try of `note` (as its claim left it), with `events`:
        delivered (`again_at` and `given_up` None), out of the outbox whoever
        holds it now; failed, due again at `again_at` or given up (with
        `given_up`) only while the claim holds, else the try is filed alone.
        Whether the outbox changed."""
        ...

    async def insert(
        self, rec: JobRecord, events: Sequence[NewEvent] = ()
    ) -> tuple[JobRecord, bool]:
        """Insert `rec` unless its id exists, with `events` as its first ones;
        return the stored row and whether it was inserted. Atomic: of two
        racing inserts exactly one wins."""
        ...

    async def get(self, job_id: str) -> JobRecord | None: ...

    async def salt_of(self, job_id: str) -> str | None:
        """The job's `salt` alone: None when it has none, or there is no such job."""
        ...

    async def attempt_of(self, job_id: str) -> tuple[int, int] | None:
        """The job's `attempt` and `created_at` alone (None: no such job):
        whether a row read before is still the job's attempt, without
        reading (and decoding) the row again."""
        ...

    async def pages(
        self,
        pairs: Sequence[tuple[str | None, str | None]],
        limit: int,
        before_seq: int | None,
        tags: Sequence[str] = (),
        created_after: int | None = None,
        created_before: int | None = None,
    ) -> Listed:
        """Newest first, at most `limit` rows with `seq < before_seq`, of any
        of `pairs` (a state and a backend; None: any), having every one of
        `tags`, created strictly between the two times (if given). A job that
        changes state meanwhile is listed once. Filters that rarely meet may
        give a short page that says where to go on (`Listed.resume_before`)."""
        ...

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
        """Record what the trigger returned; a `pending` job becomes `running`
        (a job that ended meanwhile keeps its state), its first heartbeat due
        at `heartbeat_due`. With `event` (the trigger's), only the first
        receipt is written, with the event: a second trigger of the attempt
        (a process that stalled while another took its workflow over) leaves
        the row as it is (returned), its `keys` indexed. `keys` (the backend's
        `run_keys` of it) are indexed to the job in the same transaction (a
        key another job had moves to this one). Returns the row; with
        `open_only`, writes only while the job is `pending` or `running`, and
        with `attempt` only while it is at that attempt (None otherwise: a
        trigger that stalled past its lease never writes onto a later attempt),
        and with `created_at` only to the job created then (None otherwise:
        nor onto a new job under the same id, made after retention deleted
        the one it triggered)."""
        ...

    async def jobs_of_run_keys(
        self, backend: str, keys: Sequence[str]
    ) -> list[tuple[str, JobRecord]]:
        """The jobs of `backend` whose runs are known by any of `keys` (as
        `set_external` indexed them), each with the key that found it. One
        indexed read; unknown keys cost nothing more."""
        ...

    async def finish(
        self,
        job_id: str,
        outcome: Outcome,
        now: int,
        from_states: Sequence[str] = OPEN_STATES,
        attempt: int | None = None,
    ) -> JobRecord | None:
        """End the job with `outcome` if its state is one of `from_states` (by
        default any open state) and, if `attempt` is given, it is at that
        attempt; else leave it. Returns the row as it now stands (None if
        unknown). `end` without events."""
        ...

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
        """`finish`, and whether this call ended the job: if it did, `events`
        then a `finished` event are recorded with the change. With
        `stop_due`, a job with a run recorded gets it as its `stop_due` in
        the same write, and its attempt as its `stop_attempt` (no workflow
        will stop that run: see `claim_stop`). `together` (only where
        `settles_together`): protocol requests made first in the same
        transaction; `NotTogether` when they raise it, or when the job was
        not open at `attempt`, and then nothing was written."""
        ...

    async def retry(
        self, job_id: str, attempt: int, deadline: int, now: int, event: NewEvent
    ) -> JobRecord | None:
        """Start the job's next attempt if it is at `attempt`, in one of
        `RETRYABLE_STATES`, and no stop is due (`stop_due`: the ended
        attempt is still winding up): `pending` again, the attempt one more, `deadline`
        new, what the ended attempt recorded (external, result, error,
        heartbeats) cleared, and `event` recorded as the new attempt's first.
        One conditional update: of two racing retries exactly one starts the
        attempt. Returns the row it wrote, None when it changed nothing."""
        ...

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
        """Record events that change nothing else (but, with `external` as
        `(attempt, fields)`, those fields merged into the job's `external`
        while it is running at that attempt: what a status check learnt); the
        row after (None: no such job). With `open_at`, only while the job is
        open at that attempt (None otherwise, nothing filed): what a look at a
        running job found is not filed after the job's `finished`. With
        `ended_at` (and no `open_at`), only while the job is ended at that
        attempt: a late callback's note is not filed under a retry's
        attempt."""
        ...

    async def events_after(
        self, job_id: str, after: int, limit: int
    ) -> tuple[JobRecord | None, list[Event]]:
        """The job and its events with `seq > after`, oldest first, at most `limit`."""
        ...

    async def last_tries(self, job_id: str, attempt: int, limit: int) -> list[Event]:
        """The last `limit` `trigger_failed` and `trigger_slow` events of the
        job's attempt, oldest first: what its trigger's tries so far were
        (`JobSteps._tries_made`), whatever other events came between."""
        ...

    async def history(
        self, job_id: str, after: int, limit: int
    ) -> tuple[JobRecord | None, list[Event], int]:
        """The job, its events with `seq > after` (oldest first, at most
        `limit`) and how many of its events the bound on history dropped."""
        ...

    async def due(self, now: int, limit: int) -> list[JobRecord]:
        """Open jobs past their deadline, running jobs due a status check,
        jobs whose heartbeat is overdue, and ended jobs whose run's stop is
        due (`stop_due`: its lease ran out)."""
        ...

    async def next_due(self, after: int) -> int | None:
        """The earliest deadline, status check or heartbeat due of an open job,
        or run's stop due, strictly after `after` (None: none), from the
        indexes, never a scan."""
        ...

    async def reschedule_check(self, job_id: str, expected: int, next_check_at: int | None) -> bool:
        """Move a running job's next check from `expected` to `next_check_at`
        (None: no more checks); False if another process moved it first (it
        then owns this check)."""
        ...

    async def beat(
        self, job_id: str, attempt: int, now: int, progress: Any, due: int | None, note_every: int
    ) -> JobRecord | None:
        """A heartbeat of the job's attempt `attempt`, open: `heartbeat_at`
        becomes `now`, `progress` (unless None) the job's progress, `due` its
        `heartbeat_due`. A `heartbeat` event is recorded with it only when the
        progress differs from the one the last such event recorded and that
        event is at least `note_every` ms old. None (nothing changed) when the
        job is unknown, ended, or at another attempt: a heartbeat of an
        attempt that ended (and was retried) after its caller read the row
        never sets the next attempt's `heartbeat_due`."""
        ...

    async def mark_tries(
        self, job_id: str, created_at: int, attempt: int, seen: str | None, mark: str
    ) -> bool:
        """Set the job's `tries_run` to `mark` where the job is the one
        created at `created_at` (not another made under its id since), at
        attempt `attempt`, and its `tries_run` is `seen` (as the caller read
        it) or `mark` already (a write whose answer was lost, made again).
        False (nothing written) otherwise: another run marked it meanwhile,
        or the attempt is over."""
        ...

    async def claim_heartbeat(self, job_id: str, expected: int, next_due: int) -> bool:
        """Move a job's `heartbeat_due` from `expected` to `next_due`; False if a
        heartbeat or another process moved it first (then there is no miss to
        handle here)."""
        ...

    async def hold_stop(self, job_id: str, attempt: int, until: int) -> JobRecord | None:
        """Hold the stop of what a call of attempt `attempt`'s trigger, still
        under way after the attempt was canceled or timed out with no run
        recorded, may start (`core.steps.JobSteps._answered_late`):
        `stop_due` becomes `until` (this process's lease, renewed while the
        call runs: `core.lease`) and `stop_attempt` `attempt`, so a process
        that dies first leaves that stop to any watchdog
        (`claim_stop`). The row as held; None (nothing written) unless the
        job is at `attempt`, canceled or timed out, with no run recorded and
        no stop due."""
        ...

    async def claim_stop(self, job_id: str, expected: int, until: int) -> JobRecord | None:
        """Take over the stop of a job's run whose `stop_due` is `expected`
        (passed: the process that held it died, or stalled), or renew this
        process's own (`core.lease`): `stop_due` moves to `until`, this
        process's lease, renewed while the stop runs, so no other process
        stops the run meanwhile. The row as claimed (its
        `stop_attempt` says whose run it is: the row may be at a later
        attempt, retried by a host of an earlier release); None if another
        process claimed it first, or the stop was recorded."""
        ...

    async def stopped(
        self, job_id: str, attempt: int, claim: int, events: Sequence[NewEvent], now: int
    ) -> JobRecord | None:
        """Record the outcome of the stop of the run of the job's attempt
        `attempt` (its `stop_attempt`), held until `claim` (its
        `stop_due`): `stop_due` and `stop_attempt` cleared and `events` (a
        `cancel_failed`) filed under that attempt, in one write. None
        (nothing written) when the job's `stop_due` is no longer `claim`, or
        not for that attempt: another process took the stop over after the
        lease ran out, and records its own outcome."""
        ...

    async def release_stop(self, job_id: str, attempt: int, claim: int, due: int) -> bool:
        """Give up the stop of the run of the job's attempt `attempt` held
        until `claim` (its `stop_due`), unfinished (the process stopping it
        is shutting down): `stop_due` becomes `due` (now, or for a trigger
        call's hold the time by which that call should have ended:
        `hold_stop`), so the first sweep of any process's watchdog from then
        takes the stop over (`claim_stop`) instead of waiting the lease out.
        False (nothing written) when the job's `stop_due` is no longer
        `claim`, or not for that attempt, as
        `stopped`: another process holds the stop, or it was recorded."""
        ...

    async def delete_finished(self, before: int, limit: int) -> list[str]:
        """Delete up to `limit` jobs finished before `before`, with their
        history, tags and run keys; return their ids. A job whose run's stop
        is still due (`stop_due`) is kept until its outcome is recorded."""
        ...

    async def ping(self) -> None:
        """Raise if the store does not answer."""
        ...

    async def change_mark(self) -> object:
        """A value that differs once anything was committed to the index
        since it was read, by any process; None where that cannot be told
        cheaply (Postgres): a reader that would read again only after a
        change then reads each time."""
        ...

    def refused(self) -> str | None:
        """Why the store's last attempt to connect failed, if it did, in words
        that name no address or credential (Postgres: `core.store.postgres.
        Attempts`); None where there is nothing to connect to."""
        ...

    async def close(self) -> None: ...
