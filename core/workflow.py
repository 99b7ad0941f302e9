"""The one durable workflow every job runs, whatever its backend: everything
about its Resonate shape (ids, tags, versions, registration) is in this file.

```
job(job_id, deadline, attempt)                root promise "{job_id}" (attempt 1),
                                                "{job_id}~N" (attempt N > 1)
  p = ctx.promise(timeout)                    "{root}:1", the callback promise
  ctx.run(TRIGGER_STEP, job_id, p.id, N)      "{root}:2", the backend's trigger, a durable step
  outcome = await p                           suspended: nothing held in memory
  steps.finish(job_id, outcome, N)            record it; backend cancel on cancel/timeout;
                                                in the body, not a durable step (version 3)
  return outcome                              the root promise is resolved
```

Whoever ends a job settles `p` with an outcome Tether builds (see
`core.settle`): the callback endpoint, cancel, the watchdog (timeout, status
checks), or the trigger step itself when the trigger failed. The first settle
wins; the workflow resumes on whichever worker the store hands it to. The body
replays from the top on every resume; only the trigger step's result is
recorded. The finish runs in the body after the wait: the index already holds
the outcome when `p` is settled (`core.settle`), so what is left is repeatable
work (a conditional index write, the backend's `cancel`, `tether_job_finished`)
that needs no durable record of its own: a crash before the root promise is
resolved replays the body, which finds `p` settled and finishes again (at
least once, as `cancel` and `tether_job_finished` always were; the conditional
write records one `finished`). Version 2 ran it as a durable step, which cost
two protocol requests and a promise per job on the path from the callback to
the workflow's end.

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
import logging
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, Protocol

from resonate.context import Context
from resonate.error import ServerError
from resonate.resonate import Resonate
from resonate.types import TaskData, Value

from core.store.jobs import now_ms

log = logging.getLogger("tether")

WORKFLOW = "tether.job"
VERSION = 3
"""The version new workflows start under. Version 3 finishes in the body after
the wait (`FINISH_STEP` is no longer a durable op of it): two durable ops, the
callback promise and the trigger step, where versions 1 and 2 have three.
Version 2 (re-runs) takes the attempt as a third argument and hands it to
both steps; its durable operations are version 1's, in number and order.
Version 1 (two arguments: every job started before re-runs) runs as attempt 1
of version 2, with the same promise ids it always had. Both stay registered
for the jobs that started under them."""
TRIGGER_STEP = "tether.job.trigger"
FINISH_STEP = "tether.job.finish"
"""Versions 1 and 2 only: their finish, a durable step ("{root}:3")."""

FINISH_BACKOFF = 1.0
FINISH_BACKOFF_MAX = 60.0
"""Version 3's finish, when it fails (the job index did not answer), is tried
again in the body after this many seconds, doubled each time up to the max,
until it succeeds; the task's lease is kept meanwhile. As a durable step
(versions 1 and 2) the SDK's retry policy did the same (1 s doubling)."""

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


def parse_promise_id(promise_id: str) -> tuple[str, int] | None:
    """The job and attempt a callback promise id belongs to, or None if it
    names none (only the ids `callback_promise_id` makes are read)."""
    root, sep, seq = promise_id.rpartition(":")
    job_id, mark, number = root.partition(ATTEMPT_MARK)
    if not sep or seq != "1" or not job_id:
        return None
    if not mark:
        return job_id, 1
    if not (number.isascii() and number.isdigit()):
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
    """What the workflow's trigger step and its finish call."""

    async def trigger(self, job_id: str, promise_id: str, attempt: int) -> None: ...

    async def finish(self, job_id: str, value: Any, attempt: int) -> None: ...


async def wait_for_outcome(
    ctx: Context, job_id: str, deadline_ms: int, attempt: int
) -> dict[str, Any]:
    """The durable ops every version starts with: the callback promise
    ("{root}:1"), the trigger step ("{root}:2"), the wait. Returns what `p`
    was settled with."""
    wait_ms = max(deadline_ms - now_ms() + PROMISE_GRACE_MS, 1)  # used only when p is created
    p = ctx.promise(timeout=timedelta(milliseconds=wait_ms))
    promise_id = await p.id()
    if promise_id != callback_promise_id(job_id, attempt):
        raise RuntimeError(
            f"workflow {WORKFLOW} expected its promise to be "
            f"{callback_promise_id(job_id, attempt)!r}, got {promise_id!r}"
        )
    await ctx.run(TRIGGER_STEP, job_id, promise_id, attempt)
    try:
        value: dict[str, Any] = await p
    except Exception:  # the store timed the promise out: no watchdog got there first
        value = {"status": "timed_out", "by": "store"}
    return value


async def finish_until_done(
    steps: Steps,
    job_id: str,
    value: Any,
    attempt: int,
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
) -> None:
    """Version 3's finish: `steps.finish`, tried again after a failure
    (`FINISH_BACKOFF`) until it succeeds. A failure must not reach the
    workflow body: the SDK would reject the root promise for good, with the
    job's finish never done."""
    delay = FINISH_BACKOFF
    while True:
        try:
            await steps.finish(job_id, value, attempt)
            return
        except Exception as exc:
            log.warning(
                "job %s: finishing attempt %d failed (%s); again in %gs",
                job_id,
                attempt,
                type(exc).__name__,
                delay,
                extra={"job_id": job_id},
            )
        await sleep(delay)
        delay = min(delay * 2, FINISH_BACKOFF_MAX)


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
        """Version 3: the finish in the body, after the wait."""
        value = await wait_for_outcome(ctx, job_id, deadline_ms, attempt)
        await finish_until_done(steps, job_id, value, attempt)
        return dict(value)

    async def job_workflow_v2(
        ctx: Context, job_id: str, deadline_ms: int, attempt: int
    ) -> dict[str, Any]:
        """Version 2: the finish as a durable step ("{root}:3")."""
        value = await wait_for_outcome(ctx, job_id, deadline_ms, attempt)
        await ctx.run(FINISH_STEP, job_id, value, attempt)
        return dict(value)

    async def job_workflow_v1(ctx: Context, job_id: str, deadline_ms: int) -> dict[str, Any]:
        """Version 1, for jobs started before re-runs: attempt 1 of version 2.
        A step's arguments are not part of its promise (the SDK runs a local
        step from the replayed call), so handing the steps the attempt changes
        nothing a job in flight recorded."""
        return await job_workflow_v2(ctx, job_id, deadline_ms, 1)

    async def trigger_step(ctx: Context, job_id: str, promise_id: str, attempt: int) -> None:
        await steps.trigger(job_id, promise_id, attempt)

    async def finish_step(ctx: Context, job_id: str, value: dict[str, Any], attempt: int) -> None:
        await steps.finish(job_id, value, attempt)

    r.register(job_workflow_v1, name=WORKFLOW, version=1)
    r.register(job_workflow_v2, name=WORKFLOW, version=2)
    r.register(job_workflow, name=WORKFLOW, version=3)
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
    the backend's cancel, `tether_job_finished`, still to come). A root
    promise that does not exist (never created, or deleted by retention) runs
    nothing."""
    try:
        record = await r.promises.get(root_promise_id(job_id, attempt))
    except ServerError as exc:
        if exc.code == 404:
            return False
        raise
    return bool(record.state == "pending")
