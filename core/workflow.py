"""The one durable workflow every job runs, whatever its backend: everything
about its Resonate shape (ids, tags, versions, registration) is in this file.

```
job(job_id, deadline, attempt)                root promise "{job_id}" (attempt 1),
                                                "{job_id}~N" (attempt N > 1)
  p = ctx.promise(timeout)                    "{root}:1", the callback promise: the one durable op
  steps.trigger(job_id, p.id, N)              the backend's trigger, in the body; recorded with
                                                the job (`external`), skipped once it is
  outcome = await p                           suspended: nothing held in memory
  steps.finish(job_id, outcome, N)            record it; backend cancel on cancel/timeout
  return outcome                              the root promise is resolved
```
(or the settle that ends a waiting job resolves the root promise itself,
with `p`, in its own transaction, when the finish has nothing to do: below)

Whoever ends a job settles `p` with an outcome Tether builds (see
`core.settle`): the callback endpoint, cancel, the watchdog (timeout, status
checks), or the trigger itself when it failed. The first settle wins; the
workflow resumes on whichever worker the store hands it to. The body replays
from the top on every resume, so what it does besides `p` is repeatable work
that needs no durable record of its own (version 4):

- **The trigger** is recorded by the job index, not by the store: the
  trigger's index write (`external`, with the `triggered` event) is its
  record, and `steps.trigger` reads the job's row first and does nothing once
  the attempt was triggered or has ended. A crash after the backend started
  the run but before the index recorded it triggers again on the replay, with
  the same idempotency key, as an interrupted durable step did. Versions 1-3
  ran it as a durable step ("{root}:2"): a promise and two protocol requests
  per job, and a crash between the index write and the step's record
  triggered again (the row check now stops that in every version).
- **The finish** runs after the wait: the index already holds the outcome when
  `p` is settled (`core.settle`), so what is left is a conditional index
  write, the backend's `cancel` and `tether_job_finished`: a crash before the
  root promise is resolved replays the body, which finds `p` settled and
  finishes again (at least once, as `cancel` and `tether_job_finished` always
  were; the conditional write records one `finished`). Versions 1 and 2 ran
  it as a durable step ("{root}:3").

- **A settle may end the workflow itself** (the embedded store and
  Postgres, whose promises share the index's database:
  `core.settle.Settler._settle_together`). A settle that wins settles `p`
  and ends the job in the index in one transaction; when the finish would
  do nothing more (no run to stop, no plugin implementing
  `tether_job_finished`: `JobSteps.finishes_alone`) and the workflow waits
  (its task suspended on `p`), the same transaction settles the root
  promise with what the body would return (`p`'s value) first, so the
  workflow never runs again: no acquire, no replay, no fulfill. Any
  version: the durable ops of versions 1 and 2 after the wait (their finish
  step) are then never made. A workflow still running (its trigger, when
  the callback came quickly) or whose finish has work to do resumes as
  always.

Neither may raise into the SDK, which would reject the root promise for good:
each is tried again until it succeeds (`until_done`), the task's lease kept.
But a stop (SIGTERM) cuts short their waits between two tries of a backend
(`JobSteps.close`): the body (version 4) then hands its task back to the
store (`CutShort`, which the SDK answers by releasing the task), once the
SDK's stop has begun, for another process or the next start to run it
again at once; the older versions' tasks wait for their leases to run out.

Each attempt of a job (`POST /jobs/{id}/retry` starts the next) is a workflow
of its own, with its own root and callback promise: a new callback URL and a
new idempotency key, while the earlier attempt's promises stay settled.
Attempt 1 keeps the ids jobs had before re-runs existed.

The workflow does not import the service: `register` is handed the object
whose `trigger` the step calls and whose `finish` the body calls
(`core.steps.JobSteps`).

Changing the order or number of durable operations here shifts the promise
ids of jobs in flight: register a new `VERSION` instead, and keep the old ones
registered until no job runs under them.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, Protocol

from resonate.context import Context, ResonateFuture
from resonate.error import PlatformError, ResonateError, ServerError
from resonate.observability import BackgroundTaskFailed, Event, logging_observer
from resonate.resonate import Resonate
from resonate.types import TaskData, Value

from core.store.jobs import now_ms

log = logging.getLogger("tether")

WORKFLOW = "tether.job"
VERSION = 4
"""The version new workflows start under. Version 4 triggers in the body
(`TRIGGER_STEP` is no longer a durable op of it): one durable op, the
callback promise. Version 3 has two (the callback promise, the trigger step)
and finishes in the body after the wait. Version 2 (re-runs) takes the
attempt as a third argument and hands it to both steps; its durable
operations are version 1's, in number and order: the callback promise, the
trigger step, the finish step (`FINISH_STEP`). Version 1 (two arguments:
every job started before re-runs) runs as attempt 1 of version 2, with the
same promise ids it always had. All stay registered for the jobs that started
under them."""
TRIGGER_STEP = "tether.job.trigger"
"""Versions 1-3 only: their trigger, a durable step ("{root}:2")."""
FINISH_STEP = "tether.job.finish"
"""Versions 1 and 2 only: their finish, a durable step ("{root}:3")."""

RETRY_BACKOFF = 1.0
RETRY_BACKOFF_MAX = 60.0
"""The body's trigger (version 4) and finish (versions 3 and 4), when they
fail (the job index did not answer), are tried again after this many seconds,
doubled each time up to the max, until they succeed; the task's lease is kept
meanwhile. As durable steps the SDK's retry policy did the same (1 s
doubling)."""

ATTEMPT_MARK = "~"
"""Between a job id and its attempt in the root promise id of attempt N > 1:
job ids may not contain it (`JOB_ID_PATTERN`), and URLs need not escape it."""

PROMISE_GRACE_MS = 60_000
"""The callback promise times out this long after the job's deadline: the
watchdog settles it as `timed_out` at the deadline, and the store's own timeout
is the backstop when no watchdog runs."""

ROOT_GRACE_MS = 3_600_000
"""The workflow's own deadline is this long after the job's: time to record the
outcome and cancel the external run once the wait is over."""


def root_promise_id(job_id: str, attempt: int = 1) -> str:
    """The id of the workflow of attempt `attempt` of job `job_id`."""
    return job_id if attempt == 1 else f"{job_id}{ATTEMPT_MARK}{attempt}"


def callback_promise_id(job_id: str, attempt: int = 1) -> str:
    """The id of the promise attempt `attempt` of job `job_id` waits on: its
    workflow's first durable op."""
    return f"{root_promise_id(job_id, attempt)}:1"


