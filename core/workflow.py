"""The one durable workflow every job runs, whatever its backend: everything
about its Resonate shape (ids, tags, versions, registration) is in this file.

```
job(job_id, deadline, attempt)                root promise "{job_id}" (attempt 1),
                                                "{job_id}~N" (attempt N > 1)
  p = ctx.promise(timeout)                    "{root}:1", the callback promise
  ctx.run(TRIGGER_STEP, job_id, p.id, N)      the backend's trigger, a durable step
  outcome = await p                           suspended: nothing held in memory
  ctx.run(FINISH_STEP, job_id, outcome, N)    record it; backend cancel on cancel/timeout
```

Whoever ends a job settles `p` with an outcome Tether builds (see
`core.settle`): the callback endpoint, cancel, the watchdog (timeout, status
checks), or the trigger step itself when the trigger failed. The first settle
wins; the workflow resumes on whichever worker the store hands it to. The body
replays from the top on every resume; only the two steps' results are
recorded, so they are written to be repeatable.

Each attempt of a job (`POST /jobs/{id}/retry` starts the next) is a workflow
of its own, with its own root and callback promise: a new callback URL and a
new idempotency key, while the earlier attempt's promises stay settled.
Attempt 1 keeps the ids jobs had before re-runs existed.

The workflow does not import the service: `register` is handed the object
whose `trigger` and `finish` the steps call (`core.steps.JobSteps`).

Changing the order or number of durable operations here shifts the promise
ids of jobs in flight: register a new `VERSION` instead, and keep the old ones
registered until no job runs under them.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Protocol

from resonate.context import Context
from resonate.error import ServerError
from resonate.resonate import Resonate
from resonate.types import TaskData, Value

from core.store.jobs import now_ms

WORKFLOW = "tether.job"
VERSION = 2
"""Version 2 (re-runs) takes the attempt as a third argument and hands it to
both steps; its durable operations are version 1's, in number and order.
Version 1 (two arguments: every job started before re-runs) stays registered
and runs as attempt 1, with the same promise ids it always had."""
TRIGGER_STEP = "tether.job.trigger"
FINISH_STEP = "tether.job.finish"

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
    """What the workflow's two durable steps call."""

    async def trigger(self, job_id: str, promise_id: str, attempt: int) -> None: ...

    async def finish(self, job_id: str, value: Any, attempt: int) -> None: ...


async def job_workflow(ctx: Context, job_id: str, deadline_ms: int, attempt: int) -> dict[str, Any]:
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
        value = await p
    except Exception:  # the store timed the promise out: no watchdog got there first
        value = {"status": "timed_out", "by": "store"}
    await ctx.run(FINISH_STEP, job_id, value, attempt)
    return dict(value)


async def job_workflow_v1(ctx: Context, job_id: str, deadline_ms: int) -> dict[str, Any]:
    """Version 1, for jobs started before re-runs: attempt 1 of version 2.
    A step's arguments are not part of its promise (the SDK runs a local step
    from the replayed call), so handing the steps the attempt changes nothing
    a job in flight recorded."""
    return await job_workflow(ctx, job_id, deadline_ms, 1)


def register(r: Resonate, steps: Steps) -> None:
    """Register the workflow (every version still in use) and its steps,
    which call `steps`.

    The steps are run by name, so the SDK inspects their signatures once here,
    not on every `ctx.run` (which cost ~1 ms of CPU per job). Names are not part
    of the promise ids: jobs in flight are unaffected by how a step is referenced.
    """

    async def trigger_step(ctx: Context, job_id: str, promise_id: str, attempt: int) -> None:
        await steps.trigger(job_id, promise_id, attempt)

    async def finish_step(ctx: Context, job_id: str, value: dict[str, Any], attempt: int) -> None:
        await steps.finish(job_id, value, attempt)

    r.register(job_workflow_v1, name=WORKFLOW, version=1)
    r.register(job_workflow, name=WORKFLOW, version=VERSION)
    r.register(trigger_step, name=TRIGGER_STEP)
    r.register(finish_step, name=FINISH_STEP)


class RootPromise(Protocol):
    """The fields of a job that its root promise is made from."""

    id: str
    deadline: int
    attempt: int


async def start(r: Resonate, target: str, job: RootPromise) -> None:
    """Create the root promise of the job's current attempt; the store hands
    its task to a worker of `target`. Creating an existing root promise changes
    nothing, so this is safe to repeat (a reattach, or a repair after a crash
    between the index write and this)."""
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
    """Whether the workflow of that attempt has yet to return (its finish
    step, the backend's cancel, `tether_job_finished`, still to come). A root
    promise that does not exist (never created, or deleted by retention) runs
    nothing."""
    try:
        record = await r.promises.get(root_promise_id(job_id, attempt))
    except ServerError as exc:
        if exc.code == 404:
            return False
        raise
    return bool(record.state == "pending")
