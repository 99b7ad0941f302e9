"""What the workflow does around its wait: the trigger (with retries) and the finish.

Both run in the workflow's body (version 4; versions 1-3 ran the trigger as a
durable step, versions 1 and 2 the finish too). Either may run again after a
crash or on a replay (the trigger on every resume, the finish whenever the
worker dies before the workflow's root promise is resolved), so both are
written to be repeatable: the trigger reads the job's row first and does
nothing once the attempt was triggered (its index write, `external`, is its
record) or has ended; it passes the backend an idempotency key derived from
the promise id; every index write is conditional, and the events of a change
(`triggered`, `finished`) are recorded with it, so a replay records none
again. A trigger interrupted before its index write does try the backend
again: its failures are new tries and are recorded as such. A replayed finish
calls the backend's `cancel` and `tether_job_finished` again, which both are
documented to allow (`core.hookspecs`).

A try whose answer never came (it timed out, the process died inside it)
may have started a run nothing recorded. The finish of an attempt that
ended with no run recorded asks the backend to find and stop it
(`cancel_unrecorded`), unless no try can have reached it: every try was a
clear refusal (`trigger_failed`'s `retryable`) in a run of the body that
made its callback promise itself (a replay's refusal may refuse a repeat of
a try an earlier run died inside: `replayed`), or the job ended before its
callback promise existed (settled `by: index` without `tried`), which the
workflow makes before its first try. A trigger whose tries end because the
attempt ended asks for that stop itself when the finish is over already (it
stalled past its lease while another process ran it; the job was retried).

A backend that breaks its contract costs its own job alone: a call of its
`trigger` is not waited for once its attempt ended, nor past
`TRIGGER_TIMEOUT`; an answer that is no mapping JSON can write fails the
job at once (its finish stops what the try may have started); one past
`max_result_bytes` is kept cut (`core.bounds.bound_external`); a
`check_interval` that raises or is no number means no status checks.
None of these runs the trigger again (docs/lifecycle.md, "A trigger's
bounds").
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import numbers
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import msgspec
from msgspec.structs import replace
from resonate.error import ServerError

from core.bounds import bound_external
from core.errors import BackendError, StoreUnavailable, reason
from core.hookspecs import Backend
from core.lease import StopLease
from core.models import ErrorInfo, Job, Outcome, Trigger, read_json
from core.notices import run_keys_of
from core.plugins import PLUGIN_EXITS, PLUGIN_FAULTS, Plugins, cancelling, stored_params
from core.redact import (
    log_traceback,
    redact,
    redact_bytes,
    redact_value,
    unquoted,
)
from core.settings import Settings
from core.settle import (
    Settler,
    noted,
    outcome_of,
    outcome_of_record,
    store_call,
    store_refusal,
    store_timed_out,
    store_timeout,
)
from core.store import STORE_CALL_TIMEOUT
from core.store.jobs import Event, JobIndex, JobRecord, NewEvent, now_ms
from core.store.sql import HISTORY_LIMIT
from core.tokens import CallbackSigner, idempotency_key
from core.views import backend_view, view
from core.workflow import RETRY_BACKOFF, RETRY_BACKOFF_MAX, callback_promise_id, root_promise_id

log = logging.getLogger("tether")
_log_traceback = functools.partial(log_traceback, log)
"""`log_traceback` on this module's logger."""

CANCEL_TIMEOUT = 300.0
"""Seconds a backend's `cancel` may take to answer, each try: then the try
has failed (not tried again: a backend that hangs would hang again), and it
is logged and filed as `cancel_failed` as any other failure. Longer than a
backend's own retries take (as the watchdog's `CHECK_TIMEOUT`): it is there
for a backend that hangs, which would otherwise hold the finish (the
workflow's, or the watchdog's look at a job without one) for good."""


TRIGGER_TIMEOUT = 900.0
"""Seconds one call of a backend's `trigger` (or `rerun`) may take: then the
call is abandoned (cancelled) as a try whose answer was lost, since it may
have started a run. It is not tried again (a backend that hangs would hang
again): the job fails (`error.type` `trigger_timeout`), and its finish asks
the backend to stop what the try may have started (`cancel_unrecorded`).
Three times the longest request `http_webhook` makes (its `timeout`, at most
300 s); a backend bounds its own calls well below it. It is there for a
trigger that hangs, which would otherwise hold a task slot
(`TETHER_MAX_CONCURRENT_TASKS`) for good."""

TRIGGER_SLOW = 30.0
"""Seconds a call of a backend's `trigger` (or `rerun`) may take before the
job's history says so (`trigger_slow`: once a call, at the first look at
the job's row past this) and the log warns: a job `pending` for minutes
shows why (its backend has not answered) where it showed nothing until
`TRIGGER_TIMEOUT`. A call that answers within this costs nothing more."""

TRIGGER_WATCH = 5.0
"""Seconds between looks at the job's row while a call of its backend's
`trigger` is under way (the first after this long, so a prompt answer costs
no read): once its attempt ended (timed out, canceled, or its run's
callback came) or moved on (retried), the workflow no longer waits for the
call, and frees its task slot; its finish asks the backend to stop what the
call may have started, as after a try whose answer was lost, and the call
may still answer until `TRIGGER_TIMEOUT` (`JobSteps._answered_late`). Not
once another process recorded a run for the attempt: this call's answer
may name a second run, which the trigger stops when it comes."""

REPLAY_MARGIN = 1.0
"""Seconds by which a callback promise must predate the run of the body
that found it to tell a replay (`JobSteps._replayed`), at most: a quarter
of `task_ttl` when that is shorter (a replay by another host comes a lease
after the run that made it)."""

WAIT_MIN = 0.5
"""Seconds a trigger's wait that sent nothing (`BackendError.tried` False)
lasts at least, whatever its `retry_after` and `TETHER_TRIGGER_BACKOFF`
(which may be 0): a backend that asks again at once does not spin."""

WAIT_SLICE = 5.0
"""Seconds a wait between two trigger tries sleeps before it looks at the
job's row again: a job canceled or timed out during a long wait (a
`retry_after`, a backoff grown large) stops waiting within this."""

STOP_MARGIN = 60.0
"""Seconds `JobSteps.stop_within` adds for the rest of a finish (the index,
`tether_job_finished`)."""

RELEASE_TIMEOUT = 5.0
"""Seconds the write that gives up a stop cut short (the service stopping:
`JobSteps._release_stop`) may take; past it the stop's lease runs out
instead."""

_releasing: set[asyncio.Future[bool]] = set()
"""Those writes under way (shielded: nothing else may hold them)."""

_abandoned: set[asyncio.Future[Any]] = set()
"""Trigger calls cancelled, until they end (`_abandon`)."""

STOP_WITHIN_MAX = 86_400.0
"""The most `JobSteps.stop_within` answers (a day): `TETHER_TRIGGER_ATTEMPTS`
has no upper bound, and a doubling backoff over a thousand tries is past a
float (`OverflowError` at start-up) or a store's timestamp."""


class Slots:
    """This process's workflow task slots (`TETHER_MAX_CONCURRENT_TASKS`):
    the SDK's semaphore, which each workflow task holds from its claim to
    its suspension, trigger step included. A trigger lends its task's slot
    back (`lent`) while it waits between two tries, as a workflow engine's
    timers hold none, and while a call goes on past `TRIGGER_SLOW`: a
    backoff or a backend's `retry_after` (a target answering 429 with
    `Retry-After: 60`), or a call to a target that hangs, held a slot
    throughout, so as many such jobs as there are slots kept every other
    job of the process `pending` (found by a QA pass: 3 slots, a healthy
    target's job triggered 3 minutes late; 64 calls hung for their 60 s
    `timeout`, 4 minutes late). At most `size` lend at once: a lent task
    is still in memory (and a slow call holds a connection), so a process
    holds at most twice its slots in tasks, as the slots bound a burst's
    memory; the next keep theirs."""

    def __init__(
        self,
        held: asyncio.Semaphore | None,
        room: Callable[[], contextlib.AbstractContextManager[None]] | None = None,
        size: int = 64,
    ) -> None:
        self.held = held
        self.room = room
        """The store's own count of the tasks it handed this process, where
        it keeps one (the embedded store's `room_lent`), lent back too."""
        self.size = size
        """The slots (`TETHER_MAX_CONCURRENT_TASKS`), and so the most that lend theirs."""
        self.lending = 0
        """Tasks lending their slots now."""

    @classmethod
    def of(cls, resonate: Any, connection: Any, size: int) -> Slots:
        """The slots of a `Resonate` and its store connection (none when its
        SDK keeps them elsewhere: a test checks that this one does)."""
        sema = getattr(getattr(resonate, "_runtime", None), "execute_sema", None)
        if not isinstance(sema, asyncio.Semaphore):
            log.warning(
                "resonate-sdk keeps its task slots where Tether does not look: a trigger's"
                " waits and slow calls hold their slot"
            )
            return cls(None)
        return cls(sema, getattr(connection, "room_lent", None), size)

    @contextlib.asynccontextmanager
    async def lent(self) -> AsyncIterator[None]:
        """The running task's slot, given back for the block and taken again
        after it (waiting for one, as any task does), unless `size` are lent
        already (then kept). A block that raises (cancelled: the service
        stops; a call abandoned) or a take cut short by a cancel leaves the
        take to a future of its own, so that the SDK's release of the task's
        slot, as it ends, leaves the count as it was."""
        sema = self.held
        if sema is None or self.lending >= self.size:
            yield
            return
        self.lending += 1  # until it has its slot back: waiting for one, it is still here

        def back(_: object) -> None:
            self.lending -= 1

        with self.room() if self.room is not None else contextlib.nullcontext():
            sema.release()
            try:
                yield
            except BaseException:
                _take(sema).add_done_callback(back)
                raise
        taking = _take(sema)
        taking.add_done_callback(back)
        await asyncio.shield(taking)  # cancelled: the take goes on


def _say_cut(waits: int, which: str = "") -> None:
    """The log line of `waits` waits between two tries a stop cut short."""
    log.warning(
        "stopping: %d wait(s) between two tries of a backend's trigger or cancel %scut short;"
        " their workflows are handed back to the store, and those tries go on on another"
        " host, or on this one when it is back",
        waits,
        which,
    )


def _unanswered(backend: str, which: str) -> dict[str, str]:
    """A try's error when its call did not answer within `TRIGGER_TIMEOUT`."""
    message = f"backend {backend!r}: {which} did not answer within {TRIGGER_TIMEOUT:g} s;"
    return {"type": "trigger_timeout", "message": f"{message} the call was cancelled"}


def _plugin_bug(backend: str, exc: BaseException) -> dict[str, str]:
    """A try's error when the backend raised what is no `BackendError`: its
    type alone, as for every other backend method. Its words (a plugin's
    own token, quoted) would reach the job record, the events, the
    dashboard and the notification (found by a QA pass); the log has its
    traceback, callback tokens masked (`_log_traceback`)."""
    name = type(exc).__name__
    message = f"{name} (raised by backend {backend!r}, not a BackendError; its traceback is"
    return {"type": name, "message": f"{message} in the service's log)"}