STOP_MARK = ":stop"
"""After a root promise id, the id of its attempt's stop promise
(`stop_promise_id`): not a durable op of any workflow (theirs are numbered)."""


def stop_promise_id(job_id: str, attempt: int = 1) -> str:
    """The promise that is pending while the finish of attempt `attempt` of
    job `job_id` runs without its workflow (an orphan's finish: its run's
    stop, after a long outage), as releases before schema version 11 made
    it; today's record that stop in the job's row (`JobRecord.stop_due`),
    and this is read only for a stop a host of an earlier release runs."""
    return f"{root_promise_id(job_id, attempt)}{STOP_MARK}"


ATTEMPT_DIGITS = 18
"""The most digits of an attempt's number a promise id is read with: more
name no attempt (the index keeps it in 64 bits), and Python refuses to read
an integer of over 4,300 digits at all (a 500, found in an audit,
2026-12-04)."""


def parse_promise_id(promise_id: str) -> tuple[str, int] | None:
    """The job and attempt a callback promise id belongs to, or None if it
    names none (only the ids `callback_promise_id` makes are read)."""
    root, sep, seq = promise_id.rpartition(":")
    job_id, mark, number = root.partition(ATTEMPT_MARK)
    if not sep or seq != "1" or not job_id:
        return None
    if not mark:
        return job_id, 1
    if not (number.isascii() and number.isdigit()) or len(number) > ATTEMPT_DIGITS:
        return None
    attempt = int(number)
    return (job_id, attempt) if attempt > 1 and root_promise_id(job_id, attempt) == root else None


def job_id_of(promise_id: str) -> str | None:
    """The job a callback promise id belongs to, or None if it names none."""
    parsed = parse_promise_id(promise_id)
    return None if parsed is None else parsed[0]


def attempt_of(promise_id: str) -> int | None:
    """The attempt a callback promise id belongs to, or None if it names none."""
    parsed = parse_promise_id(promise_id)
    return None if parsed is None else parsed[1]


class Steps(Protocol):
    """What the workflow's trigger and finish call."""

    async def trigger(
        self,
        job_id: str,
        promise_id: str,
        attempt: int,
        *,
        ended_settled: bool = True,
        began: int | None = None,
        again: bool = False,
        run: str | None = None,
    ) -> None: ...

    async def finish(self, job_id: str, value: Any, attempt: int) -> None: ...

    async def cut_short(self) -> bool: ...


