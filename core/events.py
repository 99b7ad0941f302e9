"""Job history: what happened to each job, in order, read as pages or followed
live (docs/architecture.md, "Job history").

The store records each event in the same transaction as the change it
describes (`core.store.sql`); the steps, the settler, callbacks and the
watchdog say which events to record. This module reads them back, follows a
job's history as it grows (from any process sharing the store: one look at
the store's change mark wakes every stream of this process when anything was
committed, and a stream wakes at once for this process's own events), and
tells the listeners (the metrics) of every event this process records.

A followed job's stream goes on past the `finished` of its attempt while
something is still due that files an event: a completion notification in the
outbox (`notified`, `notify_failed`), or the attempt's workflow yet to return
(its finish stops the run of a canceled or timed-out job: `cancel_failed`; a
trigger answered after the end: a late `triggered`), or, for a job no
workflow finishes, its run's stop still due (the job's `stop_due`). All are
in the store,
so any process serving the stream sees them; a backend's own `notification`
may come at any time and is never waited for (docs/lifecycle.md, "Following
a job").
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import signal
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final, Literal

from resonate.error import ServerError

from core.errors import MalformedBody, NotFound, StoreUnavailable
from core.models import EventPage, JobEvent
from core.settle import store_call
from core.store.jobs import Event, JobIndex, JobRecord, Listener
from core.views import decode_cursor, encode_cursor, event_view

log = logging.getLogger("tether")

MAX_EVENT_PAGE = 1000
POLL_INTERVAL = 0.3
"""Seconds between the looks at the store's change mark (`JobIndex.change_mark`)
for events other processes record: one look for every stream of this process,
which wakes them all once something was committed (this process's own events
wake their streams at once)."""
KEEP_ALIVE = 15.0
"""Seconds of silence after which a stream sends `PING`, so proxies and
clients see the connection is alive."""
STREAM_BATCH = 200
"""Events a stream reads from the store at once."""
FOLLOW_UP_POLL = 2.0
"""Seconds between a stream's looks while it waits past `finished` for the
events still due (a notification retried for hours need not be looked at
three times a second); this process's own events wake it at once."""
PING: Final = "ping"
"""The keep-alive the API sends after `KEEP_ALIVE` seconds of silence, as
`event: ping` with `data: {"type": "ping"}` and no `id`: an event, not a
comment, because a browser's EventSource dispatches no comment, and a page
that hears nothing could not tell a quiet service from a hung one (a
dashboard page of a service paused with SIGSTOP said "live" for good)."""
END: Final = "end"
"""What `follow` yields last when the stream has really ended (nothing more
is due, or the job was deleted), not when the service stops: the API sends it
as `event: end`, so a client can tell the end from a dropped stream."""
STOPPED_STATES = ("canceled", "timed_out")
"""The ends whose run the workflow's finish stops (the backend's `cancel`)."""


def body_digest(body: bytes) -> dict[str, Any]:
    """What a callback event keeps of the body: its size and SHA-256, never its content."""
    return {"body_bytes": len(body), "body_sha256": hashlib.sha256(body).hexdigest()}