_taking: set[asyncio.Future[Any]] = set()
"""The takes of slots under way (`_take`; a strong reference: the loop
keeps a weak one)."""


def _take(sema: asyncio.Semaphore) -> asyncio.Future[Any]:
    """A slot of `sema`, taken by a task of its own (kept until it has)."""
    taking = asyncio.ensure_future(sema.acquire())
    _taking.add(taking)
    taking.add_done_callback(_taking.discard)
    return taking


class JobSteps:
    """What the workflow's steps do (`core.workflow.Steps`)."""

    def __init__(
        self,
        settings: Settings,
        plugins: Plugins,
        jobs: JobIndex,
        signer: CallbackSigner,
        settler: Settler,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        slots: Slots | None = None,
    ) -> None:
        self.settings = settings
        self.slots = slots or Slots(None)
        """The process's task slots, lent back while a trigger waits between tries."""
        self.plugins = plugins
        self.jobs = jobs
        self.signer = signer
        self.settler = settler
        self.sleep = sleep
        """How the trigger waits between attempts (tests record the waits)."""
        self.detached: set[asyncio.Task[None]] = set()
        """Trigger calls no longer waited for, their attempt over, whose
        answer is still taken (`_answered_late`); cut short by `close`."""
        self.waiting: set[asyncio.Task[Any]] = set()
        """Tasks waiting between two tries of a trigger or a cancel
        (`_pause`); cut short by `close`, and so is any wait begun after it
        (`closing`)."""
        self.closing = False
        self.cut: set[asyncio.Task[Any]] = set()
        """The tasks whose waits `close` cut short: each hands its workflow's
        task back to the store (`cut_short`) once `hand_back` is called."""
        self._handing_back = asyncio.Event()

    async def close(self) -> None:
        """Cancel the trigger calls still answering late (`detached`), and
        wait for them: the service is stopping. Each that holds the stop of
        what it may start (`_answered_late`) makes it due once the call
        should have ended, for any watchdog; one that holds none (its job
        succeeded meanwhile, or was retried) says in a warning that a run it
        starts after this is recorded nowhere.

        And cancel the tasks waiting between two tries of a trigger or a
        cancel (`waiting`, `_pause`; the SDK's stop waits for every
        workflow under way): a stop waited out each backoff and
        `Retry-After`, up to `STOP_GRACE`, and made the next tries while
        stopping. Cut short, a workflow ends as if killed there, with
        nothing in flight; its body (version 4) hands its task back to the
        store once the SDK's stop has begun (`cut_short`, `hand_back`), for
        another process or the restart to run it again at once, whose
        trigger tries go on from the last its job's history holds
        (`_tries_made`) with the same key (a workflow of versions 1-3 waits
        for its task's lease to run out); a stop under a lease gives it up
        for the next sweep (`_spawn_stop`)."""
        self.closing = True
        if self.waiting:
            _say_cut(len(self.waiting))
        for task in list(self.waiting):
            self.cut.add(task)
            task.cancel()
        while self.detached:
            await asyncio.sleep(0)  # each begun (its `except`s in force) first
            late = list(self.detached)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)

    async def _pause(self, seconds: float) -> None:
        """Wait `seconds` between two tries of a backend's call (the
        trigger's, a cancel's: a backoff, or the backend's `retry_after`),
        cut short by `close`: the service is stopping."""
        task = asyncio.current_task()
        if task is not None:
            self.waiting.add(task)
            if self.closing:
                _say_cut(1, "begun while stopping ")
                self.cut.add(task)
                task.cancel()
        try:
            await self.sleep(seconds)
        finally:
            self.waiting.discard(task)

    async def cut_short(self) -> bool:
        """Whether the running task's wait between two tries was cut short by
        `close` (its `CancelledError` is the stop's); if so, returns once the
        SDK's stop has begun (`hand_back`), when it runs no task the store
        pushes to this process any more: a task handed back then goes to
        another process, or to this host's next start, and is not run again
        here while stopping."""
        task = asyncio.current_task()
        if task not in self.cut:
            return False
        self.cut.discard(task)
        # The stop's cancel, turned into a hand-back by the caller; not one
        # more (the loop's own at its end, after a second Ctrl-C cut the
        # stop short): swallowed, its task waited for good, and `tether
        # serve` with it (a QA pass).
        if task.uncancel() > 0:
            return False
        await self._handing_back.wait()
        return True

    def hand_back(self) -> None:
        """The SDK's stop has begun: the workflows whose waits were cut
        short hand their tasks back (`cut_short`)."""
        self._handing_back.set()

    async def trigger(
        self,
        job_id: str,
        promise_id: str,
        attempt: int = 1,
        *,
        ended_settled: bool = True,
        began: int | None = None,
        again: bool = False,
        run: str | None = None,
    ) -> None:
        """Start attempt `attempt` of the external job through its backend,
        unless it was triggered already (a replay) or ended (canceled before
        it was triggered). Past its deadline too: a replay after an outage
        asks the backend again with the same key, to record (and so stop) a
        run a crashed try may have started; the watchdog times the job out.
        `ended_settled`: a row that ended after it was
        triggered has its promise settled, as every row this code writes does
        (see below); the durable trigger step of versions 1-3 passes False,
        for rows an earlier release wrote in the other order. `began`: when
        this run of the workflow's body began (version 4; versions 1-3: this
        run of their trigger step), to tell a replay (`_replayed`); None: not
        known. `again`: a call made again after one of the same run that
        raised (the index failed), which may have tried with no record: its
        refusals are unsure, as a replay's (the workflow calls again after
        anything the call raised). `run`: a token of this run of
        the body (or of the trigger step), the same for each call it makes,
        which marks the job's row before the first try for a backend that
        asks to be told of a replay (`_mark_tries`)."""
        rec = await self.jobs.get(job_id)
        if rec is None:
            await self._without_a_row(job_id, promise_id)
            return
        if rec.attempt != attempt:  # a retry never starts while an attempt's workflow runs
            log.warning("job %s: attempt %d is over", job_id, attempt, extra=rec.log_extra())
            error = ErrorInfo(message=f"attempt {attempt} was replaced", type="superseded")
            await self.settler.resolve_quietly(
                promise_id, Outcome("canceled", error=error), "index"
            )
            return
        if rec.external is not None and (ended_settled or not rec.finished):
            # Triggered already (a replay): the index write is the trigger's
            # record. A job that ended has its promise settled by then: an
            # ending settles the promise before it writes the row, and a
            # trigger that finds the job ended settles it before it writes
            # `external` (below).
            return
        if rec.finished:
            await self.settler.resolve_quietly(promise_id, outcome_of_record(rec), "index")
            return
        backend: Backend | None = None
        try:
            backend, params = self._backend_and_params(rec)
            tried = await self._trigger_with_retries(
                backend, rec, params, promise_id, began=began, again=again, run=run
            )
        except BackendError as exc:
            # Read again while the store fails: raised, the trigger would be
            # called again, and make a new set of tries.
            latest = await self._latest(rec)
            if _another_job(rec, latest):
                log.warning(
                    "job %s: a stale trigger failed (%s) after the job was deleted and a new one"
                    " created under its id; the new job is left as it is",
                    job_id,
                    exc.message,
                    extra=rec.log_extra(promise_id),
                )
                return
            if latest is not None and latest.attempt == attempt and latest.external is not None:
                # Triggered and recorded meanwhile by another process, which
                # took this workflow over while this one stalled (its lease
                # ran out): the run is going, and this late failure is not
                # the job's.
                log.warning(
                    "job %s: a stale trigger failed (%s) after another process triggered it;"
                    " the job is left to that run",
                    job_id,
                    exc.message,
                    extra=rec.log_extra(promise_id),
                )
                return
            error = ErrorInfo(message=f"trigger failed: {exc.message}", type=exc.code or "trigger")
            log.warning(
                "job %s: trigger failed: %s", job_id, exc.message, extra=rec.log_extra(promise_id)
            )
            failed = Outcome(status="failed", error=error)
            await self._failure_settled(rec, failed)
            if (
                backend is not None
                and latest is not None
                and (latest.finished or latest.attempt != attempt)
            ):
                # It ended (or was retried) while the tries went on: stop
                # what they may have started, should its finish be over.
                await self._stop_when_finished(backend, rec, latest)
            return
        if tried is None:  # the row went between two tries (deleted by hand)
            return
        if isinstance(tried, JobRecord):  # ended, or triggered elsewhere, between two tries
            # A try failed before (retryable: it may have started a run).
            if tried.finished and tried.attempt == attempt:
                outcome = outcome_of_record(tried)
                await self.settler.resolve_quietly(promise_id, outcome, "index", tried=True)
                await self._stop_when_finished(backend, rec, tried)
            elif tried.attempt != attempt:
                await self._stop_when_finished(backend, rec, tried)
            elif tried.external is not None:
                log.warning(
                    "job %s: triggered meanwhile by another process; this trigger stops",
                    job_id,
                    extra=rec.log_extra(promise_id),
                )
            return
        receipt, tries = tried
        await self._record_run(backend, rec, params, promise_id, receipt, tries)

    async def _record_run(
        self,
        backend: Backend,
        rec: JobRecord,
        params: Any,
        promise_id: str,
        receipt: dict[str, Any],
        tries: int,
    ) -> None:
        """Record the run `backend` answered try `tries` of attempt
        `rec.attempt`'s trigger with (`receipt`), and stop it when it is
        not wanted: the attempt ended, or was retried, while the backend
        was being asked, or another process recorded a run of its own."""
        job_id, attempt = rec.id, rec.attempt
        interval = self._check_interval(backend, rec, params)  # never raises: the run is started
        now = now_ms()
        next_check = None if interval is None else now + int(interval * 1000)
        triggered = NewEvent("triggered", {"try": tries, "external": receipt})
        beat = rec.heartbeat_timeout  # counted from the trigger until the first heartbeat
        due = None if beat is None else now + int(beat * 1000)
        keys = run_keys_of(backend, receipt)  # its notifications find the job by them
        record = functools.partial(
            self.jobs.set_external,
            job_id,
            receipt,
            now,
            next_check,
            triggered,
            due,
            keys,
            attempt=attempt,
            created_at=rec.created_at,
        )
        written = await self._until_written(rec, lambda: record(open_only=True))
        if written is None:
            # Ended while the trigger was under way, maybe before the promise
            # existed (the row alone was ended): settle it first, then record
            # the run, then stop it. In this order a replay that finds
            # `external` never leaves it unsettled; the settle says the
            # trigger tried, so after a crash between the two the finish
            # stops the unrecorded run (`cancel_unrecorded`). Ended and
            # retried meanwhile: the run is stopped, recorded nowhere.
            ended = await self._row(rec)
            if ended is not None and ended.attempt == attempt:
                outcome = outcome_of_record(ended)
                await self.settler.resolve_quietly(promise_id, outcome, "index", tried=True)
                # Decided before the run is recorded: once it is, a replay of
                # this trigger (after a failure below) returns at once.
                unwanted = await self._run_unwanted(ended, promise_id)
                recorded = await self._until_written(rec, record)
                # The finish may have run already (in another process that
                # took this workflow over while this one stalled): stop this
                # trigger's run here too (the row may keep another process's
                # receipt, and the job may have ended under that run). A
                # cancel may so come twice, as on a replay.
                if recorded is not None and (
                    unwanted or self._other_run(backend, recorded.external, keys)
                ):
                    await self._cancel_run(backend, replace(recorded, external=receipt))
                elif recorded is None:  # retried meanwhile (the write is the attempt's only)
                    later = await self._row(rec)
                    if later is not None and later.attempt > attempt:
                        await self._stop_stale_run(backend, rec, promise_id, receipt, keys, later)
                        return
            elif ended is not None:
                await self._stop_stale_run(backend, rec, promise_id, receipt, keys, ended)
                return
        elif written.attempt == attempt and self._other_run(backend, written.external, keys):
            # Another process recorded a run of its own for the attempt (a
            # backend that ignored the idempotency key): the job is that
            # run's, and this one is stopped.
            log.warning(
                "job %s: another process started and recorded a run of this attempt;"
                " this trigger's run is stopped",
                job_id,
                extra=rec.log_extra(promise_id),
            )
            await self._cancel_run(backend, replace(written, external=receipt))
            return
        elif written.attempt == attempt and written.external != receipt:
            # Another process recorded its answer first, and the two cannot be
            # told apart (a backend without run keys, as `http_webhook`: the
            # same idempotency key is to answer the same run). Its receipt is
            # the job's; this one is not kept, nor said as a second
            # "triggered" (found by a QA pass).
            log.info(
                "job %s: another process recorded this attempt's run first; this trigger's"
                " answer (the same run, by its idempotency key) is not kept",
                job_id,
                extra=rec.log_extra(promise_id),
            )
            return
        log.info("job %s triggered", job_id, extra=rec.log_extra(promise_id))

    def _check_interval(self, backend: Backend, rec: JobRecord, params: Any) -> float | None:
        """`backend.check_interval(params)` for a run just started, guarded
        as the watchdog's later asks are (`Plugins.check_interval`): one that
        raises or answers what is no number of seconds is a warning naming
        the backend and a look at the job an hour on; the run is recorded
        all the same."""
        return self.plugins.check_interval(backend, rec, params, self.settings.max_timeout)[0]

    async def _stop_when_finished(self, backend: Backend, rec: JobRecord, now: JobRecord) -> None:
        """Tries of attempt `rec.attempt` that may have started a run ended
        because the attempt ended (`now`: the job's row, ended, or at a
        later attempt): its finish stops that run (`_may_have_started`),
        unless the finish is over already (this process stalled past its
        lease while another ran it, or the job was retried since): then the
        run is asked to stop here (`cancel_unrecorded`), with the attempt's
        end."""
        root = root_promise_id(rec.id, rec.attempt)

        async def finished() -> bool:
            promise = await self._promise(root)
            return promise is None or promise.state != "pending"

        if not await self._until_stored(rec, "reading its workflow", finished):
            return
        if now.attempt == rec.attempt:
            ended = now
        else:
            how = await self._until_stored(
                rec, "reading how its attempt ended", lambda: self._ended_as(rec.id, rec.attempt)
            )
            error = msgspec.convert(how.get("error"), ErrorInfo | None)
            ended = replace(rec, state=how["state"], error=error, external=how.get("external"))
        await self._cancel_unrecorded(backend, ended, retried=now.attempt != rec.attempt)

    async def _stop_stale_run(
        self,
        backend: Backend,
        rec: JobRecord,
        promise_id: str,
        receipt: dict[str, Any],
        keys: Sequence[str],
        now: JobRecord,
    ) -> None:
        """The run the backend answered attempt `rec.attempt`'s trigger with,
        the attempt having ended (and the job been retried: `now`) while it
        was being asked: recorded nowhere, no finish stops it, so it is
        stopped here, unless `_stale_run_kept` says it is another's to stop
        or over. Asked as for any unwanted run, with the job as that attempt
        ended; a stop that fails is a `cancel_failed` event, filed under the
        attempt the job is at, its `external` naming the run. What it reads
        is read again while the store fails: raised, the replay finds the
        attempt over and would leave the run going for good."""

        async def read() -> tuple[dict[str, Any], Any]:
            return await self._ended_as(rec.id, rec.attempt), await self._settled_value(promise_id)

        ended, value = await self._until_stored(rec, "reading how its attempt ended", read)
        if self._stale_run_kept(backend, keys, ended, value, now):
            log.info(
                "job %s: attempt %d ended while its trigger was under way; the run its backend"
                " answered with is recorded or over, and is left as it is",
                rec.id,
                rec.attempt,
                extra=rec.log_extra(promise_id),
            )
            return
        log.warning(
            "job %s: attempt %d ended and the job was retried (attempt %d) while its trigger"
            " was under way; the run its backend started is stopped",
            rec.id,
            rec.attempt,
            now.attempt,
            extra=rec.log_extra(promise_id),
        )
        error = msgspec.convert(ended.get("error"), ErrorInfo | None)
        stale = replace(rec, state=ended["state"], error=error, external=receipt)
        await self._cancel_run(backend, stale)

    @staticmethod
    def _stale_run_kept(
        backend: Backend,
        keys: Sequence[str],
        ended: dict[str, Any],
        value: Any,
        now: JobRecord,
    ) -> bool:
        """Whether a stale trigger's run (of run `keys`) is left going: it is
        the run the job now runs (a backend that reruns in place, as
        Databricks' repair: told by run keys only), or the run its attempt
        recorded (its finish decided), or, when that cannot be told (no
        keys), the attempt ended so that its run is not to be stopped (by
        its run's callback: `stopped_with`; a run surely another is stopped
        whatever the end)."""
        running = run_keys_of(backend, now.external)
        if keys and running and set(keys) & set(running):
            return True
        recorded = run_keys_of(backend, ended.get("external"))
        if keys and recorded:
            return bool(set(keys) & set(recorded))
        return not stopped_with(ended["state"], value)

    @staticmethod
    def _other_run(backend: Backend, external: dict[str, Any] | None, keys: Sequence[str]) -> bool:
        """Whether the run `external` records is another than the one of
        `keys` (this trigger's): both have run keys, and none in common.
        Without keys the two cannot be told apart (the same run, answered
        twice)."""
        theirs = run_keys_of(backend, external)
        return bool(keys) and bool(theirs) and not set(keys) & set(theirs)

    async def _failure_settled(self, rec: JobRecord, failed: Outcome) -> None:
        """The settle that fails attempt `rec.attempt` after its trigger's
        last try, tried again (`RETRY_BACKOFF` doubled) while it fails: it
        may have resolved the promise before its index write failed, and
        raised, the whole trigger would run again with the row still
        `pending` and call the backend for a job already failed (a run the
        finish would only stop). Tried again, it ends the row from the
        promise's value, as any settle that lost does. Before each try
        again, a run another process recorded for the attempt meanwhile (it
        took this workflow over, this one's lease having run out while the
        store failed) wins, while the promise is still pending: this late
        failure is not the job's, as after the last try (`trigger`)."""
        first = True

        async def settle_unless_triggered_elsewhere() -> None:
            nonlocal first
            if not first and await self._run_recorded_meanwhile(rec):
                return
            first = False
            await self.settler.settle(
                rec.id, failed, by="trigger", attempt=rec.attempt, salt=rec.salt
            )

        await self._until_stored(
            rec, "recording its trigger's failure", settle_unless_triggered_elsewhere
        )

    async def _run_recorded_meanwhile(self, rec: JobRecord) -> bool:
        """Whether another process recorded a run for attempt `rec.attempt`
        while its callback promise is still pending (a settle of it that
        failed may have been applied: then the job is failed, and the finish
        stops the run)."""
        latest = await store_call(self.jobs.get(rec.id))
        if _another_job(rec, latest):
            log.warning(
                "job %s: a trigger's failure not yet recorded, and the job was deleted and a new"
                " one created under its id meanwhile; the new job is left as it is",
                rec.id,
                extra=rec.log_extra(callback_promise_id(rec.id, rec.attempt)),
            )
            return True
        if latest is None or latest.attempt != rec.attempt or latest.external is None:
            return False
        promise_id = callback_promise_id(rec.id, rec.attempt)
        promise = await self._promise(promise_id)
        if promise is None or promise.state != "pending":
            return False
        log.warning(
            "job %s: a trigger's failure not yet recorded, and another process triggered it"
            " meanwhile; the job is left to that run",
            rec.id,
            extra=rec.log_extra(promise_id),
        )
        return True

    async def _run_unwanted(self, rec: JobRecord, promise_id: str) -> bool:
        """Whether the run of a job that ended while its trigger was under
        way is to be stopped (`stopped_with`; failed: by its promise's
        value). Not when it succeeded or its callback failed it (if it is
        the run the job ended under: `_other_run` tells another process's
        apart)."""
        if rec.state != "failed":
            return stopped_with(rec.state, None)
        value = await self._until_stored(
            rec, "reading how its attempt ended", lambda: self._settled_value(promise_id)
        )
        return stopped_with(rec.state, value)

    async def _settled_value(self, promise_id: str) -> Any:
        """The value callback promise `promise_id` was resolved with (None:
        pending, rejected or gone)."""
        promise = await self._promise(promise_id)
        if promise is None or promise.state != "resolved" or not promise.value:
            return None
        return promise.value.data

    async def _promise(self, promise_id: str) -> Any:
        """Promise `promise_id` (None: gone); a store that fails or
        answers an error is `StoreUnavailable` (the callers try again)."""
        try:
            return await store_call(self.settler.resonate.promises.get(promise_id))
        except ServerError as exc:
            if exc.code == 404:
                return None
            raise StoreUnavailable(f"the store refused the read ({store_refusal(exc)})") from None

    async def _row(self, rec: JobRecord) -> JobRecord | None:
        """The job's row now (None: gone, or another job's under its id),
        read again while the store fails: a read that raised would have the
        trigger's replay find the attempt over and leave the run it got
        going for good."""
        now = await self._latest(rec)
        return None if _another_job(rec, now) else now

    async def _latest(self, rec: JobRecord) -> JobRecord | None:
        """The row under the job's id now, whoever's, read again while the
        store fails."""
        return await self._until_stored(
            rec, "reading its job", lambda: store_call(self.jobs.get(rec.id))
        )

    async def _until_written[T](self, rec: JobRecord, write: Callable[[], Awaitable[T]]) -> T:
        """`write()`, the index write recording a run the backend started,
        tried again while the index does not answer (a store locked by
        another process): raised, the whole trigger would run again, the
        backend's call included (the same key, but once more each time)."""
        return await self._until_stored(rec, "recording its triggered run", write)

    async def _until_stored[T](
        self, rec: JobRecord, what: str, write: Callable[[], Awaitable[T]]
    ) -> T:
        """`write()`, tried again (`RETRY_BACKOFF` doubled, at most
        `RETRY_BACKOFF_MAX`) while the store does not answer; each failure is
        logged as "WHAT failed"."""
        delay = RETRY_BACKOFF
        while True:
            try:
                return await write()
            except StoreUnavailable as exc:
                log.warning(
                    "job %s: %s failed (%s); again in %gs",
                    rec.id,
                    what,
                    exc.message,
                    delay,
                    extra=rec.log_extra(),
                )
            await self.sleep(delay)
            delay = min(delay * 2, RETRY_BACKOFF_MAX)

    async def _without_a_row(self, job_id: str, promise_id: str) -> None:
        """No row for a job whose workflow runs. Its promise settled (at the
        latest by the store, at the deadline plus `PROMISE_GRACE_MS`): the
        row was deleted under the workflow (by hand: retention and `tether
        gc` delete only ended jobs), so there is nothing to trigger and the
        workflow ends (its finish finds no row either) instead of retrying
        for ever. Still pending: an error, tried again. That may be this
        process reading the wrong index (a Resonate-server store's hosts
        with different `TETHER_INDEX`es): the job stays untouched for a host
        that has its row."""
        promise = await self.settler.resonate.promises.get(promise_id)
        if promise.state == "pending":
            raise RuntimeError(f"job {job_id!r} has a workflow but no record")
        log.error(
            "job %s: its record is gone; its workflow ends (nothing triggered, stopped or told)",
            job_id,
        )

    def _backend_and_params(self, rec: JobRecord) -> tuple[Backend, Any]:
        backend = self.plugins.backends.get(rec.backend)
        if backend is None:
            message = f"backend {rec.backend!r} is not installed"
            if rec.tries_run is not None and rec.tries_run.startswith(f"{rec.attempt}:"):
                # a run of the workflow got to its tries before (a restart
                # after the plugin was removed): one may have started a run
                message += (
                    "; a try made before it was removed may have started a run, which nothing"
                    " here can stop: look for it in the external system"
                )
            raise BackendError(message, code="unknown_backend")
        try:
            return backend, stored_params(backend, rec.params)
        except msgspec.ValidationError as exc:
            raise BackendError(f"invalid params: {exc}", code="invalid_params") from None

    async def _trigger_with_retries(
        self,
        backend: Backend,
        rec: JobRecord,
        params: Any,
        promise_id: str,
        *,
        began: int | None,
        again: bool,
        run: str | None = None,
    ) -> tuple[dict[str, Any], int] | JobRecord | None:
        """`backend.trigger` (`backend.rerun` from attempt 2 on), tried
        `trigger_attempts` times while it fails with a retryable error, waiting
        `trigger_backoff` doubled each time (or the backend's `retry_after`,
        when longer). Returns the receipt with the callback token scrubbed from
        it, and the try that got it; or, when the attempt ended while it waited
        to try again (canceled, timed out), was triggered and recorded by
        another process (which took the workflow over while this one
        stalled), the job's row (None: it is gone):
        it is not tried again. Each failed try is a `trigger_failed` event; a
        clear refusal in a replayed run of the body (`_replayed`) says so
        (`replayed`): the try it repeats may have started a run. A failure
        that says the backend sent nothing (`BackendError.tried` False: it
        waits to see what an earlier try did) is recorded too, but is not
        counted against the tries: the backend says when to ask again."""
        trigger = self._trigger_of(rec, params, promise_id)
        previous = None if rec.attempt == 1 else await self._previous(rec)
        # Marked right before the first try: a call of this run that finds
        # the mark its earlier call wrote knows that one got to its tries.
        marked = False
        if backend.asks_if_replayed and run is not None:
            trigger = replace(trigger, replayed=await self._mark_tries(rec, run))
            marked = True
        attempts = max(self.settings.trigger_attempts, 1)
        delay = self.settings.trigger_backoff
        # An external system may echo the request back, and a plugin's error may
        # quote it: never keep the callback token in the job record or the log.
        tokens = self.signer.job_tokens(rec.id, rec.attempt, rec.salt)
        tries = 0  # those counted against `attempts`: each but a wait (`tried` False)
        told: set[tuple[str, str, int]] = set()  # the unexpected failures logged with a traceback
        made, last = await self._tries_made(rec)
        if made:  # an earlier run of the body's tries go on
            tries = made
            delay *= 2.0 ** min(tries, 64)
        if last is not None:
            waited = await self._rest_of_a_wait(rec, last, promise_id)
            if waited is not rec:
                return waited
        which = "trigger" if previous is None else "rerun"

        def call() -> Any:
            if previous is None:
                return backend.trigger(trigger)
            return backend.rerun(trigger, previous)

        while True:
            this = tries + 1
            try:
                started = await self._answer(rec, call, this, which)
                return self._receipt(backend, rec, which, started, tokens), this
            except _Abandoned as ended:
                log.warning(
                    "job %s: attempt %d ended while backend %r's %s had not answered; the"
                    " attempt goes on without it, as after a try whose answer was lost",
                    rec.id,
                    rec.attempt,
                    rec.backend,
                    which,
                    extra=rec.log_extra(promise_id),
                )
                try:  # held before the workflow goes on: a retry and a stream wait for it
                    lease = await self._hold_stop(rec, ended.now)
                except asyncio.CancelledError:
                    _abandon(ended.answering, rec)
                    raise
                late = self._answered_late(
                    ended, lease, backend, rec, params, promise_id, which, this
                )
                task = asyncio.get_running_loop().create_task(late, name=rec.id)
                self.detached.add(task)  # (a strong reference: the loop keeps a weak one)
                task.add_done_callback(self.detached.discard)
                return ended.now
            except (_Unanswered, _BadReceipt) as exc:
                # The try may have started a run (retryable), which no answer
                # names: the job fails, and its finish asks the backend to
                # stop that run (`cancel_unrecorded`). Not tried again: the
                # backend would hang again, or answer so again.
                if isinstance(exc, _Unanswered):
                    error = _unanswered(rec.backend, which)
                else:
                    error = {"type": "invalid_receipt", "message": redact(exc.message, tokens)}
                await self._trigger_failed(rec, this, error, None, True)
                raise BackendError(error["message"], code=error["type"]) from None
            except BackendError as exc:
                exc.message = redact(exc.message, tokens)  # whole, or cut at its end
                error = {"type": exc.code or "backend", "message": exc.message}
                counted = exc.tried or not exc.retryable
                if counted and (not exc.retryable or this >= attempts):
                    replayed = not exc.retryable and (
                        trigger.replayed
                        if marked
                        else await self._replayed(promise_id, began, again)
                    )
                    await self._trigger_failed(rec, this, error, None, exc.retryable, replayed)
                    raise
                backoff = delay if counted else max(self.settings.trigger_backoff, WAIT_MIN)
                wait = max(backoff, exc.retry_after or 0)
                reason = exc.message
            except Exception as exc:  # a plugin bug or a network error: retry, then fail
                error = _plugin_bug(rec.backend, exc)
                if _where(exc) not in told:  # once for each kind and place: tries repeat it
                    told.add(_where(exc))
                    _log_traceback(
                        logging.ERROR,
                        exc,
                        tokens,
                        "job %s: backend %r: %s raised %s, not a BackendError (a bug of its"
                        " plugin?); try %d/%d",
                        rec.id,
                        rec.backend,
                        which,
                        type(exc).__name__,
                        this,
                        attempts,
                        extra=rec.log_extra(promise_id),
                    )
                if this >= attempts:
                    await self._trigger_failed(rec, this, error, None, True)
                    raise BackendError(error["message"], code="trigger") from None
                wait, reason, counted = delay, f"{type(exc).__name__}", True
            if counted:
                tries += 1
                delay *= 2
            await self._trigger_failed(rec, this, error, wait, True, counted=counted)
            log.warning(
                "job %s: trigger try %d/%d %s (%s); again in %.1fs",
                rec.id,
                this,
                attempts,
                "failed" if counted else "waits (not counted)",
                reason,
                wait,
                extra=rec.log_extra(promise_id),
            )
            async with self.slots.lent():
                now = await self._wait_between_tries(rec, wait)
            if now is not rec:
                return now

    async def _answer(self, rec: JobRecord, call: Callable[[], Any], this: int, which: str) -> Any:
        """What `call()`, try `this` of attempt `rec.attempt`'s trigger (its
        `which`: `trigger` or `rerun`), answers, bounded: raises `_Unanswered`
        after `TRIGGER_TIMEOUT` (the call cancelled), and `_Abandoned` once
        the attempt ended or moved on meanwhile (the job's row, looked at
        every `TRIGGER_WATCH` seconds, read again while the store fails), the
        call left to answer late (`_answered_late`). Past `TRIGGER_SLOW`, a
        `trigger_slow` event (`_trigger_slow`), and the task's slot lent
        (`Slots`). Either way the workflow goes on, and frees its
        task slot; what the try may have started is its attempt's finish's
        to stop, as a try whose answer was lost (`_may_have_started`). A
        `CancelledError` the call raises of its own (this task is not being
        cancelled) is a failure like any other. A backend whose `trigger`
        is no coroutine function (it blocks the loop) is answered by what
        it returns."""
        loop = asyncio.get_running_loop()
        try:
            called = call()
        except PLUGIN_EXITS as exc:
            raise _exited(exc) from exc
        if not inspect.isawaitable(called):  # a plugin's `trigger` not async: its answer
            return called
        answering = asyncio.ensure_future(_contained(called))
        began = loop.time()
        until = began + TRIGGER_TIMEOUT
        detached = False
        try:
            now = await self._watched(rec, answering, began + TRIGGER_SLOW, until)
            if now is not None:  # slow: said, and its slot lent while it goes on
                await self._trigger_slow(now, this, which, loop.time() - began)
                async with self.slots.lent():
                    await self._watched(rec, answering, until, until)
        except _Abandoned:
            detached = True
            raise
        finally:
            if not answering.done() and not detached:
                _abandon(answering, rec)
        try:
            return answering.result()
        except asyncio.CancelledError:
            raise RuntimeError("the call was cancelled, by the backend itself") from None

    async def _watched(
        self, rec: JobRecord, answering: asyncio.Future[Any], stop_at: float, until: float
    ) -> JobRecord | None:
        """Watch a trigger's call (`_answer`) until it is done (None) or
        `stop_at` (a `loop.time()`) has passed (the job's row as last read):
        `_Unanswered` at `until`, `_Abandoned` once the attempt ended or
        moved on, the row looked at every `TRIGGER_WATCH` seconds (not
        before the first: a prompt answer costs no read)."""
        loop = asyncio.get_running_loop()
        while True:
            left = min(stop_at, until) - loop.time()
            if left > 0:
                await _settled_within(answering, min(TRIGGER_WATCH, left))
            if answering.done():
                return None
            if loop.time() >= until:
                raise _Unanswered
            now = await self._row(rec)
            if now is None or now.finished or now.attempt != rec.attempt:
                raise _Abandoned(now, answering, until)
            if loop.time() >= stop_at:
                return now

    async def _answered_late(
        self,
        ended: _Abandoned,
        lease: StopLease | None,
        backend: Backend,
        rec: JobRecord,
        params: Any,
        promise_id: str,
        which: str,
        tries: int,
    ) -> None:
        """Take the answer of a call of attempt `rec.attempt`'s trigger that
        the workflow no longer waits for (`ended`: the attempt ended or
        moved on), up to the call's `TRIGGER_TIMEOUT`, then cancel it. A run
        it answers with is recorded and stopped as any run answered after its
        attempt ended (`_record_run`: after a cancel or a timeout stopped with
        `cancel`, after a retry as a stale trigger's run), so a slow
        backend's call (one in a thread cannot be cancelled) leaves no run
        going unseen; the finish has asked the backend to look for it too
        (`cancel_unrecorded`), which is harmless.

        For an attempt canceled or timed out with no run recorded (the runs
        its finish looks for: `_stops_late`), a call that ends with no run
        taken (it failed after it may have sent its request, or was
        abandoned at its bound) has the backend asked again, as it may have
        started one after the finish asked. That stop is durable: `lease`,
        held in the job's row from before the workflow went on (`_hold_stop`)
        and renewed while the call runs, so a process that dies meanwhile
        leaves it to any watchdog once the lease ran out (`finish_orphan`:
        `cancel_unrecorded` again); a service that stops first makes it due
        when the call should have ended (its `TRIGGER_TIMEOUT`, which a
        backend's own bounds stay within: a call in a thread goes on).
        Nothing it raises goes further than the log."""
        answering, until, loop = ended.answering, ended.until, asyncio.get_running_loop()
        over = False
        outcome: list[NewEvent] = []
        try:
            async with contextlib.AsyncExitStack() as kept:
                if lease is not None:
                    await kept.enter_async_context(lease.kept())
                try:
                    await _settled_within(answering, max(until - loop.time(), 0))
                finally:
                    over = answering.done()  # of itself: else cancelled, and maybe going on
                    if not over:
                        _abandon(answering, rec)
                taken = await self._late_answer(
                    answering, backend, rec, params, promise_id, which, tries
                )
                if _stops_late(rec, ended.now) and not taken and _may_have_started_late(answering):
                    over = True  # (the call is done with: a stop cut short is due at once)
                    if lease is not None and lease.claims:
                        failed = await self._unrecorded_failure(backend, rec, lease=lease)
                        outcome = [] if failed is None else [failed]
                    else:  # held by nobody (the write failed), or taken over meanwhile
                        await self._cancel_unrecorded(backend, rec)
        except asyncio.CancelledError:  # the service is stopping (`close`)
            if lease is None:
                log.warning(
                    "job %s: its trigger's call, which its attempt no longer waited for, was"
                    " still answering as the service stopped; a run it starts after this (a"
                    " call in a thread goes on) is recorded nowhere: look for it in the"
                    " external system",
                    rec.id,
                    extra=rec.log_extra(promise_id),
                )
            else:  # due once the call should have ended (a call in a thread goes on)
                left = 0.0 if over else max(until - loop.time(), 0)
                await self._release_stop(rec, rec.attempt, lease, now_ms() + int(left * 1000))
            raise
        except Exception as exc:  # (a store that failed, a plugin's bug): the log's alone
            log.warning(
                "job %s: following its late trigger call failed (%s)%s",
                rec.id,
                type(exc).__name__,
                "; another process's watchdog asks the backend to stop what it may have"
                " started once the lease runs out"
                if lease is not None
                else "",
                extra=rec.log_extra(promise_id),
            )
            return
        if lease is not None and lease.claims:
            try:
                await self._stop_recorded(rec, rec.attempt, lease, outcome)
            except Exception as exc:
                log.warning(
                    "job %s: recording the stop of what its late trigger call may have started"
                    " failed (%s); another process's watchdog asks the backend again once its"
                    " lease runs out",
                    rec.id,
                    reason(exc),
                    extra=rec.log_extra(promise_id),
                )

    async def _late_answer(
        self,
        answering: asyncio.Future[Any],
        backend: Backend,
        rec: JobRecord,
        params: Any,
        promise_id: str,
        which: str,
        tries: int,
    ) -> bool:
        """`_answered_late`'s take of the call's answer, if it answered:
        whether a run it named was recorded (and stopped as a late
        answer's). A call that failed, or was abandoned at its bound, is
        its try's `trigger_failed` (`_failed_late`)."""
        tokens = self.signer.job_tokens(rec.id, rec.attempt, rec.salt)
        if not answering.done() or answering.cancelled() or answering.exception() is not None:
            await self._failed_late(answering, rec, which, tries, tokens)
            return False
        try:
            receipt = self._receipt(backend, rec, which, answering.result(), tokens)
            log.warning(
                "job %s: backend %r's %s answered after attempt %d ended; its run is recorded"
                " and stopped as a late answer's",
                rec.id,
                rec.backend,
                which,
                rec.attempt,
                extra=rec.log_extra(promise_id),
            )
            await self._record_run(backend, rec, params, promise_id, receipt, tries)
            return True
        except Exception as exc:
            log.warning(
                "job %s: the late answer of backend %r's %s could not be taken (%s)",
                rec.id,
                rec.backend,
                which,
                unquoted(redact(reason(exc), tokens)),
                extra=rec.log_extra(promise_id),
            )
            return False

    async def _hold_stop(self, rec: JobRecord, now: JobRecord | None) -> StopLease | None:
        """This process's lease on the stop of what a call of attempt
        `rec.attempt`'s trigger, left to answer late, may start
        (`jobs.hold_stop`), when the attempt (`now`: the row as the call was
        left) ended so that its finish looks for such a run (`_stops_late`).
        None when not, or when the write failed (said in the log: the call is
        then followed in memory alone, as a process that dies would leave it)."""
        if not _stops_late(rec, now) or now is None or now.stop_due is not None:
            return None
        length = self.stop_lease_ms()
        try:
            held = await store_call(self.jobs.hold_stop(rec.id, rec.attempt, now_ms() + length))
        except Exception as exc:
            log.warning(
                "job %s: holding the stop of what its late trigger call may start failed (%s)",
                rec.id,
                reason(exc),
                extra=rec.log_extra(),
            )
            return None
        return None if held is None else StopLease(self.jobs, held, length)

    def _receipt(
        self, backend: Backend, rec: JobRecord, which: str, started: Any, tokens: Sequence[str]
    ) -> dict[str, Any]:
        """What `backend.trigger` (`which`: or `rerun`) answered (`started`),
        as the job keeps it (`external`): a JSON object without the callback
        tokens (each form whole, in the bytes, escapes as sent; then any cut
        piece), within `max_result_bytes` (`bound_external`: its largest
        fields cut, with a warning). Anything but a mapping that JSON can
        write is `_BadReceipt`, naming the backend and what it answered."""
        if not isinstance(started, Mapping):
            raise _BadReceipt(
                f"backend {rec.backend!r}: {which} returned {_said(started)}, not a mapping"
                " (what identifies the run it started)"
            )
        try:
            data = msgspec.json.encode(dict(started))
        except Exception as exc:  # (a value JSON cannot write, a mapping that raises)
            # Its type alone, as any exception not a `BackendError`
            # (`_plugin_bug`): its words, a plugin's mapping's, may quote a
            # secret, and were filed in `trigger_failed` whole (a review,
            # 2026-12-07).
            raise _BadReceipt(
                f"backend {rec.backend!r}: {which} returned a mapping that is not JSON"
                f" ({type(exc).__name__})"
            ) from None
        whole: dict[str, Any] = read_json(redact_bytes(data, tokens))
        limit = self.settings.max_result_bytes
        bounded, cut = bound_external(whole, limit)
        if cut:
            log.warning(
                "job %s: backend %r: %s returned %d bytes of JSON; the job's external is"
                " kept with these fields cut (past the bound of %d bytes,"
                " TETHER_MAX_RESULT_BYTES, or nested too deep): %s",
                rec.id,
                rec.backend,
                which,
                len(data),
                limit,
                redact(", ".join(cut), tokens)[:1000],
                extra=rec.log_extra(),
            )
        return dict(redact_value(bounded, tokens))

    async def _tries_made(self, rec: JobRecord) -> tuple[int, Event | None]:
        """The tries of this attempt's trigger its history counts (each
        `trigger_failed` counted, and a `trigger_slow`: a try under way
        when its run of the body ended), and its last `trigger_failed` when
        that one asked for another try (`retry_in`): an earlier run of the
        body made tries, and a stop cut it short (`close`) or its process
        died. This run's tries go on from there: numbered after them,
        counted against the same `trigger_attempts` (at least one try in
        each run), after the rest of that wait. They started again from the
        first, so a host stopped again and again tried without end (found
        by a QA pass; and by a second one, a slow try's event after the
        last failure). Read only when the job has more events than
        `accepted`: a first run of a job taken at once reads nothing more."""
        if rec.events <= 1:
            return 0, None
        # The last few tries' events, found by type: other events between
        # them (callbacks refused, heartbeats) hid them from a look at the
        # job's last events (a third QA pass).
        events = await store_call(self.jobs.last_tries(rec.id, rec.attempt, 4))
        # The last says (a try its attempt no longer waited for, `late`, aside):
        # a slow try's failure not counted (a wait) undoes the slow event's
        # count of it (a third QA pass).
        newest = next((e for e in reversed(events) if not e.data.get("late")), None)
        if newest is None:
            return 0, None
        number = newest.data.get("try")
        made = number if isinstance(number, int) else 0
        if newest.type == "trigger_slow":  # under way after the last wait: it is over
            return made, None
        if not newest.data.get("counted", True):
            made = max(made - 1, 0)
        return made, newest if newest.data.get("retry_in") is not None else None

    async def _rest_of_a_wait(
        self, rec: JobRecord, last: Event, promise_id: str
    ) -> JobRecord | None:
        """Wait what is left of the wait `last` (`_tries_made`) asked for (its
        `retry_in`: a backoff, a target's `Retry-After`), if any
        (`_wait_between_tries`'s answer): the run of the body that took the
        job over tried again at once, earlier than the target asked (found
        by a QA pass)."""
        retry_in = last.data["retry_in"]
        left = (last.at + retry_in * 1000 - now_ms()) / 1000
        if left <= 0:
            return rec
        log.info(
            "job %s: its last try (%s) asked for a wait of %gs before the next, %.1fs of it"
            " left (cut short by a stop); waiting before trying again",
            rec.id,
            last.data.get("try"),
            retry_in,
            left,
            extra=rec.log_extra(promise_id),
        )
        async with self.slots.lent():
            return await self._wait_between_tries(rec, left)

    async def _wait_between_tries(self, rec: JobRecord, wait: float) -> JobRecord | None:
        """Sleep `wait` seconds, looking at the job's row every `WAIT_SLICE`
        and at the end: `rec` when the tries go on; else the row (None:
        gone, or another job's) once the attempt ended (a cancel, a
        timeout: its finish then stops what the tries may have started
        without waiting out the rest), moved on, or was triggered by
        another process. Each look is read again while the store fails:
        raised, the trigger would be called again, and find its own mark (a
        replay's wait)."""
        left = wait
        while True:
            step = min(left, WAIT_SLICE)
            await self._pause(step)
            left -= step
            now = await self._row(rec)
            if now is None or now.finished or now.attempt != rec.attempt:
                return now
            if now.external is not None:
                return now
            if left <= 0:
                return rec

    async def _mark_tries(self, rec: JobRecord, run: str) -> bool:
        """Mark the job's row as tried by this run of the body (`run`) right
        before its first try; whether an earlier call may have made a try
        nothing recorded: another run marked it first (a replay, whose run
        may have died inside a try; or a run beside this one, after a lease
        ran out), or this run's own earlier call did (it got to its tries,
        then raised). Told by the row, so no clock is compared (`_replayed`
        compares the store's with this host's). A call made again after one
        that raised before its mark (the index failed on an earlier read) is
        no replay. The write is made again while the store fails; one whose
        answer was lost finds its own mark, as written by this call."""
        mark = f"{rec.attempt}:{run}"
        if rec.tries_run == mark:
            return True
        earlier = rec.tries_run is not None and rec.tries_run.startswith(f"{rec.attempt}:")

        async def write() -> bool:
            marking = self.jobs.mark_tries(rec.id, rec.created_at, rec.attempt, rec.tries_run, mark)
            return await store_call(marking)

        return not await self._until_stored(rec, "marking its tries", write) or earlier

    async def _replayed(self, promise_id: str, began: int | None, again: bool) -> bool:
        """Whether the run of the workflow's body that began at `began` is a
        replay: its callback promise was made by an earlier run (before
        `began`, by more than `replay_margin_ms`). That run went on to try
        the trigger, so it may have died inside a try (no `trigger_failed`
        records it) whose run this run's try, with the same idempotency key,
        was refused as a repeat of. So is a call made `again` in one run.
        What cannot be told counts as a replay (a read that fails, a promise
        gone or without a creation time: a store that does not say; each
        store Tether is tested on does): a stop of a run that never started
        is harmless, a run left going is not."""
        if again:
            return True
        if began is None:
            return False
        try:
            promise = await self._promise(promise_id)
        except Exception:
            return True
        if promise is None:
            return True
        made: int = promise.created_at
        return made <= 0 or made < began - self.replay_margin_ms

    @property
    def replay_margin_ms(self) -> int:
        """How much earlier than a run's start its callback promise must be
        made to count as an earlier run's: the store's clock (it stamps the
        promise) and this host's may differ a little, and a replay comes a
        lease's time (`task_ttl`) or a restart after the run that made it."""
        return int(min(REPLAY_MARGIN, self.settings.task_ttl / 4) * 1000)

    def _trigger_of(self, rec: JobRecord, params: Any, promise_id: str) -> Trigger:
        """What the backend's trigger of attempt `rec.attempt` is handed."""
        return Trigger(
            job=backend_view(rec),
            params=params,
            promise_id=promise_id,
            callback_url=self.signer.url(promise_id, rec.salt),
            idempotency_key=idempotency_key(promise_id, rec.salt),
            tokens=tuple(self.signer.tokens(promise_id, rec.salt)),
        )

    async def _ended_as(self, job_id: str, attempt: int) -> dict[str, Any]:
        """How attempt `attempt` of the job ended (`state`, `error`,
        `external`): what the `retried` event that started the next attempt
        kept of it."""
        _, events = await self.jobs.events_after(job_id, 0, HISTORY_LIMIT)
        retried = [e for e in events if e.type == "retried" and e.attempt == attempt + 1]
        # (Its event trimmed from the history, which a recent one never is: the state alone.)
        return retried[0].data["previous"] if retried else {"state": "failed"}

    async def _previous(self, rec: JobRecord) -> Job:
        """The job as its previous attempt ended, for `Backend.rerun`; its
        `external` the run the latest attempt that recorded one recorded:
        an attempt whose trigger failed (a repair refused while its run went
        on) recorded none, and the run before is still the one to repair."""
        _, events = await self.jobs.events_after(rec.id, 0, HISTORY_LIMIT)
        ended = [
            e.data["previous"]
            for e in events
            if e.type == "retried" and e.attempt <= rec.attempt  # (one per attempt)
        ]
        last = ended[-1] if ended else {"state": "failed"}  # (trimmed from the history)
        external = next(
            (p["external"] for p in reversed(ended) if p.get("external") is not None), None
        )
        return msgspec.structs.replace(
            backend_view(rec),
            attempt=rec.attempt - 1,
            state=last["state"],
            external=external,
            error=msgspec.convert(last.get("error"), ErrorInfo | None),
        )

    async def _failed_late(
        self,
        answering: asyncio.Future[Any],
        rec: JobRecord,
        which: str,
        tries: int,
        tokens: Sequence[str],
    ) -> None:
        """File try `tries` of attempt `rec.attempt`, which the attempt no
        longer waited for, as failed once its call did, or was abandoned at
        `TRIGGER_TIMEOUT`: a `trigger_failed` after `finished` (`late`:
        true; `retryable` and `counted` as for any try), as a late answer is
        a `triggered` after it, and a warning. Before, such a try
        was filed nowhere: a target that hung past its jobs' timeouts left
        `tether_trigger_attempts_total` at 0 and its alert silent (found by
        a QA pass). Not once the job was retried (its history is the new
        attempt's), nor when the store fails (the log has it)."""
        retryable, counted = True, True
        exc = None if not answering.done() or answering.cancelled() else answering.exception()
        if exc is None:  # abandoned at its bound (an answer was taken before this)
            error = _unanswered(rec.backend, which)
        else:
            if isinstance(exc, BackendError):
                error = {"type": exc.code or "backend", "message": redact(exc.message, tokens)}
                retryable, counted = exc.retryable, exc.tried or not exc.retryable
            else:  # its type alone, as at any try (`_trigger_with_retries`)
                error = _plugin_bug(rec.backend, exc)
                _log_traceback(
                    logging.ERROR,
                    exc,
                    tokens,
                    "job %s: backend %r: %s raised %s, not a BackendError (a bug of its"
                    " plugin?), after its attempt ended",
                    rec.id,
                    rec.backend,
                    which,
                    type(exc).__name__,
                    extra=rec.log_extra(callback_promise_id(rec.id, rec.attempt)),
                )
        log.warning(
            "job %s: backend %r's %s, which attempt %d no longer waited for, failed: %s",
            rec.id,
            rec.backend,
            which,
            rec.attempt,
            unquoted(error["message"]),
            extra=rec.log_extra(callback_promise_id(rec.id, rec.attempt)),
        )
        await self._trigger_failed(rec, tries, error, None, retryable, counted=counted, late=True)

    async def _trigger_slow(self, rec: JobRecord, this: int, which: str, took: float) -> None:
        """Say that try `this` of the job's trigger has not answered in
        `took` seconds (`TRIGGER_SLOW`): a `trigger_slow` event (`try`,
        `seconds`, `timeout`: when the call is given up) and a warning. Not
        once another process recorded a run for the attempt. A store that
        fails to record it is logged, and the call goes on: the event is
        what an operator reads, the call is the job."""
        if rec.external is not None:
            return
        data = {"try": this, "seconds": round(took, 1), "timeout": TRIGGER_TIMEOUT}
        log.warning(
            "job %s: backend %r's %s has not answered in %.0f s (try %d); it is given up"
            " %g s from its start",
            rec.id,
            rec.backend,
            which,
            took,
            this,
            TRIGGER_TIMEOUT,
            extra=rec.log_extra(callback_promise_id(rec.id, rec.attempt)),
        )
        await self._file_aside(rec, NewEvent("trigger_slow", data), "; the call goes on")

    async def _file_aside(self, rec: JobRecord, event: NewEvent, then: str) -> None:
        """Record `event`, one an operator reads while the job goes on
        without it (`trigger_slow`, a late `trigger_failed`): a store that
        fails is a warning, never raised into the step."""
        try:
            await self.jobs.record(rec.id, [event], now_ms())
        except Exception as exc:
            log.warning(
                "job %s: its %s event was not recorded (%s)%s",
                rec.id,
                event.type,
                type(exc).__name__,
                then,
            )

    async def _trigger_failed(
        self,
        rec: JobRecord,
        attempt: int,
        error: dict[str, str],
        retry_in: float | None,
        retryable: bool,
        replayed: bool = False,
        *,
        counted: bool = True,
        late: bool = False,
    ) -> None:
        """Record a failed try; `retry_in` None: no more tries; `retryable`
        False: a clear refusal (no run started), else the try may have
        started one (`_tries_unsure` reads it); `replayed`: a refusal of a
        try an earlier run of the body may have made (`_replayed`), which
        may have started one too; `counted` False: the backend sent nothing
        (it waits for an earlier try's run to show), so the next try has the
        same number. Not once the
        attempt has ended or was triggered (a process that stalled inside the
        trigger while another ended the job or triggered it): a finished
        attempt's history ends with it, and a triggered one's tries are over.
        But a `late` try (`_failed_late`: one its attempt no longer waited
        for) is filed after the end, unless the job was retried since, and
        a store that fails is a warning (`_file_aside`), not raised."""
        try:
            now = await self._row(rec)  # read again while the store fails
        except Exception:
            if not late:
                raise
            now = None  # (the store fails: `_failed_late`'s warning is what is left)
        if now is None or now.attempt != rec.attempt:
            return
        if not late and (now.finished or now.external is not None):
            return
        if retry_in is not None:  # to the millisecond: not 0.30000000000000004
            retry_in = round(retry_in, 3)
        data = {"try": attempt, "error": error, "retry_in": retry_in, "retryable": retryable}
        if replayed:
            data["replayed"] = True
        if not counted:
            data["counted"] = False
        if late:
            data["late"] = True
            await self._file_aside(rec, NewEvent("trigger_failed", data), "")
            return
        await self.jobs.record(rec.id, [NewEvent("trigger_failed", data)], now_ms())

    async def finish(self, job_id: str, value: Any, attempt: int = 1) -> None:
        """Record the outcome of attempt `attempt`, stop the external run of a
        job canceled, timed out or failed by its trigger (`stopped_with`:
        a run recorded by another process, which took the workflow over
        while the one whose trigger failed stalled, before that failure
        ended the job), tell the plugins. Repeatable: the index
        write is conditional (one `finished` event however often this runs);
        `cancel` and `tether_job_finished` run again on a repeat. An exception
        (the index did not answer) is the caller's to retry."""
        rec = await self.jobs.get(job_id)  # usually the settle already recorded it
        if rec is not None and rec.attempt == attempt and not rec.finished:
            # The store timed the promise out: no watchdog settled it.
            late = isinstance(value, dict) and value.get("by") == "store"
            # Not ended by its settle's index write (it timed out, a 503 to
            # the caller, though the store took the settle): that settle's
            # event (a `callback`, a `cancel_requested`), kept in the value.
            events = [store_timed_out(rec.timeout)] if late else noted(value)
            outcome = store_timeout(rec.timeout) if late else outcome_of(value)
            rec, _ = await self.jobs.end(job_id, outcome, now_ms(), events=events, attempt=attempt)
        if rec is None or rec.attempt != attempt:
            return
        backend = self.plugins.backends.get(rec.backend)
        if stopped_with(rec.state, value) and backend:
            if rec.external is not None:
                await self._cancel_run(backend, rec)
            elif await self._may_have_started(rec, value):
                await self._cancel_unrecorded(backend, rec)
        elif stopped_with(rec.state, value) and rec.external is not None:
            log.warning(
                "job %s: its external run was not stopped: backend %r is not installed here;"
                " stop it in the external system",
                job_id,
                rec.backend,
                extra=rec.log_extra(),
            )
        log.info("job %s finished: %s", job_id, rec.state, extra=rec.log_extra())
        self.plugins.job_finished(view(rec))

    async def _may_have_started(self, rec: JobRecord, value: Any) -> bool:
        """Whether the trigger of attempt `rec.attempt`, which ended with no run recorded,
        may have started one all the same. Not when its callback promise was
        settled from an ended row (`by: index`: by its trigger, which found the
        job ended before the promise existed, so before any try), nor for an
        attempt no workflow finishes (an orphan's: a job ended while queued, or
        after its workflow was over, its trigger long done or never begun); for
        a job its trigger failed, only after a try that was not a clear refusal
        (`_tries_unsure`). Else (canceled or timed out while a try was under way
        or between tries, or while the process that tried died) it may have."""
        by = value.get("by") if isinstance(value, dict) else None
        if by in (None, "index"):  # None: an orphan's finish (`finish_orphan`)
            return isinstance(value, dict) and value.get("tried") is True
        if by == "trigger":  # (ended otherwise: by a settle of the row alone meanwhile)
            return rec.state != "failed" or await self._tries_unsure(rec)
        return True

    async def _tries_unsure(self, rec: JobRecord) -> bool:
        """Whether a try of attempt `rec.attempt`'s trigger failed so that
        it may have started a run (`retryable`; a try recorded by an earlier
        release: one followed by another), or a refusal came in a replayed
        run of the body (`replayed`: an earlier run may have died inside a
        try)."""
        _, events = await self.jobs.events_after(rec.id, 0, HISTORY_LIMIT)
        return any(
            e.data.get("retryable", e.data.get("retry_in") is not None)
            or e.data.get("replayed", False)
            for e in events
            if e.type == "trigger_failed" and e.attempt == rec.attempt
        )

    async def _cancel_unrecorded(
        self, backend: Backend, rec: JobRecord, *, retried: bool = False
    ) -> None:
        """`backend.cancel_unrecorded` for the run attempt `rec.attempt`'s
        trigger may have started, as `_cancel_run` asks `cancel` (a failure
        is its `cancel_failed` event, `external` null). `retried`: the job
        is at a later attempt now (`Trigger.retried`)."""
        failed = await self._unrecorded_failure(backend, rec, retried=retried)
        if failed is not None:
            await self.jobs.record(rec.id, [failed], now_ms())

    async def _unrecorded_failure(
        self,
        backend: Backend,
        rec: JobRecord,
        *,
        retried: bool = False,
        bound: int | None = None,
        lease: StopLease | None = None,
    ) -> NewEvent | None:
        """`_cancel_unrecorded`'s ask, its failure returned (`_cancel_failure`,
        with its `bound` and `lease`) for the caller to file."""
        try:
            params = stored_params(backend, rec.params)
        except msgspec.ValidationError:  # never tried: the trigger refused them
            return None
        promise_id = callback_promise_id(rec.id, rec.attempt)
        trigger = replace(self._trigger_of(rec, params, promise_id), retried=retried)
        log.warning(
            "job %s: ended with no run recorded after a trigger try that may have started one;"
            " %s is asked to stop it",
            rec.id,
            rec.backend,
            extra=rec.log_extra(),
        )
        return await self._cancel_failure(
            backend, rec, bound, lease, ask=lambda: backend.cancel_unrecorded(trigger)
        )

    def finishes_alone(self, state: str, value: Any) -> bool:
        """Whether `finish` would do nothing but the index write for an
        attempt ended `state`, its callback promise settled with `value`:
        no run to stop (`stopped_with`) and no plugin to tell. A settle that
        ends such a job ends its workflow too (`Settler.finishes_alone`)."""
        return not stopped_with(state, value) and not self.plugins.told_of_finish

    def stop_within(self) -> float:
        """Seconds a finish that stops a run takes at most (a backend's
        `retry_after` longer than the backoff aside): every try's
        `CANCEL_TIMEOUT`, the waits between them, and `STOP_MARGIN`; at most
        `STOP_WITHIN_MAX`. A stop under a lease (`finish_orphan`) tries no
        more once another try would end past it (`_past_bound`)."""
        attempts = max(self.settings.trigger_attempts, 1)
        total, wait = STOP_MARGIN + CANCEL_TIMEOUT, self.settings.trigger_backoff
        for _ in range(attempts - 1):  # each later try: its wait, then its cancel
            total += wait + CANCEL_TIMEOUT
            if total >= STOP_WITHIN_MAX:
                return STOP_WITHIN_MAX
            wait *= 2
        return total

    def stop_lease_ms(self) -> int:
        """The lease on a run's stop (`core.lease`): `TETHER_TASK_TTL`, as a
        workflow step's. A process that dies mid-stop hands it over within
        it; one that lives renews it for as long as the stop takes."""
        return max(int(self.settings.task_ttl * 1000), 1)

    async def finish_orphan(self, rec: JobRecord) -> None:
        """The finish of an attempt that ended with no workflow to finish it
        (`Settler.on_orphan`): `finish`'s, made durable when it has a run to
        stop (`rec.stop_due`: this process's lease on that stop, renewed
        while the stop runs, `core.lease`): the run's stop and the plugins
        told, then the stop's outcome (`cancel_failed`, if it failed) filed
        in the write that clears `stop_due` (nothing filed if another
        process took the stop over meanwhile: it files its own). A process
        that dies first leaves the stop to the watchdog of any process once
        the lease ran out (`Watchdog.stop_again`), which calls this again:
        the run is asked to stop once more (`cancel` runs at least once) and
        one outcome is filed. One cut short (cancelled: the service is
        stopping) gives its lease up (`_release_stop`), so that watchdog
        takes it over at its next sweep. A stop whose attempt
        (`stop_attempt`) is no longer the job's (a host of an earlier
        release retried it meanwhile) stops nothing and files nothing: the
        row's run is the later attempt's, and its plugins were told by its
        own finish; the stop is only cleared. A stop with no run recorded is
        a late trigger call's (`_answered_late`, taken over from a holder
        that died or stopped): the backend is asked to stop what that call
        may have started (`cancel_unrecorded`), and the plugins are not told
        again (the job's workflow finish told them)."""
        if rec.stop_due is None:
            value: dict[str, Any] = {"status": rec.state}
            if rec.external is None and await self._promise_timed_out(rec):
                value["by"] = "store"  # its trigger may have been under way
            await self.finish(rec.id, value, rec.attempt)
            return
        attempt = rec.attempt if rec.stop_attempt is None else rec.stop_attempt
        lease = StopLease(self.jobs, rec, self.stop_lease_ms())
        try:
            recorded = await self._stop(rec, attempt, lease)
        except asyncio.CancelledError:  # the service is stopping: the next sweep takes it
            await self._release_stop(rec, attempt, lease)
            raise
        if recorded is None:
            log.warning(
                "job %s: its run's stop was taken over by another process (this one stalled"
                " past its lease), which records its outcome; or a write of this one's whose"
                " answer was lost recorded it",
                rec.id,
                extra=rec.log_extra(),
            )

    async def _promise_timed_out(self, rec: JobRecord) -> bool:
        """Whether the callback promise of attempt `rec.attempt` exists and
        the store timed it out: its workflow made it, so its trigger may
        have been under way (an orphan after an outage past the deadline
        and `ROOT_GRACE_MS`), not one that never began."""
        promise = await self._promise(callback_promise_id(rec.id, rec.attempt))
        return promise is not None and promise.state == "rejected_timedout"

    async def _stop(self, rec: JobRecord, attempt: int, lease: StopLease) -> JobRecord | None:
        """`finish_orphan`'s stop of the run of attempt `attempt`, its
        outcome recorded (`_stop_recorded`), the lease renewed meanwhile."""
        failed = None
        if rec.attempt == attempt and rec.finished:
            backend = self.plugins.backends.get(rec.backend)
            stops = rec.state in ("canceled", "timed_out") and backend is not None
            bound = now_ms() + int(self.stop_within() * 1000)
            if rec.external is None:  # a late trigger call's hold (`_hold_stop`), taken over
                if stops and backend is not None:  # (its workflow's finish told the plugins)
                    async with lease.kept():
                        failed = await self._unrecorded_failure(
                            backend, rec, bound=bound, lease=lease
                        )
            else:
                if stops and backend is not None:
                    async with lease.kept():
                        failed = await self._cancel_failure(backend, rec, bound, lease)
                log.info("job %s finished: %s", rec.id, rec.state, extra=rec.log_extra())
                self.plugins.job_finished(view(rec))
        else:  # the row's run (if any) is a later attempt's: its workflow's to stop
            log.warning(
                "job %s: the run of its attempt %d was not asked to stop again: the job was"
                " retried (by a host of a release before the stop was recorded in the job's"
                " row) before the stop was made, and that run is no longer recorded",
                rec.id,
                attempt,
                extra=rec.log_extra(),
            )
        outcome = [] if failed is None else [failed]
        return await self._stop_recorded(rec, attempt, lease, outcome)

    async def _release_stop(
        self, rec: JobRecord, attempt: int, lease: StopLease, due: int | None = None
    ) -> None:
        """Give up the stop held under `lease`, cut short (its task
        cancelled: the service is stopping): `jobs.release_stop` makes it
        due now, so the next sweep of any process's watchdog (the restarted
        service's first) takes it over, rather than the lease's end; or at
        `due` (Unix ms: a late trigger call's hold, due once the call should
        have ended).
        Shielded from the cancellation, within `RELEASE_TIMEOUT`; one that
        fails leaves the lease to run out, as a process that dies does. The
        caller raises the cancellation again (as it does when cancelled
        again meanwhile)."""
        releasing = asyncio.ensure_future(
            asyncio.wait_for(self._release_any(rec, attempt, lease, due), RELEASE_TIMEOUT)
        )
        _releasing.add(releasing)  # (a strong reference, should this task go first)
        releasing.add_done_callback(_releasing.discard)
        try:
            released = await asyncio.shield(releasing)
        except Exception as exc:
            log.warning(
                "job %s: its run's stop was cut short, and giving it up failed (%s): another"
                " process stops the run once its lease runs out",
                rec.id,
                reason(exc),
                extra=rec.log_extra(),
            )
            return
        if released and due is not None:
            log.warning(
                "job %s: its trigger's call, which its attempt no longer waited for, was still"
                " answering as the service stopped: what it may start is asked to stop by the"
                " first watchdog sweep of any process from %s, when the call should have ended",
                rec.id,
                _utc(due),
                extra=rec.log_extra(),
            )
        elif released:
            log.warning(
                "job %s: its run's stop was cut short (the service is stopping): the next"
                " watchdog sweep of any process stops it again",
                rec.id,
                extra=rec.log_extra(),
            )

    async def _release_any(
        self, rec: JobRecord, attempt: int, lease: StopLease, due: int | None = None
    ) -> bool:
        """`jobs.release_stop` under whichever of the lease's values is the
        row's, due now (or at `due`)."""
        for claim in lease.claims:
            if await self.jobs.release_stop(rec.id, attempt, claim, due or now_ms()):
                return True
        return False

    async def _stop_recorded(
        self, rec: JobRecord, attempt: int, lease: StopLease, outcome: list[NewEvent]
    ) -> JobRecord | None:
        """`jobs.stopped` for the stop held under `lease` (renewed no longer
        in the background: its values are settled), tried again
        (`RETRY_BACKOFF` doubled) while it fails: just after the outage that
        made the orphan the store may still fail now and then, and a stop
        left due is made again by another process once its lease ran out.
        The lease is renewed between tries (never beside one), so a store
        that answers now and then keeps it; raises the last failure once no
        try would end within the lease the row surely holds (a renewal that
        failed does not put that off): the stop is then the watchdog's. A try that
        failed may have been applied: the renewal or a later try then finds
        the stop recorded (None, as if taken over)."""
        delay = RETRY_BACKOFF
        while True:
            try:
                for claim in lease.claims:
                    written = await store_call(
                        self.jobs.stopped(rec.id, attempt, claim, outcome, now_ms())
                    )
                    if written is not None:
                        return written
                return None
            except Exception as exc:
                await lease.renew()
                if not lease.claims:  # taken over, or the failed try was applied
                    return None
                # The oldest candidate: the row surely holds the lease until
                # then. A renewal that failed adds a later one, which would
                # put the end off at every try for as long as the store fails.
                if now_ms() + (delay + STORE_CALL_TIMEOUT) * 1000 >= min(lease.claims):
                    raise
                log.warning(
                    "job %s: recording its run's stop failed (%s); again in %gs",
                    rec.id,
                    reason(exc),
                    delay,
                    extra=rec.log_extra(),
                )
            await self.sleep(delay)
            delay = min(delay * 2, RETRY_BACKOFF_MAX)

    async def _cancel_run(self, backend: Backend, rec: JobRecord) -> None:
        """`_cancel_failure`, its `cancel_failed` event filed."""
        failed = await self._cancel_failure(backend, rec)
        if failed is not None:
            await self.jobs.record(rec.id, [failed], now_ms())

    async def _cancel_failure(
        self,
        backend: Backend,
        rec: JobRecord,
        bound: int | None = None,
        lease: StopLease | None = None,
        ask: Callable[[], Awaitable[None]] | None = None,
    ) -> NewEvent | None:
        """`backend.cancel`, tried as a trigger is while it fails with a
        retryable error (`trigger_attempts` tries, `trigger_backoff` doubled,
        or the backend's `retry_after` when longer): one throttled or
        unavailable answer left the external run going. A try not answered
        within `CANCEL_TIMEOUT` has failed, and is not tried again. A failure that
        remains is logged as an error, naming the job, and returned as its
        `cancel_failed` event (with the run's receipt: a second run stopped
        while the job runs on is not its `external`), for the caller to
        file, so the API, the dashboard and `/metrics` tell that the run may
        still be going. `bound` (Unix ms; a stop under a lease, whose
        `stop_within` it is): no more tries once one would end past it (a
        backend's long `retry_after`); nor once `lease` (the stop's, renewed
        meanwhile) was found taken over: the process that took it asks the
        backend now, and files the outcome (None here). A `CancelledError`
        the backend raises of its own (this task is not being cancelled) is
        a failure like any other: only a real cancellation (the service
        stopping) goes up. `ask`: the call to make instead of `cancel`
        (`cancel_unrecorded`)."""
        attempts = max(self.settings.trigger_attempts, 1)
        delay = self.settings.trigger_backoff
        for attempt in range(1, attempts + 1):
            if lease is not None and not lease.claims:  # taken over (found by a renewal)
                return None
            limit = asyncio.timeout(CANCEL_TIMEOUT)
            try:
                async with limit:
                    await (backend.cancel(backend_view(rec)) if ask is None else ask())
                return None
            except PLUGIN_FAULTS as exc:
                if isinstance(exc, asyncio.CancelledError) and cancelling():
                    raise
                if isinstance(exc, PLUGIN_EXITS):
                    exc = _exited(exc)
                # A BackendError's words are written for the job's readers;
                # another exception's may quote a secret: its type alone.
                said = reason(exc) if isinstance(exc, BackendError) else type(exc).__name__
                if limit.expired():  # (not a timeout of the backend's own)
                    said = f"no answer within {CANCEL_TIMEOUT:g} s"
                tokens = self.signer.job_tokens(rec.id, rec.attempt, rec.salt)
                said = redact(said, tokens)  # a backend may echo what it was sent
                retryable = isinstance(exc, BackendError) and exc.retryable
                retry_after = exc.retry_after if isinstance(exc, BackendError) else None
                wait = max(delay, retry_after or 0)
                if not retryable or attempt == attempts or _past_bound(bound, wait):
                    # Another library's words, or a plugin's bug: the traceback
                    # goes to the log (masked), the event keeps the type alone.
                    unexpected = not isinstance(exc, BackendError) and not limit.expired()
                    _log_traceback(
                        logging.ERROR,
                        exc,
                        tokens if unexpected else (),
                        "job %s: cancelling the external run failed (%s); it may still be"
                        " running: stop it in %s",
                        rec.id,
                        said,
                        rec.backend,
                        extra=rec.log_extra(),
                        traceback=unexpected,
                    )
                    kind = type(exc).__name__
                    if isinstance(exc, BackendError):
                        kind = exc.code or "backend"
                    error = {"type": kind, "message": said}
                    tried = {"tries": attempt, "error": error, "external": rec.external}
                    return NewEvent("cancel_failed", tried)
                log.warning(
                    "job %s: cancel try %d/%d of the external run failed (%s); again in %.1fs",
                    rec.id,
                    attempt,
                    attempts,
                    said,
                    wait,
                    extra=rec.log_extra(),
                )
            await self._pause(wait)
            delay *= 2
        return None


