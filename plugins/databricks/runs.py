"""How a Databricks run ended, read from `jobs.get_run`: pure functions, no I/O.

Classify by `status` (the current field) first: only `status.state ==
TERMINATED` is final, and `status.termination_details.code` says how it ended.
Fall back to the deprecated `state.life_cycle_state` / `state.result_state` when
`status` is missing. The SDK turns enum strings it does not know into `None`:
an unknown *state* is not final (keep checking); an unknown termination *code*
of a terminated run is read from `state.result_state`, else counted a failure.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from core.plugin import ErrorInfo, Outcome, Running

if TYPE_CHECKING:
    from databricks.sdk.service.jobs import Run

SUCCESS_CODES = frozenset({"SUCCESS", "SUCCESS_WITH_FAILURES"})
CANCELED_CODES = frozenset({"USER_CANCELED", "CANCELED"})
SKIPPED_CODES = frozenset(
    {
        "SKIPPED",
        "DISABLED",
        "MAX_CONCURRENT_RUNS_EXCEEDED",
        "MAX_JOB_QUEUE_SIZE_EXCEEDED",
        # the deprecated result states of a run that never ran
        "MAXIMUM_CONCURRENT_RUNS_REACHED",
        "EXCLUDED",
        "UPSTREAM_FAILED",
        "UPSTREAM_CANCELED",
    }
)

FINAL_LIFE_CYCLE_STATES = frozenset({"TERMINATED", "SKIPPED", "INTERNAL_ERROR"})
LIVE_STATES = frozenset(
    {"PENDING", "QUEUED", "BLOCKED", "WAITING", "WAITING_FOR_RETRY", "RUNNING", "TERMINATING"}
)
"""States (`status.state`, or the deprecated `state.life_cycle_state`) of a
run that has not ended: Databricks confirms it is going."""


def _name(value: Any) -> str | None:
    """An SDK enum's wire value (`None` stays `None`)."""
    return None if value is None else str(getattr(value, "value", value))


def outcome_of_run(run: Run) -> Outcome | Running | None:
    """The outcome of a run that has ended, `Running` while it is going
    (`progress`: its state), `None` when its state is one this SDK does not
    know (Tether cannot tell)."""
    status, state = run.status, run.state
    life_cycle = _name(state.life_cycle_state) if state else None
    result_state = _name(state.result_state) if state else None
    old_message = (state.state_message if state else None) or ""
    if status is not None and status.state is not None:
        current = _name(status.state)
        if current != "TERMINATED":
            return Running(progress={"state": current}) if current in LIVE_STATES else None
        details = status.termination_details
        code = _name(details.code) if details else None
        message = (details.message if details else None) or old_message
        if code is None:  # a code newer than this SDK: read the deprecated field instead
            code = result_state or "UNKNOWN"
        return _outcome(run, code, message)
    if life_cycle in LIVE_STATES:
        return Running(progress={"state": life_cycle})
    if life_cycle not in FINAL_LIFE_CYCLE_STATES:
        return None  # a state this SDK does not know
    if life_cycle == "SKIPPED":
        return _outcome(run, "SKIPPED", old_message)
    if life_cycle == "INTERNAL_ERROR" and result_state is None:
        return _outcome(run, "INTERNAL_ERROR", old_message)
    return _outcome(run, result_state or "UNKNOWN", old_message)


def _outcome(run: Run, code: str, message: str) -> Outcome:
    result: dict[str, Any] = {"run_id": run.run_id, "termination_code": code}
    if code in SUCCESS_CODES:
        if message:
            result["message"] = message
        return Outcome(status="succeeded", result=result)
    where = f"Databricks run {run.run_id}"
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
