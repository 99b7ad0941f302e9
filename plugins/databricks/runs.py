"""How a Databricks run ended, read from `jobs.get_run` and its tasks'
`jobs.get_run_output`: pure functions, no I/O.

Classify by `status` (the current field) first: only `status.state ==
TERMINATED` is final, and `status.termination_details.code` says how it ended.
Fall back to the deprecated `state.life_cycle_state` / `state.result_state` when
`status` is missing. The SDK turns enum strings it does not know into `None`:
an unknown *state* is not final (keep checking); an unknown termination *code*
of a terminated run is read from `state.result_state`, else counted a failure.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import msgspec

from core.plugin import ErrorInfo, Outcome, Running, read_json

if TYPE_CHECKING:
    from databricks.sdk.service.jobs import Run, RunOutput, RunState, RunStatus, RunTask

SUCCESS_CODES = frozenset({"SUCCESS", "SUCCESS_WITH_FAILURES"})
CANCELED_CODES = frozenset({"USER_CANCELED", "CANCELED"})
SKIPPED_CODES = frozenset(
    {
        "SKIPPED",
        "DISABLED",
        "MAX_CONCURRENT_RUNS_EXCEEDED",
        "MAX_JOB_QUEUE_SIZE_EXCEEDED",
        "WORKSPACE_RUN_LIMIT_EXCEEDED",
        # the deprecated result states of a run that never ran
        "MAXIMUM_CONCURRENT_RUNS_REACHED",
        "EXCLUDED",
        "UPSTREAM_FAILED",
        "UPSTREAM_CANCELED",
    }
)

NOT_RUN_CODES = frozenset(
    {"SKIPPED", "EXCLUDED", "UPSTREAM_FAILED", "UPSTREAM_CANCELED", "DISABLED"}
)
"""Codes of a task that never ran (an upstream task failed, a condition
excluded it): not one of a run's failed tasks."""

FINAL_LIFE_CYCLE_STATES = frozenset({"TERMINATED", "SKIPPED", "INTERNAL_ERROR"})
LIVE_STATES = frozenset(
    {"PENDING", "QUEUED", "BLOCKED", "WAITING", "WAITING_FOR_RETRY", "RUNNING", "TERMINATING"}
)
"""States (`status.state`, or the deprecated `state.life_cycle_state`) of a
run that has not ended: Databricks confirms it is going."""


def _name(value: Any) -> str | None:
    """An SDK enum's wire value (`None` stays `None`)."""
    return None if value is None else str(getattr(value, "value", value))


def _read(status: RunStatus | None, state: RunState | None) -> tuple[bool, str, str] | None:
    """How a run (or a task run) stands: `(False, state, "")` while it goes,
    `(True, code, message)` once it has ended, `None` when this SDK cannot tell."""
    life_cycle = _name(state.life_cycle_state) if state else None
    result_state = _name(state.result_state) if state else None
    old_message = (state.state_message if state else None) or ""
    if status is not None and status.state is not None:
        current = _name(status.state) or ""
        if current != "TERMINATED":
            return (False, current, "") if current in LIVE_STATES else None
        details = status.termination_details
        code = _name(details.code) if details else None
        message = (details.message if details else None) or old_message
        # a code newer than this SDK: read the deprecated field instead
        return True, code or result_state or "UNKNOWN", message
    if life_cycle in LIVE_STATES:
        return False, life_cycle or "", ""
    if life_cycle not in FINAL_LIFE_CYCLE_STATES:
        return None  # a state this SDK does not know
    if life_cycle == "SKIPPED":
        return True, "SKIPPED", old_message
    if life_cycle == "INTERNAL_ERROR" and result_state is None:
        return True, "INTERNAL_ERROR", old_message
    return True, result_state or "UNKNOWN", old_message