class _Abandoned(Exception):
    """A trigger's call no longer waited for because its attempt ended or
    moved on: `now`, the job's row (None: gone, or another job's);
    `answering`, the call, to be answered by `until` (the loop's time)."""

    def __init__(self, now: JobRecord | None, answering: asyncio.Future[Any], until: float) -> None:
        super().__init__()
        self.now, self.answering, self.until = now, answering, until


class _Unanswered(Exception):
    """A trigger's call that did not answer within `TRIGGER_TIMEOUT`."""


class _BadReceipt(Exception):
    """A trigger's answer that is no receipt (not a mapping, not JSON)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _abandon(answering: asyncio.Future[Any], rec: JobRecord) -> None:
    """Cancel a trigger's call past `TRIGGER_TIMEOUT` (or whose workflow
    is being cancelled), and keep it until it ends. A call that answers all
    the same (a plugin that ignores its cancellation) is logged: the run it
    names is recorded nowhere."""
    answering.cancel()
    _abandoned.add(answering)

    def ended(done: asyncio.Future[Any]) -> None:
        _abandoned.discard(done)
        if done.cancelled() or done.exception() is not None:
            return  # (its exception is retrieved: nobody waits for it)
        log.warning(
            "job %s: backend %r answered a trigger call abandoned before (it did not stop when"
            " cancelled); what it started is recorded nowhere: look for it in the external"
            " system",
            rec.id,
            rec.backend,
            extra=rec.log_extra(),
        )

    answering.add_done_callback(ended)


async def _settled_within(future: asyncio.Future[Any], seconds: float) -> None:
    """Wait until `future` is done, for `seconds` at most (`asyncio.wait`'s
    work for one future, with less of its cost: this is in every trigger)."""
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()

    def wake(_: object = None) -> None:
        if not waiter.done():
            waiter.set_result(None)

    timer = loop.call_later(seconds, wake)
    future.add_done_callback(wake)
    try:
        await waiter
    finally:
        timer.cancel()
        future.remove_done_callback(wake)


def _where(exc: BaseException) -> tuple[str, str, int]:
    """An exception's type, and the file and line it was raised at."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return type(exc).__qualname__, "", 0
    return type(exc).__qualname__, tb.tb_frame.f_code.co_filename, tb.tb_lineno


