"""The watchdog: in every process, time out jobs past their deadline, ask
backends about running jobs due a status check or whose heartbeat is overdue,
and now and then apply retention. Settles are first-wins and checks are
claimed, so processes sharing a store don't clash.

It sleeps until the next thing due: after each sweep it asks the job index
for the earliest deadline, status check, heartbeat or run's stop due (`next_due`: the
first row of each partial index, no scan), and a job this process writes due
sooner wakes it at once (`on_event`, a listener of the job history). Jobs
other processes or hosts write while it sleeps are found at its next look,
at most `watchdog_interval` seconds later (`TETHER_WATCHDOG_INTERVAL`): that
is the bound on how late one is seen (docs/operations.md, "Timers").

A missed heartbeat (none for `heartbeat_timeout` seconds, counted from the
trigger until the first) is not yet a failure: the backend is asked. A run
that ended settles the job with its outcome; one the backend confirms is going
(`Running`) is a `heartbeat_missed` event and the job waits on; a backend
that cannot tell (`None`) ends the job `timed_out` (`error.type`
`heartbeat_timeout`). A check that fails (the backend raised or did not
answer, or answered none of the three: a bug in its plugin, `read_status`)
decides nothing. Either way the backend is asked again once the run has been
silent twice as long (`recheck_in`: a run silent for hours is asked about,
and filed, a few times and then hourly, not every `heartbeat_timeout`).

A job a deadline ends that no workflow will finish has its run's stop
recorded as due (`stop_due`) in the write that ends it, held by the process
that ended it under a lease it renews while the stop runs (`core.lease`):
should that process die before it records the stop's outcome, the stop is
taken over once that lease ran out (`stop_again`), by whichever process
claims it first."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from resonate.error import ServerError

from core.callbacks import GoingChecks, Repeats, going_said
from core.errors import BackendError, InvalidRequest, reason
from core.hookspecs import Backend
from core.models import ErrorInfo, Outcome, Running
from core.plugins import (
    BUGGY_CHECK_INTERVAL,
    PLUGIN_FAULTS,
    Plugins,
    cancelling,
    contract_answer,
    stored_params,
)
from core.redact import redact
from core.settings import MAX_RETENTION, MIN_RETENTION, Settings
from core.settle import Settler, deadline_message
from core.store import Store
from core.store.jobs import Event, JobRecord, NewEvent, now_ms
from core.views import backend_view
from core.workflow import ATTEMPT_MARK, ROOT_GRACE_MS, root_promise_id

log = logging.getLogger("tether")

WATCHDOG_BATCH = 200
"""Jobs one sweep looks at, at most."""
WATCHDOG_CONCURRENCY = 16
"""Jobs of one backend one process asks it about at once, for status checks
and for missed heartbeats each (so a backend slow to answer holds up neither
another backend's looks nor its own heartbeat misses behind its checks);
deadlines are not counted."""
SWEEP_WAIT = 1.0
"""Seconds a sweep waits for its looks before it goes on: a look that asks a
backend slow to answer goes on in the background (and its job is not looked
at again until it ends), so one slow backend never holds up the deadlines and
checks of other jobs."""
GC_EVERY = 3600.0
"""Seconds between retention runs of one process."""
GC_BATCH = 500
"""Job rows one retention statement deletes."""
MAX_CHECK_BACKOFF = 10
"""A status check comes at most this many check intervals after the last."""
HEARTBEAT_CHECK_TIMEOUT = 30.0
"""Seconds a backend may take to answer the status check a missed heartbeat asks for."""
CHECK_TIMEOUT = 300.0
"""Seconds a backend may take to answer a routine status check (every
`check_interval`): then the look is given up and logged, its slot freed, and
the next check comes as planned. Longer than a backend's own retries take
(Databricks: `TETHER_DATABRICKS_RETRY_TIMEOUT`, 60 s, and the output of each
task of an ended run): it is there for a backend that hangs."""
HEARTBEAT_RECHECK_MAX = 3600.0
"""Seconds between the looks at a run that stays silent, at most (unless its
`heartbeat_timeout` is longer): see `recheck_in`."""
RETRY_AFTER = 1.0
"""Seconds (at most `watchdog_interval`) before the next sweep when the store
did not answer, or a sweep found a full batch due (more may be)."""


class JobWorkflowIds:
    """`core.workflow`'s promise ids, as retention reads them (`WorkflowIds`):
    attempt N's workflow is `{id}` (N = 1) or `{id}~N`, and its promises
    `{root}:...`."""

    def root(self, job_id: str, attempt: int) -> str:
        return root_promise_id(job_id, attempt)

    def job(self, root_id: str) -> str:
        # `:` too: a callback promise made alone (no workflow) is its own root
        return root_id.partition(":")[0].partition(ATTEMPT_MARK)[0]


WORKFLOW_IDS = JobWorkflowIds()

KEPT_MARGIN_MS = ROOT_GRACE_MS
"""How much further back than `Store.kept_since` retention keeps promises:
the hosts' clocks (and the store's) need not agree to the millisecond."""


async def collect_garbage(store: Store, older_than: float) -> tuple[int, int]:
    """Delete jobs finished more than `older_than` seconds ago, with their
    history and their promises; nothing open is touched. Returns (jobs, promises) deleted.

    Promises go first and with an hour's more reach than the job rows (a job's
    workflow ends at most `ROOT_GRACE_MS` after the job does): a job row is
    never gone while its workflow's promises remain, or a later start with the
    same id would find an old, finished workflow and never run.

    Nor do the promises of a job the index holds open go, whatever the
    store says of them: a workflow the store timed out (no process ran from before
    its job's deadline until `ROOT_GRACE_MS` after it: an outage, a backup
    restored late) is settled, and within reach a day after, while its job
    waits for the watchdog to time it out, which settles the job's callback
    promise (one deleted would leave the job open for good). The store keeps
    them as it deletes (the embedded store, lineage by lineage), or says how
    far back it must keep everything (`Store.kept_since`: Postgres, whose
    `resonate.gc` takes only a time), and then neither promises nor job rows
    go from further back than that, until the watchdog has ended the job.
    """
    if not MIN_RETENTION <= older_than <= MAX_RETENTION:
        raise InvalidRequest(
            f"keep finished jobs at least {MIN_RETENTION:g} and at most {MAX_RETENTION:g} seconds"
        )
    now = now_ms()
    rows = int(older_than * 1000)  # a job row goes once it finished this long ago
    reach = rows - ROOT_GRACE_MS  # its promises once they settled this long ago
    kept = await store.kept_since(WORKFLOW_IDS, now)
    if kept is not None and now - reach > kept - KEPT_MARGIN_MS:
        reach = now - kept + KEPT_MARGIN_MS
        rows = reach + ROOT_GRACE_MS
        log.info(
            "retention: going back no further than %s: a job open past its deadline"
            " has promises from then (the watchdog times it out; tether_jobs_overdue counts"
            " such jobs)",
            time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime((now - reach) / 1000)) + " UTC",
        )
    promises = await store.delete_promises(reach, WORKFLOW_IDS)
    before, jobs = now - rows, 0
    while ids := await store.jobs.delete_finished(before, GC_BATCH):
        jobs += len(ids)
    if jobs or promises:
        log.info("retention: deleted %d finished jobs and %d promises", jobs, promises)
    return jobs, promises


def read_status(backend: str, answer: object) -> tuple[Outcome | Running | None, str | None]:
    """What backend `backend`'s `check_status` answered, as Tether reads it
    (`contract_answer`), and None; or None and what the log says of an
    answer it may not give (of another type, or a malformed `Outcome` or
    `Running`): a bug in its plugin, a failed check as a raise is. Said by
    type alone, never by value (a dict the backend built may hold a token)."""
    found, fault = contract_answer(answer, Outcome, Running)
    if fault is not None:
        return None, f"backend {backend!r}: check_status {fault}"
    return found, None


def recheck_in(rec: JobRecord, now: int) -> int:
    """Milliseconds from a missed heartbeat's look at `now` to the next: as
    long as the run has been silent (since its last heartbeat, or the
    attempt's start when none came), at least `heartbeat_timeout` and at most
    `HEARTBEAT_RECHECK_MAX` (or `heartbeat_timeout`, when longer).

    So a run that stopped beating is asked about after S, 2S, 4S, ... of
    silence, then hourly: each answer is one `heartbeat_missed` event and one
    request to its backend, a dozen in the first hour of a silence with S = 1 s
    rather than 3,600, and its bounded history keeps how the job started. A
    heartbeat starts the count again (the next miss comes S after it). The
    routine status checks (`check_interval`) go on meanwhile as ever, so a
    run that ends is found as soon as before by any backend that has them."""
    assert rec.heartbeat_timeout is not None
    window = int(rec.heartbeat_timeout * 1000)
    since = rec.heartbeat_at
    if since is None:
        since = rec.deadline - int(rec.timeout * 1000)  # the attempt's start
    return min(max(window, now - since), max(window, int(HEARTBEAT_RECHECK_MAX * 1000)))


RESUME_EVERY = 30.0
"""Seconds between one process's looks for pending jobs whose workflow start
was lost with another process (`Watchdog.resume`)."""


class Watchdog:
    def __init__(
        self,
        settings: Settings,
        plugins: Plugins,
        store: Store,
        settler: Settler,
        resume: Callable[[], Awaitable[int]] | None = None,
    ) -> None:
        self.settings = settings
        self.plugins = plugins
        self.store = store
        self.settler = settler
        self.resume = resume
        """Starts the workflows of pending jobs that have gone a while
        without one (a process died between writing a job `pending` and
        starting its workflow: a new job, a retry, a job out of the queue);
        run every `RESUME_EVERY` seconds, so a host that never comes back
        strands none."""
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._planned = math.inf
        """When the sleeping loop sweeps next (Unix ms); while it sweeps, the
        earliest due this process wrote meanwhile (`inf`: none)."""
        self.started = now_ms()
        """When this process's watchdog started (Unix ms): a heartbeat is not
        missed until `heartbeat_timeout` after it (`heartbeat_missed`)."""
        self._failed_checks = Repeats()
        """Which failed status checks are filed (`_check_failed`)."""
        self._going_checks = GoingChecks()
        """Which status checks that found the run going are filed."""
        self._looking: dict[tuple[str, bool], asyncio.Task[None]] = {}
        """The looks under way, by job id and whether it is the job's deadline
        (one that outlived its sweep: a backend slow to answer)."""
        self._asking: defaultdict[tuple[str, bool], asyncio.Semaphore] = defaultdict(
            lambda: asyncio.Semaphore(WATCHDOG_CONCURRENCY)
        )
        """The slots for asking a backend, by backend and whether for a missed heartbeat."""

    def start(self) -> None:
        self.started = now_ms()
        if self.settings.watchdog_interval > 0:
            self._task = asyncio.create_task(self._run(), name="tether-watchdog")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        looks = list(self._looking.values())
        for look in looks:
            look.cancel()
        await asyncio.gather(*looks, return_exceptions=True)

    def on_event(self, rec: JobRecord, event: Event) -> None:
        """A `JobHistory` listener: this process wrote a job (a new one, a
        retry, a trigger that set its checks, ...); if that job is due before
        the sweep planned, sweep then instead. Costs a comparison, no read."""
        times = (
            rec.next_check_at,
            rec.heartbeat_due,
            None if rec.finished else rec.deadline,
            rec.stop_due,
        )
        due = min((t for t in times if t is not None), default=None)
        if due is not None:
            self.due_by(due)

    def due_by(self, due: int) -> None:
        """Sweep by `due` (Unix ms) at the latest: a job this process wrote
        is due then (`on_event`; a heartbeat, which files no event, moving
        its next miss before the look planned after a miss: it was found up
        to `watchdog_interval` late, found by a QA pass, 2026-12-07)."""
        if due < self._planned:
            self._planned = due
            self._wake.set()  # read only while the loop sleeps

    async def _run(self) -> None:
        nap = self.settings.watchdog_interval
        retry = min(nap, RETRY_AFTER)
        last_gc = -math.inf  # retention on the first sweep, even on a host up for under an hour
        last_resume = time.monotonic()  # the service resumed every pending job as it started
        delay = 0.0  # a first look at once: what is due, and when the next is
        while True:
            await self._sleep(delay)
            self._planned = math.inf  # awake: `on_event` keeps the earliest due written
            if self.resume is not None and time.monotonic() - last_resume >= RESUME_EVERY:
                last_resume = time.monotonic()
                try:
                    await self.resume()
                except Exception as exc:
                    log.warning("resuming pending jobs: %s", type(exc).__name__)
            if self.settings.retention and time.monotonic() - last_gc >= GC_EVERY:
                last_gc = time.monotonic()
                try:
                    await collect_garbage(self.store, self.settings.retention)
                except Exception as exc:
                    log.warning("retention: %s", reason(exc))
            # Until the next of: the store's earliest due time, the next
            # resume or retention, and `nap` (work other processes write).
            delay = min(nap, RESUME_EVERY + last_resume - time.monotonic())
            if self.settings.retention:
                delay = min(delay, GC_EVERY + last_gc - time.monotonic())
            now = now_ms()
            try:
                if await self.sweep(now) >= WATCHDOG_BATCH:
                    delay = min(delay, retry)  # more may be due
                at = await self.store.jobs.next_due(now)
            except Exception as exc:
                log.warning("watchdog: the store did not answer: %s", type(exc).__name__)
                delay = min(delay, retry)
                continue
            # `_planned` holds what this process wrote while the sweep ran.
            for due in (at, self._planned):
                if due is not None and due < math.inf:
                    delay = min(delay, (due - now_ms() + 1) / 1000)
            delay = max(delay, 0.0)

    async def _sleep(self, delay: float) -> None:
        """Sleep `delay` seconds, or until a job this process writes is due if
        that is sooner (`on_event` moves `_planned`). The end is kept on the
        monotonic clock too: one kept on the wall clock alone, stepped back
        during the sleep (and set right again), slept as long as the step
        (an hour's: heartbeats went unchecked for an hour; found by a QA pass)."""
        self._planned = now_ms() + int(delay * 1000)
        ends = time.monotonic() + delay
        while (left := min((self._planned - now_ms()) / 1000, ends - time.monotonic())) > 0:
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), left)

    async def sweep(self, now: int) -> int:
        """Look once at every job due: past its deadline, due a status check
        or a heartbeat, or its run's stop (at most `WATCHDOG_BATCH` of each),
        all at once, but a job whose earlier look is still under way (its
        deadline's look even then); how many looks it started. Waits
        `SWEEP_WAIT` at most: a look still asking its backend then goes on
        without the sweep."""
        due = await self.store.jobs.due(now, WATCHDOG_BATCH)
        looks = []
        for rec in due:
            key = (rec.id, rec.deadline <= now)
            if key not in self._looking:
                look = self._looking[key] = asyncio.create_task(self._look(rec, now))
                look.add_done_callback(functools.partial(self._looked, key))
                looks.append(look)
        if looks:
            await asyncio.wait(looks, timeout=SWEEP_WAIT)
        return len(looks)

    def _looked(self, key: tuple[str, bool], _: asyncio.Task[None]) -> None:
        self._looking.pop(key, None)

    async def _look(self, rec: JobRecord, now: int) -> None:
        try:
            # A deadline asks no backend, and a run's stop none of the slots:
            # never behind the slow ones.
            stop = rec.stop_due is not None and rec.stop_due <= now
            if rec.deadline <= now or stop:
                await self.look_at(rec, now)
            else:
                beat = rec.heartbeat_due is not None and rec.heartbeat_due <= now
                async with self._asking[rec.backend, beat]:  # maybe later: plan from then
                    await self.look_at(rec, max(now, now_ms()))
        except Exception as exc:
            log.warning("watchdog: job %s: %s", rec.id, self._said(rec, exc), extra=rec.log_extra())

    def _said(self, rec: JobRecord, exc: Exception) -> str:
        """What the log says of a look at `rec` that failed: a backend's own
        words (`GET host answered 501`), its callback tokens masked; of any
        other error its type, and a store's status (its text may hold
        anything)."""
        if isinstance(exc, ServerError):
            return f"the store answered status {exc.code}"
        if not isinstance(exc, BackendError):
            return type(exc).__name__
        said = redact(exc.message, self.settler.job_tokens(rec))
        return f"BackendError: {said}"

    async def look_at(self, rec: JobRecord, now: int) -> None:
        """Time the job out if its deadline passed, else ask its backend about
        it if a status check is due (and no other process took that check);
        stop the run of an ended one if its stop is due (`stop_again`)."""
        if rec.stop_due is not None and rec.stop_due <= now:
            await self.stop_again(rec)
            return
        if rec.deadline <= now:
            # (Not "no callback": a backend may have none, and learn the end by status checks.)
            message = deadline_message(rec.timeout)
            if rec.state == "queued":  # never triggered: no callback was ever asked for
                message = (
                    f"still queued after {rec.timeout:g} seconds: its backend stayed at its"
                    " limit of running jobs (TETHER_MAX_RUNNING)"
                )
            message += self.plugins.not_stopped(rec.backend, rec.external)
            outcome = Outcome(status="timed_out", error=ErrorInfo(message=message, type="timeout"))
            deadline = {"timeout": rec.timeout}
            result, _ = await self.settler.settle(
                rec.id,
                outcome,
                by="timeout",
                note=lambda r: NewEvent("timed_out", deadline) if r == "accepted" else None,
                attempt=rec.attempt,
                wait_stop=True,  # in this look: bounded by the sweep, cancelled with it
            )
            if result == "accepted":
                log.info("job %s timed out", rec.id, extra=rec.log_extra())
            return
        if rec.heartbeat_due is not None and rec.heartbeat_due <= now:
            await self.heartbeat_missed(rec, now)
            return
        backend = self.plugins.backends.get(rec.backend)
        if rec.next_check_at is None or backend is None:
            return
        try:
            params = stored_params(backend, rec.params)
        except msgspec.ValidationError:  # no longer taken, or its type's own checks' bug
            # No check can be asked with them: looked at again an hour on,
            # once logged (the job stayed due, looked at every sweep, found
            # by a QA pass; a `SystemExit` stopped the service, by a review).
            log.warning(
                "watchdog: job %s: backend %r: its stored params could not be read with its"
                " params_type; no status check; looked at again in %g s",
                rec.id,
                rec.backend,
                BUGGY_CHECK_INTERVAL,
                extra=rec.log_extra(),
            )
            later = now + int(BUGGY_CHECK_INTERVAL * 1000)
            await self.store.jobs.reschedule_check(rec.id, rec.next_check_at, later)
            return
        # Guarded as at the trigger: a bug in its plugin is a warning and a
        # check an hour on (it was logged at every sweep, the job due for
        # good); a valid None or 0 ends the job's routine checks.
        seconds, buggy = self.plugins.check_interval(
            backend, rec, params, self.settings.max_timeout
        )
        if seconds is None:
            await self.store.jobs.reschedule_check(rec.id, rec.next_check_at, None)
            return
        interval = seconds * 1000
        # backed off with the job's age, but for a bug's hour (as the log says)
        backoff = min(MAX_CHECK_BACKOFF * interval, max(interval, (now - rec.updated_at) / 2))
        delay = int(interval if buggy else backoff)
        if not await self.store.jobs.reschedule_check(rec.id, rec.next_check_at, now + delay):
            return  # another process took this check
        found, fault, error_type, wait = await self._ask(backend, rec, CHECK_TIMEOUT)
        if fault is not None:  # logged and filed; the next check as planned, or as asked
            log.warning("watchdog: job %s: %s", rec.id, fault, extra=rec.log_extra())
            asked = 0 if wait is None else int(min(wait, BUGGY_CHECK_INTERVAL) * 1000)
            if asked > delay:  # a `Retry-After` past the plan: not asked sooner
                await self.store.jobs.reschedule_check(rec.id, now + delay, now + asked)
            await self._check_failed(rec, error_type)
            return
        if found is None or isinstance(found, Running):
            tokens = self.settler.job_tokens(rec)
            data, learnt_now = await going_said(rec, found, tokens, self.settler.max_result_bytes)
            events = self._going_checks.events(rec.id, rec.attempt, data)
            if events or learnt_now is not None:
                await self.store.jobs.record(
                    rec.id, events, now_ms(), learnt_now, open_at=rec.attempt
                )
        else:
            said = NewEvent("status_check", {"said": "ended", "status": found.status})
            result, _ = await self.settler.settle(
                rec.id,
                found,
                by="status_check",
                note=lambda _: said,
                attempt=rec.attempt,
                salt=rec.salt,
                wait_stop=True,
            )
            if result == "accepted":
                log.info(
                    "job %s %s (found by status check)", rec.id, found.status, extra=rec.log_extra()
                )

    async def _ask(
        self, backend: Backend, rec: JobRecord, within: float
    ) -> tuple[Outcome | Running | None, str | None, str, float | None]:
        """What `backend.check_status` says of `rec`'s run within `within`
        seconds, read (`read_status`), and None; or None and what the log
        says of a check that failed, naming the backend and the method (an
        exception by its type, a `BackendError` in its words, tokens
        masked: `_said`); and the `error_type` its event files (`TypeError`
        for an answer it may not give, as Python would say of it); and the
        seconds a failed check's `BackendError` asked to be left alone
        (`retry_after`: a throttled `GET` of the run; a routine check comes
        no sooner, found by a review, 2026-12-06: a job checked every
        second was checked 6 times in 20 s through `Retry-After: 30`). A
        `CancelledError` the backend raises of its own (this look is not
        being cancelled) fails the check as any other exception: it ended
        the look silently."""
        limit = asyncio.timeout(within)
        try:
            async with limit:
                answer = await backend.check_status(backend_view(rec))
        except PLUGIN_FAULTS as exc:
            if isinstance(exc, asyncio.CancelledError) and cancelling():
                raise  # this look's own: the service stops
            if limit.expired():  # (not a timeout of the backend's own)
                said = f"did not answer within {within:g} s"
            elif isinstance(exc, BackendError):
                said = f"raised {self._said(rec, exc)}"
            else:  # never its words: they may quote a secret
                said = f"raised {type(exc).__name__}"
            wait = exc.retry_after if isinstance(exc, BackendError) else None
            return None, f"backend {rec.backend!r}: check_status {said}", type(exc).__name__, wait
        found, fault = read_status(rec.backend, answer)
        return found, fault, "TypeError", None

    async def _check_failed(self, rec: JobRecord, error_type: str) -> None:
        """File a routine status check that failed (`said: error`), at most
        once a minute per job, attempt and error type, with `repeats` (it was
        only logged, where the history promised it: found by an exploratory
        QA pass; a check every second that keeps failing would flood the
        history)."""
        left_out = self._failed_checks.admit(rec.id, rec.attempt, error_type)
        if left_out is None:
            return
        data: dict[str, Any] = {"said": "error", "error_type": error_type}
        if left_out:
            data["repeats"] = left_out
        event = NewEvent("status_check", data)
        await self.store.jobs.record(rec.id, [event], now_ms(), open_at=rec.attempt)

    async def stop_again(self, rec: JobRecord) -> None:
        """Stop the run of a job no workflow finishes whose stop's lease ran
        out (`stop_due`): the process that ended the job died, or stalled,
        before it recorded the stop's outcome. Claimed first, for a lease of
        `stop_lease_ms` (renewed while the stop runs, so no other process
        stops the run meanwhile), then
        finished as that process would have (`Settler.on_orphan`): the run
        is asked to stop again, and the stop's outcome filed once."""
        if self.settler.on_orphan is None or rec.stop_due is None:
            return
        until = now_ms() + self.settler.stop_lease_ms
        claimed = await self.store.jobs.claim_stop(rec.id, rec.stop_due, until)
        if claimed is None:
            return  # another process took it, or the stop was recorded
        log.warning(
            "job %s: its run's stop was not recorded in time (the process stopping it"
            " died?): stopping it again",
            rec.id,
            extra=rec.log_extra(),
        )
        await self.settler.orphaned(claimed)

    async def heartbeat_missed(self, rec: JobRecord, now: int) -> None:
        """No heartbeat came in time: ask the backend (unless another process
        or a heartbeat got there first) and settle on its answer, or wait on.

        A miss whose window (the `heartbeat_timeout` before it was due)
        began before this process started is given `heartbeat_timeout` from
        the start instead: heartbeats sent while no service was up (a
        restart, a deploy, a crash) had nowhere to go, and a run that kept
        trying is not to be blamed for Tether's own outage. (Another process
        up meanwhile takes a miss when it falls due; one it had not taken yet
        is delayed by `heartbeat_timeout` at most.)"""
        assert rec.heartbeat_due is not None and rec.heartbeat_timeout is not None
        timeout = rec.heartbeat_timeout
        window = int(timeout * 1000)
        grace = self.started + window
        if rec.heartbeat_due - window < self.started and now < grace:
            await self.store.jobs.claim_heartbeat(rec.id, rec.heartbeat_due, grace)
            return
        if not await self.store.jobs.claim_heartbeat(
            rec.id, rec.heartbeat_due, now + recheck_in(rec, now)
        ):
            return  # a heartbeat came, or another process handles this miss
        missed = {"heartbeat_timeout": timeout}
        backend = self.plugins.backends.get(rec.backend)
        found: Outcome | Running | None = None
        if backend is not None and rec.external is not None:
            found, fault, error_type, _ = await self._ask(backend, rec, HEARTBEAT_CHECK_TIMEOUT)
            if fault is not None:  # the log says why (its tokens masked), the event what
                log.warning(
                    "job %s: no heartbeat, and the status check failed: %s",
                    rec.id,
                    fault,
                    extra=rec.log_extra(),
                )
                error = {"said": "error", "error_type": error_type}
                event = NewEvent("heartbeat_missed", {**missed, **error})
                await self.store.jobs.record(rec.id, [event], now_ms(), open_at=rec.attempt)
                return
        if isinstance(found, Running):
            tokens = self.settler.job_tokens(rec)
            data, learnt_now = await going_said(rec, found, tokens, self.settler.max_result_bytes)
            event = NewEvent("heartbeat_missed", {**missed, **data})
            await self.store.jobs.record(rec.id, [event], now_ms(), learnt_now, open_at=rec.attempt)
            return
        if found is None:
            said = {**missed, "said": "unknown"}
            found = Outcome(
                status="timed_out",
                error=ErrorInfo(
                    message=f"no heartbeat within {timeout:g} seconds, and its backend"
                    " cannot tell whether the run is still going"
                    + self.plugins.not_stopped(rec.backend, rec.external),
                    type="heartbeat_timeout",
                ),
            )
        else:
            said = {**missed, "said": "ended", "status": found.status}
        event = NewEvent("heartbeat_missed", said)
        result, _ = await self.settler.settle(
            rec.id,
            found,
            by="heartbeat",
            note=lambda r: event if r == "accepted" else None,
            attempt=rec.attempt,
            salt=rec.salt,
            wait_stop=True,
        )
        if result == "accepted":
            log.info(
                "job %s %s (no heartbeat within %gs)",
                rec.id,
                found.status,
                timeout,
                extra=rec.log_extra(),
            )