CUT_SHORT = "a wait between two tries cut short by a stop: the task is handed back"


class CutShort(ResonateError):
    """Raised to the SDK (in a `PlatformError`, which it lets past the body
    and answers by releasing the task: `resonate/core.py`) when a stop cut
    short the body's wait between two tries (`Steps.cut_short`): the task
    goes back to the store at once, for the next process to run the body
    again, instead of held until its lease runs out (`TETHER_TASK_TTL`)."""

    def __str__(self) -> str:
        return CUT_SHORT


def observe(event: Event) -> None:
    """The SDK's observer (`Resonate(observer=...)`): its own, without the
    error a task handed back by a stop would log (`CutShort`)."""
    if isinstance(event, BackgroundTaskFailed) and event.cause == CUT_SHORT:
        return
    logging_observer(event)


class _HandedBack(logging.Filter):
    """Keeps the SDK's "execution failed, releasing task" error (and its
    traceback) out of the log for a task handed back by a stop (`CutShort`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (
            isinstance(exc, PlatformError) and any(isinstance(c, CutShort) for c in exc.causes)
        )


HANDED_BACK = _HandedBack()


async def callback_promise(
    ctx: Context, job_id: str, deadline_ms: int, attempt: int
) -> tuple[ResonateFuture[Any], str]:
    """The first durable op of every version: the callback promise
    ("{root}:1") and its id."""
    wait_ms = max(deadline_ms - now_ms() + PROMISE_GRACE_MS, 1)  # used only when p is created
    p = ctx.promise(timeout=timedelta(milliseconds=wait_ms))
    promise_id = await p.id()
    if promise_id != callback_promise_id(job_id, attempt):
        raise RuntimeError(
            f"workflow {WORKFLOW} expected its promise to be "
            f"{callback_promise_id(job_id, attempt)!r}, got {promise_id!r}"
        )
    return p, promise_id


async def outcome(p: ResonateFuture[Any]) -> dict[str, Any]:
    """What `p` was settled with; a timeout by the store (no watchdog got
    there first) as `timed_out`."""
    try:
        value: dict[str, Any] = await p
    except Exception:
        value = {"status": "timed_out", "by": "store"}
    return value


async def until_done(
    doing: str,
    job_id: str,
    attempt: int,
    call: Callable[[], Awaitable[None]],
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
) -> None:
    """`call()`, tried again after a failure (`RETRY_BACKOFF`) until it
    succeeds. A failure must not reach the workflow body: the SDK would reject
    the root promise for good, with the job's trigger or finish never done."""
    delay = RETRY_BACKOFF
    while True:
        try:
            await call()
            return
        except Exception as exc:
            log.warning(
                "job %s: %s attempt %d failed (%s); again in %gs",
                job_id,
                doing,
                attempt,
                type(exc).__name__,
                delay,
                extra={"job_id": job_id},
            )
        await sleep(delay)
        delay = min(delay * 2, RETRY_BACKOFF_MAX)


