"""The one durable workflow every job runs, whatever its backend: everything
about its Resonate shape (ids, tags, version, registration) is in this file.

```
job(job_id, deadline)                         root promise = the job id
  p = ctx.promise(timeout)                    "{job_id}:1", the callback promise
  ctx.run(TRIGGER_STEP, job_id, p.id)         the backend's trigger, a durable step
  outcome = await p                           suspended: nothing held in memory
  ctx.run(FINISH_STEP, job_id, outcome)       record it; backend cancel on cancel/timeout
```

Whoever ends a job settles `p` with an outcome Tether builds (see
`core.settle`): the callback endpoint, cancel, the watchdog (timeout, status
checks), or the trigger step itself when the trigger failed. The first settle
wins; the workflow resumes on whichever worker the store hands it to. The body
replays from the top on every resume; only the two steps' results are
recorded, so they are written to be repeatable.

The workflow does not import the service: `register` is handed the object
whose `trigger` and `finish` the steps call (`core.steps.JobSteps`).

Changing the order or number of durable operations here shifts the promise
ids of jobs in flight: register a new `VERSION` instead.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Protocol

from resonate.context import Context
from resonate.resonate import Resonate
from resonate.types import TaskData, Value

from core.store.jobs import now_ms

WORKFLOW = "tether.job"
VERSION = 1
TRIGGER_STEP = "tether.job.trigger"
FINISH_STEP = "tether.job.finish"

PROMISE_GRACE_MS = 60_000
"""The callback promise times out this long after the job's deadline: the
watchdog settles it as `timed_out` at the deadline, and the store's own timeout
is the backstop when no watchdog runs."""

ROOT_GRACE_MS = 3_600_000
"""The workflow's own deadline is this long after the job's: time to record the
outcome and cancel the external run once the wait is over."""


def callback_promise_id(job_id: str) -> str:
    """The id of the promise job `job_id` waits on: the workflow's first durable op."""
    return f"{job_id}:1"


def job_id_of(promise_id: str) -> str | None:
    """The job a callback promise id belongs to, or None if it names none."""
    job_id, sep, seq = promise_id.rpartition(":")
    return job_id if sep and seq == "1" and job_id else None


class Steps(Protocol):
    """What the workflow's two durable steps call."""

    async def trigger(self, job_id: str, promise_id: str) -> None: ...

    async def finish(self, job_id: str, value: Any) -> None: ...


async def job_workflow(ctx: Context, job_id: str, deadline_ms: int) -> dict[str, Any]:
    wait_ms = max(deadline_ms - now_ms() + PROMISE_GRACE_MS, 1)  # used only when p is created
    p = ctx.promise(timeout=timedelta(milliseconds=wait_ms))
    promise_id = await p.id()
    if promise_id != callback_promise_id(job_id):
        raise RuntimeError(
            f"workflow {WORKFLOW} v{VERSION} expected its promise to be "
            f"{callback_promise_id(job_id)!r}, got {promise_id!r}"
        )
    await ctx.run(TRIGGER_STEP, job_id, promise_id)
    try:
        value = await p
    except Exception:  # the store timed the promise out: no watchdog got there first
        value = {"status": "timed_out", "by": "store"}
    await ctx.run(FINISH_STEP, job_id, value)
    return dict(value)


def register(r: Resonate, steps: Steps) -> None:
    """Register the workflow and its steps, which call `steps`.

    The steps are run by name, so the SDK inspects their signatures once here,
    not on every `ctx.run` (which cost ~1 ms of CPU per job). Names are not part
    of the promise ids: jobs in flight are unaffected by how a step is referenced.
    """

    async def trigger_step(ctx: Context, job_id: str, promise_id: str) -> None:
        await steps.trigger(job_id, promise_id)

    async def finish_step(ctx: Context, job_id: str, value: dict[str, Any]) -> None:
        await steps.finish(job_id, value)

    r.register(job_workflow, name=WORKFLOW, version=VERSION)
    r.register(trigger_step, name=TRIGGER_STEP)
    r.register(finish_step, name=FINISH_STEP)


class RootPromise(Protocol):
    """The fields of a job that its root promise is made from."""

    id: str
    deadline: int


async def start(r: Resonate, target: str, job: RootPromise) -> None:
    """Create the job's root promise; the store hands its task to a worker of
    `target`. Creating an existing root promise changes nothing, so this is
    safe to repeat (a reattach after a crash between index and promise)."""
    data = TaskData(func=WORKFLOW, args=(job.id, job.deadline), kwargs={}, version=VERSION)
    tags = {
        "resonate:origin": job.id,
        "resonate:branch": job.id,
        "resonate:parent": job.id,
        "resonate:scope": "global",
        "resonate:target": target,
    }
    await r.promises.create(job.id, job.deadline + ROOT_GRACE_MS, Value(data=data), tags)