def run_state(run: Run) -> str | None:
    """The run's state now (`status.state`, else the deprecated life cycle
    state): `QUEUED`, `BLOCKED`, `RUNNING`, `TERMINATED`, ..."""
    if run.status is not None and run.status.state is not None:
        return _name(run.status.state)
    return _name(run.state.life_cycle_state) if run.state is not None else None


def outcome_of_run(run: Run, repair_id: int | None = None) -> Outcome | Running | None:
    """The outcome of a run that has ended, `Running` while it is going
    (`progress`: its state, and why it waits when it is `QUEUED`), `None` when
    its state is one this SDK does not know (Tether cannot tell).

    `repair_id`: the repair this attempt made of the run (`runs/repair`). The
    run is judged by that repair's own entry in `repair_history` (the run's
    state may still be the one the repaired run ended with); a repair not
    listed yet cannot be told about."""
    status, state = run.status, run.state
    if repair_id is not None:
        item = next((r for r in run.repair_history or [] if r.id == repair_id), None)
        if item is None:
            return None
        if item.status is not None or item.state is not None:
            status, state = item.status, item.state
    read = _read(status, state)
    if read is None:
        return None
    ended, name, message = read
    if not ended:
        return Running(progress=_progress(name, status), external={"state": name})
    # `status`'s code CANCELED is Databricks' own cancel (the run's
    # `timeout_seconds` passed, ...), a user's being USER_CANCELED; the older
    # `result_state` CANCELED is a user's (its own timeout is TIMEDOUT).
    details = status.termination_details if status is not None else None
    by_databricks = name == "CANCELED" and details is not None and _name(details.code) == name
    return _outcome(run, name, message, by_databricks)


def _progress(state: str, status: RunStatus | None) -> dict[str, Any]:
    """What a status check shows of a run that goes on: its state, and for a
    queued run why it waits (`ACTIVE_RUNS_LIMIT_REACHED`, ...)."""
    progress: dict[str, Any] = {"state": state}
    queue = status.queue_details if status is not None else None
    if queue is not None and (queue.code is not None or queue.message):
        progress["queue"] = {
            k: v for k, v in (("code", _name(queue.code)), ("message", queue.message)) if v
        }
    return progress


def _outcome(run: Run, code: str, message: str, by_databricks: bool = False) -> Outcome:
    """The outcome of a run that ended with `code`. `by_databricks`: a cancel
    by Databricks itself (not a user's): a failure, not a canceled job."""
    result: dict[str, Any] = {"run_id": run.run_id, "termination_code": code}
    if code in SUCCESS_CODES:
        if message:
            result["message"] = message
        return Outcome(status="succeeded", result=result)
    where = f"Databricks run {run.run_id}"
    if by_databricks:
        said = f"{where} was canceled by Databricks ({code}; e.g. its timeout_seconds passed)"
        return Outcome(status="failed", result=result, error=ErrorInfo(_with(said, message), code))
    if code in CANCELED_CODES:
        error = ErrorInfo(message=_with(f"{where} was canceled ({code})", message), type=code)
        return Outcome(status="canceled", result=result, error=error)
    if code in SKIPPED_CODES:
        error = ErrorInfo(message=_with(f"{where} was skipped ({code})", message), type=code)
    else:
        error = ErrorInfo(message=_with(f"{where} failed ({code})", message), type=code)
    return Outcome(status="failed", result=result, error=error)


def _with(text: str, message: str) -> str:
    return f"{text}: {message}" if message else text


# ── tasks and their output (`runs/get-output`) ───────────────────────────────


def latest_tasks(run: Run) -> list[RunTask]:
    """The run's tasks, one per task key: its latest attempt (a repair or a
    retry adds one), in the order the run lists them."""
    latest: dict[str, RunTask] = {}
    for task in run.tasks or []:
        kept = latest.get(task.task_key)
        if kept is None or _attempt(task) >= _attempt(kept):
            latest[task.task_key] = task
    return list(latest.values())


def _attempt(task: RunTask) -> tuple[int, int]:
    return task.attempt_number or 0, task.run_id or 0


