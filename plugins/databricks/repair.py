"""Re-running a Databricks job by repairing its run (`runs/repair`).

`POST /jobs/{id}/retry` of a `databricks` job whose run ended without
success repairs that run in place: only its failed (or canceled) tasks run
again, with Tether's parameters of the new attempt (its callback URL, its
promise id), since the old attempt's URL now answers 410. Tasks that
succeeded keep their results; the run keeps its id and its page. The new
attempt's `external` adds the repair's id: `{"run_id", "run_page_url",
"state", "repair_id"}`.

A run that cannot be repaired is started afresh (`runs/run-now` or
`runs/submit`, with the new attempt's idempotency token): one Databricks no
longer has (runs are deleted after 60 days), one it refuses to repair (a
one-time run of a kind it cannot repair), and one that succeeded in Databricks
(the notebook reported a failure, yet nothing failed there to repair).

**Exactly once.** A repair takes no idempotency token, and the trigger step
runs again after a crash, or the SDK sends the request again when its answer
was lost. So before repairing, Tether reads the run with its
`repair_history`: the previous attempt's `external` says which repair it ran
as (none: the original run), and a later repair whose parameters carry this
attempt's `tether_promise_id` was made by an earlier try of this same
attempt: it is taken, not made again. (A later repair whose parameters say
nothing of Tether is taken too: a second repair would rerun the same tasks.
One carrying another attempt's promise id was made by hand, from the
Databricks UI: Tether repairs after it.) A repair Databricks refuses is
looked for the same way before giving up on it: the run in progress again, or
`latest_repair_id` outdated, is what a repeated request gets when the first
one went through.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from core.plugin import BackendError, Outcome, Running, Trigger
from plugins.databricks.runs import _name, latest_tasks, outcome_of_run
from plugins.databricks.workspace import Workspace

if TYPE_CHECKING:
    from collections.abc import Iterable

    from databricks.sdk.service.jobs import BaseRun, Run, RunTask

log = logging.getLogger("tether.databricks")

ENDING_WAIT = 5.0
"""Seconds between looks at a run that is ending, and before trying again to
repair a run that has not ended yet: Databricks repairs only ended runs."""

ENDING_LIMIT = 600.0
"""Seconds a repair waits, looking every `ENDING_WAIT`, for a run that is
ending (`TERMINATING`: a cancel under way, its cluster stopping) before it
counts as not ended (`RUN_NOT_ENDED`, a try of the trigger's): a retry right
after a cancel would otherwise spend its tries in well under a minute."""


class NotRepaired(Exception):
    """Why the run is not repaired: the caller starts a new run instead."""


async def repair(
    workspace: Workspace,
    run_id: int,
    known: int | None,
    promise_id: str,
    parameters: Mapping[str, Any],
    secret: str,
) -> dict[str, Any]:
    """Repair run `run_id` for the attempt of `promise_id`, or take the repair
    an earlier try of that attempt made. `known`: the repair the previous
    attempt ran as (None: the original run). `parameters`: `job_parameters=`
    or `notebook_params=` for `runs/repair`. Returns the attempt's `external`.

    Raises `NotRepaired` when the run cannot be repaired, `BackendError`
    (retryable) when Databricks cannot answer now or the run has not ended
    yet."""
    run = await _read(workspace, run_id)
    latest = latest_repair(run)
    if latest != known and carries(run, promise_id) is not False:
        log.info("databricks: run %s: repair %s is this attempt's already", run_id, latest)
        return await _external(workspace, run, latest)
    found = outcome_of_run(run)
    waited = 0.0
    while _ending(found) and waited < ENDING_LIMIT:
        await asyncio.sleep(ENDING_WAIT)
        waited += ENDING_WAIT
        run = await _read(workspace, run_id)
        latest = latest_repair(run)
        found = outcome_of_run(run)
    if found is None or isinstance(found, Running):
        state = found.progress.get("state") if isinstance(found, Running) else "unknown"
        raise BackendError(
            f"Databricks run {run_id} has not ended yet ({state}): only an ended run is"
            " repaired (this attempt tries again; once it failed, retry the job once the"
            " run ended)",
            retryable=True,
            code="RUN_NOT_ENDED",
            retry_after=ENDING_WAIT,
        )
    if found.status == "succeeded":
        raise NotRepaired(f"it succeeded ({_code(found)}): no task failed there")

    def call(w: Any) -> Any:
        return w.jobs.repair_run(
            run_id, rerun_all_failed_tasks=True, latest_repair_id=latest, **parameters
        )

    try:
        made = await workspace.call(call, secret)
    except BackendError as exc:
        if exc.retryable:  # tried again by Tether: the next try looks for this repair first
            raise
        again = await _read(workspace, run_id)
        newest = latest_repair(again)
        if newest != latest and carries(again, promise_id) is not False:
            log.info("databricks: run %s: repair %s was made by an earlier request", run_id, newest)
            return await _external(workspace, again, newest)
        raise NotRepaired(f"Databricks refused to repair it: {exc.message}") from None
    repair_id = made.response.repair_id if made.response is not None else None
    if not isinstance(repair_id, int):  # the answer lacks it: read it from the run
        repair_id = latest_repair(await _read(workspace, run_id))
    return await _external(workspace, run, repair_id)


def _ending(found: Outcome | Running | None) -> bool:
    return isinstance(found, Running) and found.progress.get("state") == "TERMINATING"


async def _read(workspace: Workspace, run_id: int) -> Run:
    try:
        return await workspace.call(lambda w: w.jobs.get_run(run_id, include_history=True))
    except BackendError as exc:
        if exc.retryable:
            raise
        raise NotRepaired(f"it cannot be read: {exc.message}") from None


async def _external(workspace: Workspace, run: Run, repair_id: int | None) -> dict[str, Any]:
    """The attempt's `external`: the run, its page, the repair and that
    repair's state (read once more: the run's own may still be the old one)."""
    external: dict[str, Any] = {"run_id": run.run_id, "run_page_url": run.run_page_url}
    try:
        now = await _read(workspace, run.run_id or 0)
    except (BackendError, NotRepaired):
        now = None
    said = outcome_of_run(now, repair_id) if now is not None else None
    if isinstance(said, Running) and isinstance(said.progress, dict):
        external["state"] = said.progress["state"]
    elif isinstance(said, Outcome):
        external["state"] = "TERMINATED"
    external["repair_id"] = repair_id
    return external


def latest_repair(run: Run) -> int | None:
    """The id of the run's latest repair (None: never repaired); the
    `ORIGINAL` entry of `repair_history` is not one."""
    repairs = [r.id for r in run.repair_history or [] if _name(r.type) == "REPAIR"]
    return repairs[-1] if repairs and isinstance(repairs[-1], int) else None


def carries(run: Run, promise_id: str) -> bool | None:
    """Whether the run's parameters as they stand (after its latest repair)
    are those of the attempt of `promise_id`: its job parameters, its
    notebook parameters, its notebook tasks' parameters. None: they name no
    Tether attempt at all."""
    named = promise_ids(run, latest_tasks(run))
    return promise_id in named if named else None


def promise_ids(run: BaseRun | Run, tasks: Iterable[RunTask]) -> set[str]:
    """The `tether_promise_id` values a run names: its job parameters, its
    latest repair's notebook parameters, and `tasks`' notebook parameters."""
    from plugins.databricks import PROMISE_ID_PARAM  # the package imports this module

    return _given(run, tasks, PROMISE_ID_PARAM)


def started_for(run: BaseRun | Run, tasks: Iterable[RunTask], trigger: Trigger) -> bool:
    """Whether a run's parameters (as `promise_ids` reads them) are those
    this deployment gave the trigger's attempt: its promise id, and, of the
    callback URLs they carry, one this deployment signed for it
    (`Trigger.signed_here`). Another Tether deployment's run of a job under
    the same id, on the same workspace, names the promise id too."""
    from plugins.databricks import CALLBACK_URL_PARAM, PROMISE_ID_PARAM  # (as above)

    if trigger.promise_id not in _given(run, tasks, PROMISE_ID_PARAM):
        return False
    urls = _given(run, tasks, CALLBACK_URL_PARAM)
    return not urls or any(trigger.signed_here(url) for url in urls)


def _given(run: BaseRun | Run, tasks: Iterable[RunTask], name: str) -> set[str]:
    """The values of Tether's parameter `name` in a run: its job parameters,
    its latest repair's notebook parameters, and `tasks`' notebook parameters."""
    seen = [p.value for p in run.job_parameters or [] if p.name == name]
    given = run.overriding_parameters
    if given is not None and given.notebook_params:
        seen.append(given.notebook_params.get(name))
    for task in tasks:
        notebook = task.notebook_task
        if notebook is not None and notebook.base_parameters:
            seen.append(notebook.base_parameters.get(name))
    return {value for value in seen if value}


def _code(outcome: Outcome) -> str:
    result = outcome.result
    return str(result.get("termination_code")) if isinstance(result, dict) else outcome.status