class JobHistory:
    """A job's events as pages and as a live stream; the listeners."""

    def __init__(self, jobs: JobIndex) -> None:
        self.jobs = jobs
        self.listeners: list[Listener] = []
        """Each is called with the job's row (as the event's transaction left
        it) and the event, after the commit, for every event this process
        records; an exception is logged and does not reach the writer."""
        self.attempt_running: Callable[[str, int], Awaitable[bool]] | None = None
        """Whether the workflow of attempt N of a job has yet to return
        (`core.workflow.attempt_running`): set by a worker process; without
        it, a stream waits past `finished` for the notification alone."""
        self._wakers: dict[str, set[asyncio.Event]] = {}
        self._watch: asyncio.Task[None] | None = None
        """Looks at the store's change mark while a stream is open (`_watching`)."""
        self._unmarked = False
        """Whether the index cannot tell cheaply that something was committed
        (`change_mark` is None: Postgres): each stream then reads every
        `POLL_INTERVAL` on its own timer (woken together, they read at once)."""
        self._stopping = False
        jobs.on_event = self._recorded

    @property
    def stopping(self) -> bool:
        """Whether `stop` ran (the service is stopping): streams end."""
        return self._stopping

    async def _watching(self) -> None:
        """Every `POLL_INTERVAL` while a stream is open, one look at the
        store's change mark for all of them; once it moved (something was
        committed, by any process), every stream is woken to read its job's
        events. A look that fails wakes them too (their reads tell the
        store's trouble). Where the mark cannot be told (None: Postgres), the
        streams go back to reading on their own timers (`_unmarked`). (A
        thousand streams on one waiting job each read it three times a second:
        a third of a core, with nothing to send.)"""
        mark: object = None
        while self._wakers and not self._stopping:
            await asyncio.sleep(POLL_INTERVAL)
            was = mark
            try:
                mark = await self.jobs.change_mark()
                self._unmarked = mark is None
            except Exception as exc:
                log.debug("looking at the store's change mark failed: %s", type(exc).__name__)
                mark = object()
            if self._unmarked or mark != was:
                for waiting in self._wakers.values():
                    for wake in waiting:
                        wake.set()
            if self._unmarked:
                return  # nothing more to look for

    def _watch_store(self) -> None:
        """Start `_watching`, unless it runs on this loop already or the
        index cannot tell a change."""
        loop = asyncio.get_running_loop()
        task = self._watch
        if self._unmarked or (task is not None and not task.done() and task.get_loop() is loop):
            return
        self._watch = loop.create_task(self._watching())

    def _recorded(self, rec: JobRecord, event: Event) -> None:
        for wake in self._wakers.get(rec.id, ()):
            wake.set()
        for listener in self.listeners:
            try:
                listener(rec, event)
            except Exception as exc:
                log.warning("event listener %r failed: %s", listener, type(exc).__name__)

    async def page(self, job_id: str, limit: int = 100, cursor: str | None = None) -> EventPage:
        """The job's events oldest first, at most `limit`, after the place
        `cursor` names; `NotFound` for an unknown job."""
        if not 1 <= limit <= MAX_EVENT_PAGE:
            raise MalformedBody(f"limit must be from 1 to {MAX_EVENT_PAGE}", {"field": "limit"})
        after = decode_cursor(cursor) if cursor else 0
        rec, events, dropped = await store_call(self.jobs.history(job_id, after, limit + 1))
        if rec is None:
            raise NotFound.job(job_id)
        more = len(events) > limit
        events = events[:limit]
        return EventPage(
            items=[event_view(e) for e in events],
            next_cursor=encode_cursor(events[-1].seq) if more else None,
            dropped=dropped,
        )

    async def follow(
        self, job_id: str, after: int = 0, until: float | None = None
    ) -> AsyncIterator[JobEvent | Literal["end"] | None]:
        """The job's events after `seq` `after`, then each new one as it is
        recorded. After the `finished` of the attempt the job is at, it goes
        on while a follow-up is due (`follow_ups_due`), and ends once none is
        and every event filed so far was sent: at once after `finished` when
        none was due, and at once for a job that ended before `after` with
        nothing due. It also ends when the job is deleted, or when the
        service stops. A retry while it waits is followed like any attempt.
        When it has ended (not when the service stops) it yields `END` last.
        `None` is yielded after `KEEP_ALIVE` seconds without an event. At
        `until` (Unix seconds; the end of the dashboard session that opened
        the stream) it stops, without `END`, at its next look: the client is
        to ask again (and is refused). `NotFound` (before anything is
        yielded) for an unknown job."""
        if await store_call(self.jobs.get(job_id)) is None:
            raise NotFound.job(job_id)
        return self._follow(job_id, after, until)

    async def follow_ups_due(self, rec: JobRecord) -> bool:
        """Whether an event may still be filed for the ended attempt of `rec`
        by something under way: a notification of the job in the outbox
        (delivered or given up, it leaves it in the transaction that files
        its `notified` or `notify_failed`); or, for an attempt that ended
        canceled or timed out, or before a run was recorded, its workflow yet
        to return (its finish stops the run, filing `cancel_failed` when it
        could not; a trigger answered after the end files a late `triggered`,
        and stops that run), or, when no workflow finishes it, the stop
        promise an earlier release made for that finish (`attempt_running`
        asks for both). A succeeded or failed attempt with a run recorded
        waits for no workflow: its finish stops nothing. A look that fails
        counts as due: the next one tells. (The run's stop of a job no
        workflow finishes is due while the job's row has `stop_due`: the
        stream reads that with its events.)"""
        try:
            if await store_call(self.jobs.notification_waiting(rec.id, rec.created_at)):
                return True
            stops = rec.state in STOPPED_STATES or rec.external is None
            if not stops or self.attempt_running is None:
                return False
            return await store_call(self.attempt_running(rec.id, rec.attempt))
        except (StoreUnavailable, ServerError) as exc:
            log.debug("job %s: looking for follow-ups failed: %s", rec.id, type(exc).__name__)
            return True

    async def _follow(
        self, job_id: str, after: int, until: float | None = None
    ) -> AsyncIterator[JobEvent | Literal["end"] | None]:
        wake = asyncio.Event()
        self._wakers.setdefault(job_id, set()).add(wake)
        self._watch_store()
        quiet_since = time.monotonic()
        sent: JobRecord | None = None
        """The job as the last look found it, when that look found its attempt
        ended and every event sent: from then on, the stream ends at the first
        look that finds nothing more due, nothing new, and the same attempt."""
        try:
            while not self._stopping and (until is None or time.time() < until):
                wake.clear()
                # Asked before the read: a follow-up files its event before it
                # stops being due (in the same transaction, or before its
                # workflow returns), so when none is due the read has them all.
                due = sent is not None and await self.follow_ups_due(sent)
                try:
                    read = await store_call(self.jobs.events_after(job_id, after, STREAM_BATCH))
                except (StoreUnavailable, ServerError) as exc:  # the client resumes it
                    said = type(exc).__name__
                    log.warning("job %s: its event stream stopped (%s): resumed", job_id, said)
                    return
                rec, events = read
                for event in events:
                    yield event_view(event)
                    after = event.seq
                if rec is None:
                    yield END
                    return
                ended = rec.finished and rec.events <= after
                # A run's stop still due (`stop_due`) files its outcome in the
                # write that clears it: read with the row, before the events.
                due = due or rec.stop_due is not None
                if ended and not due and sent is not None and sent.attempt == rec.attempt:
                    yield END
                    return
                newly = ended and (sent is None or sent.attempt != rec.attempt)
                sent = rec if ended else None
                if events:
                    quiet_since = time.monotonic()
                if events or newly:
                    continue  # newly ended: look for follow-ups at once
                silent = time.monotonic() - quiet_since
                if silent >= KEEP_ALIVE:
                    yield None
                    quiet_since, silent = time.monotonic(), 0.0
                # Woken by this process's events and by `_watching` once
                # something was committed; a follow-up's end may not be (a
                # workflow on a Resonate server), so it is looked for on a
                # timer too; and the session's end, `until`, at its time.
                pace = FOLLOW_UP_POLL if sent is not None else KEEP_ALIVE - silent
                if self._unmarked and sent is None:
                    pace = POLL_INTERVAL
                if until is not None:
                    pace = min(pace, max(until - time.time(), 0.0))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), min(pace, KEEP_ALIVE - silent))
        finally:
            waiting = self._wakers.get(job_id)
            if waiting is not None:
                waiting.discard(wake)
                if not waiting:
                    del self._wakers[job_id]
            if not self._wakers and self._watch is not None:
                self._watch.cancel()  # the last stream: nothing to look for
                self._watch = None

    def stop(self) -> None:
        """End every stream: the service is stopping, and its server waits
        for open responses before it stops."""
        self._stopping = True
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        for waiting in self._wakers.values():
            for wake in waiting:
                wake.set()

    def stop_on_signals(self, *also: Callable[[], None]) -> None:
        """End every stream as soon as SIGTERM or SIGINT arrives, before the
        server's graceful shutdown waits for open responses to end (uvicorn
        waits for them before it stops the app), and call each of `also`
        (in the loop). Chained in front of the handlers installed now (the
        server's own), which still run."""
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread gets signals (and a server there installs its handlers)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous = signal.getsignal(sig)
            if not callable(previous):
                continue  # no server handling it: the signal ends the process anyway

            def handler(signum: int, frame: Any, previous: Any = previous) -> None:
                for call in (self.stop, *also):
                    loop.call_soon_threadsafe(call)
                previous(signum, frame)

            signal.signal(sig, handler)