def failed_tasks(tasks: list[RunTask]) -> list[RunTask]:
    """The tasks that ran and did not succeed (not those skipped because an
    upstream task failed: they never ran)."""
    failed = []
    for task in tasks:
        read = _read(task.status, task.state)
        if read is not None and read[0] and read[1] not in SUCCESS_CODES | NOT_RUN_CODES:
            failed.append(task)
    return failed


def has_output(task: RunTask) -> bool:
    """Whether the task can have an exit value: a notebook task."""
    return task.notebook_task is not None and task.run_id is not None


def exit_value(output: RunOutput | None) -> Any:
    """A notebook's `dbutils.notebook.exit` value: parsed when it is JSON, the
    text when it is not, None when there is none. A value Databricks cut (past
    5 MB) is `{"truncated": true, "preview": <what Databricks kept>,
    "truncated_by": "databricks"}`."""
    notebook = output.notebook_output if output is not None else None
    if notebook is None or notebook.result is None:
        return None
    if notebook.truncated:
        return {"truncated": True, "preview": notebook.result, "truncated_by": "databricks"}
    try:
        return read_json(notebook.result)
    except (msgspec.DecodeError, RecursionError):
        return notebook.result


def with_outputs(
    outcome: Outcome, tasks: list[RunTask], outputs: Mapping[int, RunOutput | None]
) -> Outcome:
    """The outcome of an ended run with what its tasks' `runs/get-output`
    said (`outputs`, by task run id; None: it could not be read).

    Succeeded: `result` is the exit value, of the one task of a single-task
    run, else an object of each notebook task's value by task key. Failed:
    `result.failed_tasks` lists each failed task (`task_key`, `run_id`,
    `code`, `message`: its state message, `error`: get-output's), and the
    error message names them all. Canceled runs are left as they are."""
    if outcome.status == "succeeded":
        if len(tasks) == 1:
            only = tasks[0]
            value = exit_value(outputs.get(only.run_id)) if only.run_id is not None else None
            return Outcome(status="succeeded", result=value)
        values = {
            t.task_key: exit_value(outputs.get(t.run_id))
            for t in tasks
            if t.run_id is not None and t.run_id in outputs
        }
        return Outcome(status="succeeded", result=values or None)
    if outcome.status != "failed" or outcome.error is None:
        return outcome
    failed = [
        _failure(t, outputs.get(t.run_id) if t.run_id is not None else None)
        for t in failed_tasks(tasks)
    ]
    if not failed:
        return outcome
    result = {**outcome.result, "failed_tasks": failed}
    lines = "; ".join(_line(f) for f in failed)
    noun = "task" if len(failed) == 1 else "tasks"
    message = f"{outcome.error.message}; {len(failed)} {noun} failed: {lines}"
    error = ErrorInfo(message=message, type=outcome.error.type)
    return Outcome(status="failed", result=result, error=error)


TASK_TEXT = 2000
"""Characters of a failed task's state message and error kept in `failed_tasks`."""
LINE_TEXT = 300
"""Characters of each shown in the error message."""


def _failure(task: RunTask, output: RunOutput | None) -> dict[str, Any]:
    read = _read(task.status, task.state)
    code, message = (read[1], read[2]) if read is not None else ("UNKNOWN", "")
    failure: dict[str, Any] = {"task_key": task.task_key, "run_id": task.run_id, "code": code}
    if message:
        failure["message"] = _cut(message, TASK_TEXT)
    error = output.error if output is not None else None
    if error:
        failure["error"] = _cut(error, TASK_TEXT)
    return failure


def _line(failure: dict[str, Any]) -> str:
    words: list[str] = []
    for key in ("message", "error"):
        text = failure.get(key)
        if text and not any(text in w or w in text for w in words):
            words.append(text)
    said = ": ".join(_cut(w, LINE_TEXT) for w in words)
    head = f"{failure['task_key']} ({failure['code']})"
    return f"{head}: {said}" if said else head


def _cut(text: str, limit: int) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"