def _exited(exc: BaseException) -> RuntimeError:
    """A backend's `SystemExit` or `KeyboardInterrupt` as the plugin bug it is."""
    error = RuntimeError(f"the backend raised {type(exc).__name__}")
    error.__cause__ = exc  # (its traceback, logged)
    return error


async def _contained[T](call: Awaitable[T]) -> T:
    """`call` awaited (in a task of its own), `PLUGIN_EXITS` made `_exited`."""
    try:
        return await call
    except PLUGIN_EXITS as exc:
        raise _exited(exc) from exc


def _said(value: Any) -> str:
    """What a backend answered, as a log line or a job's error names it: a
    number itself, anything else by its type (its words are not Tether's
    to show)."""
    if isinstance(value, numbers.Real) or value is None:
        return repr(value)
    return f"a {type(value).__name__}"


def _another_job(rec: JobRecord, now: JobRecord | None) -> bool:
    """Whether `now`, the row under `rec`'s id, is another job than
    `rec`'s: one created under the same id after retention deleted that
    one (at least a day after it ended), while a trigger of it stalled (its
    store failing for this process alone). Nothing of that trigger may land
    on it: its run, its failure, its tries."""
    return now is not None and now.created_at != rec.created_at


def stopped_with(state: str, value: Any) -> bool:
    """Whether the run of an attempt that ended `state`, its callback
    promise settled with `value`, is to be stopped: the job was canceled or
    timed out, or it failed by its trigger's failure (`by: trigger`: a
    process that stalled past its lease gave up its own trigger while
    another process's started the run). Not when it succeeded or its
    callback failed it: then the run is over."""
    if state in ("canceled", "timed_out"):
        return True
    return state == "failed" and isinstance(value, dict) and value.get("by") == "trigger"