def register(r: Resonate, steps: Steps) -> None:
    """Register the workflow (every version still in use) and its steps,
    which call `steps`.

    The steps are run by name, so the SDK inspects their signatures once here,
    not on every `ctx.run` (which cost ~1 ms of CPU per job). Names are not part
    of the promise ids: jobs in flight are unaffected by how a step is referenced.
    """

    async def job_workflow(
        ctx: Context, job_id: str, deadline_ms: int, attempt: int
    ) -> dict[str, Any]:
        """Version 4: the trigger in the body, the wait, the finish in the body."""
        # This run of the body began then: a callback promise made before it
        # was made by an earlier run, which may have died inside a try.
        began, run = now_ms(), uuid.uuid4().hex
        p, promise_id = await callback_promise(ctx, job_id, deadline_ms, attempt)
        calls = 0

        async def trigger() -> None:
            nonlocal calls
            calls += 1
            # Made again after a call that raised (the index failed), which may
            # have tried with no record: its refusals are unsure, as a replay's.
            again = calls > 1
            await steps.trigger(job_id, promise_id, attempt, began=began, again=again, run=run)

        try:
            await until_done("triggering", job_id, attempt, trigger)
            value = await outcome(p)
            finish = functools.partial(steps.finish, job_id, value, attempt)
            await until_done("finishing", job_id, attempt, finish)
        except asyncio.CancelledError:
            if await steps.cut_short():  # nothing in flight: the next process runs it again
                handed_back = PlatformError([CutShort()])
                raise handed_back from handed_back.cause
            raise
        return dict(value)

    async def durable_trigger(
        ctx: Context, job_id: str, deadline_ms: int, attempt: int
    ) -> dict[str, Any]:
        """Versions 1-3 start so: the callback promise, the trigger step
        ("{root}:2"), the wait."""
        p, promise_id = await callback_promise(ctx, job_id, deadline_ms, attempt)
        await ctx.run(TRIGGER_STEP, job_id, promise_id, attempt)
        return await outcome(p)

    async def job_workflow_v3(
        ctx: Context, job_id: str, deadline_ms: int, attempt: int
    ) -> dict[str, Any]:
        """Version 3: the trigger step, the wait, the finish in the body."""
        value = await durable_trigger(ctx, job_id, deadline_ms, attempt)
        await until_done("finishing", job_id, attempt, lambda: steps.finish(job_id, value, attempt))
        return dict(value)

    async def job_workflow_v2(
        ctx: Context, job_id: str, deadline_ms: int, attempt: int
    ) -> dict[str, Any]:
        """Version 2: the finish as a durable step ("{root}:3")."""
        value = await durable_trigger(ctx, job_id, deadline_ms, attempt)
        await ctx.run(FINISH_STEP, job_id, value, attempt)
        return dict(value)

    async def job_workflow_v1(ctx: Context, job_id: str, deadline_ms: int) -> dict[str, Any]:
        """Version 1, for jobs started before re-runs: attempt 1 of version 2.
        A step's arguments are not part of its promise (the SDK runs a local
        step from the replayed call), so handing the steps the attempt changes
        nothing a job in flight recorded."""
        return await job_workflow_v2(ctx, job_id, deadline_ms, 1)

    async def trigger_step(ctx: Context, job_id: str, promise_id: str, attempt: int) -> None:
        # Run again only after a crash (or a failure, by the SDK's retries):
        # rows from before version 4 may hold `external` beside an unsettled
        # promise, so an ended row settles it. It starts right after the
        # callback promise is made, so a promise older than this run of it was
        # made by an earlier one (`began`).
        began, run = now_ms(), uuid.uuid4().hex
        await steps.trigger(job_id, promise_id, attempt, ended_settled=False, began=began, run=run)

    async def finish_step(ctx: Context, job_id: str, value: dict[str, Any], attempt: int) -> None:
        await steps.finish(job_id, value, attempt)

    logging.getLogger("resonate.core").addFilter(HANDED_BACK)
    r.register(job_workflow_v1, name=WORKFLOW, version=1)
    r.register(job_workflow_v2, name=WORKFLOW, version=2)
    r.register(job_workflow_v3, name=WORKFLOW, version=3)
    r.register(job_workflow, name=WORKFLOW, version=4)
    r.register(trigger_step, name=TRIGGER_STEP)
    r.register(finish_step, name=FINISH_STEP)


class RootPromise(Protocol):
    """The fields of a job that its root promise is made from."""

    id: str
    deadline: int
    attempt: int


async def start(r: Resonate, target: str, job: RootPromise) -> None:
    """Create the root promise of the job's current attempt, to run under
    `VERSION` (read here, so a test can start an older version); the store
    hands its task to a worker of `target`. Creating an existing root promise
    changes nothing, so this is safe to repeat (a reattach, or a repair after
    a crash between the index write and this): a job keeps the version it
    started under."""
    root = root_promise_id(job.id, job.attempt)
    args = (job.id, job.deadline, job.attempt)
    data = TaskData(func=WORKFLOW, args=args, kwargs={}, version=VERSION)
    tags = {
        "resonate:origin": root,
        "resonate:branch": root,
        "resonate:parent": root,
        "resonate:scope": "global",
        "resonate:target": target,
    }
    await r.promises.create(root, job.deadline + ROOT_GRACE_MS, Value(data=data), tags)


async def attempt_running(r: Resonate, job_id: str, attempt: int) -> bool:
    """Whether the workflow of that attempt has yet to return (its finish,
    the backend's cancel, `tether_job_finished`, still to come), or, for an
    attempt no workflow will finish, a host of an earlier release runs its
    finish (its stop promise pending: `stop_promise_id`; today's hosts
    record it in the job's row, `stop_due`). A promise that does not exist
    (never created, or deleted by retention) runs nothing."""
    for promise_id in (root_promise_id(job_id, attempt), stop_promise_id(job_id, attempt)):
        try:
            record = await r.promises.get(promise_id)
        except ServerError as exc:
            if exc.code == 404:
                continue
            raise
        if record.state == "pending":
            return True
    return False
