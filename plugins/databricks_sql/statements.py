"""How a SQL statement ended, read from `statement_execution.get_statement`:
pure functions, no I/O.

`status.state` is one of `PENDING` (waiting for the warehouse), `RUNNING`,
`SUCCEEDED` (the manifest and the first chunk of the result are in the
answer), `FAILED` (`status.error` says why), `CANCELED` and `CLOSED` (it
succeeded, and its result was closed since). The SDK turns a state it does
not know into `None`: Tether cannot tell, and keeps checking.

A succeeded statement's result becomes the job's `result`, bounded: the
first chunk's rows only, at most `row_limit` of them and at most the core's
result bound (`TETHER_MAX_RESULT_BYTES`) of JSON in all; whatever is left out
sets `truncated`. Cutting whole rows here keeps the result a table: a result
over the bound would be replaced by the core's marker (a preview of its text).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import msgspec

from core.plugin import ErrorInfo, Outcome, Running, settings_from_env

if TYPE_CHECKING:
    from databricks.sdk.service.sql import ResultManifest, StatementResponse

MAX_RESULT_BYTES = 1 << 20
"""The default of the core's bound on a job's result (1 MiB of JSON)."""
INLINE_LIMIT = 25 << 20
"""Databricks aborts a statement whose `INLINE` result is larger than this
(25 MiB): the `byte_limit` asked for is at most this."""


class CoreBound(msgspec.Struct, frozen=True):
    """The core's setting this backend follows (read, never declared: it is
    the core's)."""

    max_result_bytes: int = MAX_RESULT_BYTES
    """`TETHER_MAX_RESULT_BYTES`."""


def result_bound(env: Mapping[str, str] | None = None) -> int:
    """The bytes of JSON a job's result may take: `TETHER_MAX_RESULT_BYTES`,
    as the core reads it (a value it refuses stops the service at start-up;
    here it counts as the default)."""
    try:
        return max(settings_from_env(CoreBound, "TETHER_", env).max_result_bytes, 1024)
    except ValueError:
        return MAX_RESULT_BYTES


LIVE_STATES = frozenset({"PENDING", "RUNNING"})
FINAL_STATES = frozenset({"SUCCEEDED", "CLOSED", "FAILED", "CANCELED"})


def _name(value: Any) -> str | None:
    """An SDK enum's wire value (`None` stays `None`)."""
    return None if value is None else str(getattr(value, "value", value))


def state_of(statement: StatementResponse) -> str | None:
    """The statement's `status.state`, or `None` when missing or unknown."""
    return _name(statement.status.state) if statement.status else None


def outcome_of_statement(
    statement: StatementResponse,
    statement_id: str,
    row_limit: int,
    max_bytes: int = MAX_RESULT_BYTES,
) -> Outcome | Running | None:
    """The outcome of a statement that has ended, `Running` while it waits
    for the warehouse or runs (`progress`: its state), `None` when its state
    is one this SDK does not know (Tether cannot tell)."""
    state = state_of(statement)
    if state in LIVE_STATES:
        return Running(progress={"state": state})
    if state == "SUCCEEDED":
        result = result_of(statement, statement_id, row_limit, max_bytes)
        return Outcome(status="succeeded", result=result)
    if state == "CLOSED":  # succeeded, but the result is gone: say so rather than show none
        result = {"statement_id": statement_id, "state": state, "columns": [], "rows": []}
        result["message"] = "the statement succeeded; its result was closed before Tether read it"
        return Outcome(status="succeeded", result=result)
    if state not in FINAL_STATES:
        return None
    status = statement.status
    error = status.error if status else None
    message = (error.message if error else None) or ""
    ended: dict[str, Any] = {"statement_id": statement_id, "state": state}
    if status is not None and status.sql_state:
        ended["sql_state"] = status.sql_state
    where = f"Databricks SQL statement {statement_id}"
    if state == "CANCELED":
        text = f"{where} was canceled" + (f": {message}" if message else "")
        return Outcome(
            status="canceled", result=ended, error=ErrorInfo(message=text, type="CANCELED")
        )
    code = (_name(error.error_code) if error else None) or "FAILED"
    text = f"{where} failed" + (f": {message}" if message else "")
    return Outcome(status="failed", result=ended, error=ErrorInfo(message=text, type=code))


def result_of(
    statement: StatementResponse,
    statement_id: str,
    row_limit: int,
    max_bytes: int = MAX_RESULT_BYTES,
) -> dict[str, Any]:
    """A succeeded statement's result as the job keeps it:

    `{"statement_id", "state", "columns": [names], "column_types": [types],
    "rows": [[values]], "row_count", "total_row_count", "truncated"}`.

    Values are as the API's `JSON_ARRAY` format gives them: each a string (a
    number or a date too) or `null`; `column_types` says how to read them.
    `row_count` is the number of rows kept; `total_row_count` the number
    Databricks counted in the result (after `row_limit`), when it says.
    `truncated` is true when rows were left out: by `row_limit` or its byte
    limit (the manifest says so), because the result has more chunks than
    the first, or to keep the result's JSON within `max_bytes`."""
    manifest = statement.manifest
    names, types = _columns(manifest)
    data = (statement.result.data_array if statement.result else None) or []
    truncated = bool(manifest and manifest.truncated) or len(data) > row_limit
    if manifest is not None and (manifest.total_chunk_count or 1) > 1:
        truncated = True
    result: dict[str, Any] = {
        "statement_id": statement_id,
        "state": "SUCCEEDED",
        "columns": names,
        "column_types": types,
        "rows": [],
        "row_count": 0,
        "total_row_count": manifest.total_row_count if manifest else None,
        "truncated": False,  # counted with the longer of its two values
    }
    # Room for the rows once the rest is written (with the longest count).
    room = max_bytes - len(msgspec.json.encode(result)) - len(str(row_limit))
    rows = []
    for row in data[:row_limit]:
        size = len(msgspec.json.encode(row)) + 1  # with the comma before it
        if size > room:
            truncated = True
            break
        room -= size
        rows.append(row)
    result.update(rows=rows, row_count=len(rows), truncated=truncated)
    return result


def _columns(manifest: ResultManifest | None) -> tuple[list[str], list[str]]:
    """The result's column names and types (`type_text`, e.g.
    `DECIMAL(10,2)`, else `type_name`), in the result's order."""
    columns = list(manifest.schema.columns or []) if manifest and manifest.schema else []
    columns.sort(key=lambda c: c.position if c.position is not None else 0)
    names = [c.name or "" for c in columns]
    types = [c.type_text or _name(c.type_name) or "" for c in columns]
    return names, types