def _stops_late(rec: JobRecord, now: JobRecord | None) -> bool:
    """Whether what a call of attempt `rec.attempt`'s trigger, left to
    answer late, may start is to be stopped (`_answered_late`): the attempt
    (`now`: the row as the call was left) was canceled or timed out with no
    run recorded, the runs its finish looks for (`cancel_unrecorded`). Not
    one retried meanwhile (a run the call names is stopped as a stale
    trigger's), nor one its run's callback ended."""
    if now is None or now.attempt != rec.attempt or now.external is not None:
        return False
    return now.state in ("canceled", "timed_out")


def _may_have_started_late(answering: asyncio.Future[Any]) -> bool:
    """Whether a trigger's call left to answer late (`_answered_late`), over
    with no run taken, may have started one: unless it refused clearly (a
    `BackendError` not `retryable`) or sent nothing (not `tried`). One
    cancelled (`_abandon`: done only at the loop's next turn) may have."""
    if not answering.done() or answering.cancelled():
        return True
    exc = answering.exception()
    return not isinstance(exc, BackendError) or (exc.retryable and exc.tried)


def _utc(ms: int) -> str:
    """Unix ms as the log says a time: ISO 8601, UTC, to the second."""
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _past_bound(bound: int | None, wait: float) -> bool:
    """Whether another try of a stop bounded by `bound` (Unix ms), after
    `wait` seconds, could end less than `STOP_MARGIN / 2` before it (that
    much is kept for recording the outcome): never on the backoff's own
    schedule, which the bound (`stop_within`) was made for."""
    if bound is None:
        return False
    ends = now_ms() + (wait + CANCEL_TIMEOUT + STOP_MARGIN / 2) * 1000
    return ends > bound
